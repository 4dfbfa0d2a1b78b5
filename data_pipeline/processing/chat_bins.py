"""What the chat-format bin builders share (build_sft_bins.py, build_preference_bins.py).

Both render the rows of a raw JSONL split with THE chat template in worker processes (a row that
fails comes back as an error string: it is skipped and counted) and write, per split,
  {split}.bin       token ids, sequences back to back
  {split}.mask.bin  uint8, 1 where the loss applies
  {split}.idx.npy   where the sequences are (each builder's own layout)
then one meta.json: the builder's fields followed by per-split counts. The folder appears
atomically, and a split without one valid row is a UserError.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.jsonl import load_jsonl
from data_pipeline.processing.binfile import token_dtype, write_arrays, write_meta
from data_pipeline.processing.parallel import parallel_map
from data_pipeline.tokenizer.chat_template import render_chat
from data_pipeline.tokenizer.tokenizer import Tokenizer
from utils.errors import UserError
from utils.fs import atomic_dir


@dataclass
class SplitArrays:
    """One split's valid rows as a builder lays them out."""

    tokens: Iterable[np.ndarray]  # token id sequences, written back to back
    masks: Iterable[np.ndarray]  # one uint8 loss mask per sequence
    index: np.ndarray  # saved as {split}.idx.npy
    counts: dict = field(default_factory=dict)  # per-split meta.json entries after the common ones


def build_chat_bins(
    out_dir: Path,
    raw_path: Callable[[str], Path] | None,
    tok: Tokenizer,
    num_workers: int,
    meta: dict,
    *,
    render_chunk: Callable[[Tokenizer, list[dict]], list],
    layout: Callable[[list], SplitArrays],
    item: str,
    count_key: str,
    rows_of: Callable[[str], tuple[str, list]] | None = None,
    strict: bool = False,
) -> dict:
    """Render and write the train and val splits of ``raw_path(split)`` into ``out_dir``
    (or, with ``rows_of(split) -> (name, rows)``, of rows already read). ``strict``: a row that
    fails to render is an error (its message, which names the row, is raised) instead of skipped.

    ``render_chunk(tok, rows)`` runs in the workers and returns a rendered item or an error string
    per row; ``layout(valid_items)`` turns a split's valid items into arrays. ``item`` names a row
    in messages ("conversation"); ``count_key`` is the meta key counting valid rows ("n_examples").
    Returns ``meta`` with each count as {"train": ..., "val": ...}.
    """
    dtype = token_dtype(tok.vocab_size)
    with atomic_dir(out_dir) as tmp:
        for split in ("train", "val"):
            path, rows = rows_of(split) if rows_of is not None else (raw_path(split), load_jsonl(raw_path(split)))
            rendered = parallel_map(render_chunk, rows, str(tok.path), num_workers, desc=f"render {split}")
            good = [r for r in rendered if not isinstance(r, str)]
            errors = [r for r in rendered if isinstance(r, str)]
            if errors and strict:
                raise UserError(f"{errors[0]}. Fix the row, or set data.on_bad_row: skip to skip and count such rows.")
            if not good:
                raise UserError(f"{path}: no valid {item} to build bins from"
                                + (f" (first problem: {errors[0]})" if errors else " (the file is empty)"))
            arrays = layout(good)
            n = write_arrays(tmp / f"{split}.bin", arrays.tokens, dtype)
            write_arrays(tmp / f"{split}.mask.bin", arrays.masks, np.dtype(np.uint8))
            np.save(tmp / f"{split}.idx.npy", arrays.index)
            if errors:
                print(f"{split}: skipped {len(errors)} {item}s (first problem: {errors[0]})")
            counts = {"n_tokens": n, count_key: len(good), "skipped": len(errors), **arrays.counts}
            for key, value in counts.items():
                meta.setdefault(key, {})[split] = value
        write_meta(tmp, meta)
    return meta


# ----------------------------------------------------------------------------- the SFT layout


def sft_meta(tok: Tokenizer) -> dict:
    """The meta.json fields an SFT bin folder starts with (the loader checks the tokenizer hash)."""
    return {"format": "sft", "dtype": token_dtype(tok.vocab_size).name, "vocab_size": tok.vocab_size,
            "pad_id": tok.pad_id, "eos_id": tok.eos_id, "bos_id": tok.bos_id, "stop_ids": list(tok.chat_stop_ids),
            "tokenizer_hash": tok.hash, "tokenizer_path": str(tok.path),
            "chat_format": "data_pipeline.tokenizer.chat_template.render_chat"}


def render_sft_chunk(tok: Tokenizer, rows: list[dict]) -> list:
    """Worker: (ids, mask) arrays per conversation ({"messages": [...]}), or an error string for a bad one."""
    out = []
    for row in rows:
        where = f"{row['where']}: " if "where" in row else ""  # user files name the row in every problem
        try:
            ids, mask = render_chat(tok, row.get("messages"))
        except UserError as err:
            out.append(f"{where}{err}")
            continue
        out.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)) if any(mask)
                   else f"{where}the conversation has no assistant message to learn")
    return out


def layout_examples(good: list) -> SplitArrays:
    """Conversations back to back; the index holds each one's start offset."""
    lengths = np.array([ids.size for ids, _ in good], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    counts = {"n_assistant_tokens": int(sum(int(m.sum()) for _, m in good)),
              "max_example_len": int(lengths.max()), "mean_example_len": round(float(lengths.mean()), 1)}
    return SplitArrays((ids for ids, _ in good), (m for _, m in good), starts, counts)

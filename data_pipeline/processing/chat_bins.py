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
    raw_path: Callable[[str], Path],
    tok: Tokenizer,
    num_workers: int,
    meta: dict,
    *,
    render_chunk: Callable[[Tokenizer, list[dict]], list],
    layout: Callable[[list], SplitArrays],
    item: str,
    count_key: str,
) -> dict:
    """Render and write the train and val splits of ``raw_path(split)`` into ``out_dir``.

    ``render_chunk(tok, rows)`` runs in the workers and returns a rendered item or an error string
    per row; ``layout(valid_items)`` turns a split's valid items into arrays. ``item`` names a row
    in messages ("conversation"); ``count_key`` is the meta key counting valid rows ("n_examples").
    Returns ``meta`` with each count as {"train": ..., "val": ...}.
    """
    dtype = token_dtype(tok.vocab_size)
    with atomic_dir(out_dir) as tmp:
        for split in ("train", "val"):
            path = raw_path(split)
            rendered = parallel_map(render_chunk, load_jsonl(path), str(tok.path), num_workers, desc=f"render {split}")
            good = [r for r in rendered if not isinstance(r, str)]
            errors = [r for r in rendered if isinstance(r, str)]
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

"""SFT bins from your own files, rendered in the model's own chat format and cached by content.

    bin_dir = build_sft_cache("chats.jsonl", "", tok, cache_root="data/cache")   # what finetune/sft.py calls

Rows are read by data_pipeline/user_data.py (JSONL/JSON/Parquet/save_to_disk/hf:name; messages,
ShareGPT or Alpaca), rendered with ``render_chat`` (so the assistant loss mask follows the
tokenizer's template) and written in the layout of data_pipeline/processing/build_sft_bins.py,
which the SFT loader reads. The folder's name is a hash of everything the result depends on (the
files' bytes, the tokenizer and its chat template, the row form and field names), so a second run
with the same inputs starts at once and a changed input never reuses stale tokens.

A bad row is an error naming its file and line (``on_bad_row="error"``), or skipped and counted
(``"skip"``). Without a validation file every 50th row is held out.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from data_pipeline.processing.chat_bins import build_chat_bins, layout_examples, render_sft_chunk, sft_meta
from data_pipeline.user_data import FORMATS, field_names, read_rows, to_messages
from utils.errors import UserError

VAL_EVERY = 50  # without val_path, rows 49, 99, ... are the validation split
CACHE_VERSION = 1  # bump when the rendering or layout changes, so old caches are not reused


def source_digest(source: str) -> str:
    """A hash of a data source's bytes (every file under a folder), or of its hub name."""
    h = hashlib.sha256()
    path = Path(source)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        h.update(source.encode())
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def cache_key(train: str, val: str, tok, fmt: str, fields: dict) -> str:
    template = getattr(tok, "chat_template", None) or "project"
    parts = {"v": CACHE_VERSION, "train": source_digest(train), "val": source_digest(val) if val else "",
             "tokenizer": tok.hash, "template": hashlib.sha256(template.encode()).hexdigest(), "format": fmt,
             "fields": fields}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def build_sft_cache(train: str, val: str, tok, *, fmt: str = "auto", fields: Optional[dict] = None,
                    on_bad_row: str = "error", cache_root: str = "data/cache", num_workers: int = 1) -> Path:
    """The SFT bin folder of ``train`` (+ ``val``) for ``tok``: built once, then reused."""
    if fmt not in FORMATS:
        raise UserError(f"data.format={fmt!r} is not one of {', '.join(FORMATS)}.")
    if on_bad_row not in ("error", "skip"):
        raise UserError(f"data.on_bad_row={on_bad_row!r} is not one of error, skip.")
    fields = field_names(fields)
    out = Path(cache_root) / f"sft-{cache_key(train, val, tok, fmt, fields)}"
    if (out / "meta.json").is_file():
        print(f"sft data: reusing the tokenized cache {out} ({train})")
        return out
    splits = _messages_by_split(train, val, fmt, fields, on_bad_row)
    build_chat_bins(out, None, tok, num_workers, {**sft_meta(tok), "source": {"train": train, "val": val or None}},
                    render_chunk=render_sft_chunk, layout=layout_examples, item="conversation", count_key="n_examples",
                    rows_of=lambda split: splits[split], strict=on_bad_row == "error")
    print(f"sft data: {train} tokenized with {tok.path} -> {out}")
    return out


def _messages_by_split(train: str, val: str, fmt: str, fields: dict, on_bad_row: str) -> dict:
    """{split: (name, [{"messages": ...}, ...])}, converting every row (bad rows: error or skip)."""
    def convert(source: str, split: str) -> list[tuple[str, dict]]:
        rows, skipped = [], []
        for where, row in read_rows(source, split):
            try:
                rows.append((where, {"messages": to_messages(row, fmt, fields), "where": where}))
            except UserError as err:
                if on_bad_row == "error":
                    raise UserError(f"{where}: {err}. Fix the row, or set data.on_bad_row: skip to skip and count "
                                    "such rows.") from None
                skipped.append(where)
        if skipped:
            print(f"sft data: skipped {len(skipped)} bad row(s) of {source} (first: {skipped[0]})")
        return rows

    train_rows = convert(train, "train")
    if val:
        val_rows = convert(val, "validation" if Path(val).is_dir() or val.startswith("hf:") else "val")
    else:
        val_rows = [r for i, r in enumerate(train_rows) if i % VAL_EVERY == VAL_EVERY - 1]
        train_rows = [r for i, r in enumerate(train_rows) if i % VAL_EVERY != VAL_EVERY - 1] or train_rows
        val_rows = val_rows or train_rows[-1:]
    return {"train": (train, [r for _, r in train_rows]), "val": (val or f"{train} (every {VAL_EVERY}th row)",
                                                              [r for _, r in val_rows])}

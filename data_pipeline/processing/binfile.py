"""Token bins on disk: flat ``.bin`` arrays (memmap-able) described by a ``meta.json``.

A bin folder holds ``{split}.bin`` (token ids, dtype uint16 when the vocab has
fewer than 65536 ids, else uint32) plus stage-specific side files, and one
``meta.json`` with the dtype, counts and the hash of the tokenizer that made it.
Readers check the file sizes against the meta (a truncated or corrupted file is
a UserError, never silent garbage) and, when asked, the tokenizer hash.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from utils.errors import UserError


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 if every id fits (vocab < 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def write_arrays(path: str | os.PathLike, arrays: Iterable[np.ndarray], dtype: np.dtype) -> int:
    """Stream ``arrays`` into one flat binary file of ``dtype``; return the element count."""
    n = 0
    with open(path, "wb") as f:
        for a in arrays:
            a = np.asarray(a)
            if a.size and (a.min() < 0 or a.max() > np.iinfo(dtype).max):
                raise ValueError(f"value out of range for {dtype}")
            f.write(a.astype(dtype, copy=False).tobytes())
            n += a.size
    return n


def write_meta(folder: str | os.PathLike, meta: dict) -> None:
    Path(folder, "meta.json").write_text(json.dumps(meta, indent=1))


def read_meta(folder: str | os.PathLike, rebuild_hint: str) -> dict:
    """The meta.json of a bin folder; UserError naming ``rebuild_hint`` when missing or broken."""
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise UserError(f"{path} does not exist; build the bins first with {rebuild_hint}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is corrupted (not valid JSON); rebuild it with {rebuild_hint}") from None


def open_array(path: str | os.PathLike, dtype: np.dtype | str, count: int, rebuild_hint: str) -> np.memmap:
    """Memory-map ``path`` read-only after checking it holds exactly ``count`` items of ``dtype``."""
    path, dtype = Path(path), np.dtype(dtype)
    if not path.is_file():
        raise UserError(f"{path} does not exist; build it with {rebuild_hint}")
    size, expected = path.stat().st_size, count * dtype.itemsize
    if size != expected:
        raise UserError(f"{path} is corrupted or truncated: {size} bytes, but its meta.json says "
                        f"{count} x {dtype} = {expected} bytes; rebuild it with {rebuild_hint}")
    if count == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def check_tokenizer_hash(meta: dict, expect_hash: str | None, where: str, rebuild_hint: str) -> None:
    """UserError when the bins were made by a different tokenizer than ``expect_hash``."""
    if expect_hash is not None and meta.get("tokenizer_hash") != expect_hash:
        raise UserError(f"{where} was built with tokenizer {meta.get('tokenizer_hash')} but the "
                        f"current tokenizer is {expect_hash}; the token ids would not match. "
                        f"Rebuild the bins with {rebuild_hint} (or use the tokenizer they were built with)")

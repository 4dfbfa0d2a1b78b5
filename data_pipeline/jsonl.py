"""Read and write JSON-lines files (one JSON object per line), with clear errors."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from utils.fs import atomic_path
from utils.errors import UserError


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Yield one dict per non-empty line of ``path``.

    Raises UserError when the file is missing, is not UTF-8, or has a line that
    is not a JSON object (the message names the file and the line number).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; run the downloader that writes it first "
                        "(see docs/DATA.md, 'Data pipeline')")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{path} line {lineno} is not valid UTF-8 ({err.reason} at byte "
                                f"{err.start}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {lineno} is not valid JSON ({err.msg}); "
                                "each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {lineno} is a JSON {type(row).__name__}, "
                                "expected an object like {\"text\": ...}")
            yield row


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    """Return all rows of a JSON-lines file as a list of dicts (see ``iter_jsonl``)."""
    return list(iter_jsonl(path))


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write ``rows`` to ``path`` atomically (temp file + rename); return the row count."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n

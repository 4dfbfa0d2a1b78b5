"""Write an eval's results: a JSON summary and one JSON line per example.

Both files are written to a temp file in the same directory and renamed into
place, so a crash mid-run never leaves a half-written result that looks complete.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable


def _write_temp(path: Path, write) -> str:
    """Call write(f) on a fsynced temp file beside `path`; return its name (removed on error)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def write_results(out_dir: str | os.PathLike, name: str, summary: dict,
                  records: Iterable[dict]) -> tuple[Path, Path]:
    """Write `{out_dir}/{name}_summary.json` and `{out_dir}/{name}_records.jsonl`.

    Args:
        out_dir: created if missing.
        name: the eval's name, e.g. "gsm8k".
        summary: JSON-serialisable metrics (accuracy, pass@k, config, ...).
        records: one JSON-serialisable dict per example (prompt, output, score, ...).
    Returns:
        (summary_path, records_path).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / f"{name}_summary.json"
    records_path = out / f"{name}_records.jsonl"

    def write_records(f):
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    # Serialise both before renaming either, so a failure leaves the old pair intact;
    # records are renamed first, so a summary on disk implies its records are complete.
    records_tmp = _write_temp(records_path, write_records)
    try:
        summary_tmp = _write_temp(
            summary_path, lambda f: f.write(json.dumps(summary, indent=2, ensure_ascii=False) + "\n"))
    except BaseException:
        os.unlink(records_tmp)
        raise
    os.replace(records_tmp, records_path)
    os.replace(summary_tmp, summary_path)
    return summary_path, records_path

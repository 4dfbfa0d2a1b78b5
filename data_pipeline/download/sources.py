"""Where a downloader's data comes from: the HF hub (streaming), a local file, or the synthetic default.

``resolve_source`` turns the --source / --local_path flags into one of
"hf", "local", "synthetic", checking the hub with a short timeout.
``read_local`` reads a file in its original format (jsonl, json, txt, parquet).
``hf_rows`` streams rows of a hub dataset through HF ``datasets``.
"""
from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from data_pipeline.jsonl import iter_jsonl
from utils.errors import UserError


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to the HF hub opens within ``timeout`` seconds.

    DNS lookups ignore socket timeouts, so the whole check runs in a daemon thread.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    ok = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def resolve_source(source: str | None, local_path: str | None) -> str:
    """Return "hf", "local" or "synthetic" from the --source/--local_path flags.

    No --source: local when --local_path is given, else hf when the hub answers,
    else synthetic (printing one line). --source hf offline is a UserError that
    names the two offline options.
    """
    if source == "local" or (source is None and local_path):
        if not local_path:
            raise UserError("--source local needs --local_path FILE (jsonl, json, txt or parquet)")
        if not Path(local_path).exists():
            raise UserError(f"--local_path {local_path} does not exist")
        return "local"
    if source == "synthetic":
        return "synthetic"
    if hub_reachable():
        return "hf"
    if source == "hf":
        raise UserError("cannot reach the Hugging Face hub for --source hf (no network?); run offline "
                        "with --source synthetic (the embedded generated corpus) or with "
                        "--source local --local_path FILE (your copy of the data)")
    print("the Hugging Face hub is unreachable: using --source synthetic (the embedded offline corpus)")
    return "synthetic"


def read_local(path: str | os.PathLike) -> list[dict]:
    """Rows of a local file; a .txt file gives {"text": doc} per document.

    Text files split on ``<|endoftext|>`` when present (TinyStories' txt
    layout), else on blank lines. UserError for a missing, non-UTF-8 or empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = list(iter_jsonl(path))
    elif suffix in (".json", ".txt"):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{path} is not valid UTF-8 ({err.reason} at byte {err.start}); "
                            "re-encode it as UTF-8") from None
        if suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise UserError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
            rows = data if isinstance(data, list) else next(
                (v for v in data.values() if isinstance(v, list)), []) if isinstance(data, dict) else []
        else:
            sep = "<|endoftext|>" if "<|endoftext|>" in text else "\n\n"
            rows = [{"text": d.strip()} for d in text.split(sep) if d.strip()]
    elif suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(path).to_pylist()
        except (pyarrow.ArrowException, OSError) as err:
            raise UserError(f"{path} is not a readable Parquet file ({err}); check the file, or convert it "
                            "to .jsonl") from None
    else:
        raise UserError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .txt or .parquet")
    if not rows:
        raise UserError(f"{path} holds no records (empty corpus)")
    return rows


def hf_rows(name: str, split: str, config: str | None = None, limit: int | None = None) -> Iterator[dict]:
    """Stream up to ``limit`` rows of a hub dataset (HF ``datasets``, streaming=True)."""
    from datasets import load_dataset
    ds = load_dataset(name, config, split=split, streaming=True)
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        yield row


def split_every(rows: list, every: int) -> tuple[list, list]:
    """(train, val): every ``every``-th row (by index) goes to val, deterministic."""
    return ([r for i, r in enumerate(rows) if i % every != every - 1],
            [r for i, r in enumerate(rows) if i % every == every - 1])

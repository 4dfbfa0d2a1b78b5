"""Loaders for the eval sets: GSM8K, MMLU, HumanEval, each from one of three sources.

- ``hf``: the real sets through HF ``datasets`` (streaming, so ``limit`` reads little):
  GSM8K "openai/gsm8k" (main, test), MMLU "cais/mmlu" (all, dev + test),
  HumanEval "openai/openai_humaneval" (test).
- ``local``: copies in their original formats under ``data_path``:
  GSM8K a .jsonl/.parquet file (or a dir holding test.jsonl) with question/answer;
  MMLU a dir of headerless per-subject CSVs ``{subject}_dev.csv``/``{subject}_test.csv``
  (the original tarball, subdirs allowed) or dev*/test* .jsonl/.parquet files with
  subject/question/choices/answer (the HF layout); HumanEval a .jsonl(.gz)/.parquet file.
- ``synthetic``: the project's embedded sets, written by
  ``data_pipeline/download/download_prompts.py`` under ``data/eval/``.

Every loader returns plain lists of dicts in the HF record layout:
GSM8K {"question", "answer"}; MMLU {"subject", "question", "choices": [4 str],
"answer": int 0-3}; HumanEval {"task_id", "prompt", "canonical_solution", "test", "entry_point"}.
"""
from __future__ import annotations

import csv
import gzip
import itertools
import json
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Iterable, Optional

from utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_DIR = REPO_ROOT / "data" / "eval"
SOURCES = ("hf", "local", "synthetic")
LETTERS = "ABCD"
DOWNLOAD_CMD = "python data_pipeline/download/download_prompts.py"

GSM8K_FIELDS = ("question", "answer")
MMLU_FIELDS = ("subject", "question", "choices", "answer")
HUMANEVAL_FIELDS = ("task_id", "prompt", "test", "entry_point")


# ----------------------------------------------------------------------------- helpers

def _check_source(source: str, data_path: Optional[str]) -> None:
    if source not in SOURCES:
        raise UserError(f"unknown --source {source!r}; use one of {', '.join(SOURCES)}")
    if source == "local":
        if not data_path:
            raise UserError("--source local needs --data_path pointing at your copy of the eval set")
        if not Path(data_path).exists():
            raise UserError(f"--data_path {data_path} does not exist; point it at your copy of the eval set")


def _read_records(path: Path) -> list[dict]:
    """Rows of a .jsonl / .jsonl.gz / .json (list) / .parquet file as dicts."""
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq
            return pq.read_table(path).to_pylist()
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            if name.endswith(".json"):
                data = json.load(f)
                return data if isinstance(data, list) else [data]
            return [json.loads(line) for line in f if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise UserError(f"cannot read {path}: {err}; expected JSON lines (one object per line) "
                        "or parquet") from err
    except Exception as err:  # pyarrow's own errors: not an importable common base
        raise UserError(f"cannot read {path}: {type(err).__name__}: {err}") from err


def _require_fields(records: list[dict], fields: Iterable[str], where: str) -> None:
    for i, r in enumerate(records):
        missing = [f for f in fields if f not in r]
        if missing:
            raise UserError(f"{where}: record {i} lacks field(s) {missing}; "
                            f"it has {sorted(r)} (expected {list(fields)})")


def _take(records: Iterable[dict], limit: Optional[int]) -> list[dict]:
    return [dict(r) for r in itertools.islice(records, limit)]


def _synthetic_path(*parts: str) -> Path:
    path = SYNTHETIC_DIR.joinpath(*parts)
    if not path.exists():
        raise UserError(f"the synthetic eval set {path} is missing; create it with `{DOWNLOAD_CMD}` "
                        "(or use --source hf / --source local --data_path ...)")
    return path


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick TCP probe of the Hub, so no network fails in seconds, not after retries."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True  # a proxy may reach what a direct connection cannot: let datasets try
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _offline_error(name: str, detail: str) -> UserError:
    return UserError(f"cannot load {name} from the HuggingFace Hub ({detail}). Offline, run with "
                     f"--source synthetic (the embedded set; create it with `{DOWNLOAD_CMD}`) or "
                     f"--source local --data_path <your copy in the original format>")


def _import_hf_datasets():
    """HuggingFace `datasets`, imported only when the hf source is used."""
    import datasets

    return datasets


def _hf_stream(name: str, config: Optional[str], split: str):
    """Streaming iterator over a Hub split; any failure to reach it is a UserError."""
    offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    if not offline and not _hub_reachable():
        raise _offline_error(name, "no network connection to huggingface.co")
    datasets = _import_hf_datasets()
    try:
        # Offline mode can still serve a cached copy, which streaming never uses.
        return iter(datasets.load_dataset(name, config, split=split, streaming=not offline))
    except Exception as err:  # ConnectionError, DatasetNotFoundError, HTTP errors, ...
        raise _offline_error(name, f"{type(err).__name__}: {str(err)[:200]}") from err


# ----------------------------------------------------------------------------- GSM8K

def load_gsm8k(source: str, data_path: Optional[str] = None, limit: Optional[int] = None) -> list[dict]:
    """GSM8K test problems [{"question", "answer"}] (answer ends in "#### <number>").

    limit: keep the first `limit` problems.
    """
    _check_source(source, data_path)
    if source == "hf":
        return _take(_hf_stream("openai/gsm8k", "main", "test"), limit)
    if source == "local":
        path = Path(data_path)
        if path.is_dir():
            path = path / "test.jsonl"
            if not path.exists():
                raise UserError(f"--data_path {data_path} is a directory without test.jsonl; "
                                "point it at the GSM8K test .jsonl or .parquet file")
    else:
        path = _synthetic_path("gsm8k_test.jsonl")
    records = _read_records(path)
    _require_fields(records, GSM8K_FIELDS, str(path))
    return _take(records, limit)


# ----------------------------------------------------------------------------- MMLU

def _normalise_mmlu(r: dict, where: str) -> dict:
    """HF layout with answer as int 0-3 (accepts a letter too); 4 choices."""
    choices = list(r["choices"])
    answer = r["answer"]
    if isinstance(answer, str):
        answer = LETTERS.index(answer.strip().upper()) if answer.strip().upper() in LETTERS else answer
    if len(choices) != 4 or not isinstance(answer, int) or not 0 <= answer <= 3:
        raise UserError(f"{where}: MMLU record {r.get('question', '')[:60]!r} needs 4 choices and "
                        f"an answer 0-3 or A-D; got {len(choices)} choices, answer {r['answer']!r}")
    return {"subject": r["subject"], "question": r["question"], "choices": choices, "answer": answer}


def _read_mmlu_csv(path: Path, subject: str) -> list[dict]:
    """Original Hendrycks CSV: no header; question, A, B, C, D, answer letter."""
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if len(row) != 6:
                raise UserError(f"{path}:{line_no}: expected 6 columns (question,A,B,C,D,answer), "
                                f"got {len(row)}")
            out.append(_normalise_mmlu({"subject": subject, "question": row[0],
                                        "choices": row[1:5], "answer": row[5]}, f"{path}:{line_no}"))
    return out


def _load_mmlu_dir(root: Path) -> tuple[list[dict], list[dict]]:
    """dev and test records from a local MMLU copy (CSV per subject, or dev*/test* files)."""
    splits: dict[str, list[dict]] = {"dev": [], "test": []}
    csvs = sorted(root.rglob("*.csv"))
    if csvs:
        for path in csvs:
            stem = path.stem
            for split in splits:
                if stem.endswith("_" + split):
                    splits[split] += _read_mmlu_csv(path, stem[: -len(split) - 1])
    else:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            split = next((s for s in splits if path.name.startswith(s)), None)
            if split and path.name.endswith((".jsonl", ".jsonl.gz", ".json", ".parquet")):
                records = _read_records(path)
                _require_fields(records, MMLU_FIELDS, str(path))
                splits[split] += [_normalise_mmlu(r, str(path)) for r in records]
    if not splits["dev"] or not splits["test"]:
        raise UserError(f"--data_path {root}: found {len(splits['dev'])} dev and {len(splits['test'])} "
                        "test MMLU questions; expected {subject}_dev.csv / {subject}_test.csv files "
                        "(original format) or dev*/test* .jsonl/.parquet files (HF layout)")
    return splits["dev"], splits["test"]


def _limit_per_subject(records: list[dict], limit: Optional[int]) -> list[dict]:
    if limit is None:
        return records
    seen: dict[str, int] = {}
    out = []
    for r in records:
        if seen.get(r["subject"], 0) < limit:
            seen[r["subject"]] = seen.get(r["subject"], 0) + 1
            out.append(r)
    return out


def load_mmlu(source: str, data_path: Optional[str] = None,
              limit: Optional[int] = None) -> tuple[list[dict], list[dict]]:
    """MMLU (dev, test): dev holds the few-shot examples (5 per subject in the original).

    limit: keep the first `limit` test questions of every subject (as lm-eval-harness's
    --limit does per subtask), so a quick run still covers all subjects.
    """
    _check_source(source, data_path)
    if source == "hf":
        dev = [_normalise_mmlu(r, "cais/mmlu") for r in _hf_stream("cais/mmlu", "all", "dev")]
        test = [_normalise_mmlu(r, "cais/mmlu") for r in _hf_stream("cais/mmlu", "all", "test")]
    elif source == "local":
        root = Path(data_path)
        if not root.is_dir():
            raise UserError(f"--data_path {data_path} must be a directory for MMLU "
                            "(per-subject CSVs, or dev/test .jsonl/.parquet files)")
        dev, test = _load_mmlu_dir(root)
    else:
        dev, test = [], []
        for split, out in (("dev", dev), ("test", test)):
            path = _synthetic_path("mmlu", f"{split}.jsonl")
            records = _read_records(path)
            _require_fields(records, MMLU_FIELDS, str(path))
            out += [_normalise_mmlu(r, str(path)) for r in records]
    return dev, _limit_per_subject(test, limit)


# ----------------------------------------------------------------------------- HumanEval

def load_humaneval(source: str, data_path: Optional[str] = None, limit: Optional[int] = None) -> list[dict]:
    """HumanEval problems [{"task_id", "prompt", "canonical_solution", "test", "entry_point"}].

    limit: keep the first `limit` problems.
    """
    _check_source(source, data_path)
    if source == "hf":
        return _take(_hf_stream("openai/openai_humaneval", None, "test"), limit)
    path = Path(data_path) if source == "local" else _synthetic_path("humaneval.jsonl")
    if path.is_dir():
        raise UserError(f"--data_path {data_path} is a directory; point it at HumanEval.jsonl(.gz)")
    records = _read_records(path)
    _require_fields(records, HUMANEVAL_FIELDS, str(path))
    return _take(records, limit)

"""Loaders for the eval sets: GSM8K, MMLU, HumanEval, each from one of three sources.

- ``hf``: the real sets through HF ``datasets`` (streaming, so ``limit`` reads little):
  GSM8K "openai/gsm8k" (main, test), MMLU "cais/mmlu" (all, dev + test),
  HumanEval "openai/openai_humaneval" (test).
- ``local``: your copy under ``data_path``, in the layout its publisher ships (the original
  GSM8K test.jsonl, MMLU's data/ folder of per-subject CSVs or a cais/mmlu snapshot,
  HumanEval.jsonl.gz, HF snapshots); read and checked by data_pipeline/download/eval_files.py,
  which download_prompts.py --eval_local_dir shares. A data_path with another source is an error.
- ``synthetic``: the project's embedded sets, written by
  ``data_pipeline/download/download_prompts.py`` under ``data/eval/``.

Every loader returns plain lists of dicts in the HF record layout, checked whatever the source:
GSM8K {"question", "answer" ending "#### N"}; MMLU {"subject", "question", "choices": [4 str],
"answer": int 0-3}; HumanEval {"task_id", "prompt", "canonical_solution", "test", "entry_point"}.
"""
from __future__ import annotations

import itertools
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Iterable, Optional

from data_pipeline.download.eval_files import (MMLU_FIELDS, gsm8k_problems, humaneval_tasks, mmlu_question,
                                               read_gsm8k, read_humaneval, read_mmlu, read_records, require_fields)
from utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_DIR = REPO_ROOT / "data" / "eval"
SOURCES = ("hf", "local", "synthetic")
DOWNLOAD_CMD = "python data_pipeline/download/download_prompts.py"


# ----------------------------------------------------------------------------- helpers

def _check_source(source: str, data_path: Optional[str]) -> None:
    if source not in SOURCES:
        raise UserError(f"unknown --source {source!r}; use one of {', '.join(SOURCES)}")
    if source == "local":
        if not data_path:
            raise UserError("--source local needs --data_path pointing at your copy of the eval set")
        if not Path(data_path).exists():
            raise UserError(f"--data_path {data_path} does not exist; point it at your copy of the eval set")
    elif data_path:
        raise UserError(f"--data_path {data_path} with --source {source}: a data path is read only with "
                        "--source local; drop --source (a data path alone means local) or set it to local")


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
        return gsm8k_problems(_take(_hf_stream("openai/gsm8k", "main", "test"), limit), "openai/gsm8k")
    if source == "local":
        return _take(read_gsm8k(data_path), limit)
    path = _synthetic_path("gsm8k_test.jsonl")
    return _take(gsm8k_problems(read_records(path), str(path)), limit)


# ----------------------------------------------------------------------------- MMLU

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
        dev = [mmlu_question(r, "cais/mmlu") for r in _hf_stream("cais/mmlu", "all", "dev")]
        test = [mmlu_question(r, "cais/mmlu") for r in _hf_stream("cais/mmlu", "all", "test")]
    elif source == "local":
        dev, test = read_mmlu(data_path)
    else:
        dev, test = [], []
        for split, out in (("dev", dev), ("test", test)):
            path = _synthetic_path("mmlu", f"{split}.jsonl")
            records = read_records(path)
            require_fields(records, MMLU_FIELDS, str(path))
            out += [mmlu_question(r, str(path)) for r in records]
    return dev, _limit_per_subject(test, limit)


# ----------------------------------------------------------------------------- HumanEval

def load_humaneval(source: str, data_path: Optional[str] = None, limit: Optional[int] = None) -> list[dict]:
    """HumanEval problems [{"task_id", "prompt", "canonical_solution", "test", "entry_point"}].

    limit: keep the first `limit` problems.
    """
    _check_source(source, data_path)
    if source == "hf":
        return humaneval_tasks(_take(_hf_stream("openai/openai_humaneval", None, "test"), limit),
                               "openai/openai_humaneval")
    if source == "local":
        return _take(read_humaneval(data_path), limit)
    path = _synthetic_path("humaneval.jsonl")
    return _take(humaneval_tasks(read_records(path), str(path)), limit)

"""The real eval sets' files, read in the layouts their publishers ship and checked row by row.

The eval scripts (``--source local --data_path``) and ``download_prompts.py --eval_local_dir``
both read through here, so they accept the same files and reject the same mistakes:

- GSM8K: a .jsonl/.jsonl.gz/.json/.parquet file of {"question", "answer"} whose answer ends in
  ``#### N`` (the original ``test.jsonl``); or a folder holding ``test.jsonl`` or an HF snapshot's
  ``main/test-*.parquet``. A bare number as the answer (72, "72") is taken as ``#### 72``.
- MMLU: a folder. The original tarball: ``data/{dev,val,test,auxiliary_train}/<subject>_<split>.csv``,
  no header row: question, A, B, C, D, answer letter (a header naming those columns is read by
  name). Or the HF layout: dev*/test* .jsonl/.parquet files with subject/question/choices/answer
  (0-3 or A-D); in a cais/mmlu snapshot only ``all/`` is read, since the per-subject folders beside
  it repeat its questions.
- HumanEval: ``HumanEval.jsonl.gz`` (or .jsonl/.parquet), or a folder holding one.

Records come back in the HF layout: GSM8K {"question", "answer"}; MMLU {"subject", "question",
"choices": [4 str], "answer": int 0-3}; HumanEval {"task_id", "prompt", "canonical_solution",
"test", "entry_point"}.
"""
from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from collections.abc import Iterable

from data_pipeline.answer import extract_hash_answer, normalize_number
from utils.errors import UserError

LETTERS = "ABCD"
GSM8K_FIELDS = ("question", "answer")
MMLU_FIELDS = ("subject", "question", "choices", "answer")
HUMANEVAL_FIELDS = ("task_id", "prompt", "test", "entry_point")
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
# Where a folder may hold each set (first match wins): the original names, then HF snapshots'.
GSM8K_NAMES = ("test.jsonl", "main/test-*.parquet", "test-*.parquet")
HUMANEVAL_NAMES = ("HumanEval.jsonl.gz", "HumanEval.jsonl", "humaneval.jsonl", "openai_humaneval/test-*.parquet",
                   "test-*.parquet")
TARBALL_FOLDERS = ("dev", "val", "test", "auxiliary_train")  # MMLU's data.tar


# ----------------------------------------------------------------------------- files

def read_records(path: Path) -> list[dict]:
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


def require_fields(records: list[dict], fields: Iterable[str], where: str) -> None:
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise UserError(f"{where}: record {i} is {type(r).__name__}, not an object with fields {list(fields)}")
        missing = [f for f in fields if f not in r]
        if missing:
            raise UserError(f"{where}: record {i} lacks field(s) {missing}; "
                            f"it has {sorted(r)} (expected {list(fields)})")


def find_files(root: Path, patterns: Iterable[str]) -> list[Path]:
    """The files of the first pattern (glob, relative to root) that matches any; [] if none does."""
    for pattern in patterns:
        found = sorted(p for p in root.glob(pattern) if p.is_file())
        if found:
            return found
    return []


def _files_or_folder(path: Path, patterns: tuple[str, ...], what: str) -> list[Path]:
    if not path.exists():
        raise UserError(f"{path} does not exist; point it at your copy of {what}")
    if path.is_file():
        return [path]
    files = find_files(path, patterns)
    if not files:
        raise UserError(f"{path} is a folder without {what}; looked for {', '.join(patterns)}")
    return files


# ----------------------------------------------------------------------------- GSM8K

def gsm8k_problem(row: dict) -> dict | str:
    """{"question", "answer" ending in '#### N'}, or why the row is not a GSM8K problem.

    A bare number (72, 1.5, "1,234") is the gold answer itself and becomes "#### 72"."""
    question, answer = row.get("question"), row.get("answer")
    if "choices" in row:  # MMLU's records also have a question and an integer answer
        return "a multiple-choice record (it has choices), not a GSM8K problem"
    if not isinstance(question, str) or not question.strip():
        return "no question text"
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = f"#### {answer}"
    elif isinstance(answer, str) and extract_hash_answer(answer) is None and normalize_number(answer) is not None:
        answer = f"#### {answer.strip()}"
    if not isinstance(answer, str) or extract_hash_answer(answer) is None:
        return f"the answer {str(answer)[-80:]!r} does not end in '#### <number>'"
    return {"question": question, "answer": answer}


def gsm8k_problems(records: list[dict], where: str) -> list[dict]:
    """Every record as a checked GSM8K problem; one UserError naming the rows that are not."""
    require_fields(records, GSM8K_FIELDS, where)
    problems = [gsm8k_problem(r) for r in records]
    bad = [i for i, p in enumerate(problems) if isinstance(p, str)]
    if bad:
        raise UserError(f"{where}: {len(bad)} of {len(records)} rows are not GSM8K problems (first: row {bad[0]}, "
                        f"{problems[bad[0]]}); a GSM8K answer is the worked solution ending in a line "
                        "'#### 72', or the bare number")
    return problems


def read_gsm8k(path: str | Path) -> list[dict]:
    """GSM8K problems from a file, or a folder holding test.jsonl (or an HF snapshot of openai/gsm8k)."""
    files = _files_or_folder(Path(path), GSM8K_NAMES, "the GSM8K test set (test.jsonl)")
    return [p for f in files for p in gsm8k_problems(read_records(f), str(f))]


# ----------------------------------------------------------------------------- MMLU

def mmlu_question(r: dict, where: str) -> dict:
    """HF layout with answer as int 0-3 (a letter A-D is accepted too); 4 choices."""
    answer = r["answer"]
    if isinstance(answer, str) and answer.strip().upper() in tuple(LETTERS):
        answer = LETTERS.index(answer.strip().upper())
    choices = r["choices"]
    choices = list(choices) if isinstance(choices, (list, tuple)) else None
    if choices is None or len(choices) != 4 or isinstance(answer, bool) or not isinstance(answer, int) \
            or not 0 <= answer <= 3:
        n = "not a list of" if choices is None else len(choices)
        raise UserError(f"{where}: MMLU record {str(r.get('question', ''))[:60]!r} needs 4 choices and "
                        f"an answer 0-3 or A-D; got {n} choices, answer {r['answer']!r}")
    return {"subject": r["subject"], "question": r["question"], "choices": choices, "answer": answer}


def _is_header(row: list[str]) -> bool:
    """A first row that names columns rather than asking a question."""
    names = {cell.strip().lower() for cell in row}
    return row[-1].strip().upper() not in tuple(LETTERS) and bool(names & {"question", "input", "answer", "target"})


def _csv_columns(header: list[str], path: Path) -> list[int]:
    """Column indices of question, A, B, C, D, answer in a header row (lm-eval's input/target too)."""
    names = [h.strip().lower() for h in header]
    wanted = [("question", "input"), ("a",), ("b",), ("c",), ("d",), ("answer", "target")]
    cols = [next((names.index(n) for n in options if n in names), None) for options in wanted]
    if None in cols:
        raise UserError(f"{path}:1: a header row {header} without the columns question (or input), A, B, C, D "
                        "and answer (or target); the original MMLU CSVs have no header: each row is "
                        "question,A,B,C,D,answer letter")
    return cols


def read_mmlu_csv(path: Path, subject: str) -> list[dict]:
    """One subject's CSV: no header (question, A, B, C, D, answer letter), or a header naming those."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [(i, row) for i, row in enumerate(csv.reader(f), start=1) if row]
    cols = list(range(6))
    if rows and _is_header(rows[0][1]):
        cols = _csv_columns(rows.pop(0)[1], path)
    out = []
    for line_no, row in rows:
        if len(row) < max(cols) + 1 or (cols == list(range(6)) and len(row) != 6):
            raise UserError(f"{path}:{line_no}: expected 6 columns (question,A,B,C,D,answer), got {len(row)}")
        question, *choices, answer = (row[c] for c in cols)
        if answer.strip().isdigit():
            raise UserError(f"{path}:{line_no}: the answer is the number {answer!r}; MMLU CSVs give the letter "
                            "(A-D), and a number could count from 0 or from 1: write the answer column as letters")
        out.append(mmlu_question({"subject": subject, "question": question, "choices": choices, "answer": answer},
                                 f"{path}:{line_no}"))
    return out


def _visible(path: Path, root: Path) -> bool:
    """Not inside a hidden folder (a snapshot's .cache/ holds copies of its file names)."""
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _mmlu_csvs(root: Path) -> list[tuple[str, str, Path]]:
    """(split, subject, path) of every <subject>_dev.csv / <subject>_test.csv under root.

    A CSV inside one of the tarball's folders belongs to that folder's split only:
    auxiliary_train/mc_test.csv is MCTest training data, not the test split of a subject "mc"."""
    out = []
    for path in sorted(p for p in root.rglob("*.csv") if _visible(p, root)):
        split = next((s for s in ("dev", "test") if path.stem.endswith("_" + s)), None)
        folder = path.parent.name if path.parent != root else None
        if split and (folder not in TARBALL_FOLDERS or folder == split):
            out.append((split, path.stem[: -len(split) - 1], path))
    return out


def _mmlu_record_files(root: Path) -> list[tuple[str, Path]]:
    """(split, path) of the dev*/test* record files of the HF layout; only all/ when a snapshot has it."""
    if find_files(root / "all", [f"{s}*{x}" for s in ("dev", "test") for x in RECORD_SUFFIXES]):
        root = root / "all"
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and _visible(p, root)):
        split = next((s for s in ("dev", "test") if path.name.startswith(s)), None)
        if split and path.name.endswith(RECORD_SUFFIXES):
            out.append((split, path))
    return out


def read_mmlu(root: str | Path) -> tuple[list[dict], list[dict]]:
    """(dev, test) from a local MMLU folder: the original CSVs, or the HF layout's record files."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} must be a folder for MMLU (the original data/ of per-subject CSVs, "
                        "or an HF snapshot / dev and test .jsonl/.parquet files)")
    splits: dict[str, list[dict]] = {"dev": [], "test": []}
    csvs = _mmlu_csvs(root)
    for split, subject, path in csvs:
        splits[split] += read_mmlu_csv(path, subject)
    if not csvs:
        for split, path in _mmlu_record_files(root):
            records = read_records(path)
            require_fields(records, MMLU_FIELDS, str(path))
            splits[split] += [mmlu_question(r, str(path)) for r in records]
    if not splits["dev"] or not splits["test"]:
        raise UserError(f"{root}: found {len(splits['dev'])} dev and {len(splits['test'])} test MMLU questions; "
                        "expected {subject}_dev.csv / {subject}_test.csv files (the original data/ folder) "
                        "or dev*/test* .jsonl/.parquet files (HF layout)")
    return splits["dev"], splits["test"]


# ----------------------------------------------------------------------------- HumanEval

def humaneval_tasks(records: list[dict], where: str) -> list[dict]:
    """The records, checked: the fields as strings, every task_id once (completions are keyed by it)."""
    require_fields(records, HUMANEVAL_FIELDS, where)
    seen = set()
    for i, r in enumerate(records):
        wrong = [f for f in HUMANEVAL_FIELDS if not isinstance(r[f], str)]
        if wrong:
            raise UserError(f"{where}: record {i} has non-text field(s) {wrong}")
        if r["task_id"] in seen:
            raise UserError(f"{where}: task {r['task_id']!r} appears twice; each task_id must be unique")
        seen.add(r["task_id"])
    return records


def read_humaneval(path: str | Path) -> list[dict]:
    """HumanEval tasks from HumanEval.jsonl.gz (or .jsonl/.parquet), or a folder holding one."""
    files = _files_or_folder(Path(path), HUMANEVAL_NAMES, "HumanEval (HumanEval.jsonl.gz)")
    return humaneval_tasks([r for f in files for r in read_records(f)], ", ".join(map(str, files)))

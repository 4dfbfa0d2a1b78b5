"""Eval-set loaders on small files in each original format, written to tmp dirs."""
import csv
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import eval.data as ds
from tests.eval import real_files as real
from utils.errors import UserError

GSM = [{"question": "Tom has 3 apples and buys 2. How many?", "answer": "3+2=5\n#### 5"},
       {"question": "What is 10 - 4?", "answer": "#### 6"}]
HE = [{"task_id": "HumanEval/0", "prompt": "def f(x):\n", "canonical_solution": "    return x\n",
       "test": "def check(c):\n    assert c(1) == 1\n", "entry_point": "f"}]
# Rows in the original headerless MMLU CSV layout; the first has a comma, quote and newline.
CSV_ROWS = {
    "abstract_algebra": {"dev": [['Find "x", given\nx+1=2.', "0", "1", "2", "3", "B"]],
                         "test": [["2*3?", "5", "6", "7", "8", "B"], ["1+0?", "1", "0", "2", "3", "A"]]},
    "college_biology": {"dev": [["DNA has how many strands?", "1", "2", "3", "4", "B"]],
                        "test": [["Cell powerhouse?", "nucleus", "ribosome", "golgi", "mitochondria", "D"]]},
}


def write_jsonl(path: Path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def write_mmlu_csvs(root: Path):
    # Original tarball layout: data/dev/{subject}_dev.csv, data/test/{subject}_test.csv
    for subject, splits in CSV_ROWS.items():
        for split, rows in splits.items():
            (root / split).mkdir(parents=True, exist_ok=True)
            with open(root / split / f"{subject}_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows(rows)


def test_gsm8k_local_jsonl_dir_and_parquet(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", GSM)
    assert ds.load_gsm8k("local", str(tmp_path / "test.jsonl")) == GSM
    assert ds.load_gsm8k("local", str(tmp_path), limit=1) == GSM[:1]
    pq.write_table(pa.Table.from_pylist(GSM), tmp_path / "test-00000-of-00001.parquet")
    assert ds.load_gsm8k("local", str(tmp_path / "test-00000-of-00001.parquet")) == GSM


def test_mmlu_local_csv_per_subject(tmp_path):
    write_mmlu_csvs(tmp_path)
    dev, test = ds.load_mmlu("local", str(tmp_path))
    assert dev[0] == {"subject": "abstract_algebra", "question": 'Find "x", given\nx+1=2.',
                      "choices": ["0", "1", "2", "3"], "answer": 1}
    assert [r["subject"] for r in dev] == ["abstract_algebra", "college_biology"]
    assert [(r["subject"], r["answer"]) for r in test] == [
        ("abstract_algebra", 1), ("abstract_algebra", 0), ("college_biology", 3)]
    # limit is per subject
    _, test1 = ds.load_mmlu("local", str(tmp_path), limit=1)
    assert [r["question"] for r in test1] == ["2*3?", "Cell powerhouse?"]


def test_mmlu_local_jsonl_and_parquet_hf_layout(tmp_path):
    dev = [{"subject": "astronomy", "question": "Closest star?", "choices": ["Sun", "Vega", "Sirius", "Rigel"], "answer": 0}]
    test = [{"subject": "astronomy", "question": "Red planet?", "choices": ["Venus", "Mars", "Moon", "Io"], "answer": "B"}]
    write_jsonl(tmp_path / "dev.jsonl", dev)
    write_jsonl(tmp_path / "test.jsonl", test)
    d, t = ds.load_mmlu("local", str(tmp_path))
    assert d == dev and t[0]["answer"] == 1  # letters normalised to 0-3
    pdir = tmp_path / "pq" / "all"
    pdir.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(dev), pdir / "dev-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(dev * 2), pdir / "test-00000-of-00001.parquet")
    d, t = ds.load_mmlu("local", str(tmp_path / "pq"))
    assert d == dev and t == dev * 2


def test_mmlu_bad_rows_are_user_errors(tmp_path):
    (tmp_path / "x_dev.csv").write_text("q,a,b,c\n")
    (tmp_path / "x_test.csv").write_text("q,a,b,c,d,A\n")
    with pytest.raises(UserError, match="6 columns"):
        ds.load_mmlu("local", str(tmp_path))
    (tmp_path / "x_dev.csv").write_text("q,a,b,c,d,E\n")
    with pytest.raises(UserError, match="answer"):
        ds.load_mmlu("local", str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="_dev.csv"):
        ds.load_mmlu("local", str(empty))


def test_humaneval_local_jsonl_and_gz(tmp_path):
    write_jsonl(tmp_path / "he.jsonl", HE)
    write_jsonl(tmp_path / "HumanEval.jsonl.gz", HE, opener=gzip.open)
    assert ds.load_humaneval("local", str(tmp_path / "he.jsonl")) == HE
    assert ds.load_humaneval("local", str(tmp_path / "HumanEval.jsonl.gz")) == HE
    write_jsonl(tmp_path / "bad.jsonl", [{"task_id": "x", "prompt": "p"}])
    with pytest.raises(UserError, match="entry_point"):
        ds.load_humaneval("local", str(tmp_path / "bad.jsonl"))


def test_synthetic_layout_and_missing_files(tmp_path, monkeypatch):
    monkeypatch.setattr(ds, "SYNTHETIC_DIR", tmp_path)
    for load in (lambda: ds.load_gsm8k("synthetic"), lambda: ds.load_mmlu("synthetic"),
                 lambda: ds.load_humaneval("synthetic")):
        with pytest.raises(UserError, match="download_prompts.py"):
            load()
    write_jsonl(tmp_path / "gsm8k_test.jsonl", GSM)
    write_jsonl(tmp_path / "humaneval.jsonl", HE)
    (tmp_path / "mmlu").mkdir()
    mmlu = [{"subject": "s", "question": "q", "choices": ["a", "b", "c", "d"], "answer": 2}]
    write_jsonl(tmp_path / "mmlu" / "dev.jsonl", mmlu)
    write_jsonl(tmp_path / "mmlu" / "test.jsonl", mmlu * 3)
    assert ds.load_gsm8k("synthetic") == GSM
    assert ds.load_humaneval("synthetic", limit=5) == HE
    dev, test = ds.load_mmlu("synthetic", limit=2)
    assert dev == mmlu and test == mmlu * 2


def test_source_and_path_errors(tmp_path):
    with pytest.raises(UserError, match="synthetic"):
        ds.load_gsm8k("huggingface")
    with pytest.raises(UserError, match="--data_path"):
        ds.load_gsm8k("local")
    with pytest.raises(UserError, match="does not exist"):
        ds.load_humaneval("local", str(tmp_path / "nope.jsonl"))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="broken.jsonl"):
        ds.load_gsm8k("local", str(tmp_path / "broken.jsonl"))


def test_hf_without_network_is_one_clear_user_error(monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(ds, "_hub_reachable", lambda timeout_s=3.0: False)
    for load in (ds.load_gsm8k, ds.load_mmlu, ds.load_humaneval):
        with pytest.raises(UserError) as err:
            load("hf")
        assert "--source synthetic" in str(err.value) and "--data_path" in str(err.value)

    # Reachable host but the download itself fails (e.g. blocked, dataset gone).
    class FailingHF:
        @staticmethod
        def load_dataset(*args, **kwargs):
            raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub")
    monkeypatch.setattr(ds, "_hub_reachable", lambda timeout_s=3.0: True)
    monkeypatch.setattr(ds, "_import_hf_datasets", lambda: FailingHF)
    with pytest.raises(UserError, match="--source synthetic.*--data_path"):
        ds.load_gsm8k("hf")


def test_hf_path_names_the_real_sets_and_maps_records(monkeypatch):
    calls = []
    hf_rows = {
        ("openai/gsm8k", "main", "test"): GSM * 3,
        ("cais/mmlu", "all", "dev"): [{"question": "q", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": 3}],
        ("cais/mmlu", "all", "test"): [{"question": "t", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": 0}] * 4,
        ("openai/openai_humaneval", None, "test"): HE * 2,
    }

    class FakeHF:
        @staticmethod
        def load_dataset(name, config, split, streaming):
            calls.append((name, config, split, streaming))
            return iter(hf_rows[(name, config, split)])
    monkeypatch.setattr(ds, "_hub_reachable", lambda timeout_s=3.0: True)
    monkeypatch.setattr(ds, "_import_hf_datasets", lambda: FakeHF)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert ds.load_gsm8k("hf", limit=2) == GSM
    dev, test = ds.load_mmlu("hf", limit=3)
    assert dev[0]["answer"] == 3 and len(test) == 3
    assert ds.load_humaneval("hf", limit=1) == HE
    assert all(streaming for *_, streaming in calls)


# ----------------------------------------------------------------------------- the real files' layouts

def test_a_data_path_means_local_data(tmp_path, monkeypatch):
    monkeypatch.setattr(ds, "_hub_reachable", lambda timeout_s=3.0: False)
    path = real.write_gsm8k_test_jsonl(tmp_path / "test.jsonl")
    for source in ("synthetic", "hf"):
        with pytest.raises(UserError, match=f"--data_path .* with --source {source}: .*only with --source local"):
            ds.load_gsm8k(source, str(path))
    with pytest.raises(UserError, match="only with --source local"):
        ds.load_mmlu("synthetic", str(tmp_path))
    with pytest.raises(UserError, match="only with --source local"):
        ds.load_humaneval("synthetic", str(path))


def test_gsm8k_original_test_jsonl_and_hf_snapshot(tmp_path):
    path = real.write_gsm8k_test_jsonl(tmp_path / "grade_school_math" / "data" / "test.jsonl")
    assert ds.load_gsm8k("local", str(path)) == real.GSM8K_TEST
    assert ds.load_gsm8k("local", str(path.parent)) == real.GSM8K_TEST
    snapshot = tmp_path / "gsm8k_snapshot"
    (snapshot / "main").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(real.GSM8K_TEST), snapshot / "main" / "test-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(real.GSM8K_TEST[:1]), snapshot / "main" / "train-00000-of-00001.parquet")
    assert ds.load_gsm8k("local", str(snapshot)) == real.GSM8K_TEST


def test_gsm8k_answers_without_the_hash_line_are_one_clear_error(tmp_path):
    rows = real.GSM8K_TEST + [{"question": "How many legs has a cat?", "answer": "A cat has four legs."}]
    path = real.write_gsm8k_test_jsonl(tmp_path / "test.jsonl", rows)
    with pytest.raises(UserError, match=r"1 of 3 .*row 2.*#### "):
        ds.load_gsm8k("local", str(path))
    real.write_gsm8k_test_jsonl(path, [{"question": "q", "answer": ["#### 1"]}])
    with pytest.raises(UserError, match="row 0"):
        ds.load_gsm8k("local", str(path))


def test_gsm8k_bare_number_answers_are_the_gold_answer(tmp_path):
    rows = [{"question": "2+70?", "answer": 72}, {"question": "half of 3?", "answer": 1.5},
            {"question": "1000+234?", "answer": "1,234"}]
    path = real.write_gsm8k_test_jsonl(tmp_path / "test.jsonl", rows)
    assert [r["answer"] for r in ds.load_gsm8k("local", str(path))] == ["#### 72", "#### 1.5", "#### 1,234"]
    real.write_gsm8k_test_jsonl(path, [{"question": "yes?", "answer": True}])
    with pytest.raises(UserError, match="row 0"):
        ds.load_gsm8k("local", str(path))
    real.write_gsm8k_test_jsonl(path, real.mmlu_hf_rows("test"))  # MMLU's test.jsonl: its answers are not the gold
    with pytest.raises(UserError, match="multiple-choice"):
        ds.load_gsm8k("local", str(path))


def test_mmlu_original_tarball_reads_dev_and_test_only(tmp_path):
    data = real.write_mmlu_tarball(tmp_path)
    want_test = real.mmlu_hf_rows("test")
    for root in (data, tmp_path):  # data/ itself, or the folder it was extracted into
        dev, test = ds.load_mmlu("local", str(root))
        assert test == want_test and dev == real.mmlu_hf_rows("dev")
        assert {r["subject"] for r in test} == {"abstract_algebra", "world_religions"}  # no "mc" from mc_test.csv


def test_mmlu_hf_snapshot_reads_all_once(tmp_path):
    snapshot = real.write_mmlu_hf_snapshot(tmp_path / "cais_mmlu")
    dev, test = ds.load_mmlu("local", str(snapshot))
    assert test == real.mmlu_hf_rows("test") and dev == real.mmlu_hf_rows("dev")  # not each question twice
    dev, test = ds.load_mmlu("local", str(snapshot / "world_religions"))  # one subject's folder
    assert test == real.mmlu_hf_rows("test", "world_religions") and len(dev) == 1
    # the per-subject folders alone (a snapshot without all/) hold every question once too
    import shutil

    shutil.rmtree(snapshot / "all")
    dev, test = ds.load_mmlu("local", str(snapshot))
    by_question = lambda rows: sorted(rows, key=lambda r: r["question"])
    assert by_question(test) == by_question(real.mmlu_hf_rows("test"))


def test_mmlu_csv_header_row_is_read_by_column_names(tmp_path):
    (tmp_path / "dev").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "dev" / "astronomy_dev.csv").write_text("question,A,B,C,D,answer\nClosest star?,Sun,Vega,Sirius,Rigel,A\n")
    (tmp_path / "test" / "astronomy_test.csv").write_text("input,A,B,C,D,target\nRed planet?,Venus,Mars,Moon,Io,B\n")
    dev, test = ds.load_mmlu("local", str(tmp_path))
    assert dev == [{"subject": "astronomy", "question": "Closest star?", "choices": ["Sun", "Vega", "Sirius", "Rigel"],
                    "answer": 0}]
    assert test[0]["question"] == "Red planet?" and test[0]["answer"] == 1
    (tmp_path / "test" / "astronomy_test.csv").write_text("Question,Option A,Option B,Option C,Option D,Correct Answer\n"
                                                     "Red planet?,Venus,Mars,Moon,Io,B\n")
    with pytest.raises(UserError, match="header"):
        ds.load_mmlu("local", str(tmp_path))


def test_mmlu_csv_numeric_answers_are_one_clear_error(tmp_path):
    (tmp_path / "astronomy_dev.csv").write_text("Closest star?,Sun,Vega,Sirius,Rigel,A\n")
    (tmp_path / "astronomy_test.csv").write_text("Red planet?,Venus,Mars,Moon,Io,1\n")
    with pytest.raises(UserError, match=r"astronomy_test.csv:1.*letter"):
        ds.load_mmlu("local", str(tmp_path))


def test_humaneval_original_gz_and_folders(tmp_path):
    gz = real.write_humaneval_gz(tmp_path / "human-eval" / "data" / "HumanEval.jsonl.gz")
    assert ds.load_humaneval("local", str(gz)) == real.HUMANEVAL
    assert ds.load_humaneval("local", str(gz.parent)) == real.HUMANEVAL
    snapshot = tmp_path / "openai_humaneval_snapshot" / "openai_humaneval"
    snapshot.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(real.HUMANEVAL), snapshot / "test-00000-of-00001.parquet")
    assert ds.load_humaneval("local", str(snapshot.parent)) == real.HUMANEVAL
    real.write_humaneval_gz(gz, real.HUMANEVAL + real.HUMANEVAL[:1])
    with pytest.raises(UserError, match="HumanEval/0.*twice"):
        ds.load_humaneval("local", str(gz))

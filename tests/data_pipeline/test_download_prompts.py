"""download_prompts.py --eval_local_dir: the real eval files under their publishers' names are found
and written unchanged; a set it lacks is named, and a folder holding none of them is an error."""
from __future__ import annotations

import json
from pathlib import Path

from tests.data_pipeline.conftest import run_script
from tests.eval import real_files as real

SMALL = ["--n_rl_train", "20", "--n_rl_test", "5", "--n_gsm8k_test", "7", "--n_mmlu_test", "8",
         "--n_mmlu_dev_per_subject", "1", "--n_humaneval", "3"]


def written(data_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (data_dir / "eval" / name).read_text().splitlines()]


def test_real_file_names_are_found_and_written_unchanged(tmp_path):
    eval_dir = tmp_path / "mine"
    real.write_gsm8k_test_jsonl(eval_dir / "test.jsonl")  # GSM8K's own name
    real.write_humaneval_gz(eval_dir / "HumanEval.jsonl.gz")
    real.write_mmlu_tarball(eval_dir)  # eval_dir/data/{dev,val,test,auxiliary_train}/*.csv
    rl = real.write_gsm8k_test_jsonl(tmp_path / "rl.jsonl", real.GSM8K_TEST * 5)
    result = run_script(["data_pipeline/download/download_prompts.py", "--source", "local", "--local_path", str(rl),
                         "--eval_local_dir", str(eval_dir), *SMALL], tmp_path / "data")
    assert result.returncode == 0, result.stderr
    d = tmp_path / "data"
    assert written(d, "gsm8k_test.jsonl") == real.GSM8K_TEST
    assert written(d, "humaneval.jsonl") == real.HUMANEVAL
    assert written(d, "mmlu/test.jsonl") == real.mmlu_hf_rows("test")  # no auxiliary_train rows
    assert written(d, "mmlu/dev.jsonl") == real.mmlu_hf_rows("dev")
    assert "synthetic" not in result.stdout


def test_an_hf_snapshot_folder_and_the_sets_it_lacks(tmp_path):
    eval_dir = tmp_path / "mine"
    real.write_mmlu_hf_snapshot(eval_dir / "mmlu")
    result = run_script(["data_pipeline/download/download_prompts.py", "--source", "synthetic",
                         "--eval_local_dir", str(eval_dir), *SMALL], tmp_path / "data")
    assert result.returncode == 0, result.stderr
    d = tmp_path / "data"
    assert written(d, "mmlu/test.jsonl") == real.mmlu_hf_rows("test")  # all/ once, not all/ + per subject
    assert len(written(d, "gsm8k_test.jsonl")) == 7 and len(written(d, "humaneval.jsonl")) == 3  # synthetic
    assert "gsm8k: synthetic" in result.stdout and "humaneval: synthetic" in result.stdout
    assert "HumanEval.jsonl.gz" in result.stdout  # says which names it looked for


def test_a_folder_without_any_eval_set_is_an_error(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("nothing here\n")
    result = run_script(["data_pipeline/download/download_prompts.py", "--source", "synthetic",
                         "--eval_local_dir", str(tmp_path / "mine"), *SMALL], tmp_path / "data")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no eval set" in result.stderr and "HumanEval.jsonl.gz" in result.stderr
    assert not (tmp_path / "data" / "eval").exists()

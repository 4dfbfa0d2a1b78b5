"""Results are written whole or not at all."""
import json

import pytest

from eval.report import write_results


def test_writes_summary_and_records(tmp_path):
    summary = {"accuracy": 0.5, "n": 2, "name": "gsm8k é"}
    records = [{"idx": 0, "correct": True, "output": "#### 5"}, {"idx": 1, "correct": False, "output": "7"}]
    s_path, r_path = write_results(tmp_path / "new_dir", "gsm8k", summary, records)
    assert s_path.name == "gsm8k_summary.json" and r_path.name == "gsm8k_records.jsonl"
    assert json.loads(s_path.read_text(encoding="utf-8")) == summary
    assert [json.loads(line) for line in r_path.read_text().splitlines()] == records
    assert sorted(p.name for p in s_path.parent.iterdir()) == ["gsm8k_records.jsonl", "gsm8k_summary.json"]


def test_failure_leaves_old_results_and_no_temp_files(tmp_path):
    write_results(tmp_path, "mmlu", {"micro": 0.3}, [{"i": 0}])

    def bad_records():
        yield {"i": 0}
        yield {"i": object()}  # not serialisable: fails mid-file
    with pytest.raises(TypeError):
        write_results(tmp_path, "mmlu", {"micro": 0.9}, bad_records())
    with pytest.raises(TypeError):
        write_results(tmp_path, "mmlu", {"micro": object()}, [{"i": 1}])
    assert json.loads((tmp_path / "mmlu_summary.json").read_text()) == {"micro": 0.3}
    # Neither failure replaced the previous pair, not even the records of the second.
    lines = (tmp_path / "mmlu_records.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"i": 0}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mmlu_records.jsonl", "mmlu_summary.json"]

"""Source resolution, local readers and the converters from public dataset rows."""
from __future__ import annotations

import json

import pytest

from data_pipeline.download import formats
from data_pipeline.download.sources import (
    hub_reachable,
    read_local,
    resolve_source,
    split_every,
)
from utils.errors import UserError


def test_offline_resolution(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not hub_reachable()
    assert resolve_source(None, None) == "synthetic" and "unreachable" in capsys.readouterr().out
    assert resolve_source("synthetic", None) == "synthetic"
    with pytest.raises(UserError, match="--source synthetic.*--local_path"):
        resolve_source("hf", None)
    with pytest.raises(UserError, match="needs --local_path"):
        resolve_source("local", None)
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "hi"}\n')
    assert resolve_source(None, str(f)) == "local"


def test_read_local_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"question": "q1", "answer": "a\n#### 1"}, {"question": "q2", "answer": "b"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    (tmp_path / "x.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "x.txt").write_text("first story\n\nsecond story\n")
    assert read_local(tmp_path / "x.parquet") == rows == read_local(tmp_path / "x.json")
    assert read_local(tmp_path / "x.txt") == [{"text": "first story"}, {"text": "second story"}]
    assert formats.convert(rows, formats.to_gsm8k) == ([rows[0]], 1)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(UserError, match="line 2"):
        read_local(tmp_path / "bad.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported"):
        read_local(tmp_path / "x.csv")


def test_converters_for_public_datasets():
    # HuggingFaceH4/ultrafeedback_binarized: full conversations on both sides.
    uf = {"prompt": "Hi?", "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
          "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}]}
    assert formats.to_preference(uf) == {"prompt": [{"role": "user", "content": "Hi?"}],
                                         "chosen": "Hello!", "rejected": "Go away."}
    assert formats.to_preference({"prompt": "Q", "chosen": "A", "rejected": "B"})["prompt"] == [{"role": "user", "content": "Q"}]
    assert formats.to_preference({"prompt": "Q", "chosen": "A"}) is None
    chat = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "category": "qa"}
    assert formats.to_sft(chat) == {"messages": chat["messages"]}
    assert formats.to_sft({"messages": [{"role": "bot", "content": "y"}]}) is None
    assert formats.to_mmlu({"question": "q", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": "C"})["answer"] == 2
    assert formats.to_mmlu({"question": "q", "choices": ["a", "b"], "answer": 0}) is None
    assert formats.to_story({"text": "  t "}) == {"text": "t"} and formats.to_story({"text": " "}) is None
    assert split_every(list(range(10)), 5) == ([0, 1, 2, 3, 5, 6, 7, 8], [4, 9])

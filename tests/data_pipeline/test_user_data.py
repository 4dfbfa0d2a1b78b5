"""Users' own data: the file kinds and row forms of data_pipeline/user_data.py, and SFT bins
built from them in the model's chat format, cached by content (data_pipeline/processing/sft_cache.py)."""
import json

import numpy as np
import pytest

from data_pipeline.user_data import field_names, read_rows, to_messages, to_preference, to_prompt
from utils.errors import UserError

F = field_names(None)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


@pytest.mark.parametrize("row,fmt", [
    ({"messages": CHAT}, "messages"),
    ({"messages": [{"role": "developer", "content": "Be brief."}] + CHAT[1:]}, "messages"),
    ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"},
                        {"from": "gpt", "value": "4"}]}, "sharegpt"),
    ({"instruction": "2+2?", "output": "4", "system": "Be brief."}, "alpaca"),
])
def test_every_row_form_becomes_the_same_chat(row, fmt):
    assert to_messages(row, fmt, F) == CHAT
    assert to_messages(row, "auto", F) == CHAT


def test_alpaca_input_tool_turns_and_renamed_fields():
    assert to_messages({"instruction": "Add", "input": "2 and 2", "output": "4"}, "auto", F)[0] == \
        {"role": "user", "content": "Add\n\n2 and 2"}
    calls = [{"role": "user", "content": "weather?"},
             {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
             {"role": "tool", "content": "sunny", "tool_call_id": "c1"}, {"role": "assistant", "content": "Sunny."}]
    out = to_messages({"messages": calls}, "auto", F)
    assert out[1] == {"role": "assistant", "content": "", "tool_calls": calls[1]["tool_calls"]} and out[2]["tool_call_id"] == "c1"
    renamed = field_names({"messages": "dialog", "role": "speaker", "content": "text"})
    row = {"dialog": [{"speaker": "user", "text": "hi"}, {"speaker": "assistant", "text": "hello"}]}
    assert to_messages(row, "auto", renamed) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(UserError, match="fields: unknown key"):
        field_names({"mesages": "x"})


@pytest.mark.parametrize("row,fragment", [
    ({"text": "plain"}, "none of which says its form"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role='robot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "must be text"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "from='alien'"),
    ({"instruction": "x"}, "output must be text, got nothing"),
])
def test_bad_rows_say_what_is_wrong(row, fragment):
    with pytest.raises(UserError, match=fragment):
        to_messages(row, "auto", F)


def test_preference_and_prompt_forms():
    assert to_preference({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, F) == ([CHAT[1]], "4", "5")
    conv = {"prompt": [CHAT[1]], "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}]}
    assert to_preference(conv, F) == ([CHAT[1]], "4", "5")
    implicit = {"chosen": CHAT, "rejected": CHAT[:2] + [{"role": "assistant", "content": "5"}]}
    assert to_preference(implicit, F) == (CHAT[:2], "4", "5")
    with pytest.raises(UserError, match="'rejected' is empty"):
        to_preference({"prompt": "x", "chosen": "4", "rejected": "  "}, F)
    assert to_prompt({"question": "2+2?", "answer": 4}, F) == ([CHAT[1]], "4")
    assert to_prompt({"q": [CHAT[1]], "a": "#### 4"}, field_names({"question": "q", "answer": "a"})) == ([CHAT[1]], "#### 4")


def test_file_kinds_name_their_rows(tmp_path):
    rows = [{"messages": CHAT}, {"instruction": "hi", "output": "hello"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"instruction": "hi", "output": "hello"}] * 2), tmp_path / "d.parquet")
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"instruction": "hi", "output": "hello"}])}).save_to_disk(str(tmp_path / "disk"))
    assert [w.split("/")[-1] for w, _ in read_rows(str(tmp_path / "d.jsonl"))] == ["d.jsonl line 1", "d.jsonl line 2"]
    assert [r for _, r in read_rows(str(tmp_path / "d.json"))] == rows
    assert [w.split("/")[-1] for w, _ in read_rows(str(tmp_path / "d.parquet"))] == ["d.parquet row 0", "d.parquet row 1"]
    assert [r for _, r in read_rows(str(tmp_path / "disk"))] == [{"instruction": "hi", "output": "hello"}]
    (tmp_path / "fake.parquet").write_text("not parquet")
    for source, fragment in ((tmp_path / "fake.parquet", "cannot be read as Parquet"), (tmp_path / "nope.jsonl", "does not exist")):
        with pytest.raises(UserError, match=fragment):
            list(read_rows(str(source)))
    with pytest.raises(UserError, match="splits \\['train'\\], not 'validation'"):
        list(read_rows(str(tmp_path / "disk"), "validation"))


# ----------------------------------------------------------------------------- SFT bins from files


def test_sft_cache_renders_with_the_template_and_is_reused(tmp_path, tokenizer, capsys):
    from data_pipeline.loader import SFTLoader
    from data_pipeline.processing.sft_cache import build_sft_cache
    from data_pipeline.tokenizer.chat_template import render_chat

    rows = [{"conversations": [{"from": "human", "value": f"what is {i} plus {i}?"}, {"from": "gpt", "value": f"it is {2 * i}"}]}
            for i in range(60)]
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = build_sft_cache(str(data), "", tokenizer, cache_root=str(tmp_path / "cache"))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n_examples"] == {"train": 59, "val": 1} and meta["tokenizer_hash"] == tokenizer.hash
    ids, mask = render_chat(tokenizer, to_messages(rows[0], "auto", F))
    loader = SFTLoader(out, "train", 64, 1, shuffle=False, pack=False, expect_tokenizer_hash=tokenizer.hash)
    assert np.array_equal(loader.tokens[: len(ids)], ids) and np.array_equal(loader.mask[: len(ids)], mask)
    again = build_sft_cache(str(data), "", tokenizer, cache_root=str(tmp_path / "cache"))
    assert again == out and "reusing the tokenized cache" in capsys.readouterr().out
    data.write_text("\n".join(json.dumps(r) for r in rows[:30]) + "\n")  # changed content: a new cache
    assert build_sft_cache(str(data), "", tokenizer, cache_root=str(tmp_path / "cache")) != out


def test_sft_cache_bad_rows_error_or_skip(tmp_path, tokenizer):
    from data_pipeline.processing.sft_cache import build_sft_cache

    good = {"messages": CHAT}
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [good, {"messages": [{"role": "user", "content": "only a question"}]},
                                                        {"text": "?"}, good]) + "\n")
    with pytest.raises(UserError, match="chats.jsonl line 3: the row has keys"):
        build_sft_cache(str(data), str(data), tokenizer, cache_root=str(tmp_path / "c1"))
    data.write_text("\n".join(json.dumps(r) for r in [good, {"messages": [{"role": "user", "content": "only a question"}]}, good]) + "\n")
    with pytest.raises(UserError, match="chats.jsonl line 2: the conversation has no assistant message"):
        build_sft_cache(str(data), str(data), tokenizer, cache_root=str(tmp_path / "c2"))
    assert not any((tmp_path / "c2").glob("sft-*"))  # nothing half-written
    out = build_sft_cache(str(data), str(data), tokenizer, on_bad_row="skip", cache_root=str(tmp_path / "c3"))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n_examples"]["train"] == 2 and meta["skipped"]["train"] == 1

"""The seven seed commands, run as a user runs them, and their errors on bad input."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from data_pipeline.jsonl import load_jsonl
from data_pipeline.tokenizer.tokenizer import Tokenizer
from tests.data_pipeline.conftest import run_script
from utils.errors import UserError


def test_seven_commands_write_every_contract_file(pipeline_dir):
    d = pipeline_dir
    tok = Tokenizer.from_file(d / "tokenizer/tokenizer.json")
    stories = load_jsonl(d / "raw/stories_train.jsonl")
    assert len(stories) <= 300 and all(isinstance(r["text"], str) for r in stories)
    assert len(load_jsonl(d / "raw/stories_val.jsonl")) <= 30

    from transformers import PreTrainedTokenizerFast
    fast = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer/tokenizer.json"))
    assert fast.encode("Once upon a time", add_special_tokens=False) == tok.encode("Once upon a time")

    meta = json.loads((d / "bins/pretrain/meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer_hash"] == tok.hash
    for split in ("train", "val"):
        tokens = np.fromfile(d / f"bins/pretrain/{split}.bin", dtype=np.uint16)
        assert tokens.size == meta["n_tokens"][split] and tokens[-1] == tok.eos_id
        assert int((tokens == tok.eos_id).sum()) == meta["n_docs"][split]
    docs = np.split(tokens, np.flatnonzero(tokens == tok.eos_id) + 1)[:-1]
    val_texts = {r["text"] for r in load_jsonl(d / "raw/stories_val.jsonl")}
    assert tok.decode(docs[0][:-1].tolist()) in val_texts  # a whole story between separators

    for name in ("train.bin", "val.bin", "train.mask.bin", "val.mask.bin", "train.idx.npy", "val.idx.npy", "meta.json"):
        assert (d / "bins/sft" / name).is_file()
    sft_meta = json.loads((d / "bins/sft/meta.json").read_text())
    assert sft_meta["n_examples"] == {"train": 200, "val": 20}
    assert np.load(d / "bins/sft/val.idx.npy").shape == (20,)
    assert json.loads((d / "bins/preference/meta.json").read_text())["n_pairs"] == {"train": 60, "val": 10}

    rl = load_jsonl(d / "prompts/rl_train.jsonl")
    assert len(rl) == 50 and all(r["answer"].rsplit("\n", 1)[1].startswith("#### ") for r in rl)
    mmlu = load_jsonl(d / "eval/mmlu/test.jsonl")
    assert len(mmlu) == 20 and len(load_jsonl(d / "eval/mmlu/dev.jsonl")) == 10
    assert all(len(q["choices"]) == 4 and q["answer"] in range(4) for q in mmlu)
    assert {"task_id", "prompt", "canonical_solution", "test", "entry_point"} <= set(load_jsonl(d / "eval/humaneval.jsonl")[0])

    # Held-out questions never appear in training prompts.
    train_q = {r["question"] for r in rl} | {m["content"] for r in load_jsonl(d / "raw/sft_train.jsonl")
                                               for m in r["messages"] if m["role"] == "user"}
    held_out = [r["question"] for r in load_jsonl(d / "eval/gsm8k_test.jsonl") + load_jsonl(d / "prompts/rl_test.jsonl")]
    assert len(held_out) == 30 and len(set(held_out)) == 30 and not set(held_out) & train_q
    sft_val = {m["content"] for r in load_jsonl(d / "raw/sft_val.jsonl") for m in r["messages"] if m["role"] == "user"}
    assert not sft_val & train_q


def test_explicit_hf_source_offline_is_one_clear_error(tmp_path):
    result = run_script(["data_pipeline/download/download_tinystories.py", "--source", "hf"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--source synthetic" in result.stderr and "--local_path" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def call_main(monkeypatch, module, args: list[str]) -> None:
    """Run a script's main() in this process (faster than a subprocess)."""
    monkeypatch.setattr(sys, "argv", [module.__file__, *args])
    module.main()


def test_default_source_falls_back_to_synthetic_offline(monkeypatch, tmp_path, capsys):
    from data_pipeline.download import download_tinystories
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    call_main(monkeypatch, download_tinystories, ["--data_dir", str(tmp_path), "--parts", "stories",
                                                  "--n_stories", "5", "--n_val_stories", "2"])
    out = capsys.readouterr().out
    assert out.count("unreachable") == 1 and "--source synthetic" in out
    assert len(load_jsonl(tmp_path / "raw/stories_train.jsonl")) == 5


def test_local_source_and_bad_local_files(monkeypatch, tmp_path):
    from data_pipeline.download import download_tinystories
    good = tmp_path / "stories.txt"
    good.write_text("One story.<|endoftext|>Another story.<|endoftext|>" * 30)
    out = tmp_path / "out"
    call_main(monkeypatch, download_tinystories, ["--data_dir", str(out), "--local_path", str(good), "--parts", "stories"])
    rows = load_jsonl(out / "raw/stories_train.jsonl") + load_jsonl(out / "raw/stories_val.jsonl")
    assert len(rows) == 60 and rows[0] == {"text": "One story."}
    before = (out / "raw/stories_train.jsonl").read_bytes()
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 story".encode("latin-1"))
    (tmp_path / "fake.parquet").write_text("a text file named .parquet")  # a pyarrow traceback before
    for bad, match in (("empty.jsonl", "empty"), ("latin1.txt", "UTF-8"), ("missing.jsonl", "does not exist"),
                       ("fake.parquet", "not a readable Parquet file")):
        with pytest.raises(UserError, match=match):
            call_main(monkeypatch, download_tinystories, ["--data_dir", str(out), "--local_path",
                                                          str(tmp_path / bad), "--parts", "stories"])
    assert (out / "raw/stories_train.jsonl").read_bytes() == before  # nothing half-written


def test_tokenizer_bad_inputs(monkeypatch, tmp_path, pipeline_dir):
    from data_pipeline.tokenizer import train_tokenizer
    with pytest.raises(UserError, match="too small"):
        call_main(monkeypatch, train_tokenizer, ["--data_dir", str(pipeline_dir), "--vocab_size", "200"])
    with pytest.raises(UserError, match="too large: at most 1,048,576"):  # the HF trainer aborted (exit 134) before
        call_main(monkeypatch, train_tokenizer, ["--data_dir", str(pipeline_dir), "--vocab_size", "1000000000"])
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw/stories_train.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        call_main(monkeypatch, train_tokenizer, ["--data_dir", str(tmp_path)])
    assert not (tmp_path / "tokenizer").exists()


@pytest.mark.parametrize("backend", ["hf", "scratch"])
def test_tokenizer_reports_the_size_reached_when_merges_run_out(monkeypatch, tmp_path, capsys, backend):
    from data_pipeline.tokenizer import train_tokenizer
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a cat sat", "a cat ran", "the dog sat"]))
    call_main(monkeypatch, train_tokenizer, ["--data_dir", str(tmp_path), "--vocab_size", "5000",
                                             "--backend", backend, "--inputs", str(corpus)])
    out = capsys.readouterr().out
    size = Tokenizer.from_file(tmp_path / "tokenizer/tokenizer.json").vocab_size
    assert size < 5000 and "(asked 5000)" in out and f"ran out of pairs to merge at {size} tokens" in out


def test_bins_refuse_a_retrained_tokenizer(monkeypatch, tmp_path, pipeline_dir):
    from data_pipeline.processing import build_pretrain_bins
    from data_pipeline.tokenizer import train_tokenizer
    data = tmp_path / "data"
    shutil.copytree(pipeline_dir, data)
    old_meta = (data / "bins/pretrain/meta.json").read_text()
    call_main(monkeypatch, train_tokenizer, ["--data_dir", str(data), "--vocab_size", "500", "--backend", "scratch"])
    with pytest.raises(UserError, match="encode_stories"):
        call_main(monkeypatch, build_pretrain_bins, ["--data_dir", str(data)])
    assert (data / "bins/pretrain/meta.json").read_text() == old_meta

"""pretrain/train.py end to end on tiny bins, and its recipe checks."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import pretrain.train as pretrain_script
from data_pipeline.tokenizer.tokenizer import file_hash
from pretrain.recipe import PretrainRecipe
from model.load import load_model
from utils.checkpoint import read_meta
from utils.config import load_config
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 32


def write_bins(tmp_path: Path) -> dict:
    """A learnable stream (a repeating 7-token cycle) as pretrain bins in the data stage's
    layout: {train,val}.bin (uint16) + meta.json with the tokenizer's hash."""
    (tmp_path / "tokenizer.json").write_text('{"stand-in": true}')
    cycle = np.array([3, 9, 4, 1, 7, 2, 5], dtype=np.uint16)
    n_tokens = {"train": 20000, "val": 4000}
    for split, n in n_tokens.items():
        np.tile(cycle, n // 7 + 1)[:n].tofile(tmp_path / f"{split}.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"format": "pretrain", "dtype": "uint16", "vocab_size": VOCAB,
                                                    "n_tokens": n_tokens, "tokenizer_hash": file_hash(tmp_path / "tokenizer.json")}))
    return {"data.train_bin": tmp_path / "train.bin", "data.val_bin": tmp_path / "val.bin",
            "data.tokenizer": tmp_path / "tokenizer.json"}


def tiny_overrides(tmp_path: Path, **extra) -> list[str]:
    over = {**write_bins(tmp_path), "model.vocab_size": VOCAB, "model.d_model": 32, "model.n_layers": 2,
            "model.n_heads": 4, "model.n_kv_heads": 2, "model.max_seq_len": 64, "train.out_dir": tmp_path / "run",
            "train.max_steps": 30, "train.batch_size": 4, "train.seq_len": 32, "train.global_batch_tokens": 256,
            "train.eval_every": 15, "train.eval_batches": 2, "train.save_every": 15, "train.device": "cpu",
            "train.progress": False, "optim.lr": 1e-2, "optim.warmup_steps": 5, **extra}
    return [f"{k}={v}" for k, v in over.items()]


def test_example_recipe_validates(tmp_path):
    over = write_bins(tmp_path)
    recipe = load_config(PretrainRecipe, ROOT / "configs/examples/pretrain_tiny.yaml", [f"{k}={v}" for k, v in over.items()])
    assert recipe.model.d_model == 128 and recipe.train.global_batch_tokens == 4096 and recipe.optim.name == "adamw"


def test_pretrain_end_to_end_learns_and_writes_checkpoints(tmp_path, capsys):
    torch.set_num_threads(1)
    pretrain_script.main(["--config_path", str(ROOT / "configs/examples/pretrain_tiny.yaml")] + tiny_overrides(tmp_path))
    run = tmp_path / "run"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0], losses
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < vals[0] and vals[-1] < 1.0
    assert (run / "final" / "tokenizer.json").is_file() and (run / "final" / "recipe.yaml").is_file()
    assert read_meta(run / "final")["stage"] == "pretrain"
    assert sorted(p.name for p in run.glob("step_*")) == ["step_00000015", "step_00000030"]
    assert load_model(run / "final").cfg.d_model == 32 and (run / "loss.png").is_file()
    err = capsys.readouterr().err
    assert "grad accum 2" in err and "512 tokens/step" not in err and "256 tokens/step" in err


def test_document_masked_pretraining_learns_and_needs_the_eos_id(tmp_path):
    """data.document_mask: the documents of a window (each opened by its EOS, here token 1 of the
    cycle) attend only to themselves; bins whose meta.json names no eos_id are refused up front."""
    torch.set_num_threads(1)
    over = tiny_overrides(tmp_path, **{"data.document_mask": True, "train.max_steps": 20, "train.save_every": 0})
    with pytest.raises(UserError, match="eos_id"):
        pretrain_script.main(["--config_path", str(ROOT / "configs/examples/pretrain_tiny.yaml")] + over)
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "eos_id": 1}))
    pretrain_script.main(["--config_path", str(ROOT / "configs/examples/pretrain_tiny.yaml")] + over)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("key,value,message", [
    ("train.eval_batches", 0, "eval_batches must be positive"),  # ZeroDivisionError before
    ("train.save_every", -1, "save_every must be >= 0"),  # each of these trained silently before
    ("train.keep_last", -1, "keep_last must be >= 0"),
    ("train.eval_every", -5, "eval_every must be >= 0"),
    ("optim.weight_decay", -0.1, "weight_decay must be >= 0"),
])
def test_bad_train_numbers_are_user_errors(tmp_path, key, value, message):
    with pytest.raises(UserError, match=message):
        pretrain_script.main(["--config_path", str(ROOT / "configs/examples/pretrain_tiny.yaml")]
                             + tiny_overrides(tmp_path, **{key: value}))


def test_out_dir_that_cannot_be_a_directory_is_a_user_error(tmp_path):
    base = ["--config_path", str(ROOT / "configs/examples/pretrain_tiny.yaml")]
    a_file = tmp_path / "taken"
    a_file.write_text("not a directory")
    for out_dir in (a_file, a_file / "run"):  # FileExistsError / NotADirectoryError tracebacks before
        with pytest.raises(UserError, match="is a file .*not a directory"):
            pretrain_script.main(base + tiny_overrides(tmp_path, **{"train.out_dir": out_dir}))
    assert a_file.read_text() == "not a directory"
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs here to stand for an unwritable directory")
    with pytest.raises(UserError, match="cannot be written"):  # sysfs refuses mkdir, even to root
        pretrain_script.main(base + tiny_overrides(tmp_path, **{"train.out_dir": "/sys/llm_run"}))


def test_ddp_without_torchrun_says_it_runs_one_process(tmp_path, capsys):
    torch.set_num_threads(1)
    pretrain_script.main(["--config_path", str(ROOT / "configs/examples/pretrain_tiny.yaml")]
                         + tiny_overrides(tmp_path, **{"train.distributed": "ddp", "train.max_steps": 1}))
    assert "train.distributed=ddp in a single process (not started by torchrun)" in capsys.readouterr().err


def test_bad_recipes_are_user_errors(tmp_path):
    base = ["--config_path", str(ROOT / "configs/examples/pretrain_tiny.yaml")]
    with pytest.raises(UserError, match="does not divide"):
        pretrain_script.main(base + tiny_overrides(tmp_path, **{"train.global_batch_tokens": 100}))
    for pos_emb in ("learned", "rope"):  # RoPE trained silently past the context before
        with pytest.raises(UserError, match="exceeds the model's context max_seq_len=64"):
            pretrain_script.main(base + tiny_overrides(tmp_path, **{"model.pos_emb": pos_emb, "train.seq_len": 128}))
    with pytest.raises(UserError, match="vocab_size"):
        pretrain_script.main(base + tiny_overrides(tmp_path, **{"model.vocab_size": 16}))
    with pytest.raises(UserError, match="does not exist"):
        pretrain_script.main(base + tiny_overrides(tmp_path, **{"data.train_bin": tmp_path / "missing.bin"}))
    other_tok = tmp_path / "other_tokenizer.json"
    other_tok.write_text("{}")
    with pytest.raises(UserError, match="built with tokenizer"):
        pretrain_script.main(base + tiny_overrides(tmp_path, **{"data.tokenizer": other_tok}))


def test_a_huge_lr_stops_the_command_with_one_paragraph(tmp_path):
    """The issue's reproduction, run as a user runs it: optim.lr=1e6 skipped 39 of 40 updates and
    exited 0 with "pretrain: done" and a final/ of blown-up weights."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "pretrain/train.py", "--config_path", "configs/examples/pretrain_tiny.yaml",
                          *tiny_overrides(tmp_path, **{"optim.lr": 1e6, "train.max_steps": 40})],
                         cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(errors) == 1 and "training diverged" in errors[0] and "consecutive steps were skipped" in errors[0]
    assert "pretrain: done" not in res.stderr and not (tmp_path / "run" / "final").exists()

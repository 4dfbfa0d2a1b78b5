"""The SFT entry scripts on real (tiny) SFT bins built by the data pipeline: run, resume, bad input."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.recipe import SFTRecipe
from finetune.sft import run_sft
from model import ModelConfig, Transformer
from tests.utils.faults import flip_bytes, safetensors_data_start
from utils.checkpoint import load_weights, read_meta, save_checkpoint
from utils.config import config_from_dict

REPO = Path(__file__).resolve().parents[2]


def run(args, timeout=300):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # scripts bootstrap their own imports
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    """data/raw/sft_*.jsonl -> tokenizer -> data/bins/sft (the pipeline's own builder), and a base checkpoint."""
    from data_pipeline.synthetic.sft import generate_conversations
    from data_pipeline.tokenizer.tokenizer import Tokenizer
    from data_pipeline.tokenizer.train_tokenizer import train_hf

    root = tmp_path_factory.mktemp("sft")
    rng = random.Random(0)
    (root / "raw").mkdir()
    for split, bucket, n in (("train", "sft", 60), ("val", "val", 8)):
        rows = generate_conversations(rng, n, bucket)
        (root / "raw" / f"sft_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tokenizer").mkdir()
    texts = [m["content"] for line in (root / "raw" / "sft_train.jsonl").read_text().splitlines() for m in json.loads(line)["messages"]]
    train_hf(texts, 400, False).save(str(root / "tokenizer" / "tokenizer.json"))
    built = run(["data_pipeline/processing/build_sft_bins.py", "--data_dir", root, "--num_workers", "1"])
    assert built.returncode == 0, built.stderr
    tok = Tokenizer.from_file(root / "tokenizer" / "tokenizer.json")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128)
    save_checkpoint(root / "base", Transformer(cfg), tokenizer_path=root / "tokenizer" / "tokenizer.json")
    return root


def overrides(root, out, steps=3):
    return [f"model.init_from={root / 'base'}", f"data.bin_dir={root / 'bins' / 'sft'}",
            f"data.tokenizer={root / 'tokenizer' / 'tokenizer.json'}", f"train.out_dir={out}",
            f"train.max_steps={steps}", "train.batch_size=2", "train.seq_len=64", "train.device=cpu",
            "train.eval_every=0", "train.eval_batches=2", "train.save_every=0", "train.progress=false"]


@pytest.mark.slow  # a subprocess (torch import) on purpose: the script must run from the repo root as users run it
def test_qlora_script_end_to_end(setup_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    res = run(["finetune/peft/qlora/sft_qlora_train.py", "--config_path", REPO / "configs/examples/sft_qlora_tiny.yaml",
               *overrides(setup_dir, out), "format_eval_prompts=2"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "format rate on 2 held-out arithmetic prompts" in res.stdout and "NF4 base" in res.stdout
    meta = read_meta(out / "final")
    assert meta["kind"] == "adapter" and meta["qlora"] and meta["base_checkpoint"] == str(setup_dir / "base")
    saved = set(load_weights(out / "final"))  # adapters + the example's modules_to_save (embed, lm_head)
    assert {k for k in saved if ".lora_" not in k} == {"embed.weight", "lm_head.weight"} and len(saved) == 2 + 2 * 2 * 7
    assert "val_loss" in (out / "metrics.jsonl").read_text()  # evaluated on the val split at the end
    fe = json.loads((out / "format_eval.json").read_text())
    assert fe["sft"]["n"] == 2 and 0.0 <= fe["base"]["format_rate"] <= 1.0


def run_script_main(script: str, argv: list, monkeypatch):
    """Run an entry script's main() in this process (its bootstrap and argument parsing included)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    runpy.run_path(str(REPO / script), run_name="sft_script")["main"]()


def test_wrong_script_is_a_clear_error(setup_dir, tmp_path, monkeypatch):
    from utils.errors import UserError

    with pytest.raises(UserError, match="sft_lora_train.py"):
        run_script_main("finetune/sft_train.py", ["--config_path", REPO / "configs/examples/sft_lora_tiny.yaml",
                                                  *overrides(setup_dir, tmp_path)], monkeypatch)


@pytest.mark.parametrize("damage,fragment", [
    (lambda d: (d / "model_config.json").write_text('{"d_model": "big"}'), "invalid model config"),  # TypeError before
    (lambda d: (d / "meta.json").write_text("\x00garbage{"), "meta.json is not valid JSON"),  # JSONDecodeError before
    (lambda d: flip_bytes(d / "model.safetensors", 8, seed=2, start=safetensors_data_start(d / "model.safetensors")),
     "model.safetensors does not match the checksum"),
])
def test_damaged_base_checkpoint_is_one_clear_error(setup_dir, tmp_path, monkeypatch, damage, fragment):
    import shutil

    from utils.errors import UserError

    base = shutil.copytree(setup_dir / "base", tmp_path / "base")
    damage(base)
    with pytest.raises(UserError, match=fragment):
        run_script_main("finetune/sft_train.py", ["--config_path", REPO / "configs/examples/sft_full_tiny.yaml",
                                                  *overrides(setup_dir, tmp_path / "out"), f"model.init_from={base}"],
                        monkeypatch)
    assert not (tmp_path / "out" / "final").exists()


def test_full_script_in_process(setup_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"
    run_script_main("finetune/sft_train.py", ["--config_path", REPO / "configs/examples/sft_full_tiny.yaml",
                                              *overrides(setup_dir, out, steps=2), "format_eval_prompts=0"], monkeypatch)
    assert "model saved to" in capsys.readouterr().out
    assert read_meta(out / "final")["kind"] == "model"
    assert set(load_weights(out / "final")) == set(load_weights(setup_dir / "base"))


def test_lora_resume_equals_uninterrupted(setup_dir, tmp_path):
    def recipe(out, steps):
        data = {"model": {"init_from": str(setup_dir / "base")},
                "data": {"bin_dir": str(setup_dir / "bins" / "sft"), "tokenizer": str(setup_dir / "tokenizer" / "tokenizer.json")},
                "train": {"out_dir": str(out), "max_steps": steps, "batch_size": 2, "seq_len": 64, "device": "cpu",
                          "save_every": 2, "progress": False, "eval_batches": 1},
                "optim": {"lr": 1e-2, "warmup_steps": 1, "schedule": "constant"},  # LR must not depend on max_steps
                "lora": {"r": 2, "alpha": 4, "dropout": 0.1}}
        return config_from_dict(SFTRecipe, data)

    straight = run_sft(recipe(tmp_path / "a", 4), "lora")
    run_sft(recipe(tmp_path / "b", 2), "lora")
    resumed = run_sft(recipe(tmp_path / "b", 4), "lora")  # resume=auto picks up step 2
    def losses(result):
        return [h["loss"] for h in result.history if "loss" in h]  # eval-only records carry no loss

    assert losses(resumed) == losses(straight) and len(losses(straight)) == 4
    a, b = load_weights(straight.checkpoint), load_weights(resumed.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

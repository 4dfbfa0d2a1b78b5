"""`make demo` in miniature: the same demo.py and stage scripts on tiny data, tiny models and a
few steps per stage; then a second run reuses every finished stage."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def write_recipes(tmp: Path) -> Path:
    data, runs = tmp / "data", tmp / "runs"
    d = ["--data_dir", str(data)]
    steps = [
        ("data_pipeline/download/download_tinystories.py",
         ["--source", "synthetic", "--n_stories", "300", "--n_val_stories", "30", "--n_sft", "400", "--n_sft_val", "40",
          "--n_preference", "80", "--n_preference_val", "20"]),
        ("data_pipeline/tokenizer/train_tokenizer.py", ["--vocab_size", "400"]),
        ("data_pipeline/processing/encode_stories.py", []),
        ("data_pipeline/processing/build_pretrain_bins.py", []),
        ("data_pipeline/processing/build_sft_bins.py", []),
        ("data_pipeline/processing/build_preference_bins.py", []),
        ("data_pipeline/download/download_prompts.py",
         ["--source", "synthetic", "--n_rl_train", "40", "--n_rl_test", "8", "--n_gsm8k_test", "8", "--n_mmlu_test", "20",
          "--n_mmlu_dev_per_subject", "5", "--n_humaneval", "2"]),
    ]
    tok = str(data / "tokenizer" / "tokenizer.json")
    train = lambda name, n: dict(out_dir=str(runs / name), max_steps=n, batch_size=4, seq_len=128,  # noqa: E731
                                 log_every=1, eval_every=0, eval_batches=2, save_every=0)
    stages = {
        "pretrain": dict(
            model=dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, max_seq_len=128, tie_embeddings=True),
            data=dict(train_bin=str(data / "bins/pretrain/train.bin"), val_bin=str(data / "bins/pretrain/val.bin"), tokenizer=tok),
            train=train("pretrain", 4), optim=dict(lr=3e-3, warmup_steps=1)),
        "sft": dict(
            model=dict(init_from=str(runs / "pretrain/final")), data=dict(bin_dir=str(data / "bins/sft"), tokenizer=tok),
            train=train("sft", 4), optim=dict(lr=3e-3, warmup_steps=1),
            lora=dict(r=4, alpha=8, targets="all-linear", modules_to_save=["embed", "lm_head"]), format_eval_prompts=4),
        "dpo": dict(
            algorithm="dpo", model=dict(init_from=str(runs / "sft/final")),
            data=dict(bin_dir=str(data / "bins/preference"), max_val_pairs=8), train=train("dpo", 3),
            optim=dict(lr=1e-4, warmup_steps=1)),
        "grpo": dict(
            algorithm="grpo", model=dict(init_from=str(runs / "dpo/final")),
            rollout=dict(train_prompts=str(data / "prompts/rl_train.jsonl"), test_prompts=str(data / "prompts/rl_test.jsonl"),
                         prompts_per_rollout=2, group_size=2, max_new_tokens=16, eval_prompts=4),
            reward=dict(function="gsm8k_combined"), train={**train("grpo", 2), "spike": {"enabled": False}},
            optim=dict(lr=1e-5, warmup_steps=0, schedule="constant")),
    }
    paths = {}
    for name, recipe in stages.items():
        paths[name] = tmp / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(recipe))
    demo = dict(out_dir=str(tmp / "out"), data_dir=str(data), eval_limit=4, threads=1,
                data=[{"script": s, "args": a + d} for s, a in steps], **{k: str(v) for k, v in paths.items()})
    path = tmp / "demo.yaml"
    path.write_text(yaml.safe_dump(demo))
    return path


def run_demo(recipe: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "demo.py", "--recipe", str(recipe)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_demo_pipeline_end_to_end_then_reuses_finished_stages(tmp_path):
    recipe = write_recipes(tmp_path)
    first = run_demo(recipe)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    report = (tmp_path / "out" / "report.md").read_text()
    for row in ("| pretrain |", "| SFT (LoRA) |", "| DPO |", "| GRPO |", "GSM8K-format accuracy", "MMLU-format accuracy",
                "| serve |"):
        assert row in report, report
    assert (tmp_path / "out" / "loss_curves.png").stat().st_size > 1000
    served = json.loads((tmp_path / "out" / "serve.json").read_text())
    assert served["completion_tokens"] > 0

    second = run_demo(recipe)
    assert second.returncode == 0, second.stdout[-4000:]
    assert second.stdout.count("finished earlier") == 7  # every stage reused, nothing retrained

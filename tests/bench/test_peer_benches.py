"""The peer benches (bench/bench_{sft,dpo,grpo}_peers.py) run end to end on a tiny setting, so they
cannot rot: both sides train, the loss curves agree (the benches exit 1 otherwise), and the
report prints. DPO and GRPO compare against TRL, a bench-only dependency: skipped without it."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = json.dumps({"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64, "vocab_size": 512,
                   "max_seq_len": 256})
needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                               reason="trl is a bench-only peer (pip install -r requirements-bench.txt)")


def bench(script: str, *args: str) -> str:
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, f"bench/{script}", "--rounds", "1", "--shrink", TINY, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A tokenizer, preference bins and GSM8K-format prompts made by the pipeline's own code."""
    from data_pipeline.synthetic import arithmetic, preferences
    from data_pipeline.tokenizer.train_tokenizer import train_hf

    root = tmp_path_factory.mktemp("peer_bench_data")
    rng = random.Random(0)
    pairs = {"train": preferences.generate_pairs(rng, 24, "sft"), "val": preferences.generate_pairs(rng, 8, "val")}
    problems = [arithmetic.generate_problem(rng) for _ in range(24)]
    corpus = [p["question"] + "\n" + p["answer"] for p in problems]
    corpus += [m["content"] for split in pairs.values() for p in split for m in p["prompt"]]
    corpus += [p[k] for split in pairs.values() for p in split for k in ("chosen", "rejected")]
    (root / "tokenizer").mkdir()
    train_hf(corpus, 400, show_progress=False).save(str(root / "tokenizer" / "tokenizer.json"))
    (root / "raw").mkdir()
    for split, rows in pairs.items():
        (root / "raw" / f"preference_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "prompts").mkdir()
    (root / "prompts" / "rl_train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "data_pipeline/processing/build_preference_bins.py", "--data_dir", str(root),
                           "--num_workers", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return root


@pytest.mark.slow
def test_sft_bench_full_and_qlora_agree_with_hf_trainer():
    out = bench("bench_sft_peers.py", "--modes", "full,qlora", "--sft_bins", "", "--tokenizer", "", "--batch_size", "2",
                "--seq_len", "32", "--steps", "3", "--warmup", "1", "--loss_steps", "3")
    assert "loss agreement (first 3 steps, relative tolerance 0.001): all modes ok" in out
    assert "| full |" in out and "| qlora |" in out


@needs_trl
@pytest.mark.slow
def test_dpo_bench_starts_at_ln2_and_agrees_with_trl(data):
    out = bench("bench_dpo_peers.py", "--sides", "ours,trl", "--pref_bins", str(data / "bins" / "preference"),
                "--tokenizer", str(data / "tokenizer" / "tokenizer.json"), "--batch_size", "2", "--steps", "3",
                "--warmup", "1", "--loss_steps", "3")
    assert "| ours |" in out and "| trl |" in out and out.count("0.693147 |") == 2
    assert out.rstrip().endswith("ok")


@needs_trl
@pytest.mark.slow
def test_grpo_bench_runs_both_trainers_on_the_same_prompts(data):
    out = bench("bench_grpo_peers.py", "--init_from", "", "--tokenizer", str(data / "tokenizer" / "tokenizer.json"),
                "--prompts", str(data / "prompts" / "rl_train.jsonl"), "--prompts_per_step", "2", "--group_size", "2",
                "--micro_batch", "4", "--max_new_tokens", "8", "--steps", "3")
    assert "| ours |" in out and "| trl |" in out
    assert out.count("reward per step") == 2 and "round 1: " in out

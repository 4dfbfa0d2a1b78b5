"""finetune/distill_train.py as a user runs it: the example recipe with the top-k cache and on-policy
batches, the report it writes, and bad input as one paragraph with nothing written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.distill_recipe import DistillRecipe
from utils.checkpoint import read_meta
from utils.config import load_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs/examples/distill_tiny.yaml"


def run(args, timeout=300):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # the script bootstraps its own imports
    return subprocess.run([sys.executable, "finetune/distill_train.py", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def overrides(world, out):
    return ["--config_path", EXAMPLE, f"teacher.init_from={world['root'] / 'teacher'}",
            f"model.init_from={world['root'] / 'student'}", f"data.bin_dir={world['bins']}",
            f"data.tokenizer={world['tok']}", f"train.out_dir={out}", "train.max_steps=4", "train.batch_size=2",
            "train.seq_len=64", "train.device=cpu", "train.eval_every=0", "train.eval_batches=1",
            "train.progress=false", "onpolicy.max_new_tokens=8", "format_eval_prompts=2"]


def test_example_recipe_validates(world):
    recipe = load_config(DistillRecipe, EXAMPLE, overrides(world, "unused")[2:])
    assert recipe.teacher.logits == "online" and recipe.onpolicy.ratio == 0.25 and recipe.loss.kd_weight == 0.5


@pytest.mark.slow  # a subprocess (torch import) on purpose: the script runs from the repo root as users run it
def test_script_end_to_end_with_cache_and_on_policy_batches(world, tmp_path):
    out = tmp_path / "run"
    res = run([*overrides(world, out), "teacher.logits=topk", "teacher.top_k=16", f"teacher.cache_dir={tmp_path / 'cache'}",
               "data.pack=false", "onpolicy.ratio=0.5", "train.seed=2"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "teacher top-16 of" in res.stdout and "held-out arithmetic, 2 prompts" in res.stdout
    report = json.loads((out / "format_eval.json").read_text())
    assert set(report) == {"base", "distilled", "teacher"} and report["distilled"]["n"] == 2
    assert read_meta(out / "final")["stage"] == "distill"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    on_policy = [r["on_policy"] for r in records if "on_policy" in r]
    assert on_policy == [1.0, 0.0, 0.0, 1.0]  # the draws of seed 2 at ratio 0.5: samples, data, data, samples
    assert list((tmp_path / "cache").glob("topk-*/train.index.bin"))


@pytest.mark.slow
def test_bad_input_is_one_paragraph_and_writes_nothing(world, tmp_path):
    out = tmp_path / "run"
    res = run([*overrides(world, out), "loss.divergence=kl", "teacher.top_k=0"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "loss.divergence" in res.stderr and "forward_kl" in res.stderr and "teacher.top_k" in res.stderr
    assert not out.exists()

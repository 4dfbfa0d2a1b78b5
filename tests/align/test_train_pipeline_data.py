"""The trainers on the real pipeline pieces: a BPE tokenizer trained by data_pipeline, THE chat
template, preference bins built by build_preference_bins.py, and synthetic GSM8K-format RL
prompts. (Tiny random model, so this checks wiring and formats, not learning.)"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align import train_offline, train_online
from align.rollout import encode_prompts
from inference.answers import exact_answer_check
from data_pipeline.synthetic import arithmetic, preferences
from model.config import ModelConfig
from model.transformer import Transformer
from utils.checkpoint import save_checkpoint
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from data_pipeline.tokenizer.tokenizer import Tokenizer
    from data_pipeline.tokenizer.train_tokenizer import train_hf

    root = tmp_path_factory.mktemp("align_data")
    rng = random.Random(0)
    pairs = {split: preferences.generate_pairs(rng, n, bucket) for split, n, bucket in (("train", 48, "sft"), ("val", 16, "val"))}
    problems = [arithmetic.generate_problem(rng) for _ in range(40)]
    texts = [p["question"] + "\n" + p["answer"] for p in problems]
    texts += [m["content"] for ps in pairs.values() for p in ps for m in p["prompt"]] + [p["chosen"] for p in pairs["train"]]
    (root / "tokenizer").mkdir()
    train_hf(texts, 500, show_progress=False).save(str(root / "tokenizer" / "tokenizer.json"))
    tok = Tokenizer.from_file(root / "tokenizer" / "tokenizer.json")
    (root / "raw").mkdir()
    for split, rows in pairs.items():
        (root / "raw" / f"preference_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "prompts").mkdir()
    (root / "prompts" / "rl.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "data_pipeline/processing/build_preference_bins.py", "--data_dir", str(root),
                           "--num_workers", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=160))
    ckpt = save_checkpoint(root / "sft", model, tokenizer_path=root / "tokenizer" / "tokenizer.json")
    return root, ckpt, tok


def test_dpo_from_preference_bins_matches_jsonl(world):
    root, ckpt, tok = world
    common = ["--config_path", "configs/examples/align_dpo.yaml", f"model.init_from={ckpt}", "train.batch_size=8",
              "train.max_steps=1", "train.seq_len=160", "train.eval_every=0", "train.progress=false", "train.device=cpu"]
    from_bins = train_offline.main(common + [f"data.bin_dir={root}/bins/preference", f"train.out_dir={root}/dpo_bins"])
    from_jsonl = train_offline.main(common + [f"data.train_path={root}/raw/preference_train.jsonl",
                                              f"data.val_path={root}/raw/preference_val.jsonl", f"train.out_dir={root}/dpo_jsonl"])
    # Same pairs, same chat template, same order: the two sources train identically.
    assert from_bins["before"] == from_jsonl["before"] and from_bins["after"] == from_jsonl["after"]
    assert [h["loss"] for h in from_bins["train"].history] == [h["loss"] for h in from_jsonl["train"].history]


def test_grpo_on_gsm8k_prompts_with_the_chat_template(world):
    root, ckpt, tok = world
    rows = [json.loads(line) for line in (root / "prompts" / "rl.jsonl").read_text().splitlines()]
    ids = encode_prompts(tok, [rows[0]["question"]])[0]
    text = tok.decode(ids, skip_special_tokens=False)
    assert ids[0] == tok.bos_id and text.endswith(rows[0]["question"] + "<|im_end|>\n<|im_start|>assistant\n")
    out = train_online.main(["--config_path", "configs/examples/align_grpo.yaml", f"model.init_from={ckpt}",
                             f"rollout.train_prompts={root}/prompts/rl.jsonl", f"rollout.test_prompts={root}/prompts/rl.jsonl",
                             "rollout.eval_prompts=8", "rollout.prompts_per_rollout=2", "rollout.group_size=4",
                             "rollout.max_new_tokens=12", f"train.out_dir={root}/grpo", "train.batch_size=8", "train.max_steps=1",
                             "train.eval_every=0", "train.progress=false", "train.device=cpu"])
    assert out["steps"] == 1 and out["after"]["val_response_len"] <= 12
    from model.load import load_model

    acc = exact_answer_check(load_model(root / "grpo" / "final"), tok, rows[:4], 8, max_num_seqs=8)
    assert acc["n"] == 4 and 0.0 <= acc["accuracy"] <= 1.0
    with pytest.raises(UserError, match="beyond the model's context of 160"):
        train_online.main(["--config_path", "configs/examples/align_grpo.yaml", f"model.init_from={ckpt}",
                           f"rollout.train_prompts={root}/prompts/rl.jsonl", "rollout.test_prompts=", "rollout.max_new_tokens=150",
                           f"train.out_dir={root}/never"])

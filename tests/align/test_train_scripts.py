"""The two entry scripts end to end on a tiny checkpoint: recipe -> data -> loop -> checkpoints,
resume, the reward model feeding PPO, LoRA outputs, and bad input refused before training.

A character tokenizer and a stand-in chat template keep this independent of the trained BPE
tokenizer; the scripts reach both through the same functions as with the real ones.
"""
from __future__ import annotations

import json

import pytest

from align import train_offline, train_online
from tests.align.toy_setup import CharTok, toy_prompts
from model.load import load_model
from utils.checkpoint import read_meta
from utils.config import load_config
from utils.errors import UserError


pytestmark = pytest.mark.usefixtures("char_chat")


def _text(ids):
    return CharTok().decode(ids)


@pytest.fixture()
def files(tmp_path, toy_checkpoint):
    prompts = [{"question": _text(p), "answer": "so #### 7"} for p in toy_prompts(24)]
    (tmp_path / "rl.jsonl").write_text("\n".join(json.dumps(r) for r in prompts) + "\n")
    pairs = [{"prompt": _text(p), "chosen": "fff", "rejected": "ggg"} for p in toy_prompts(40, seed=3)]
    (tmp_path / "pref.jsonl").write_text("\n".join(json.dumps(r) for r in pairs) + "\n")
    return tmp_path, toy_checkpoint


def _online(tmp, ckpt, *extra):
    return ["--config_path", "configs/examples/align_grpo.yaml", f"model.init_from={ckpt}",
            f"rollout.train_prompts={tmp}/rl.jsonl", f"rollout.test_prompts={tmp}/rl.jsonl", "rollout.eval_prompts=4",
            "rollout.prompts_per_rollout=4", "rollout.group_size=4", "rollout.max_new_tokens=6",
            "reward.function=gsm8k_format", f"train.out_dir={tmp}/run", "train.batch_size=8", "train.max_steps=2",
            "train.eval_every=0", "train.save_every=1", "train.progress=false", "train.device=cpu", *extra]


def _offline(tmp, ckpt, algorithm, *extra):
    return ["--config_path", f"configs/examples/align_{algorithm}.yaml", f"model.init_from={ckpt}",
            f"data.train_path={tmp}/pref.jsonl", f"data.val_path={tmp}/pref.jsonl", f"train.out_dir={tmp}/{algorithm}",
            "train.batch_size=8", "train.max_steps=3", "train.seq_len=24", "train.eval_every=0", "train.progress=false",
            "train.device=cpu", "optim.lr=3e-3", *extra]


def test_grpo_script_trains_saves_and_resumes(files):
    tmp, ckpt = files
    out = train_online.main(_online(tmp, ckpt))
    assert out["steps"] == 2 and set(out["before"]) == {"val_accuracy", "val_format", "val_response_len"}
    assert load_model(tmp / "run" / "final").cfg.max_seq_len == 40
    summary = json.loads((tmp / "run" / "rl_eval.json").read_text())
    assert [c["step"] for c in summary["curve"]] == [1, 2] and "reward_mean" in summary["curve"][0]
    again = train_online.main(_online(tmp, ckpt, "train.max_steps=3"))  # resumes from step 2
    assert again["steps"] == 3
    assert [c["step"] for c in again["curve"]] == [1, 2, 3]  # steps 1-2 read back from the first run's log


def test_reward_model_then_ppo_with_it(files):
    tmp, ckpt = files
    rm = train_offline.main(_offline(tmp, ckpt, "reward"))
    assert rm["after"]["val_pref_accuracy"] >= rm["before"]["val_pref_accuracy"]
    assert read_meta(tmp / "reward" / "final")["kind"] == "scalar_head"
    out = train_online.main(_online(tmp, ckpt, "algorithm=ppo", "rollout.group_size=2", f"reward.model_path={tmp}/reward/final",
                                    "rl.epochs=2", "train.max_steps=2"))
    assert "value_loss" in out["train"].history[0]
    load_model(tmp / "run" / "final")  # the policy alone, loadable by the next stage
    load_model(tmp / "run" / "critic", expect="scalar_head")


def test_dpo_lora_kto_and_qlora_dpo_scripts(files):
    tmp, ckpt = files
    out = train_offline.main(_offline(tmp, ckpt, "dpo"))
    assert out["before"]["val_pref_accuracy"] == 0.5 and out["after"]["val_pref_accuracy"] > 0.5
    lora = train_offline.main(_offline(tmp, ckpt, "kto", "model.lora={r: 4, alpha: 8}"))
    meta = read_meta(tmp / "kto" / "final")
    assert meta["kind"] == "adapter" and meta["base_checkpoint"] == str(ckpt)
    assert lora["after"]["val_pref_accuracy"] > 0.5
    qlora = train_offline.main(_offline(tmp, ckpt, "dpo", "model.lora={r: 4, alpha: 8}", "model.qlora={compute_dtype: fp32}",
                                        f"train.out_dir={tmp}/dpo_qlora"))
    assert read_meta(tmp / "dpo_qlora" / "final")["qlora"] is True and qlora["after"]["val_pref_accuracy"] > 0.5


def test_bad_input_is_refused_before_training(files):
    tmp, ckpt = files
    with pytest.raises(UserError, match="beyond the model's context of 40"):
        train_online.main(_online(tmp, ckpt, "rollout.max_new_tokens=64"))
    with pytest.raises(UserError, match="group_size must be 2 or more"):
        train_online.main(_online(tmp, ckpt, "rollout.group_size=1"))
    with pytest.raises(UserError, match="Did you mean 'gsm8k_exact'"):
        train_online.main(_online(tmp, ckpt, "reward.function=gsm8k_exac"))
    (tmp / "bad.jsonl").write_text(json.dumps({"prompt": "abc", "chosen": "", "rejected": "gg"}) + "\n")
    with pytest.raises(UserError, match="line 1: 'chosen' is empty"):
        train_offline.main(_offline(tmp, ckpt, "dpo", f"data.train_path={tmp}/bad.jsonl"))
    assert not (tmp / "run").exists() and not (tmp / "dpo").exists()


@pytest.mark.parametrize("name", ["dpo", "dpo_qlora", "orpo", "kto", "simpo", "reward", "grpo", "gspo", "ppo", "rft"])
def test_example_recipes_validate(files, name):
    tmp, ckpt = files
    from align.recipe import OfflineRecipe, OnlineRecipe

    online = name in ("grpo", "gspo", "ppo", "rft")
    paths = ([f"rollout.train_prompts={tmp}/rl.jsonl", f"rollout.test_prompts={tmp}/rl.jsonl"] if online
             else [f"data.train_path={tmp}/pref.jsonl", f"data.val_path={tmp}/pref.jsonl"])
    cfg = load_config(OnlineRecipe if online else OfflineRecipe, f"configs/examples/align_{name}.yaml",
                      [f"model.init_from={ckpt}", *paths])
    assert cfg.algorithm == name.split("_")[0]

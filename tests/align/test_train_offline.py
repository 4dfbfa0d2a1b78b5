"""Offline preference training on the shared loop: DPO / KTO / ORPO / SimPO raise held-out
preference accuracy on a toy set, the reward model learns and round-trips through its
checkpoint, LoRA leaves the base untouched, bad preference files fail before training."""
from __future__ import annotations

import json

import pytest
import torch

from model.heads import ScalarHeadModel, save_scalar_model
from model.load import load_model
from align.preference import (
    PairBatches, PreferencePair, collate_pairs, compute_reference_logps, make_preference_loss, preference_accuracy,
)
from align.preference_data import load_preference_pairs
from model.lora import apply_lora
from tests.align.toy_setup import CharTok, tiny_policy, toy_pairs, train_cfg
from utils.errors import UserError
from utils.optim import OptimConfig
from utils.train_loop import train

CPU = torch.device("cpu")
OPTIM = OptimConfig(lr=3e-3, warmup_steps=0, schedule="constant", weight_decay=0.0)


@pytest.fixture(scope="module")
def data():
    return toy_pairs(64, seed=0), toy_pairs(32, seed=1)  # disjoint prompts: held-out pairs


def _fit(algorithm, policy, train_pairs, val_pairs, out, steps=8, params=None, beta=0.1):
    ref = compute_reference_logps(policy, train_pairs, 16, CPU, mismatched=algorithm == "kto")
    val_ref = compute_reference_logps(policy, val_pairs, 16, CPU)
    before = preference_accuracy(policy, val_pairs, val_ref, 16, CPU)
    loss_fn = make_preference_loss(algorithm, beta=beta, ref=ref, pairs=train_pairs, simpo_gamma=0.5)
    eval_fn = lambda m: {"val_" + k: v for k, v in preference_accuracy(m, val_pairs, val_ref, 16, CPU).items()}  # noqa: E731
    res = train(policy, PairBatches(train_pairs, 16, seed=0), loss_fn, train_cfg(out, steps, 16), OPTIM,
                eval_fn=eval_fn, params=params)
    return before, res, ref


def test_dpo_raises_heldout_preference_accuracy_and_reference_cache_is_the_start(tmp_path, data):
    train_pairs, val_pairs = data
    policy = tiny_policy(0)
    start = tiny_policy(0)  # an identical untouched copy
    before, res, ref = _fit("dpo", policy, train_pairs, val_pairs, tmp_path)
    assert before["pref_accuracy"] == 0.5  # policy == reference: every log-ratio ties
    assert res.final_eval["val_pref_accuracy"] > 0.9
    assert res.history[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # ln 2 at step 0
    again = compute_reference_logps(start, train_pairs, 16, CPU)
    assert torch.equal(ref.chosen, again.chosen) and torch.equal(ref.rejected, again.rejected)


@pytest.mark.parametrize("algorithm,beta", [("kto", 0.1), ("orpo", 0.1), ("simpo", 2.0)])
def test_other_offline_objectives_learn_the_preference(tmp_path, data, algorithm, beta):
    train_pairs, val_pairs = data
    before, res, _ = _fit(algorithm, tiny_policy(1), train_pairs, val_pairs, tmp_path, steps=6, beta=beta)
    # pref_accuracy: chosen log-ratio (vs the start) above rejected; 0.5 at the start (ties).
    assert before["pref_accuracy"] == 0.5
    assert res.final_eval["val_pref_accuracy"] > 0.9 and res.final_eval["val_margin"] > 0
    assert res.final_eval["val_logp_accuracy"] >= before["logp_accuracy"]


def test_lora_dpo_moves_only_adapters(tmp_path, data):
    train_pairs, val_pairs = data
    policy = tiny_policy(2)
    apply_lora(policy, "all-linear", r=4, alpha=8)
    base = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" not in k}
    params = [p for p in policy.parameters() if p.requires_grad]
    _, res, _ = _fit("dpo", policy, train_pairs, val_pairs, tmp_path, steps=6, params=params)
    assert all(torch.equal(policy.state_dict()[k], v) for k, v in base.items())
    assert res.final_eval["val_pref_accuracy"] > 0.7


def test_reward_model_learns_and_round_trips_its_checkpoint(tmp_path, data, toy_checkpoint):
    # Reversed roles, so the random head starts out mostly wrong (it happens to favour the
    # usual chosen replies) and has to learn the preference.
    train_pairs, val_pairs = [[PreferencePair(p.prompt, p.rejected, p.chosen) for p in ps] for ps in data]
    rm = ScalarHeadModel(tiny_policy(3))
    before = preference_accuracy(rm, val_pairs, None, 16, CPU, reward_model=True)
    res = train(rm, PairBatches(train_pairs, 16, seed=0), make_preference_loss("reward", beta=1.0), train_cfg(tmp_path, 8, 16),
                OPTIM, weights_fn=lambda m: m.weights(live=True), checkpoint_meta={"kind": "scalar_head"})
    after = preference_accuracy(rm, val_pairs, None, 16, CPU, reward_model=True)
    assert before["pref_accuracy"] < 0.5 and after["pref_accuracy"] > 0.9
    loaded = load_model(res.checkpoint, expect="scalar_head")  # the loop's final/ is a reward-model checkpoint
    batch = collate_pairs(val_pairs[:4], range(4))
    lengths = batch["chosen_mask"].int().cumsum(1).argmax(1) + 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(batch["chosen_ids"], lengths), rm.eval().score(batch["chosen_ids"], lengths))
    save_scalar_model(tmp_path / "rm2", rm)
    assert json.loads((tmp_path / "rm2" / "meta.json").read_text())["kind"] == "scalar_head"
    with pytest.raises(UserError, match="not a reward model"):
        load_model(toy_checkpoint, expect="scalar_head")


@pytest.mark.usefixtures("char_chat")
def test_preference_file_with_an_empty_reply_is_refused(tmp_path):
    path = tmp_path / "pref.jsonl"
    rows = [{"prompt": "abc", "chosen": "ff", "rejected": "gg"}, {"prompt": "abd", "chosen": "ff", "rejected": " "}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(UserError, match=r"pref.jsonl line 2: 'rejected' is empty"):
        load_preference_pairs(str(path), CharTok(), 64)
    pairs, dropped = load_preference_pairs(str(path), CharTok(), 64, limit=1)
    assert dropped == 0 and pairs[0].chosen == [5, 5, 1] and pairs[0].prompt == [2, 0, 1, 2, 1, 3]
    pairs, dropped = load_preference_pairs(str(path), CharTok(), 64, on_bad_row="skip")
    assert len(pairs) == 1 and dropped == 1  # skipped and counted


def test_reference_pass_covers_exactly_the_pairs_a_run_reaches(data):
    train_pairs, _ = data
    batches = PairBatches(train_pairs, 16, seed=0)
    used = batches.upcoming(3)  # 3 batches of 16 from a 64-pair epoch: 48 distinct pairs
    seen = sorted({int(i) for _ in range(3) for i in next(batches)["index"]})
    assert used == seen and len(used) == 48
    ref = compute_reference_logps(tiny_policy(0), train_pairs, 16, CPU, indices=used)
    full = compute_reference_logps(tiny_policy(0), train_pairs, 16, CPU)
    assert torch.equal(ref.chosen[used], full.chosen[used])
    assert torch.isnan(ref.chosen).sum() == 16
    loss_fn = make_preference_loss("dpo", beta=0.1, ref=ref)
    with pytest.raises(RuntimeError, match="were not precomputed"):
        missing = [i for i in range(64) if i not in used][:4]
        loss_fn(tiny_policy(0), collate_pairs([train_pairs[i] for i in missing], missing))


def test_lora_policy_trains_and_saves_modules_to_save():
    # modules_to_save in an align recipe train fully and land in the adapter beside the LoRA tensors
    from align.policy import make_trainable
    from align.recipe import PolicyConfig
    from model import ModelConfig, Transformer
    from model.lora import LoRAConfig

    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16))
    lora = LoRAConfig(r=2, alpha=4, targets="all-linear", modules_to_save=["lm_head"])
    trainable = make_trainable(model, PolicyConfig(init_from="unused", lora=lora))
    saved = trainable.weights_fn(model)
    assert any(k.startswith("lm_head") for k in saved) and any("lora_A" in k for k in saved)
    assert all(p.requires_grad for p in model.lm_head.parameters())

"""Online RL on the shared loop: GRPO learns a toy reward, PPO's critic fits, the reference and
LoRA base stay frozen, resume replays the buffer exactly, bad recipes fail before training."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.heads import ScalarHeadModel
from align.online import ActorCritic, RolloutBatches, make_rl_loss
from align.policy import frozen_copy
from align.recipe import OnlineRecipe, RLConfig
from model.lora import apply_lora, lora_layers
from tests.align.toy_setup import (
    make_phase, params_snapshot, same_params, tiny_policy, toy_prompts, train_cfg,
)
from utils.config import config_from_dict
from utils.errors import UserError
from utils.optim import OptimConfig
from utils.train_loop import train

OPTIM = OptimConfig(lr=3e-3, warmup_steps=0, schedule="constant", weight_decay=0.0)


def test_grpo_raises_toy_reward_and_never_touches_the_reference(tmp_path):
    policy = tiny_policy(0)
    reference = frozen_copy(policy)
    ref_before = params_snapshot(reference)
    phase = make_phase("grpo", policy, reference, toy_prompts(32), G=8, P=4, rl=RLConfig(kl_beta=0.01))
    batches = RolloutBatches(phase, 16, 1, seed=0)
    loss_fn = make_rl_loss("grpo", clip_eps=0.2, kl_beta=0.01)
    res = train(policy, batches, loss_fn, train_cfg(tmp_path, 12, 16, global_batch_size=32), OPTIM)
    rewards = [h["reward_mean"] for h in res.history]
    assert len(rewards) == 12 and all("clipfrac" in h and "kl" in h and "response_len" in h for h in res.history)
    # Random init puts ~1/16 of the mass on the target token; 12 updates more than double it.
    assert sum(rewards[:3]) / 3 < 0.12
    assert sum(rewards[-3:]) / 3 > 0.2
    assert same_params(reference, ref_before)
    assert res.history[-1]["kl"] > 0  # the policy moved away from the frozen reference


def test_on_policy_grpo_skips_the_old_logp_pass_and_takes_the_same_steps(tmp_path):
    # One optimizer step per rollout: the policy that sampled is the one the loss runs, so pi_old
    # is the loss's own detached log-probs. Skipping the rollout-phase forward changes nothing.
    runs = {}
    for on_policy in (False, True):
        policy = tiny_policy(0)
        phase = make_phase("grpo", policy, frozen_copy(policy), toy_prompts(8), G=4, P=4, rl=RLConfig(kl_beta=0.04),
                           on_policy=on_policy)
        buffer, _ = phase(0)
        assert ("old_logp" in buffer) != on_policy
        res = train(policy, RolloutBatches(phase, 8, 1, seed=0), make_rl_loss("grpo", clip_eps=0.2, kl_beta=0.04),
                    train_cfg(tmp_path / str(on_policy), 3, 8, global_batch_size=16), OPTIM)
        runs[on_policy] = (params_snapshot(policy), res.history)
    (w_old, h_old), (w_new, h_new) = runs[False], runs[True]
    assert max((w_old[k] - w_new[k]).abs().max().item() for k in w_old) < 1e-6
    for a, b in zip(h_old, h_new):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["kl_ref"] == pytest.approx(b["kl_ref"], abs=1e-6)
    assert h_new[-1]["kl_ref"] != 0.0  # after two updates the policy has left the reference


def test_one_step_buffer_in_length_order_gives_the_same_gradient():
    # When the whole buffer is one optimizer step, micro-batches only split a token-weighted sum:
    # cutting them from length-sorted rows (less padding) instead of a shuffle gives the same
    # gradient, up to the order of float32 additions.
    grads = {}
    for one_step in (False, True):
        policy = tiny_policy(0)
        phase = make_phase("grpo", policy, frozen_copy(policy), toy_prompts(8), G=4, P=4, on_policy=True)
        batches, loss_fn, total = RolloutBatches(phase, 4, 1, seed=0, one_step=one_step), make_rl_loss("grpo", clip_eps=0.2), 0.0
        widths = []
        for _ in range(4):  # 16 rows, 4 per micro-batch
            batch = next(batches)
            widths.append(batch["mask"].shape[1])
            loss, m = loss_fn(policy, batch)
            (loss * m["loss_weight"]).backward()
            total += m["loss_weight"]
        grads[one_step] = ({n: p.grad / total for n, p in policy.named_parameters()}, sum(widths))
    (shuffled, w_shuffled), (ordered, w_ordered) = grads[False], grads[True]
    assert all(torch.allclose(shuffled[n], ordered[n], rtol=1e-5, atol=1e-8) for n in shuffled)
    assert w_ordered <= w_shuffled  # no more padded columns than the shuffle


def test_ppo_runs_end_to_end_and_value_loss_falls(tmp_path):
    policy = tiny_policy(1)
    critic = ScalarHeadModel(tiny_policy(1))
    rl = RLConfig(epochs=4, kl_coef=0.05, vf_coef=1.0)
    phase = make_phase("ppo", policy, frozen_copy(policy), toy_prompts(16), critic=critic, G=2, P=8, rl=rl)
    batches = RolloutBatches(phase, 16, rl.epochs, seed=0)
    loss_fn = make_rl_loss("ppo", clip_eps=0.2, vf_coef=1.0, vf_clip=10.0)
    res = train(ActorCritic(policy, critic), batches, loss_fn, train_cfg(tmp_path, 4, 16), OPTIM)
    losses = [h["value_loss"] for h in res.history]  # four epochs over one rollout buffer
    assert all(h["rollout"] == 1.0 for h in res.history)
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(0.0 <= h["clipfrac"] <= 1.0 for h in res.history)


def test_lora_policy_trains_only_adapters(tmp_path):
    policy = tiny_policy(2)
    reference = frozen_copy(policy)
    apply_lora(policy, "all-linear", r=4, alpha=8)
    base = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" not in k}
    adapters_b = {k: v.clone() for k, v in policy.state_dict().items() if k.endswith("lora_B")}
    phase = make_phase("grpo", policy, reference, toy_prompts(16), G=4, P=4)
    params = [p for p in policy.parameters() if p.requires_grad]
    train(policy, RolloutBatches(phase, 16, 1, seed=0), make_rl_loss("grpo", clip_eps=0.2, kl_beta=0.04),
          train_cfg(tmp_path, 2, 16), OPTIM, params=params)
    now = policy.state_dict()
    assert all(torch.equal(now[k], v) for k, v in base.items())
    assert any(not torch.equal(now[k], v) for k, v in adapters_b.items())
    assert len(lora_layers(policy)) > 0


def test_rft_keeps_each_groups_best_and_gspo_trains(tmp_path):
    policy = tiny_policy(3)
    reference = frozen_copy(policy)
    phase = make_phase("rft", policy, reference, toy_prompts(8), G=4, P=4, rl=RLConfig(rft_min_reward=0.01))
    calls = []
    score = phase.score_fn
    phase.score_fn = lambda ro, answers: calls.append(ro) or score(ro, answers)
    buffer, stats = phase(0)
    ro = calls[0]
    rewards = score(ro, None).view(4, 4)
    for g in range(4):
        best = int(rewards[g].argmax()) + 4 * g
        kept = buffer["mask"][g].any()
        assert torch.equal(buffer["tokens"][g], ro.tokens[best])
        assert bool(kept) == bool(rewards[g].max() >= 0.01)
    assert stats["kept"] == pytest.approx(float((rewards.max(dim=1).values >= 0.01).float().mean()))

    gspo = make_phase("gspo", policy, reference, toy_prompts(8), G=4, P=4)
    res = train(policy, RolloutBatches(gspo, 16, 2, seed=0), make_rl_loss("gspo", clip_eps=3e-4, clip_eps_high=4e-4),
                train_cfg(tmp_path, 2, 16), OPTIM)
    assert res.history[0]["ratio"] == pytest.approx(1.0, abs=1e-5)  # first pass: pi == pi_old
    assert res.history[1]["ratio"] != pytest.approx(1.0, abs=1e-7)  # second epoch: the policy moved


def test_iterator_resume_replays_the_same_micro_batches_without_a_new_rollout():
    policy = tiny_policy(4)
    counted = []
    phase = make_phase("grpo", policy, frozen_copy(policy), toy_prompts(8), G=4, P=4)

    def counting(r):
        counted.append(r)
        return phase(r)

    it = RolloutBatches(counting, 4, 2, seed=0)
    next(it), next(it), next(it)
    state = it.state_dict()
    expected = [next(it) for _ in range(3)]
    resumed = RolloutBatches(counting, 4, 2, seed=0)
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(3)]
    assert counted == [0]  # the buffer came back from the state; no second rollout phase
    for a, b in zip(expected, got):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != "stats")


def _recipe(**over):
    data = {"algorithm": "grpo", "model": {"init_from": "."},
            "train": {"out_dir": "x", "max_steps": 1, "batch_size": 4, "seq_len": 32},
            "rollout": {"train_prompts": __file__, "test_prompts": ""}}
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return config_from_dict(OnlineRecipe, data, "3_rlhf_grpo.yaml")


def test_bad_recipes_fail_before_training():
    _recipe()  # the base recipe is fine
    with pytest.raises(UserError, match="group_size must be 2 or more"):
        _recipe(rollout={"group_size": 1})
    with pytest.raises(UserError, match="Did you mean 'gsm8k_exact'"):
        _recipe(reward={"function": "gsm8k_exakt"})
    with pytest.raises(UserError, match="rl.clip_epsilon: unknown key"):
        _recipe(rl={"clip_epsilon": 0.1})
    assert _recipe(algorithm="gspo").rl.clip("gspo") == (3e-4, 4e-4)
    assert _recipe(algorithm="ppo", rollout={"group_size": 1}).buffer_rows == 8


def test_target_logprobs_scores_only_the_masked_positions_as_the_full_logits_would():
    from align.logprobs import target_logprobs

    policy = tiny_policy(3)
    tokens = torch.randint(0, 16, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, 4:], mask[1, 2:6], mask[2, 7] = True, True, True
    got = target_logprobs(policy, tokens, mask, temperature=0.7)
    full = (policy(tokens[:, :-1]) / 0.7).log_softmax(-1).gather(2, tokens[:, 1:, None])[..., 0]
    assert torch.allclose(got[mask], full[mask], atol=1e-6) and torch.all(got[~mask] == 0)
    got.sum().backward()  # the head's gradient flows through the gathered rows
    assert policy.lm_head.weight.grad is not None and policy.lm_head.weight.grad.abs().sum() > 0


def test_log_probs_are_those_of_the_sampling_temperature():
    policy = tiny_policy(5)
    phase = make_phase("grpo", policy, frozen_copy(policy), toy_prompts(8), G=4, P=4)
    phase.sampling = replace(phase.sampling, temperature=0.5)
    buffer, _ = phase(0)
    batch = next(RolloutBatches(lambda r: (buffer, {}), 16, 1, seed=0))
    _, on_policy = make_rl_loss("grpo", clip_eps=0.2, kl_beta=0.04, temperature=0.5)(policy, batch)
    _, mismatched = make_rl_loss("grpo", clip_eps=0.2, kl_beta=0.04, temperature=1.0)(policy, batch)
    assert on_policy["ratio"] == pytest.approx(1.0, abs=1e-6) and on_policy["kl"] == pytest.approx(0.0, abs=1e-6)
    assert abs(float(mismatched["ratio"]) - 1.0) > 1e-3  # T=1 log-probs are not the behaviour policy's

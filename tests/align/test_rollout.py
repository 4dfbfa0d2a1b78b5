"""Rollouts go through the inference engine, with correct masks, and see the live weights."""
from __future__ import annotations

import pytest
import torch

from align.policy import frozen_copy
from align.rollout import check_rollout_length, generate_rollouts, make_engine
from inference.engine import LLMEngine
from inference.sampling_params import SamplingParams
from tests.align.toy_setup import STOP, CharTok, make_phase, tiny_policy, toy_prompts
from utils.errors import UserError


def test_rollout_phase_calls_engine_generate_once_with_groups(monkeypatch):
    calls = []
    original = LLMEngine.generate

    def spy(self, prompts, params=None, use_tqdm=False):
        calls.append((len(prompts), [p.n for p in params]))
        return original(self, prompts, params, use_tqdm)

    monkeypatch.setattr(LLMEngine, "generate", spy)
    policy = tiny_policy()
    phase = make_phase("grpo", policy, frozen_copy(policy), toy_prompts(8), G=3, P=4)
    buffer, stats = phase(0)
    assert calls == [(4, [3, 3, 3, 3])]  # one batched call: 4 prompts, n = group size
    assert buffer["tokens"].shape[0] == 12 and stats["rollout"] == 1.0


def test_masks_cover_exactly_the_response_and_stop_token():
    policy = tiny_policy(1)
    prompts = [[2, 3, 4], [5, 6]]
    engine = make_engine(policy, CharTok(), block_size=8, max_num_seqs=16, max_model_len=24)
    ro = generate_rollouts(engine, prompts, SamplingParams(max_tokens=6, temperature=1.0), 3, [STOP], CharTok(), seed=3)
    assert ro.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    for r in range(6):
        prompt = prompts[int(ro.prompt_index[r])]
        row, mask = ro.tokens[r], ro.response_mask[r]
        assert row[: len(prompt)].tolist() == prompt and not mask[: len(prompt)].any()
        response = row[mask].tolist()
        n = len(response)
        assert mask[len(prompt) : len(prompt) + n].all() and not mask[len(prompt) + n :].any()
        if ro.truncated[r]:
            assert n == 6 and STOP not in response
            assert ro.texts[r] == CharTok().decode(response)
        else:  # the stop token is trained on but not part of the text
            assert response[-1] == STOP and STOP not in response[:-1]
            assert ro.texts[r] == CharTok().decode(response[:-1])
    assert ro.lengths.tolist() == [len(prompts[int(i)]) + int(n) for i, n in zip(ro.prompt_index, ro.response_lengths)]


def _greedy_reference(model, prompt, max_new):
    """Greedy continuation by full forwards (test oracle only; training never does this)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(nxt)
            if nxt == STOP:
                break
    return ids[len(prompt):]


def test_each_phase_samples_with_the_current_weights():
    policy = tiny_policy(2)
    prompts = toy_prompts(4, seed=5)
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    phase = make_phase("grpo", policy, frozen_copy(policy), prompts, G=2, P=4)
    phase.sampling = greedy
    first, _ = phase(0)
    with torch.no_grad():  # a "policy update" that changes what greedy decoding says
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    second, _ = phase(1)  # same prompts again: a stale prefix cache would show here
    assert not torch.equal(first["tokens"], second["tokens"])
    order = phase.prompt_indices(1)
    for i, pi in enumerate(order):
        row, mask = second["tokens"][2 * i], second["mask"][2 * i]
        got = row[1:][mask].tolist()
        assert got == _greedy_reference(policy, prompts[pi], 6)


def test_rollout_length_beyond_context_is_refused():
    with pytest.raises(UserError, match="lower rollout.max_new_tokens to 40"):
        check_rollout_length([[1] * 10, [1] * 24], 50, 64, "prompts.jsonl")
    check_rollout_length([[1] * 24], 40, 64, "prompts.jsonl")  # exactly fits

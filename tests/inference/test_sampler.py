"""Sampler: hand-checked filters and penalties, exact sampling distribution, seeded reproducibility."""
import math

import pytest
import torch

from inference import sampler
from inference.sampling_params import SamplingParams
from utils.errors import UserError


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    out = sampler.top_k_top_p_filter(logits, top_k=[2, 0], top_p=[1.0, 1.0])
    assert torch.isinf(out[0]).tolist() == [True, False, True, False, True]
    assert torch.equal(out[1], logits[1])  # k = 0: off


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probs 0.5, 0.3, 0.15, 0.05: top_p 0.8 keeps {0.5, 0.3}; 0.81 also needs 0.15; tiny p keeps the argmax
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log()[None].repeat(3, 1)
    out = sampler.top_k_top_p_filter(logits, top_k=[0, 0, 0], top_p=[0.8, 0.81, 0.01])
    kept = (~torch.isinf(out)).tolist()
    assert kept[0] == [False, True, False, True]
    assert kept[1] == [True, True, False, True]
    assert kept[2] == [False, True, False, False]


def test_top_k_then_top_p_renormalises_after_k():
    # After top-2 the distribution is {0.5/0.8, 0.3/0.8} = {0.625, 0.375}: top_p 0.6 keeps one token.
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = sampler.top_k_top_p_filter(probs.log()[None], top_k=[2], top_p=[0.6])
    assert (~torch.isinf(out)).tolist() == [[True, False, False, False]]


def test_penalties_hand_checked():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    # prompt has token 0, output has token 1 twice and token 3 once
    out = sampler.apply_penalties(logits, [[0]], [[1, 3, 1]], repetition=[2.0], presence=[0.5], frequency=[0.25])
    expected = [
        2.0 / 2,  # seen in prompt, positive: divided; no presence/frequency (prompt only)
        -1.0 * 2 - 0.5 - 0.25 * 2,  # seen twice in output, negative: multiplied
        0.5,  # unseen
        3.0 / 2 - 0.5 - 0.25,
        -2.0,
    ]
    assert out[0].tolist() == pytest.approx(expected)


def test_greedy_takes_argmax_after_penalties():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    sp = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    g = torch.Generator().manual_seed(0)
    assert sampler.sample(logits, [sp], [[]], [[]], [g]).tolist() == [0]
    assert sampler.sample(logits, [sp], [[0]], [[]], [g]).tolist() == [1]  # 3/1.2 = 2.5 < 2.9


def test_sampling_distribution_matches_softmax():
    """Exponential-race sampling draws Categorical(softmax(logits / T)) (chi-square check)."""
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5])
    T = 0.7
    p = (logits / T).softmax(-1)
    g = torch.Generator().manual_seed(0)
    n = 20000
    probs = p[None].expand(n, -1)
    noise = torch.empty(n, 5).exponential_(generator=g)
    counts = torch.bincount(sampler.sample_from_probs(probs, noise), minlength=5).double()
    chi2 = (((counts - n * p.double()) ** 2) / (n * p.double())).sum().item()
    assert chi2 < 18.5  # 4 dof, p = 0.001


def test_seeded_rows_reproduce_whatever_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    sp = SamplingParams(temperature=1.0, top_k=20)
    def draw(rows, seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return sampler.sample(logits[rows], [sp] * len(rows), [[]] * len(rows), [[]] * len(rows), gens).tolist()

    batch = draw([0, 1, 2], [7, 8, 9])
    assert batch == [draw([r], [7 + r])[0] for r in range(3)]
    assert draw([2, 0], [9, 7]) == [batch[2], batch[0]]
    many = {tuple(draw([0, 1, 2], [s, s + 1, s + 2])) for s in range(10, 20)}
    assert len(many) > 1  # the seed matters


def test_logprobs_are_raw_log_softmax_with_top_n():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    [(chosen, top)] = sampler.token_logprobs(logits, torch.tensor([1]), top_n=2)
    ref = logits[0].log_softmax(-1)
    assert chosen == pytest.approx(ref[1].item())
    assert [t for t, _ in top] == [2, 1] and top[0][1] == pytest.approx(ref[2].item())


def test_probs_from_logits_is_one_hot_for_greedy():
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0]])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)]
    probs = sampler.probs_from_logits(sampler.processed_logits(logits, params, [[], []], [[], []]), params)
    assert probs[0].tolist() == [0.0, 1.0, 0.0]
    assert probs[1].sum().item() == pytest.approx(1.0) and math.isclose(probs[1, 1].item(), logits[1].softmax(-1)[1].item(), rel_tol=1e-6)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(max_tokens=-1), "max_tokens"),
        (dict(max_tokens=0, n=2), "n=1"),
        (dict(prompt_logprobs=21), "prompt_logprobs"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(n=0), "n"),
        (dict(stop=[""]), "stop"),
        (dict(top_logprobs=3), "top_logprobs"),
    ],
)
def test_validate_names_the_bad_field(kw, field):
    with pytest.raises(UserError, match=field):
        SamplingParams(**kw).validate(64)

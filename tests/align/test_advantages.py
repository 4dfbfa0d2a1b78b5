"""GAE, group-normalised advantages and whitening against hand-worked values."""
import math

import pytest
import torch

from align.advantages import gae, group_advantages, whiten
from utils.errors import UserError


def test_gae_hand_computed_with_prompt_prefix_and_padding():
    # gamma = 0.9, lam = 0.8, gamma*lam = 0.72. Masked slots hold garbage (5, 7, 9, 3, 4)
    # that must be ignored; after the last response token V = 0 and A = 0.
    #
    # Row 0: prompt at t=0,1; response t=2,3,4; padding t=5.
    #   t=4: delta = 1 + 0.9*0   - 0.2 = 0.8;              A4 = 0.8
    #   t=3: delta = 0 + 0.9*0.2 - 0.4 = -0.22;            A3 = -0.22 + 0.72*0.8   = 0.356
    #   t=2: delta = 0 + 0.9*0.4 - 0.5 = -0.14;            A2 = -0.14 + 0.72*0.356 = 0.11632
    #   returns R = A + V: 0.61632, 0.756, 1.0
    # Row 1: prompt t=0; response t=1,2; padding t=3..5.
    #   t=2: delta = 2   + 0.9*0   - 1.5 = 0.5;             A2 = 0.5
    #   t=1: delta = 0.5 + 0.9*1.5 - 1.0 = 0.85;            A1 = 0.85 + 0.72*0.5 = 1.21
    #   returns: 2.21, 2.0
    rewards = torch.tensor([[5.0, 5.0, 0.0, 0.0, 1.0, 7.0],
                            [5.0, 0.5, 2.0, 7.0, 7.0, 7.0]])
    values = torch.tensor([[9.0, 9.0, 0.5, 0.4, 0.2, 9.0],
                           [3.0, 1.0, 1.5, 4.0, 4.0, 4.0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0],
                         [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0, 0, 0.11632, 0.356, 0.8, 0],
                                                  [0, 1.21, 0.5, 0, 0, 0]]))
    torch.testing.assert_close(ret, torch.tensor([[0, 0, 0.61632, 0.756, 1.0, 0],
                                                  [0, 2.21, 2.0, 0, 0, 0]]))


def test_gae_skips_masked_gap():
    # mask [1, 0, 1] (e.g. a tool output in the middle); gamma = lam = 1
    #   t=2: delta = 1 - 0.3 = 0.7;             A2 = 0.7
    #   t=0: delta = 0 + 0.3 - 0.5 = -0.2;      A0 = -0.2 + 0.7 = 0.5  (= total reward 1 - V0 0.5)
    adv, ret = gae(torch.tensor([[0.0, 99.0, 1.0]]), torch.tensor([[0.5, 99.0, 0.3]]),
                   torch.tensor([[1, 0, 1]]), gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.0, 0.7]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 0.0, 1.0]]))


def test_gae_limits():
    # lam = 1: returns are the discounted reward-to-go (Monte Carlo), independent of V.
    # lam = 0: A_t = one-step TD error.
    torch.manual_seed(0)
    r, v = torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    gamma = 0.95
    _, ret = gae(r, v, mask, gamma=gamma, lam=1.0)
    mc = torch.zeros(2, 5)
    running = torch.zeros(2)
    for t in reversed(range(5)):
        running = r[:, t] + gamma * running
        mc[:, t] = running
    torch.testing.assert_close(ret, mc)
    adv0, _ = gae(r, v, mask, gamma=gamma, lam=0.0)
    next_v = torch.cat([v[:, 1:], torch.zeros(2, 1)], dim=1)
    torch.testing.assert_close(adv0, r + gamma * next_v - v)


def test_gae_outputs_are_detached():
    values = torch.randn(1, 3, requires_grad=True)
    adv, ret = gae(torch.randn(1, 3), values, torch.ones(1, 3), 1.0, 0.95)
    assert not adv.requires_grad and not ret.requires_grad


def test_group_advantages_hand_values():
    # group 1: [1, 0, 0, 0], mean 0.25, unbiased std sqrt((0.5625 + 3*0.0625)/3) = sqrt(0.25) = 0.5
    #          -> [0.75, -0.25, -0.25, -0.25] / 0.5 = [1.5, -0.5, -0.5, -0.5]
    # group 2: all equal -> all 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, group_size=4)
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0]), atol=1e-5, rtol=0)
    assert torch.equal(adv[4:], torch.zeros(4))
    # Dr. GRPO: no std scaling
    torch.testing.assert_close(group_advantages(rewards, 4, scale=False),
                               torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    # G = 2: [3, 1] -> mean 2, std sqrt(2) -> +-1/sqrt(2)
    torch.testing.assert_close(group_advantages(torch.tensor([3.0, 1.0]), 2),
                               torch.tensor([1, -1]) / math.sqrt(2), atol=1e-5, rtol=0)


def test_group_advantages_bad_group_size():
    with pytest.raises(UserError, match="2 or more"):
        group_advantages(torch.tensor([1.0, 0.0]), group_size=1)
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([1.0, 0.0, 1.0]), group_size=2)


def test_whiten_hand_values():
    # masked entries [2, 4, 6]: mean 4, unbiased var (4 + 0 + 4)/2 = 4, std 2
    x = torch.tensor([[2.0, 4.0], [6.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    torch.testing.assert_close(whiten(x, mask), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(whiten(x, mask, shift_mean=False), torch.tensor([[3.0, 4.0], [5.0, 0.0]]))
    torch.testing.assert_close(whiten(torch.tensor([2.0, 4.0, 6.0])), torch.tensor([-1.0, 0.0, 1.0]))
    # a single entry: no variance to use, just the shift; nothing blows up
    one = whiten(torch.tensor([3.0, 8.0]), torch.tensor([1, 0]))
    assert torch.equal(one, torch.tensor([0.0, 0.0]))

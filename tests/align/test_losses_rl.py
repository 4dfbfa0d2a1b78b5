"""Online RL losses (PPO, GRPO, GSPO, KL estimators) against hand-derived values."""
import math

import pytest
import torch

from align.losses import gspo_loss, grpo_loss, kl_penalty, ppo_policy_loss, ppo_value_loss
from utils.errors import UserError

LN = math.log


def f64(rows, grad=False):
    return torch.tensor(rows, dtype=torch.float64, requires_grad=grad)


# -------------------------------------------------------------------------- KL


def test_kl_estimators_hand_values():
    x = LN(2.0)  # logp - ref_logp
    logp, ref = f64([[x, -x]]), f64([[0.0, 0.0]])
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), f64([[x, -x]]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), f64([[x * x / 2, x * x / 2]]))
    # k3 = exp(-x) + x - 1: x = ln2 -> 0.5 + ln2 - 1 = 0.1931472; x = -ln2 -> 2 - ln2 - 1 = 0.3068528
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), f64([[0.5 + x - 1, 1 - x]]))
    with pytest.raises(UserError, match="k1, k2, k3"):
        kl_penalty(logp, ref, "k4")


def test_k1_k3_are_unbiased_for_kl():
    # E_{y~p}[k(log p(y) - log q(y))] summed exactly over a 5-token vocabulary equals KL(p||q).
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(5, dtype=torch.float64), 0)
    logq = torch.log_softmax(torch.randn(5, dtype=torch.float64), 0)
    kl = (logp.exp() * (logp - logq)).sum()
    for kind in ("k1", "k3"):
        expected = (logp.exp() * kl_penalty(logp, logq, kind)).sum()
        torch.testing.assert_close(expected, kl)


# ------------------------------------------------------------------------- PPO


def _ppo_batch():
    # token: (A, rho)   unclipped -A rho | clipped -A clip(rho, .8, 1.2) | max (the loss term)
    #  1: (+1, 1.5)    -1.5              | -1.2                        | -1.2 clipped
    #  2: (+1, 0.5)    -0.5              | -0.8                        | -0.5
    #  3: (-1, 1.5)     1.5              |  1.2                        |  1.5
    #  4: (-1, 0.5)     0.5              |  0.8                        |  0.8 clipped
    #  5: (+2, 1.1)    -2.2              | -2.2                        | -2.2
    #  pad: old_logp = -inf (must not matter)
    # loss = (-1.2 - 0.5 + 1.5 + 0.8 - 2.2) / 5 = -1.6 / 5 = -0.32, clipfrac = 2/5
    old = f64([[-1.0, -1.0, -1.0], [-1.0, -1.0, float("-inf")]])
    ratios = f64([[1.5, 0.5, 1.5], [0.5, 1.1, 1.0]])
    logp = (old.nan_to_num(neginf=-1.0) + ratios.log()).detach().requires_grad_(True)
    adv = f64([[1.0, 1.0, -1.0], [-1.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    return logp, old, adv, mask


def test_ppo_policy_clipping_hand_values():
    logp, old, adv, mask = _ppo_batch()
    loss, m = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.32, abs=1e-12)
    assert m["clipfrac"].item() == pytest.approx(0.4)
    k3 = lambda r: (r - 1) - LN(r)
    assert m["approx_kl"].item() == pytest.approx((2 * k3(1.5) + 2 * k3(0.5) + k3(1.1)) / 5, abs=1e-12)
    loss.backward()
    # clipped tokens get no gradient; others d(-A rho)/dlogp / 5 = -A rho / 5
    expected = f64([[0.0, -0.5 / 5, 1.5 / 5], [0.0, -2.2 / 5, 0.0]])
    torch.testing.assert_close(logp.grad, expected)


def test_ppo_clip_higher():
    # DAPO clip-higher: eps_high = 0.6 lets token 1 (A=+1, rho=1.5) through: term -1.5 instead of -1.2
    logp, old, adv, mask = _ppo_batch()
    loss, m = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.6)
    assert loss.item() == pytest.approx((-1.5 - 0.5 + 1.5 + 0.8 - 2.2) / 5, abs=1e-12)
    assert m["clipfrac"].item() == pytest.approx(0.2)


def test_ppo_value_clipping_hand_values():
    # eps = 0.2, V_old = 0 everywhere
    #  1: V=1.0, R=1.0:  err 0,    V_clip 0.2 -> (0.2-1)^2 = 0.64  -> max 0.64 (clipped)
    #  2: V=0.1, R=1.0:  err 0.81, V_clip 0.1 -> 0.81              -> 0.81
    #  3: V=1.0, R=-1.0: err 4,    V_clip 0.2 -> 1.44              -> 4
    # loss = 0.5 (0.64 + 0.81 + 4) / 3 = 0.9083333
    values = f64([[1.0, 0.1, 1.0, 123.0]], grad=True)
    old, ret = f64([[0.0, 0.0, 0.0, 0.0]]), f64([[1.0, 1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    loss, m = ppo_value_loss(values, old, ret, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.5 * 5.45 / 3, abs=1e-12)
    assert m["vf_clipfrac"].item() == pytest.approx(1 / 3)
    loss.backward()
    # token 1: clipped branch is constant in V -> 0; token 2: 0.5*2*(0.1-1)/3 = -0.3; token 3: 0.5*2*2/3
    torch.testing.assert_close(values.grad, f64([[0.0, -0.3, 2 / 3, 0.0]]))


# ------------------------------------------------------------------------ GRPO


def test_grpo_all_masked_gives_zero_loss_and_zero_grads():
    torch.manual_seed(0)
    B, T = 3, 5
    logp = (torch.randn(B, T) * 50).requires_grad_(True)  # extreme values: exp(ref - logp) overflows
    old = torch.randn(B, T) * 50
    ref = torch.randn(B, T) * 50
    ref[0, 0], logp.data[0, 0] = 60.0, -60.0  # exp(120) = inf in float32
    mask = torch.zeros(B, T, dtype=torch.bool)
    for aggregation in ("token", "sequence"):
        logp.grad = None
        loss, m = grpo_loss(logp, old, ref, torch.tensor([1.0, -2.0, 0.5]), mask, 0.2, 0.04, aggregation)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.equal(logp.grad, torch.zeros(B, T))
        assert all(torch.isfinite(v) for v in m.values())


def test_grpo_on_policy_equals_minus_weighted_mean_advantage():
    # logp == old == ref: ratio 1, KL 0, each token contributes -A_i.
    # lengths [3, 1], A = [1, -1]
    # token:    -(3*1 + 1*(-1)) / 4 = -0.5;  d/dlogp = -A_i / 4
    # sequence: -(1 + (-1)) / 2 = 0;         d/dlogp = -A_i / (2 |o_i|): row 0 -1/6, row 1 +1/2
    logp = f64([[-1.0, -2.0, -0.5], [-0.3, 0.0, 0.0]], grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    adv = f64([1.0, -1.0])
    expected = {"token": (-0.5, [[-0.25] * 3, [0.25, 0, 0]]),
                "sequence": (0.0, [[-1 / 6] * 3, [0.5, 0, 0]])}
    for aggregation, (want_loss, want_grad) in expected.items():
        logp.grad = None
        loss, m = grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, 0.2, 0.1, aggregation)
        assert loss.item() == pytest.approx(want_loss, abs=1e-12)
        assert m["kl"].item() == 0.0
        loss.backward()
        torch.testing.assert_close(logp.grad, f64(want_grad))


def test_grpo_kl_term_hand_value():
    # A = 0, ratio 1; ref - logp = ln 2 on every token: k3 = 2 - ln2 - 1 = 0.3068528
    # loss = kl_beta * k3 = 0.1 * 0.3068528 for either aggregation
    logp = f64([[-1.0, -2.0], [-3.0, -1.0]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    for aggregation in ("token", "sequence"):
        loss, m = grpo_loss(logp, logp, logp + LN(2), f64([0.0, 0.0]), mask, 0.2, 0.1, aggregation)
        assert loss.item() == pytest.approx(0.1 * (1 - LN(2)), abs=1e-12)
        assert m["kl"].item() == pytest.approx(1 - LN(2), abs=1e-12)


def test_grpo_token_level_matches_ppo_when_kl_off():
    # Same clipped surrogate as PPO with the sequence advantage on every token.
    logp, old, _, mask = _ppo_batch()
    adv = f64([1.0, -1.0])
    g_loss, g_m = grpo_loss(logp, old, old.nan_to_num(neginf=0.0), adv, mask, 0.2, 0.0, "token")
    p_loss, p_m = ppo_policy_loss(logp, old, adv[:, None].expand(2, 3), mask, 0.2)
    torch.testing.assert_close(g_loss, p_loss)
    torch.testing.assert_close(g_m["clipfrac"], p_m["clipfrac"])


def test_grpo_sequence_aggregation_skips_empty_sequences():
    logp = f64([[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]])
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]], dtype=torch.bool)
    loss, _ = grpo_loss(logp, logp, logp, f64([2.0, 4.0, 100.0]), mask, 0.2, 0.0, "sequence")
    assert loss.item() == pytest.approx(-(2.0 + 4.0) / 2)  # the empty third row is not averaged in
    with pytest.raises(UserError, match="token, sequence"):
        grpo_loss(logp, logp, logp, f64([0.0, 0.0, 0.0]), mask, 0.2, 0.0, "tokens")


# ------------------------------------------------------------------------ GSPO


def test_gspo_on_policy_is_minus_mean_advantage():
    # s_i = 1 for all i -> loss = -mean(A) = -(1 - 3)/2 = 1, whatever the lengths.
    # grad = -A_i s_i / (|y_i| B): row 0 (len 3) -1/6 each; row 1 (len 1) +3/2
    logp = f64([[-1.0, -2.0, -0.5], [-0.3, 9.0, 9.0]], grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    loss, m = gspo_loss(logp, logp.detach(), f64([1.0, -3.0]), mask, clip_eps=3e-4)
    assert loss.item() == pytest.approx(1.0, abs=1e-12)
    assert m["ratio"].item() == 1.0 and m["clipfrac"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(logp.grad, f64([[-1 / 6] * 3, [1.5, 0, 0]]))


def test_gspo_ratio_is_length_normalised_and_clips_per_sequence():
    # row 0: token log-ratios [ln2, 0] -> s = exp(ln2 / 2) = sqrt 2 = 1.4142 (geometric mean, not 2)
    # row 1: token log-ratios [ln1.5]  -> s = 1.5
    # eps = 0.1, A = [+1, -1]:
    #   row 0: min(1.4142, 1.1) = 1.1 -> clipped, no gradient
    #   row 1: min(-1.5, -1.1) = -1.5 -> not clipped (pessimistic side)
    # loss = -(1.1 - 1.5) / 2 = 0.2
    old = f64([[-1.0, -1.0], [-1.0, -1.0]])
    logp = (old + f64([[LN(2), 0.0], [LN(1.5), 0.0]])).detach().requires_grad_(True)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    loss, m = gspo_loss(logp, old, f64([1.0, -1.0]), mask, clip_eps=0.1)
    assert m["ratio"].item() == pytest.approx((math.sqrt(2) + 1.5) / 2, abs=1e-12)
    assert loss.item() == pytest.approx(0.2, abs=1e-12)
    assert m["clipfrac"].item() == 0.5
    loss.backward()
    # row 1: d/dlogp of -(s A)/2 with s = exp(logratio / 1): -A s / 2 = 1.5 / 2
    torch.testing.assert_close(logp.grad, f64([[0.0, 0.0], [0.75, 0.0]]))


def test_gspo_small_eps_engages_just_past_clip():
    # paper-sized eps = 3e-4: s = 1.0002 stays, s = 1.001 is clipped (A > 0)
    old = f64([[0.0], [0.0]])
    logp = f64([[LN(1.0002)], [LN(1.001)]])
    _, m = gspo_loss(logp, old, f64([1.0, 1.0]), torch.ones(2, 1, dtype=torch.bool), clip_eps=3e-4)
    assert m["clipfrac"].item() == 0.5


def test_gspo_gradient_matches_paper_and_token_form():
    # Paper: grad J = E[ s_i A_i (1/|y_i|) sum_t grad log pi ] on unclipped sequences.
    # GSPO-token: s_it = sg[s_i] * pi(y_it) / sg[pi(y_it)] gives the same gradient.
    torch.manual_seed(0)
    B, T = 4, 6
    old = torch.randn(B, T, dtype=torch.float64)
    logp = (old + 0.05 * torch.randn(B, T, dtype=torch.float64)).requires_grad_(True)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [0, 0, 1, 1, 1, 0], [1] + [0] * 5], dtype=torch.bool)
    adv = f64([0.7, -1.2, 0.3, -0.4])
    eps = 0.02
    loss, _ = gspo_loss(logp, old, adv, mask, clip_eps=eps)
    (grad,) = torch.autograd.grad(loss, logp)

    lengths = mask.sum(1).double()
    s = torch.exp(((logp.detach() - old) * mask).sum(1) / lengths)
    clipped = ((s > 1 + eps) & (adv > 0)) | ((s < 1 - eps) & (adv < 0))
    coef = torch.where(clipped, 0.0, -s * adv / lengths / B)  # (B,)
    torch.testing.assert_close(grad, coef[:, None] * mask)

    s_tok = s[:, None] * torch.exp(logp - logp.detach())  # value s_i, gradient of log pi per token
    per_tok = -torch.minimum(s_tok * adv[:, None], s_tok.clamp(1 - eps, 1 + eps) * adv[:, None])
    token_form = ((per_tok * mask).sum(1) / lengths).mean()
    (grad_tok,) = torch.autograd.grad(token_form, logp)
    torch.testing.assert_close(grad, grad_tok)
    torch.testing.assert_close(loss, token_form)


def test_gspo_all_masked_is_zero():
    logp = (torch.randn(2, 3) * 50).requires_grad_(True)
    loss, m = gspo_loss(logp, torch.randn(2, 3) * 50, torch.tensor([1.0, -1.0]), torch.zeros(2, 3), 3e-4)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(2, 3))
    assert all(torch.isfinite(v) for v in m.values())

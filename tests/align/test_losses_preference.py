"""Offline preference losses against values worked out by hand (arithmetic in comments)."""
import math
from decimal import Decimal, getcontext

import pytest
import torch

from align.losses import _log1mexp, dpo_loss, kto_loss, orpo_loss, reward_pairwise_loss, simpo_loss
from utils.errors import UserError


def t(*values, dtype=torch.float64, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def softplus(x):  # -log sigma(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


# ------------------------------------------------------------------ reward model


def test_reward_pairwise_loss():
    # diffs = [2-1, 0-1] = [1, -1]; loss = mean(log(1+e^-1), log(1+e^1))
    loss, m = reward_pairwise_loss(t(2.0, 0.0), t(1.0, 1.0))
    assert loss.item() == pytest.approx((softplus(-1) + softplus(1)) / 2, abs=1e-12)
    assert loss.item() == pytest.approx(0.8132616875, abs=1e-9)
    assert m["accuracy"].item() == 0.5
    assert m["margin"].item() == 0.0
    # margin 1: logits = [1-1, -1-1] = [0, -2] -> mean(ln 2, log(1+e^2))
    loss, m = reward_pairwise_loss(t(2.0, 0.0), t(1.0, 1.0), margin=t(1.0, 1.0))
    assert loss.item() == pytest.approx((math.log(2) + softplus(2)) / 2, abs=1e-12)
    assert m["accuracy"].item() == 0.5  # accuracy ignores the margin


# ------------------------------------------------------------------------- DPO


def test_dpo_policy_equals_reference_is_ln2():
    # h = 0 -> -log sigma(0) = ln 2 for any beta; d loss / d pi_chosen = -beta sigma(0) / B
    logps = t(-12.5, -3.0, -40.0, grad=True)
    rej = t(-11.0, -9.0, -2.0, grad=True)
    for beta in (0.01, 0.1, 1.0):
        loss, m = dpo_loss(logps, rej, logps.detach(), rej.detach(), beta=beta)
        assert loss.item() == math.log(2)
        assert m["rewards/margins"].item() == 0.0 and m["rewards/accuracy"].item() == 0.0
        (grad,) = torch.autograd.grad(loss, logps)
        torch.testing.assert_close(grad, torch.full((3,), -beta * 0.5 / 3, dtype=torch.float64))


def test_dpo_known_logps():
    # chosen log-ratio = -10 - (-12) = 2; rejected log-ratio = -14 - (-12) = -2
    # h = 2 - (-2) = 4; beta h = 0.4; loss = -log sigma(0.4) = log(1 + e^-0.4) = log(1.6703200) = 0.5130153
    loss, m = dpo_loss(t(-10.0), t(-14.0), t(-12.0), t(-12.0), beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.4)), abs=1e-12)
    assert loss.item() == pytest.approx(0.5130153, abs=1e-7)
    # rewards: beta * log-ratio = 0.2 and -0.2; margin 0.4
    assert m["rewards/chosen"].item() == pytest.approx(0.2)
    assert m["rewards/rejected"].item() == pytest.approx(-0.2)
    assert m["rewards/margins"].item() == pytest.approx(0.4)
    assert m["rewards/accuracy"].item() == 1.0
    # cDPO with eps = 0.1: 0.9 log(1+e^-0.4) + 0.1 log(1+e^0.4)
    loss, _ = dpo_loss(t(-10.0), t(-14.0), t(-12.0), t(-12.0), beta=0.1, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * softplus(-0.4) + 0.1 * softplus(0.4), abs=1e-12)


def test_ipo_known_logps():
    # beta = 0.1 -> target 1/(2 beta) = 5. Pair 1: h = 4 -> (4-5)^2 = 1. Pair 2: h = (0+1)-(-4+0) = 5 -> 0.
    loss, _ = dpo_loss(t(-10.0, 0.0), t(-14.0, -4.0), t(-12.0, -1.0), t(-12.0, 0.0), beta=0.1, loss_type="ipo")
    assert loss.item() == pytest.approx(0.5, abs=1e-12)
    # policy == reference: (0 - 5)^2 = 25
    loss, _ = dpo_loss(t(-3.0), t(-4.0), t(-3.0), t(-4.0), beta=0.1, loss_type="ipo")
    assert loss.item() == pytest.approx(25.0)


def test_dpo_unknown_loss_type():
    with pytest.raises(UserError, match="sigmoid, ipo"):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), beta=0.1, loss_type="hinge")


# ------------------------------------------------------------------------- ORPO


def test_orpo_known_values():
    # chosen avg logp = ln(1/2): P = 1/2, odds = 1, log odds = 0
    # rejected avg logp = ln(1/5): P = 1/5, odds = (1/5)/(4/5) = 1/4, log odds = -ln 4
    # log odds ratio = ln 4; L_OR = -log sigma(ln 4) = -log(4/5) = ln 1.25
    # loss = nll + lam L_OR = 0.7 + 0.5 ln 1.25 = 0.8115718
    loss, m = orpo_loss(t(0.7), t(math.log(0.5)), t(math.log(0.2)), lam=0.5)
    assert m["log_odds_ratio"].item() == pytest.approx(math.log(4), abs=1e-12)
    assert m["or_loss"].item() == pytest.approx(math.log(1.25), abs=1e-12)
    assert loss.item() == pytest.approx(0.7 + 0.5 * math.log(1.25), abs=1e-12)
    assert loss.item() == pytest.approx(0.8115718, abs=1e-7)
    assert m["accuracy"].item() == 1.0


def test_log1mexp_is_accurate_in_float32():
    xs = [-1e-6, -1e-4, -0.5, -0.6931, -0.6932, -1.0, -20.0, -80.0]
    got = _log1mexp(torch.tensor(xs, dtype=torch.float32))
    getcontext().prec = 60  # reference in 60-digit decimal arithmetic, no cancellation
    for x, g in zip(xs, got.tolist()):
        want = float((1 - Decimal(x).exp()).ln())
        assert abs(g - want) <= 1e-6 * abs(want), (x, g, want)


def test_orpo_stays_finite_near_probability_one():
    chosen = t(0.0, -1e-9, dtype=torch.float32, grad=True)  # P ~ 1: infinite odds without the clamp
    rejected = t(-30.0, -1e-3, dtype=torch.float32, grad=True)
    loss, _ = orpo_loss(t(0.0, dtype=torch.float32), chosen, rejected, lam=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


# -------------------------------------------------------------------------- KTO


def test_kto_known_values():
    # beta = 0.5, z0 = 0.4
    # desirable, r = 1.2:    1.0 * (1 - sigma(0.5 (1.2 - 0.4)))  = 1 - sigma(0.4) = 0.40131234
    # undesirable, r = -0.6: 1.5 * (1 - sigma(0.5 (0.4 + 0.6))) = 1.5 (1 - sigma(0.5)) = 0.56631100
    # mean = 0.48381167
    pi, ref = t(-8.8, -10.6), t(-10.0, -10.0)
    loss, m = kto_loss(pi, ref, torch.tensor([True, False]), 0.4, beta=0.5,
                       desirable_weight=1.0, undesirable_weight=1.5)
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert loss.item() == pytest.approx(((1 - sig(0.4)) + 1.5 * (1 - sig(0.5))) / 2, abs=1e-12)
    assert loss.item() == pytest.approx(0.48381167, abs=1e-7)
    assert m["rewards/desirable"].item() == pytest.approx(0.6)
    assert m["rewards/undesirable"].item() == pytest.approx(-0.3)


def test_kto_kl_is_clamped_and_not_differentiated():
    pi = t(-5.0, -6.0, grad=True)
    ref = t(-5.5, -5.0)
    kl = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    loss_neg, m = kto_loss(pi, ref, torch.tensor([True, False]), kl, beta=0.1)
    loss_zero, _ = kto_loss(pi, ref, torch.tensor([True, False]), 0.0, beta=0.1)
    assert loss_neg.item() == loss_zero.item() and m["kl"].item() == 0.0
    loss_neg.backward()
    assert kl.grad is None and pi.grad is not None
    # only desirable examples: undesirable reward metric is 0, not NaN
    _, m = kto_loss(pi.detach(), ref, torch.tensor([True, True]), 0.0, beta=0.1)
    assert m["rewards/undesirable"].item() == 0.0


# ------------------------------------------------------------------------ SimPO


def test_simpo_known_values():
    # beta = 2, gamma = 0.5: 2(-0.5) - 2(-1.0) - 0.5 = -1 + 2 - 0.5 = 0.5 -> log(1 + e^-0.5) = 0.4740770
    loss, m = simpo_loss(t(-0.5), t(-1.0), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(softplus(-0.5), abs=1e-12)
    assert loss.item() == pytest.approx(0.4740770, abs=1e-7)
    assert m["rewards/margins"].item() == pytest.approx(1.0)
    # equal log-probs: -log sigma(-gamma) = log(1 + e^0.5)
    loss, m = simpo_loss(t(-1.0), t(-1.0), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(softplus(0.5), abs=1e-12)
    assert m["rewards/accuracy"].item() == 0.0

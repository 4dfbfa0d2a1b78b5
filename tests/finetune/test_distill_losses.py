"""Distillation divergences against hand-computed values and TRL's GKD loss; the top-k view; chunking."""
import math

import pytest
import torch
import torch.nn.functional as F

from finetune.distill_losses import (coarse_logprobs, distill_loss, divergence, forward_kl, generalized_jsd,
                                     reverse_kl, token_losses, top_k)

KINDS = ["forward_kl", "reverse_kl", "jsd"]


def logs(*probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def test_hand_computed_values():
    # P = (1/2, 1/2) teacher, Q = (1/4, 3/4) student, by hand:
    # KL(P||Q) = 1/2 ln 2 + 1/2 ln(2/3); KL(Q||P) = 1/4 ln(1/2) + 3/4 ln(3/2)
    # JSD(1/2): M = (3/8, 5/8), 1/2 [1/2 ln(4/3) + 1/2 ln(4/5)] + 1/2 [1/4 ln(2/3) + 3/4 ln(6/5)]
    p, q = logs(0.5, 0.5), logs(0.25, 0.75)
    assert forward_kl(p, q).item() == pytest.approx(0.1438410362, abs=1e-9)
    assert reverse_kl(p, q).item() == pytest.approx(0.1308120359, abs=1e-9)
    assert generalized_jsd(p, q, 0.5).item() == pytest.approx(0.0338220756, abs=1e-9)
    # beta weights the mixture toward the teacher: JSD(0.25) with M = 1/4 P + 3/4 Q = (5/16, 11/16)
    by_hand = 0.25 * (0.5 * math.log(8 / 5) + 0.5 * math.log(8 / 11)) + 0.75 * (0.25 * math.log(4 / 5) + 0.75 * math.log(12 / 11))
    assert generalized_jsd(p, q, 0.25).item() == pytest.approx(by_hand, abs=1e-12)
    assert forward_kl(p, p).item() == reverse_kl(q, q).item() == 0.0
    assert abs(generalized_jsd(q, q, 0.3).item()) < 1e-15  # M = Q, up to the rounding of log M


def test_jsd_limits():
    """JSD(beta)/beta -> KL(P||Q) as beta -> 0 and JSD(beta)/(1-beta) -> KL(Q||P) as beta -> 1;
    the endpoints themselves are those KLs."""
    torch.manual_seed(0)
    p = F.log_softmax(torch.randn(5, 11, dtype=torch.float64) * 2, -1)
    q = F.log_softmax(torch.randn(5, 11, dtype=torch.float64) * 2, -1)
    eps = 1e-6
    torch.testing.assert_close(generalized_jsd(p, q, eps) / eps, forward_kl(p, q), rtol=1e-4, atol=0)
    torch.testing.assert_close(generalized_jsd(p, q, 1 - eps) / eps, reverse_kl(p, q), rtol=1e-4, atol=0)
    assert torch.equal(generalized_jsd(p, q, 0.0), forward_kl(p, q))
    assert torch.equal(generalized_jsd(p, q, 1.0), reverse_kl(p, q))
    # between the limits JSD is bounded by the smaller KL's scale: log 2 at beta = 1/2
    assert (generalized_jsd(p, q, 0.5) <= math.log(2)).all()


@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (1.0, 1.0), (0.5, 1.0), (0.1, 2.0), (0.9, 0.5)])
def test_matches_trl_gkd(beta, temperature):
    """TRL's GKDTrainer.generalized_jsd_loss (the reference: same beta convention, temperature,
    batchmean over unmasked tokens) equals our masked mean divergence."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    torch.manual_seed(1)
    s, t = torch.randn(2, 6, 13), torch.randn(2, 6, 13) * 1.5
    labels = torch.randint(0, 13, (2, 6))
    labels[0, :2] = -100  # prompt tokens
    ref = gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=temperature)
    kind = "jsd" if 0 < beta < 1 else ("forward_kl" if beta == 0 else "reverse_kl")
    mask = labels != -100
    kd, _ = token_losses(s[mask], t[mask], labels[mask], kind, beta, temperature)
    assert kd.mean().item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)


def test_temperature_softens_both_and_scales_by_t_squared():
    torch.manual_seed(2)
    s, t, y = torch.randn(7, 9), torch.randn(7, 9) * 3, torch.randint(0, 9, (7,))
    kd, ce = token_losses(s, t, y, "forward_kl", temperature=2.0)
    torch.testing.assert_close(kd, forward_kl(F.log_softmax(t / 2, -1), F.log_softmax(s / 2, -1)))
    torch.testing.assert_close(ce, F.cross_entropy(s, y, reduction="none"))  # the CE stays at T = 1
    w = torch.randn(9, 4)
    h = s @ torch.linalg.pinv(w).T  # hidden states whose head output is close to s; any h works
    loss, parts = distill_loss(h, lambda x: x @ w.T, y, lambda rows: t[rows], temperature=2.0, kd_weight=1.0)
    assert loss.item() == pytest.approx(4.0 * parts["kd"].item(), rel=1e-6)  # T^2 = 4
    loss, parts = distill_loss(h, lambda x: x @ w.T, y, lambda rows: t[rows], temperature=2.0, kd_weight=0.25)
    assert loss.item() == pytest.approx(0.25 * 4.0 * parts["kd"].item() + 0.75 * parts["ce"].item(), rel=1e-6)


def test_kd_weight_zero_is_cross_entropy():
    torch.manual_seed(3)
    h, w, y = torch.randn(10, 4), torch.randn(12, 4), torch.randint(0, 12, (10,))
    y[3] = -100
    loss, _ = distill_loss(h, lambda x: x @ w.T, y, lambda rows: pytest.fail("teacher asked"), kd_weight=0.0)
    assert loss.item() == pytest.approx(F.cross_entropy(h @ w.T, y, ignore_index=-100).item(), rel=1e-6)


def setup_rows(seed=4, n=23, d=8, v=17):
    torch.manual_seed(seed)
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    teacher = torch.randn(n, v) * 2
    y = torch.randint(0, v, (n,))
    y[::4] = -100  # prompt and padding positions
    return h, w, teacher, y


@pytest.mark.parametrize("kind", KINDS)
def test_masked_positions_do_not_count(kind):
    h, w, teacher, y = setup_rows()
    loss, _ = distill_loss(h, lambda x: x @ w.T, y, lambda rows: teacher[rows], kind=kind, kd_weight=0.5)
    loss.backward()
    keep = y != -100
    kd, ce = token_losses((h @ w.T)[keep], teacher[keep], y[keep], kind)
    assert loss.item() == pytest.approx((0.5 * kd + 0.5 * ce).mean().item(), rel=1e-6)
    assert h.grad[~keep].abs().max() == 0  # masked rows get no gradient
    teacher2 = teacher.clone()
    teacher2[~keep] = torch.randn_like(teacher2[~keep])  # a different teacher where nothing counts
    loss2, _ = distill_loss(h, lambda x: x @ w.T, y, lambda rows: teacher2[rows], kind=kind, kd_weight=0.5)
    assert loss2.item() == loss.item()


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked(kind):
    h, w, teacher, y = setup_rows()
    grads = []
    for size in (3, 5, 1000):
        h.grad = w.grad = None
        loss, _ = distill_loss(h, lambda x: x @ w.T, y, lambda rows: teacher[rows], kind=kind, beta=0.3,
                               temperature=1.5, kd_weight=0.7, chunk_size=size)
        loss.backward()
        grads.append((loss.detach(), h.grad.clone(), w.grad.clone()))
    for other in grads[:-1]:
        for a, b in zip(other, grads[-1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_with_k_equal_v_is_the_full_computation(kind):
    h, w, teacher, y = setup_rows()
    out = []
    for make in (lambda rows: teacher[rows], lambda rows: top_k(teacher[rows], 17, 1.5)):
        h.grad = w.grad = None
        loss, _ = distill_loss(h, lambda x: x @ w.T, y, make, kind=kind, beta=0.3, temperature=1.5, kd_weight=0.6)
        loss.backward()
        out.append((loss.detach(), h.grad.clone(), w.grad.clone()))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_top_k_view():
    torch.manual_seed(5)
    logits = torch.randn(6, 40) * 3
    full = F.log_softmax(logits, -1)
    top = top_k(logits, 5)
    assert torch.equal(top.index, full.topk(5, -1).indices)
    torch.testing.assert_close(top.logp, full.topk(5, -1).values)
    # the tail is the log of the rest of the mass: top-k mass + tail mass = 1
    torch.testing.assert_close(top.logp.exp().sum(-1) + top.tail.exp(), torch.ones(6))
    assert torch.isneginf(top_k(logits, 40).tail).all()
    # a coarser view never exceeds the full divergence (data processing), for all three
    student = F.log_softmax(torch.randn(6, 40), -1)
    logp, logq = coarse_logprobs(top, student)
    assert logp.shape == logq.shape == (6, 6)
    torch.testing.assert_close(logq.exp().sum(-1), torch.ones(6))
    for kind in KINDS:
        assert (divergence(kind, logp, logq, 0.5) <= divergence(kind, full, student, 0.5) + 1e-6).all()


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_equal_to_student_gives_zero_loss_and_gradient(kind):
    h, w, _, y = setup_rows()
    with torch.no_grad():
        same = h @ w.T
    loss, parts = distill_loss(h, lambda x: x @ w.T, y, lambda rows: same[rows], kind=kind, temperature=2.0)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and parts["ce"] > 0
    assert h.grad.abs().max() < 1e-6 and w.grad.abs().max() < 1e-6


def test_nothing_counts():
    h, w, teacher, y = setup_rows()
    loss, parts = distill_loss(h, lambda x: x @ w.T, torch.full_like(y, -100), lambda rows: teacher[rows])
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max() == 0

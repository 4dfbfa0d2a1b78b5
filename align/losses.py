"""Preference and RL losses as pure functions.

Each loss takes tensors and returns ``(loss, metrics)``: a scalar tensor to call
``backward()`` on and a dict of detached scalar tensors for logging. Trainers
differ only in which of these they call (see docs/ARCHITECTURE.md).

Conventions
- Sequence log-probs (``*_logps``, shape (B,)) are sums of per-token log-probs
  over response tokens (``masked_sum(sequence_logprobs(...), mask, dim=1)``);
  ``*_avg_logp(s)`` are those sums divided by the response length.
- Per-token tensors are (B, T) with a (B, T) ``mask`` that is 1 on response tokens.
  Masked slots never reach the loss or its gradient, even if they hold inf.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from align.logprobs import masked_mean, masked_sum
from utils.errors import UserError

Metrics = Dict[str, Tensor]


def _check_choice(name: str, value: str, valid: Tuple[str, ...]) -> None:
    if value not in valid:
        raise UserError(f"unknown {name} {value!r}; choose one of {', '.join(valid)}")


# --------------------------------------------------------------------------- rewards


def reward_pairwise_loss(
    r_chosen: Tensor, r_rejected: Tensor, margin: Optional[Tensor] = None
) -> Tuple[Tensor, Metrics]:
    """Bradley-Terry loss for a scalar reward model.

    L = -mean log sigma(r_chosen - r_rejected - margin)

    Args: r_chosen, r_rejected (B,) rewards; margin (B,) or scalar, optional
    (Llama-2 style: larger for more clearly preferred pairs).
    Metrics: accuracy (r_chosen > r_rejected), margin, chosen, rejected means.
    """
    diff = r_chosen - r_rejected
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    metrics = {
        "accuracy": (diff > 0).float().mean(),
        "margin": diff.mean(),
        "reward_chosen": r_chosen.mean(),
        "reward_rejected": r_rejected.mean(),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


# ----------------------------------------------------------------- offline preference


def dpo_loss(
    pi_chosen_logps: Tensor,
    pi_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> Tuple[Tensor, Metrics]:
    """DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023).

    With h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)):
      sigmoid: L = -(1-eps) log sigma(beta h) - eps log sigma(-beta h)
               (eps = label_smoothing, the conservative cDPO variant)
      ipo:     L = (h - 1/(2 beta))^2
    averaged over the batch.

    Args: four (B,) summed sequence log-probs. (The IPO paper uses
    length-averaged log-probs; pass averages to get that.)
    Metrics: rewards/chosen = beta (log pi - log pi_ref)(y_w), rewards/rejected,
    rewards/margins (chosen - rejected), rewards/accuracy (chosen > rejected).
    """
    _check_choice("DPO loss_type", loss_type, ("sigmoid", "ipo"))
    chosen_logratio = pi_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratio = pi_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    chosen_rewards = beta * chosen_logratio
    rejected_rewards = beta * rejected_logratio
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
    }
    return losses.mean(), {k: v.detach() for k, v in metrics.items()}


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012).

    Near 0, 1 - exp(x) cancels: use log(-expm1(x)). Far below, exp(x) is tiny:
    use log1p(-exp(x)). The switch point is -ln 2.
    """
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_nll: Tensor, chosen_avg_logp: Tensor, rejected_avg_logp: Tensor, lam: float
) -> Tuple[Tensor, Metrics]:
    """ORPO (Hong et al. 2024): SFT loss plus an odds-ratio preference term.

    odds(y) = P(y) / (1 - P(y)) with log P(y) = average token log-prob, so
    log odds(y) = avg_logp - log(1 - exp(avg_logp)).
    L = mean[ NLL(y_w) - lam * log sigma(log odds(y_w) - log odds(y_l)) ]

    Args: chosen_nll (B,) or scalar, the SFT loss on the chosen response (mean
    token NLL); chosen_avg_logp, rejected_avg_logp (B,), length-averaged
    log-probs (< 0). A value of exactly 0 (P = 1, infinite odds) is clamped to
    -1e-6 so the loss stays finite.
    Metrics: nll, or_loss, log_odds_ratio, accuracy (chosen avg logp > rejected).
    """
    c = chosen_avg_logp.clamp(max=-1e-6)
    r = rejected_avg_logp.clamp(max=-1e-6)
    log_odds = (c - _log1mexp(c)) - (r - _log1mexp(r))  # (B,)
    or_losses = -F.logsigmoid(log_odds)
    nll = chosen_nll.mean()
    loss = nll + lam * or_losses.mean()
    metrics = {
        "nll": nll,
        "or_loss": or_losses.mean(),
        "log_odds_ratio": log_odds.mean(),
        "accuracy": (chosen_avg_logp > rejected_avg_logp).float().mean(),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


def kto_loss(
    pi_logps: Tensor,
    ref_logps: Tensor,
    is_desirable: Tensor,
    kl_estimate: Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tuple[Tensor, Metrics]:
    """KTO (Ethayarajh et al. 2024) on unpaired examples.

    r = log pi(y|x) - log pi_ref(y|x),  z0 = max(0, kl_estimate) (no gradient)
      desirable:   L = lambda_D * (1 - sigma(beta (r - z0)))
      undesirable: L = lambda_U * (1 - sigma(beta (z0 - r)))
    averaged over the batch (lambda_y - v(x, y) in the paper's notation).

    Args: pi_logps, ref_logps (B,) summed sequence log-probs; is_desirable (B,)
    bool; kl_estimate scalar, the batch estimate of KL(pi || pi_ref) from
    mismatched (x, y') pairs; the trainer computes it, this treats it as a constant.
    Metrics: rewards/desirable, rewards/undesirable (mean beta*r, 0 if none), kl.
    """
    is_desirable = is_desirable.bool()
    z0 = torch.as_tensor(kl_estimate, dtype=pi_logps.dtype, device=pi_logps.device).detach().clamp(min=0)
    logratio = pi_logps - ref_logps  # (B,)
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio)))
    losses = torch.where(is_desirable, desirable_losses, undesirable_losses)
    rewards = (beta * logratio).detach()
    metrics = {
        "rewards/desirable": masked_mean(rewards, is_desirable),
        "rewards/undesirable": masked_mean(rewards, ~is_desirable),
        "kl": z0,
    }
    return losses.mean(), {k: v.detach() for k, v in metrics.items()}


def simpo_loss(
    chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, beta: float, gamma: float
) -> Tuple[Tensor, Metrics]:
    """SimPO (Meng et al. 2024): length-normalised, reference-free DPO with a margin.

    L = -mean log sigma(beta * avg_logp(y_w) - beta * avg_logp(y_l) - gamma)

    Args: (B,) length-averaged log-probs; gamma is the target reward margin
    itself (the paper's gamma, not TRL's gamma/beta ratio).
    Metrics: rewards/chosen, rewards/rejected (beta*avg_logp), margins, accuracy.
    """
    chosen_rewards = beta * chosen_avg_logps
    rejected_rewards = beta * rejected_avg_logps
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
    }
    return losses.mean(), {k: v.detach() for k, v in metrics.items()}


# ------------------------------------------------------------------------- online RL


def _safe_log_ratio(logp: Tensor, other: Tensor, mask: Tensor) -> Tensor:
    """logp - other on masked tokens, 0 elsewhere, so exp() of padding never yields
    inf (whose backward through ``where`` would be 0 * inf = NaN)."""
    return torch.where(mask, logp - other, torch.zeros_like(logp))


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman 2020).

    With x = log pi - log pi_ref on a token sampled from pi:
      k1 = x                      (unbiased, can be negative)
      k2 = x^2 / 2                (biased, low variance)
      k3 = exp(-x) + x - 1        (unbiased, always >= 0)
    Args: (B, T) tensors. Returns (B, T); mask it yourself.
    """
    _check_choice("KL estimator", kind, ("k1", "k2", "k3"))
    x = logp - ref_logp
    if kind == "k1":
        return x
    if kind == "k2":
        return 0.5 * x**2
    return torch.exp(-x) + x - 1


def ppo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    clip_eps_high: Optional[float] = None,
) -> Tuple[Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017), token-level mean.

    rho_t = pi(a_t) / pi_old(a_t)
    L = -mean_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps_high) A_t)
    (eps_high defaults to eps; a larger one is DAPO's clip-higher.)

    Args: logp, old_logp, advantages, mask all (B, T).
    Metrics: clipfrac (tokens where the clipped term was chosen), approx_kl
    (k3 estimate of KL(pi_old || pi)), ratio (mean rho).
    """
    mask = mask.bool()
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = _safe_log_ratio(logp, old_logp, mask)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + high)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    metrics = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask),
        "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
        "ratio": masked_mean(ratio, mask),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float
) -> Tuple[Tensor, Metrics]:
    """Clipped value loss (as in OpenAI baselines / InstructGPT PPO).

    V_clip = V_old + clip(V - V_old, -eps, eps)
    L = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)

    Args: values, old_values, returns, mask all (B, T).
    Metrics: vf_clipfrac, value (mean V), value_error (mean (V - R)^2).
    """
    mask = mask.bool()
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err = (values - returns) ** 2
    err_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    metrics = {
        "vf_clipfrac": masked_mean((err_clipped > err).float(), mask),
        "value": masked_mean(values, mask),
        "value_error": masked_mean(err, mask),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


def _aggregate(per_token: Tensor, mask: Tensor, aggregation: str) -> Tensor:
    """Token-level: sum over all tokens / number of tokens (DAPO).
    Sequence-level: mean over non-empty sequences of each one's token mean (GRPO
    paper). Empty sequences carry no tokens and are left out of both."""
    if aggregation == "token":
        return masked_mean(per_token, mask)
    lengths = mask.sum(dim=1)  # (B,)
    per_seq = masked_sum(per_token, mask, dim=1) / lengths.clamp(min=1)  # (B,)
    return masked_mean(per_seq, lengths > 0)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    kl_beta: float,
    aggregation: str = "token",
    clip_eps_high: Optional[float] = None,
) -> Tuple[Tensor, Metrics]:
    """GRPO (Shao et al. 2024, DeepSeekMath eq. 3).

    rho_{i,t} = pi(o_{i,t}) / pi_old(o_{i,t}),  A_i the group-normalised advantage
    l_{i,t} = -[ min(rho A_i, clip(rho, 1 - eps, 1 + eps_high) A_i) - beta * KL_k3 ]
    KL_k3 = exp(ref - logp) - (ref - logp) - 1
    L = sum_{i,t} l / sum_i |o_i|          (aggregation="token")
      = mean_i (1/|o_i|) sum_t l_{i,t}     (aggregation="sequence")

    Args: logp, old_logp, ref_logp, mask (B, T); advantages (B,).
    A batch with an all-zero mask gives loss exactly 0 and zero gradients.
    Metrics: kl (mean k3), clipfrac, ratio.
    """
    _check_choice("GRPO aggregation", aggregation, ("token", "sequence"))
    mask = mask.bool()
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(_safe_log_ratio(logp, old_logp, mask))  # (B, T)
    adv = advantages.unsqueeze(1)  # (B, 1)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + high) * adv)
    ref_minus_logp = _safe_log_ratio(ref_logp, logp, mask)
    kl = torch.exp(ref_minus_logp) - ref_minus_logp - 1  # (B, T), k3
    per_token = -(surrogate - kl_beta * kl)
    loss = _aggregate(per_token, mask, aggregation)
    metrics = {
        "kl": masked_mean(kl, mask),
        "clipfrac": masked_mean((surrogate < ratio * adv).float(), mask),
        "ratio": masked_mean(ratio, mask),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


def gspo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    clip_eps_high: Optional[float] = None,
) -> Tuple[Tensor, Metrics]:
    """GSPO (Zheng et al. 2025): one importance ratio per sequence.

    s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|) = exp( (1/|y_i|) sum_t (logp - old_logp) )
    L = -mean_i min(s_i A_i, clip(s_i, 1 - eps, 1 + eps_high) A_i)

    s_i is formed in log space as the paper writes it (exp of a mean of
    log-ratios), never as a product of per-token ratios, which under- or
    overflows on long responses. Its gradient is the paper's
    s_i A_i (1/|y_i|) sum_t grad log pi(y_{i,t}) (equal to the GSPO-token form
    with A_{i,t} = A_i). The paper's eps is small (3e-4 / 4e-4) because s_i is a
    per-token geometric mean.

    Args: logp, old_logp, mask (B, T); advantages (B,). Empty sequences are left
    out; an all-zero mask gives loss exactly 0 and zero gradients.
    Metrics: clipfrac (fraction of sequences clipped), ratio (mean s_i).
    """
    mask = mask.bool()
    high = clip_eps if clip_eps_high is None else clip_eps_high
    lengths = mask.sum(dim=1)  # (B,)
    nonempty = lengths > 0
    log_s = masked_sum(_safe_log_ratio(logp, old_logp, mask), mask, dim=1) / lengths.clamp(min=1)  # (B,)
    s = torch.exp(log_s)
    unclipped = s * advantages
    clipped = torch.clamp(s, 1 - clip_eps, 1 + high) * advantages
    per_seq = -torch.minimum(unclipped, clipped)  # (B,)
    loss = masked_mean(per_seq, nonempty)
    metrics = {
        "clipfrac": masked_mean((clipped < unclipped).float(), nonempty),
        "ratio": masked_mean(s, nonempty),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}

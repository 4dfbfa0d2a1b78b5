"""Advantage estimators for online RL: GAE (PPO), group-normalised (GRPO/GSPO), whitening.

All outputs are detached: advantages and returns are regression targets and
weights, never something to differentiate through.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from align.logprobs import masked_mean, masked_sum
from utils.errors import UserError


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}   (= sum_l (gamma*lam)^l delta_{t+l})
    R_t     = A_t + V_t                          (the value target)

    Only tokens with mask = 1 are steps of the episode: "t+1" is the next masked
    token, so a masked prompt prefix, right padding, or a masked gap (e.g. tool
    output) is skipped. After the last response token V_{t+1} = 0 and A_{t+1} = 0
    (the episode ends there; whatever the critic says about padding is ignored).

    Args:
        rewards: (B, T) per-token rewards (typically -beta*KL per token plus the
            sequence score on the last response token). Masked entries are ignored.
        values: (B, T) critic values V(s_t). Masked entries are ignored.
        mask: (B, T) 1 on response tokens.
    Returns:
        (advantages, returns), both (B, T) float32, 0 where mask = 0.
    """
    mask = mask.bool()
    rewards, values = rewards.float(), values.float()
    B, T = rewards.shape
    advantages = torch.zeros(B, T, dtype=torch.float32, device=rewards.device)
    next_value = torch.zeros(B, dtype=torch.float32, device=rewards.device)
    next_adv = torch.zeros(B, dtype=torch.float32, device=rewards.device)
    for t in reversed(range(T)):  # one step per position, vectorised over the batch
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(m, adv_t, torch.zeros_like(adv_t))
        # Masked positions leave the carry untouched: they are not episode steps.
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv_t, next_adv)
    returns = torch.where(mask, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


@torch.no_grad()
def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6, scale: bool = True) -> Tensor:
    """GRPO advantages: each completion's reward relative to its prompt's group.

    A_i = (r_i - mean(group)) / (std(group) + eps)   if scale
    A_i =  r_i - mean(group)                          if not scale (Dr. GRPO, Liu et al.
                                                      2025: std scaling overweights easy /
                                                      hard prompts)
    std is the unbiased (n-1) sample std, as in DeepSeekMath and TRL.

    Args:
        rewards: (N,) rewards laid out group by group: [p0 s0, p0 s1, ..., p1 s0, ...].
        group_size: G completions per prompt; N must be a multiple of G, and G >= 2.
    Returns:
        (N,) float32 advantages. A group whose rewards are all equal gets all zeros.
    """
    if group_size < 2:
        raise UserError(
            f"GRPO group size is {group_size}; group-normalised advantages compare completions "
            "of the same prompt, so set the group size (samples per prompt) to 2 or more"
        )
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards shape {tuple(rewards.shape)} is not (N,) with N a multiple of {group_size}")
    grouped = rewards.float().view(-1, group_size)  # (N/G, G)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    return centered.view(-1)


@torch.no_grad()
def whiten(x: Tensor, mask: Optional[Tensor] = None, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` to zero mean, unit (unbiased) variance over masked entries.

    shift_mean=False keeps the original mean (rescale only), as PPO implementations
    do for rewards so their sign is kept.
    Args: x (any shape); mask same shape, 1 on entries that count (None = all).
    Returns: same shape float32, 0 where mask = 0. With fewer than 2 entries there
    is no variance to estimate, so only the mean shift applies.
    """
    x = x.float()
    mask = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    mean = masked_mean(x, mask)
    count = mask.sum()
    var = masked_sum((x - mean) ** 2, mask) / (count - 1).clamp(min=1)
    if count < 2:
        var = torch.ones_like(var)  # nothing to scale by; avoid dividing by sqrt(eps)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros_like(out))

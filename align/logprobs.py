"""Per-token log-probabilities of given targets, and masked reductions.

Every preference and RL loss starts from ``log pi(y_t | x, y_<t)`` of the tokens
that were actually chosen; this file computes it once, in float32, without
materialising a full (B, T, V) log-softmax.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

# Upper bound on elements of one float32 (B, chunk, V) slab: 2**25 floats = 128 MiB.
_CHUNK_ELEMENTS = 2**25


def sequence_logprobs(
    logits: Tensor,
    targets: Tensor,
    mask: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Log-probability of each target token under ``logits``.

    Args:
        logits: (B, T, V) unnormalised scores; position t predicts ``targets[:, t]``
            (the caller has already shifted by one).
        targets: (B, T) int token ids. Entries outside ``mask`` may hold anything
            (e.g. -100); they are never gathered.
        mask: (B, T) bool/0-1, 1 on tokens to score. None scores every token.
        chunk_size: positions per chunk along T; None picks one so a float32 chunk
            stays near 128 MiB.

    Returns:
        (B, T) float32 log p(target); exactly 0 where ``mask`` is 0.

    logp = logit[target] - logsumexp(logits). Computed in float32 even for bf16
    logits: bf16 log-softmax is off by ~1e-2 per token, which summed over a
    response swamps a DPO margin. Chunking over T bounds the forward peak of the
    float32 upcast; autograd still keeps each chunk for backward.
    """
    B, T, V = logits.shape
    if targets.shape != (B, T):
        raise ValueError(f"targets shape {tuple(targets.shape)} != logits (B, T) {(B, T)}")
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=logits.device)
    mask = mask.bool()
    # Masked targets may be -100 (ignore index); gather needs a valid id.
    safe_targets = torch.where(mask, targets, torch.zeros_like(targets)).long()

    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(1, B * V))
    pieces = []
    for start in range(0, T, chunk_size):
        chunk = logits[:, start : start + chunk_size].float()  # (B, c, V)
        tgt = safe_targets[:, start : start + chunk_size].unsqueeze(-1)  # (B, c, 1)
        picked = chunk.gather(-1, tgt).squeeze(-1)  # (B, c)
        pieces.append(picked - torch.logsumexp(chunk, dim=-1))
    logp = torch.cat(pieces, dim=1)  # (B, T)
    return torch.where(mask, logp, torch.zeros_like(logp))


def target_logprobs(model: nn.Module, tokens: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """(B, T-1) log pi_T(tokens[:, j+1] | tokens[:, :j+1]) of a language model, 0 off ``mask``.

    tokens (B, T) ids; mask (B, T-1) on the shifted grid (column j scores token j+1). pi_T =
    softmax(logits / T): an RL rollout sampled at temperature T scores its tokens under the
    distribution it drew them from. The LM head and the log-softmax run only on the masked
    positions (responses; prompt logits are never needed, and on short answers they are
    most of the row). ``model`` may be wrapped (DDP, compile; an FSDP-sharded head goes through
    the full logits).
    """
    from utils.distributed import is_dtensor, unwrap

    scored = mask.bool().nonzero(as_tuple=True)  # (rows, columns) of the N scored positions
    if is_dtensor(unwrap(model).lm_head.weight):  # FSDP-sharded head: only the model's own forward gathers it
        logits = model(tokens[:, :-1])[scored]  # (N, V)
    else:
        hidden = model(tokens[:, :-1], return_hidden=True)  # (B, T-1, d_model)
        logits = unwrap(model).logits(hidden[scored])  # (N, V)
    if temperature != 1.0:
        logits = logits / temperature
    picked = sequence_logprobs(logits[None], tokens[:, 1:][scored][None])[0]  # (N,)
    return torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).index_put(scored, picked)


def masked_sum(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is set (over ``dim``, or everything if None).

    Uses ``where`` rather than ``x * mask`` so inf/NaN in masked slots (e.g.
    padding) cannot leak into the result as ``0 * inf``.
    """
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of ``x`` over masked entries; an empty mask gives exactly 0 (not NaN)."""
    count = mask.to(x.dtype if x.is_floating_point() else torch.float32)
    count = count.sum() if dim is None else count.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)

"""Fused linear + cross-entropy: the chunk loop of ``chunked_ce.LinearCrossEntropy`` with the
per-row softmax done by a Triton kernel that overwrites each chunk of logits with its gradient.

Per row (one program): pass 1 streams the V logits once with an online max / sum-exp to get
lse = log sum exp(z); loss = lse - z[target]. Pass 2 (training) streams them again and writes
d(mean loss)/dz = (exp(z - lse) - [v == target]) / n_valid in place, in the logits' dtype, so
no second (C, V) buffer and no fp32 copy of the logits exist. The matmuls stay in cuBLAS.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from model.kernels.chunked_ce import LinearCrossEntropy


@triton.jit
def _tanh(x):
    # tanh via exp (no tanh in the interpreter's math): 1 - 2 / (e^{2x} + 1), exact at +-inf
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _ce_rows_kernel(
    LOGITS, stride_row, TARGETS, LOSS, SCALE, V, ignore_index, softcap,
    HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    cols = tl.arange(0, BLOCK_V)

    # pass 1: online log-sum-exp over the vocabulary
    m = -float("inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        z = tl.load(ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(mask, z, -float("inf"))  # after the cap, which would map -inf to -softcap
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    safe_target = tl.where(valid, target, 0)
    z_t = tl.load(ptr + safe_target).to(tl.float32)
    if HAS_SOFTCAP:
        z_t = softcap * _tanh(z_t / softcap)
    tl.store(LOSS + row, tl.where(valid, lse - z_t, 0.0))

    # pass 2: overwrite the logits with d(mean loss)/d(logits)
    if COMPUTE_GRAD:
        scale = tl.load(SCALE) * valid.to(tl.float32)
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            mask = idx < V
            z = tl.load(ptr + idx, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(z / softcap)
                g = tl.exp(softcap * t - lse) - (idx == target).to(tl.float32)
                g = g * (1.0 - t * t)
            else:
                g = tl.exp(z - lse) - (idx == target).to(tl.float32)
            tl.store(ptr + idx, (g * scale).to(LOGITS.dtype.element_ty), mask=mask)


# A torch custom op (mutating the logits in place), so torch.compile treats the launch as one
# opaque call (see triton_rmsnorm).
@torch.library.custom_op("model_kernels::ce_rows", mutates_args=("logits",))
def ce_rows(
    logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, ignore_index: int,
    softcap: Optional[float], compute_grad: bool,
) -> torch.Tensor:
    """logits (C, V), contiguous rows -> row losses (C,) fp32; with compute_grad the logits are
    overwritten by d(mean loss)/d(logits)."""
    C, V = logits.shape
    losses = torch.empty(C, dtype=torch.float32, device=logits.device)
    BLOCK_V = min(triton.next_power_of_2(V), 4096 if logits.is_cuda else 1024)
    _ce_rows_kernel[(C,)](
        logits, logits.stride(0), targets, losses, scale, V, ignore_index,
        float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None, COMPUTE_GRAD=compute_grad, BLOCK_V=BLOCK_V,
        num_warps=16 if BLOCK_V >= 4096 else 4,
    )
    return losses


@ce_rows.register_fake
def _(logits, targets, scale, ignore_index, softcap, compute_grad):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def row_loss_triton(
    logits: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    softcap: Optional[float],
    compute_grad: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Same contract as ``chunked_ce.row_loss_torch``; the gradient is ``logits`` itself, overwritten."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    losses = ce_rows(logits, targets.contiguous(), scale.reshape(1), ignore_index, softcap, compute_grad)
    return losses, (logits if compute_grad else None)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Mean CE of softcap(hidden (N, d) @ weight (V, d)^T) vs targets (N,); see chunked_ce."""
    return LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, softcap, chunk_size, row_loss_triton)

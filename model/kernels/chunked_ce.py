"""Cross-entropy of the LM head without the full logits tensor (pure PyTorch; no Triton).

A plain loss computes logits = hidden @ W^T for all N tokens at once: (N, V) in the model
dtype, then an fp32 copy for the softmax, then its gradient; for N=16k tokens and V=50k that
is several GiB. Here the tokens are processed in chunks of C rows: for each chunk we form its
(C, V) logits, take the loss, and immediately turn them into the gradient of the logits,
which two matmuls turn into this chunk's d(hidden) and a contribution to d(W). The
gradients are stored during the forward (as Liger-Kernel does), so backward only scales them
by the incoming grad. Peak memory of the loss: one chunk of logits (about 1/8 of the full
tensor by default) plus the fp32 d(W).

``row_loss_torch`` does the per-chunk softmax in PyTorch; ``model/kernels/triton_ce.py``
provides a Triton version with the same signature that works in place.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

# (logits (C, V), targets (C,), scale () fp32, ignore_index, softcap, compute_grad)
#   -> (row losses (C,) fp32, d(loss)/d(logits) (C, V) in logits' dtype, or None)
RowLossFn = Callable[..., tuple[torch.Tensor, Optional[torch.Tensor]]]


def default_chunk_size(n_rows: int, vocab: int, n_chunks: int = 8, max_chunk_bytes: int = 2**30) -> int:
    """Rows per chunk: about ``n_chunks`` chunks, each at most ~1 GiB of fp32 logits.

    Fewer, bigger chunks keep the matmuls efficient and the per-chunk cost of adding into the
    (V, d) weight gradient small, while the logits alive at once stay <= 1/8 of the full tensor.
    """
    rows = -(-n_rows // n_chunks)
    rows = min(rows, max(1, max_chunk_bytes // (4 * vocab)))
    if rows >= 8:
        rows = -(-rows // 8) * 8  # a multiple of 8 suits tensor cores
    return min(n_rows, rows)


def row_loss_torch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    softcap: Optional[float],
    compute_grad: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-row cross-entropy of one chunk and (optionally) its gradient, in fp32."""
    z = logits.float()
    if softcap is not None:  # Gemma-2: logits = c * tanh(z / c)
        t = torch.tanh(z / softcap)
        z = softcap * t
    lse = torch.logsumexp(z, dim=-1)  # (C,)
    valid = targets != ignore_index
    tgt = torch.where(valid, targets, torch.zeros_like(targets))
    loss = (lse - z.gather(1, tgt[:, None]).squeeze(1)) * valid
    if not compute_grad:
        return loss, None
    # d(mean CE)/dz = (softmax(z) - onehot(target)) / n_valid, zero on ignored rows
    grad = torch.exp(z - lse[:, None])
    grad.scatter_add_(1, tgt[:, None], -torch.ones_like(lse)[:, None])
    grad *= (valid.float() * scale)[:, None]
    if softcap is not None:
        grad *= 1 - t * t  # d(c tanh(z/c))/dz
    return loss, grad.to(logits.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """mean CE of (hidden @ weight^T) against targets, chunked over rows; see module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, softcap, chunk_size, row_loss):
        N, d = hidden.shape
        V = weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        compute_grad = need_h or need_w
        # 1 / (number of counted tokens), kept on device so no host sync is needed.
        n_valid = (targets != ignore_index).sum()
        scale = 1.0 / n_valid.clamp_min(1).float()
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(V, d, dtype=torch.float32, device=weight.device) if need_w else None
        losses = torch.empty(N, dtype=torch.float32, device=hidden.device)
        C = chunk_size or default_chunk_size(N, V)
        for start in range(0, N, C):
            h = hidden[start : start + C]  # (C, d)
            logits = h @ weight.t()  # (C, V) in the model dtype; the only big buffer
            loss, g = row_loss(logits, targets[start : start + C], scale, ignore_index, softcap, compute_grad)
            losses[start : start + C] = loss
            if need_h:
                grad_h[start : start + C] = g @ weight
            if need_w:
                if g.dtype == h.dtype == torch.float32:
                    grad_w.addmm_(g.t(), h)  # in place, no (V, d) temporary
                else:  # bf16 matmul (fp32 accumulate inside), then into the fp32 sum
                    grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        return losses.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        grad_w = grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Mean cross-entropy of the LM head, never materialising the (N, V) fp32 logits.

    hidden (N, d) final hidden states; weight (V, d) the lm_head weight; targets (N,) int64
    with ``ignore_index`` for tokens that do not count (use ``targets.masked_fill(~mask,
    ignore_index)`` for a boolean mask); softcap: Gemma-2's final_logit_softcap.
    Returns the mean over counted tokens (0 when none count; F.cross_entropy gives nan).
    Equals ``F.cross_entropy(softcap(hidden @ weight.T).float(), targets)`` up to fp rounding.
    """
    return LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, softcap, chunk_size, row_loss_torch)

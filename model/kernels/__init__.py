"""Fused kernels for the hot spots of training and decoding, each with a PyTorch fallback.

Every function here runs anywhere. On CUDA tensors with Triton installed it launches the
Triton kernel (``model/kernels/triton_*.py``); otherwise it runs the PyTorch reference
(``model/kernels/reference.py``, the same math as the model's own modules). With
``TRITON_INTERPRET=1`` set before the first call, CPU tensors go through Triton's
interpreter instead (slow: tests only). Triton is imported lazily, so this package imports
on machines without it.

    rms_norm(x, weight, eps, unit_offset)            RMSNorm, fwd + bwd (x and weight grads)
    apply_rotary(x, cos, sin)                        RoPE, "halves" layout, fwd + bwd
    swiglu(gate, up)                                 silu(gate) * up, fwd + bwd
    linear_cross_entropy(hidden, weight, targets)    mean CE of the LM head, chunked
    chunked_cross_entropy(...)                       the same in pure PyTorch (any device)
    paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale)
    blocks_view(pool, block_size)                    slot-major pool -> the kernel's block layout
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from model.kernels.chunked_ce import chunked_cross_entropy
from model.kernels.reference import paged_attention_ref, rms_norm_ref, rotary_ref, swiglu_ref

__all__ = [
    "triton_available", "use_triton", "rms_norm", "apply_rotary", "swiglu",
    "linear_cross_entropy", "chunked_cross_entropy", "paged_attention_decode", "blocks_view",
]


# find_spec does not import triton (which takes a second); a plain constant also keeps
# use_triton traceable by torch.compile (it cannot trace an lru_cache or an import).
try:
    _HAS_TRITON = importlib.util.find_spec("triton") is not None
except (ImportError, ValueError):  # a broken or blocked install counts as absent
    _HAS_TRITON = False


def triton_available() -> bool:
    """True when the triton package is installed (it needs no GPU to import)."""
    return _HAS_TRITON


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels serve tensors like ``x``: CUDA tensors, or CPU tensors when
    TRITON_INTERPRET=1 (the interpreter, used by the tests)."""
    if not _HAS_TRITON:
        return False
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """RMSNorm of x (..., N) with weight (N,); same result as ``model.norms.RMSNorm``."""
    if use_triton(x):
        from model.kernels.triton_rmsnorm import rms_norm as fused

        return fused(x, weight, eps, unit_offset)
    return rms_norm_ref(x, weight, eps, unit_offset)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of x (B, H, T, D) with cos/sin (B or 1, 1, T, R); same as ``positions.apply_rotary``.

    The Triton path gives no gradient to cos/sin, so it is used only when they need none."""
    if use_triton(x) and not (cos.requires_grad or sin.requires_grad):
        from model.kernels.triton_rope import apply_rotary as fused

        return fused(x, cos, sin)
    return rotary_ref(x, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for two tensors of the same shape."""
    if use_triton(gate) and gate.shape == up.shape:
        from model.kernels.triton_swiglu import swiglu as fused

        return fused(gate, up)
    return swiglu_ref(gate, up)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Mean cross-entropy of softcap(hidden (N, d) @ weight (V, d)^T) against targets (N,).

    Tokens with target == ignore_index do not count (mean over the rest; 0 if none count).
    The (N, V) logits are never built: rows are processed ``chunk_size`` at a time (default:
    ~8 chunks, each <= 1 GiB of fp32 logits). Triton on CUDA, PyTorch elsewhere.
    """
    if not torch.is_grad_enabled():  # both kernels form the gradients in the forward when inputs require them
        hidden, weight = hidden.detach(), weight.detach()
    if use_triton(hidden):
        from model.kernels.triton_ce import fused_linear_cross_entropy as fused

        return fused(hidden, weight, targets, ignore_index, softcap, chunk_size)
    return chunked_cross_entropy(hidden, weight, targets, ignore_index, softcap, chunk_size)


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention, q (B, H, D) over the paged pool k/v_cache (num_blocks, block_size,
    Hkv, D) through block_tables (B, max_blocks) and context_lens (B,) -> (B, H, D).
    Layout details in ``model/kernels/triton_paged.py``. No window, ALiBi or soft-cap."""
    if use_triton(q):
        from model.kernels.triton_paged import paged_attention_decode as fused

        return fused(q, k_cache, v_cache, block_tables, context_lens, scale)
    return paged_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)


def blocks_view(pool: torch.Tensor, block_size: int) -> torch.Tensor:
    """A slot-major pool (Hkv, num_blocks * block_size, D), as inference/paged_cache.py keeps
    it, seen as the (num_blocks, block_size, Hkv, D) layout ``paged_attention_decode`` reads.
    A strided view (no copy); the kernel takes any strides as long as D is contiguous."""
    n_kv, slots, D = pool.shape
    return pool.view(n_kv, slots // block_size, block_size, D).permute(1, 2, 0, 3)

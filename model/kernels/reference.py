"""PyTorch references for the fused kernels: the same math the model's modules use.

These are the fallbacks of ``model.kernels`` (CPU, no Triton) and the ground truth of the
kernel tests. ``tests/model/test_kernels.py`` checks that the first three equal the model's
own modules (``RMSNorm``, ``positions.apply_rotary``, ``GatedMLP``) bit for bit, so they
cannot drift apart.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """x (..., N), weight (N,) -> (..., N); identical to ``model.norms.RMSNorm.forward``."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (y * (1.0 + weight.float())).type_as(x)
    return weight * y.type_as(x)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), cos/sin (B, 1, T, R) with R <= D even -> (B, H, T, D); the "halves"
    layout: pairs (x_i, x_{i+R/2}) rotate, channels R..D pass through."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    out = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return out if rot == x.shape[-1] else torch.cat((out, x_pass), dim=-1)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise (the activation of SwiGLU, Shazeer 2020)."""
    return F.silu(gate) * up


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention over a paged KV pool: gather each sequence's pages, then softmax.

    q (B, H, D); k_cache, v_cache (num_blocks, block_size, Hkv, D); block_tables (B, max_blocks)
    int; context_lens (B,) int -> out (B, H, D) in q's dtype. Token t of sequence b lives at
    k_cache[block_tables[b, t // block_size], t % block_size]. Scores and softmax in fp32.
    """
    B, H, D = q.shape
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for b in range(B):
        n = int(context_lens[b])
        t = torch.arange(n, device=q.device)
        pages = block_tables[b, t // block_size].long()
        k = k_cache[pages, t % block_size].float()  # (n, Hkv, D)
        v = v_cache[pages, t % block_size].float()
        k = k.repeat_interleave(H // n_kv, dim=1)  # GQA: query head h reads kv head h // G
        v = v.repeat_interleave(H // n_kv, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale  # (H, n)
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v).to(q.dtype)
    return out

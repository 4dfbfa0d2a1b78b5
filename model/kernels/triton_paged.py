"""Paged-attention decode in Triton: one new query token per sequence attends to its cached keys,
read straight from the block pool through the block table (no gather into a contiguous copy).

Pool layout (documented contract with the engine):
  k_cache, v_cache   (num_blocks, block_size, Hkv, D), any strides with D contiguous
  block_tables       (B, max_blocks) int32/int64: physical block of each logical block
  context_lens       (B,) int: number of cached tokens of each sequence (including the new one,
                     whose K/V the engine wrote into the pool before this call)
Token t of sequence b lives at [block_tables[b, t // block_size], t % block_size].
inference/paged_cache.py keeps slot-major pools (Hkv, num_blocks * block_size, D);
``model.kernels.blocks_view(pool, block_size)`` presents one in this layout without a copy.

One program per (sequence, KV head) serves the whole group of G = H / Hkv query heads, so
each key and value is read from memory once (GQA/MQA). Keys are visited in tiles of BLOCK_N
tokens with the online softmax of FlashAttention (running max m, sum l, accumulator acc).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    Q, K, V, BLOCK_TABLES, CONTEXT_LENS, O, scale, page_size,
    sqb, sqh, skn, skt, skh, svn, svt, svh, sbt, sob, soh,
    G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gm, dm = g < G, d < D
    heads = kvh * G + g
    qmask = gm[:, None] & dm[None, :]
    # (BLOCK_G, BLOCK_D); loads go to fp32 first (tensor cores still serve tf32 for bf16 inputs)
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + d[None, :], mask=qmask, other=0.0).to(tl.float32)
    q = q * scale
    n_ctx = tl.load(CONTEXT_LENS + b)

    m_i = tl.full([BLOCK_G], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start in range(0, n_ctx, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        tm = t < n_ctx
        page = tl.load(BLOCK_TABLES + b * sbt + t // page_size, mask=tm, other=0).to(tl.int64)
        slot = (t % page_size).to(tl.int64)
        kvmask = tm[:, None] & dm[None, :]
        k = tl.load(K + page[:, None] * skn + slot[:, None] * skt + kvh * skh + d[None, :], mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=DOT_PRECISION)  # (BLOCK_G, BLOCK_N)
        s = tl.where(tm[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + page[:, None] * svn + slot[:, None] * svt + kvh * svh + d[None, :], mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty context gives zeros, not nan
    tl.store(O + b * sob + heads[:, None] * soh + d[None, :], out.to(O.dtype.element_ty), mask=qmask)


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    block_n: Optional[int] = None,
) -> torch.Tensor:
    """q (B, H, D) -> out (B, H, D) in q's dtype; pool layout in the module docstring."""
    B, H, D = q.shape
    _, page_size, n_kv, Dk = k_cache.shape
    if Dk != D or v_cache.shape != k_cache.shape or H % n_kv:
        raise ValueError(
            f"paged attention: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache "
            f"{tuple(v_cache.shape)}: need equal head_dim, equal pools and H divisible by Hkv"
        )
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("paged attention: the last dim of k_cache / v_cache must be contiguous")
    return paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale, block_n)


# A torch custom op, so torch.compile treats the launch as one opaque call (see triton_rmsnorm).
@torch.library.custom_op("model_kernels::paged_decode", mutates_args=())
def paged_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, block_n: Optional[int],
) -> torch.Tensor:
    B, H, D = q.shape
    _, page_size, n_kv, _ = k_cache.shape
    G = H // n_kv
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    block_tables, context_lens = block_tables.contiguous(), context_lens.contiguous()
    # tl.dot wants every dim >= 16 on GPU; padded query rows are masked out
    BLOCK_G = max(16, triton.next_power_of_2(G))
    BLOCK_N = block_n or (64 if q.is_cuda else 16)
    _paged_decode_kernel[(B, n_kv)](
        q, k_cache, v_cache, block_tables, context_lens, out, scale, page_size,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=G, D=D, BLOCK_G=BLOCK_G, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_N=BLOCK_N,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out


@paged_decode.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, scale, block_n):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)

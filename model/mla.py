"""Multi-head Latent Attention (MLA, DeepSeek-V2 / V3).

Keys and values are not projected from x directly but from a small latent
    c_kv = RMSNorm(W_DKV x)                      (kv_lora_rank channels, shared by all heads)
    k_nope_h = W_UK_h c_kv,  v_h = W_UV_h c_kv   (per head, from kv_b_proj)
and position enters through a separate "decoupled" RoPE key k_rope = RoPE(W_KR x)
(qk_rope_head_dim channels, also shared by all heads). Queries may be low-rank too:
    q_h = W_UQ_h RMSNorm(W_DQ x)                 (q_lora_rank; 0/None -> one full-rank q_proj)
A head's query/key is [nope | rope] of size qk_nope_head_dim + qk_rope_head_dim.

The decode cache holds only c_kv and k_rope: (kv_lora_rank + qk_rope_head_dim) numbers per
token and layer, instead of 2 * n_kv_heads * head_dim for standard attention.

Two equal ways to attend (``naive`` and ``absorbed``):
  naive     expand every cached latent to per-head keys and values, then ordinary attention.
            Cheapest when queries are as many as keys (training, prefill).
  absorbed  fold W_UK into the query (q_lat_h = W_UK_h^T q_nope_h) and W_UV into the output,
            so attention runs directly on the cached latents: one shared "key" [c_kv | k_rope]
            and one shared "value" c_kv, i.e. multi-query attention in latent space.
            Cheapest when few queries meet many cached keys (decoding).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.attention import AttnMask
from model.config import ModelConfig
from model.norms import RMSNorm
from model.positions import apply_rotary

# DeepSeek's latent norms use a fixed eps (its reference code and HF's DeepseekV3Attention).
LATENT_NORM_EPS = 1e-6


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * m * ln(s) + 1 for a context stretch s > 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under DeepSeek's YaRN.

    DeepSeek-V3 scales cos/sin by mscale/mscale_all_dim (positions.py) and the softmax by
    mscale_all_dim^2, so with mscale == mscale_all_dim the rope part is unscaled and the
    whole logit is multiplied by mscale^2.
    """
    scale = cfg.head_dim**-0.5
    s = cfg.rope_scaling
    if s is not None and s.get("mscale_all_dim"):
        m = yarn_mscale(float(s["factor"]), float(s["mscale_all_dim"]))
        scale = scale * m * m
    return scale


class MLAttention(nn.Module):
    # "naive" | "absorbed" | None (auto: absorbed when a few new queries meet a longer cache)
    path: Optional[str] = None
    ABSORB_MAX_QUERIES = 16

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        m = cfg.mla
        self.layer = layer
        self.n_heads = cfg.n_heads
        self.q_lora_rank = m["q_lora_rank"] or 0
        self.kv_lora_rank = m["kv_lora_rank"]
        self.d_nope, self.d_rope, self.d_v = m["qk_nope_head_dim"], m["qk_rope_head_dim"], m["v_head_dim"]
        self.window = cfg.layer_window(layer)
        self.dropout = cfg.dropout
        self.scale = mla_softmax_scale(cfg)
        d_qk = self.d_nope + self.d_rope
        bias = cfg.qkv_bias
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(cfg.d_model, self.q_lora_rank, bias=bias)
            self.q_a_norm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * d_qk, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.d_model, self.n_heads * d_qk, bias=False)
        # One projection makes both the latent and the (pre-RoPE) shared rope key.
        self.kv_a_proj = nn.Linear(cfg.d_model, self.kv_lora_rank + self.d_rope, bias=bias)
        self.kv_a_norm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.d_nope + self.d_v), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.d_v, cfg.d_model, bias=cfg.attn_out_bias)

    def forward(self, x: torch.Tensor, rope, mask: AttnMask, cache=None) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model). ``rope`` = (cos, sin) for qk_rope_head_dim."""
        B, T, _ = x.shape
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(B, T, self.n_heads, self.d_nope + self.d_rope).transpose(1, 2)  # (B, H, T, d_qk)
        q_nope, q_rope = q.split([self.d_nope, self.d_rope], dim=-1)

        c_kv, k_rope = self.kv_a_proj(x).split([self.kv_lora_rank, self.d_rope], dim=-1)
        c_kv = self.kv_a_norm(c_kv)[:, None]  # (B, 1, T, r): one "head", so any cache layout fits
        k_rope = k_rope[:, None]  # (B, 1, T, d_rope)
        cos, sin = rope
        q_rope, k_rope = apply_rotary(q_rope, cos, sin), apply_rotary(k_rope, cos, sin)
        if cache is not None:
            c_kv, k_rope = cache.update(self.layer, c_kv, k_rope)  # (B, 1, Tk, r), (B, 1, Tk, d_rope)

        if self._use_absorbed(T, c_kv.shape[-2], cache):
            y = self._attend_absorbed(q_nope, q_rope, c_kv, k_rope, mask)
        else:
            y = self._attend_naive(q_nope, q_rope, c_kv, k_rope, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.d_v))

    def _use_absorbed(self, T: int, Tk: int, cache) -> bool:
        if self.path is not None:
            return self.path == "absorbed"
        return cache is not None and T <= self.ABSORB_MAX_QUERIES and Tk > T

    def _sdpa(self, q, k, v, mask: AttnMask) -> torch.Tensor:
        m, causal = mask.get(self.window)
        dropout = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=m, is_causal=causal, dropout_p=dropout, scale=self.scale, enable_gqa=True
        )

    def _attend_naive(self, q_nope, q_rope, c_kv, k_rope, mask: AttnMask) -> torch.Tensor:
        B, _, Tk, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv[:, 0]).view(B, Tk, self.n_heads, self.d_nope + self.d_v).transpose(1, 2)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)  # (B, H, Tk, d_nope), (B, H, Tk, d_v)
        k = torch.cat([k_nope, k_rope.expand(-1, self.n_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return self._sdpa(q, k, v, mask)  # (B, H, T, d_v)

    def _attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, mask: AttnMask) -> torch.Tensor:
        # kv_b_proj.weight (H*(d_nope+d_v), r) holds W_UK_h (d_nope, r) and W_UV_h (d_v, r) per head.
        w = self.kv_b_proj.weight.view(self.n_heads, self.d_nope + self.d_v, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.d_nope], w[:, self.d_nope :]
        # q_nope . k_nope = q_nope . (W_UK c) = (W_UK^T q_nope) . c
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # (B, H, T, r)
        q = torch.cat([q_lat, q_rope], dim=-1)  # (B, H, T, r + d_rope)
        k = torch.cat([c_kv, k_rope], dim=-1)  # (B, 1, Tk, r + d_rope): shared by every head
        # Every head attends to the same single key/value "head", so fold the heads into the
        # query axis: one (H*T)-query attention, with no per-head copy of the cached latents.
        B, H, T, _ = q.shape
        m, causal = mask.get(self.window)
        if causal:
            m = mask.bool_mask(self.window)
        if m is not None:  # (B, 1, T, Tk) -> (B, 1, H*T, Tk)
            m = m[:, :, None].expand(B, 1, H, T, m.shape[-1]).reshape(B, 1, H * T, m.shape[-1])
        dropout = self.dropout if self.training else 0.0
        o_lat = F.scaled_dot_product_attention(q.reshape(B, 1, H * T, -1), k, c_kv, attn_mask=m, dropout_p=dropout,
                                               scale=self.scale)  # (B, 1, H*T, r) = sum_j p_j c_j
        return torch.einsum("bhtr,hdr->bhtd", o_lat.view(B, H, T, -1), w_uv)  # W_UV sum_j p_j c_j = sum_j p_j v_j

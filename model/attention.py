"""Attention: one module covers MHA, GQA and MQA (through n_kv_heads), with optional
QK-norm (per head or over the whole projection), biases, sliding window, ALiBi and logit soft-capping.

MLA and linear attention live in their own files (model/mla.py, model/linear_attention.py)
and follow the same call signature.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.norms import RMSNorm
from model import kernels
from model.positions import apply_rotary


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Head slopes m_h of ALiBi (Press et al. 2022): a geometric sequence 2^(-8h/n).

    For a head count that is not a power of two, take the slopes of the closest lower power
    of two and interleave every other slope of the next one (the paper's recipe).
    """

    def powers(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = powers(closest)
    if closest < n_heads:
        slopes += powers(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes)


def document_ids(positions: torch.Tensor) -> torch.Tensor:
    """Which document each token of a packed row belongs to, from positions that restart at 0 at
    each document: (B, T) -> (B, T) int64, counting from 1 (padding at position 0 is its own)."""
    return (positions == 0).long().cumsum(1)


class AttnMask:
    """Masks for one forward, built once and shared by every layer.

    Query i may see key j when k_pos[j] <= q_pos[i], the key is valid (not padding), with a
    sliding window W q_pos[i] - k_pos[j] < W, and, for packed rows (``documents`` (B, T), see
    ``document_ids``), both are in the same document: block-diagonal causal attention, whose
    positions restart per document. When nothing but plain causality applies, ``get`` returns
    (None, True) so SDPA takes its fused causal path.
    """

    def __init__(self, q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: Optional[torch.Tensor],
                 documents: Optional[torch.Tensor] = None):
        self.q_pos, self.k_pos, self.k_valid, self.documents = q_pos, k_pos, k_valid, documents
        T, Tk = q_pos.shape[1], k_pos.shape[1]
        if documents is not None and T != Tk:
            raise ValueError("document masks apply to a whole packed row, not to decoding with a cache")
        self.plain_causal = k_valid is None and T == Tk and documents is None
        self.plain_full = k_valid is None and T == 1  # one new token sees every cached key
        self._cache: dict[Optional[int], torch.Tensor] = {}

    def dist(self) -> torch.Tensor:
        # (B, 1, Tq, Tk): how far each key lies behind each query
        return (self.q_pos[:, :, None] - self.k_pos[:, None, :])[:, None]

    def get(self, window: Optional[int]) -> tuple[Optional[torch.Tensor], bool]:
        if window is None and self.plain_causal:
            return None, True
        if window is None and self.plain_full:
            return None, False
        if window not in self._cache:
            d = self.dist()
            allowed = d >= 0
            if window is not None:
                allowed = allowed & (d < window)
            if self.k_valid is not None:
                allowed = allowed & self.k_valid[:, None, None, :]
            if self.documents is not None:
                allowed = allowed & (self.documents[:, None, :, None] == self.documents[:, None, None, :])
            self._cache[window] = allowed
        return self._cache[window], False

    def bool_mask(self, window: Optional[int]) -> torch.Tensor:
        """Always an explicit (B, 1, Tq, Tk) boolean mask (for paths that cannot use is_causal)."""
        mask, _ = self.get(window)
        if mask is not None:
            return mask
        d = self.dist()
        return d >= 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = cfg.layer_window(layer)
        self.softcap = cfg.attn_logit_softcap
        self.fused_rope = cfg.kernels
        self.dropout = cfg.dropout
        scalar = cfg.query_pre_attn_scalar or cfg.head_dim
        self.scale = scalar**-0.5
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, q_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.attn_out_bias)
        # RMSNorm on q and k: per head over head_dim (Qwen3, Gemma-3), or over the whole projection
        # before it is split into heads (OLMo-2), which mixes the heads' scales.
        self.qk_norm_all = cfg.qk_norm_scope == "all"
        if cfg.qk_norm:
            q_width, k_width = (q_dim, kv_dim) if self.qk_norm_all else (cfg.head_dim, cfg.head_dim)
            self.q_norm = RMSNorm(q_width, cfg.norm_eps, cfg.norm_unit_offset, fused=cfg.kernels)
            self.k_norm = RMSNorm(k_width, cfg.norm_eps, cfg.norm_unit_offset, fused=cfg.kernels)
        else:
            self.q_norm = self.k_norm = None
        if cfg.pos_emb == "alibi":
            self.register_buffer("alibi", alibi_slopes(cfg.n_heads), persistent=False)
        else:
            self.alibi = None

    def forward(self, x, rope, mask: AttnMask, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)  # (B, T, H*D), (B, T, Hkv*D)
        if self.q_norm is not None and self.qk_norm_all:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and not self.qk_norm_all:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            rotate = kernels.apply_rotary if self.fused_rope else apply_rotary
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if T == 1 and getattr(cache, "decode_kernel", False) and self.plain_softmax:
            # a paged cache reads the keys through its block table (one new token per row)
            y = cache.attend_decode(self.layer, q, k, v, self.scale)  # (B, H, 1, D)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, Tk, D)
        y = self.attend(q, k, v, mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    @property
    def plain_softmax(self) -> bool:
        """softmax(q k^T * scale) v over every cached key: what the paged decode kernel computes."""
        return self.window is None and self.softcap is None and self.alibi is None and not self.training

    def attend(self, q, k, v, mask: AttnMask) -> torch.Tensor:
        dropout = self.dropout if self.training else 0.0
        if self.softcap is None and self.alibi is None:
            m, causal = mask.get(self.window)
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=m, is_causal=causal, dropout_p=dropout, scale=self.scale, enable_gqa=True
            )
        # Explicit path: ALiBi adds -m_h * distance, Gemma-2 soft-caps the logits (tanh),
        # neither of which SDPA's fused kernels expose.
        groups = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-2, -1)).float() * self.scale  # (B, H, Tq, Tk)
        if self.softcap is not None:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        if self.alibi is not None:
            scores = scores - self.alibi.view(1, -1, 1, 1) * mask.dist().float()
        scores = scores.masked_fill(~mask.bool_mask(self.window), float("-inf"))
        probs = F.dropout(scores.softmax(-1), dropout, self.training).type_as(q)
        return probs @ v

"""Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

Softmax attention's similarity exp(q.k) is replaced by phi(q).phi(k) with the positive
feature map phi(x) = elu(x) + 1, so causal attention becomes a running sum:

    S_t = sum_{j<=t} phi(k_j) v_j^T    (D x Dv)      z_t = sum_{j<=t} phi(k_j)   (D)
    y_t = phi(q_t)^T S_t / (phi(q_t)^T z_t)

Cost is O(T * D * Dv) instead of O(T^2). Two forms compute the same thing:
  parallel (training / prefill): chunks of C tokens; inside a chunk a masked C x C product,
      across chunks the state carried by a cumulative sum of per-chunk phi(K)^T V.
  recurrent (decode): update (S, z) one token at a time; kept in ``cache.states[layer]``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.attention import AttnMask
from model.config import ModelConfig
from model.norms import RMSNorm
from model.positions import apply_rotary
from utils.errors import UserError

EPS = 1e-6


def feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def linear_attention_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    chunk: int = 64,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Chunked causal linear attention on feature-mapped inputs.

    q, k (B, H, T, D) and v (B, H, T, Dv), already through phi; ``state`` = (S (B, H, D, Dv),
    z (B, H, D)) from earlier tokens or None. Returns y (B, H, T, Dv) and the state after T.
    """
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    if state is None:
        state = (q.new_zeros(B, H, D, Dv), q.new_zeros(B, H, D))
    S0, z0 = state
    pad = (-T) % chunk
    if pad:  # zero features add nothing to any sum
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    n = (T + pad) // chunk
    qc, kc, vc = (t.reshape(B, H, n, chunk, t.shape[-1]) for t in (q, k, v))
    # State entering each chunk: S0 plus all earlier chunks (exclusive prefix sum).
    kv = kc.transpose(-2, -1) @ vc  # (B, H, n, D, Dv)
    S_in = S0[:, :, None] + kv.cumsum(2) - kv
    z_in = z0[:, :, None] + kc.sum(3).cumsum(2) - kc.sum(3)  # (B, H, n, D)
    # Inside a chunk: query i sees keys j <= i.
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    att = (qc @ kc.transpose(-2, -1)).masked_fill(~causal, 0.0)  # (B, H, n, C, C)
    num = qc @ S_in + att @ vc  # (B, H, n, C, Dv)
    den = (qc * z_in[:, :, :, None]).sum(-1) + att.sum(-1)  # (B, H, n, C)
    y = (num / (den[..., None] + EPS)).reshape(B, H, n * chunk, Dv)[:, :, :T]
    return y, (S_in[:, :, -1] + kv[:, :, -1], z_in[:, :, -1] + kc[:, :, -1].sum(2))


def linear_attention_recurrent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Optional[tuple[torch.Tensor, torch.Tensor]] = None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The RNN form, one token at a time (same arguments and results as the parallel form)."""
    B, H, T, D = q.shape
    if state is None:
        state = (q.new_zeros(B, H, D, v.shape[-1]), q.new_zeros(B, H, D))
    S, z = state
    ys = []
    for t in range(T):
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]  # += phi(k_t) v_t^T
        z = z + k[:, :, t]
        num = (q[:, :, t, :, None] * S).sum(-2)  # phi(q_t)^T S_t  (B, H, Dv)
        den = (q[:, :, t] * z).sum(-1, keepdim=True)
        ys.append(num / (den + EPS))
    return torch.stack(ys, dim=2), (S, z)


class LinearAttention(nn.Module):
    """Same projections and call signature as ``Attention``; GQA through n_kv_heads."""

    chunk = 64

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, q_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.attn_out_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_unit_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_unit_offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, rope, mask: AttnMask, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        if mask.k_valid is not None:
            # A running sum cannot skip padded keys after the fact; batch rows must be unpadded.
            raise NotImplementedError("linear attention does not support padded key masks")
        if mask.documents is not None:  # the chunked running sum carries every earlier document along
            raise UserError("linear attention keeps one running sum per row, so it cannot keep packed documents "
                            "apart; set data.document_mask: false (packed examples then see each other) or "
                            "data.pack: false.")
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        groups = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        # Sums run in fp32: a bf16 running sum over thousands of tokens loses the new terms.
        q, k, v = feature_map(q.float()), feature_map(k.float()), v.float()
        state = cache.states.get(self.layer) if cache is not None else None
        if T == 1 and cache is not None:
            y, state = linear_attention_recurrent(q, k, v, state)
        else:
            y, state = linear_attention_parallel(q, k, v, state, self.chunk)
        if cache is not None:
            cache.states[self.layer] = state
        return self.o_proj(y.to(x.dtype).transpose(1, 2).reshape(B, T, -1))

"""Position information: rotary embeddings (RoPE, with linear / Llama-3 / YaRN scaling)
and learned absolute positions (GPT-2)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from model.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> tuple[torch.Tensor, float]:
    """Inverse frequencies theta_i = base^(-2i/d) for the rotated dims, after scaling.

    Returns (inv_freq (rotary_dim/2,), attention_scaling) where attention_scaling multiplies
    cos and sin (YaRN's mscale; 1.0 otherwise). ``local``: the sliding-window layers' RoPE,
    plain at base ``rope_local_theta`` (Gemma-3 stretches only its global layers).
    """
    dim = cfg.rotary_dim
    base = cfg.rope_local_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = None if local else cfg.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    kind, factor = scaling["type"], float(scaling["factor"])
    if kind == "linear":  # position interpolation: every position divided by factor
        return inv_freq / factor, 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, factor, scaling), 1.0
    return _yarn_inv_freq(cfg, factor, scaling)


def _llama3_inv_freq(inv_freq: torch.Tensor, factor: float, s: dict) -> torch.Tensor:
    # Llama-3.1: long wavelengths are interpolated, short ones kept, a smooth ramp between.
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_seq_len"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(cfg: ModelConfig, factor: float, s: dict) -> tuple[torch.Tensor, float]:
    # YaRN (Peng et al. 2023): interpolate low frequencies, extrapolate high ones, blend with a
    # linear ramp between the dims that complete beta_fast and beta_slow turns in the old context.
    dim, base = cfg.rotary_dim, cfg.rope_theta
    old_len = s["original_max_seq_len"]
    beta_fast, beta_slow = s.get("beta_fast") or 32.0, s.get("beta_slow") or 1.0  # 0 means the default, as in HF

    def correction_dim(n_rot: float) -> float:
        return dim * math.log(old_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):  # the paper rounds the ramp's ends to whole dims; gpt-oss does not
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 -> keep original (extrapolate), 0 -> interpolate
    inv_freq = interpolation * (1 - keep) + extrapolation * keep

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if "attention_factor" in s:
        att = s["attention_factor"]
    elif s.get("mscale") and s.get("mscale_all_dim"):  # DeepSeek's variant (a 0 switches it off, as in HF)
        att = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
    else:
        att = mscale(factor)
    return inv_freq, float(att)


class Rotary(nn.Module):
    """Computes cos/sin for given positions on the fly (exact for any position, no table)."""

    def __init__(self, cfg: ModelConfig, local: bool = False):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(cfg, local)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions (B, T) -> cos, sin (B, 1, T, rotary_dim), the "halves" layout of Llama/HF
        freqs = positions.float()[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos[:, None].to(dtype), sin[:, None].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by angle pos*theta_i. x: (B, H, T, head_dim).

    With partial rotary only the first rotary_dim channels turn; the rest pass through.
    """
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return _Rotary.apply(x, cos, sin)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((_Rotary.apply(x_rot, cos, sin), x_pass), dim=-1)


def _turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool) -> torch.Tensor:
    """x * cos + cat(-x2, x1) * sin (the "halves" rotation), or with ``transpose`` the transposed
    map, in five kernels and one output buffer: out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2 (transposed: out1 =
    x1 c1 + x2 s2, out2 = x2 c2 - x1 s1). Products are rounded before the sums, so the
    forward equals that formula bit for bit."""
    h = x.shape[-1] // 2
    out = x * cos
    x1, x2, s1, s2 = x[..., :h], x[..., h:], sin[..., :h], sin[..., h:]
    if transpose:
        out[..., :h] += x2 * s2
        out[..., h:] -= x1 * s1
    else:
        out[..., :h] -= x2 * s1
        out[..., h:] += x1 * s2
    return out


class _Rotary(torch.autograd.Function):
    """RoPE with a hand-written backward: the gradient is the transposed rotation of the
    incoming gradient. Saves only cos and sin (autograd would also keep the rotated copy)
    and runs five kernels each way instead of about eight: RoPE's time on CPU halves."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.dtype = x.dtype
        return _turn(x, cos, sin, transpose=False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _turn(grad, cos, sin, transpose=True).to(ctx.dtype), None, None

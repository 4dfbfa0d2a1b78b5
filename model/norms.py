"""Normalisation layers: RMSNorm (Llama, Gemma) and LayerNorm (GPT-2)."""
from __future__ import annotations

import torch
import torch.nn as nn

from model import kernels
from model.config import ModelConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 (as Llama and Gemma do).

    ``unit_offset`` stores the weight as w and applies (1 + w) (Gemma's convention, which
    makes a zero-initialised weight the identity).
    """

    def __init__(self, dim: int, eps: float = 1e-5, unit_offset: bool = False, fused: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.fused = fused
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:  # one Triton kernel on CUDA (falls back to the same math elsewhere)
            return kernels.rms_norm(x, self.weight, self.eps, self.unit_offset)
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:  # Gemma multiplies in fp32 before the cast
            return (y * (1.0 + self.weight.float())).type_as(x)
        return self.weight * y.type_as(x)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.d_model
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias)
    return RMSNorm(dim, eps=cfg.norm_eps, unit_offset=cfg.norm_unit_offset, fused=cfg.kernels)


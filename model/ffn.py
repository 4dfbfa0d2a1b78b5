"""Feed-forward networks: gated (SwiGLU, GeGLU) and the plain GELU MLP (GPT-2).

The DeepSeekMoE layer lives in model/moe.py and has the same call signature.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import kernels
from model.config import ModelConfig


def activation(name: str):
    return {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
    }[name]


class GatedMLP(nn.Module):
    """SwiGLU / GeGLU (Shazeer 2020): down( act(gate(x)) * up(x) )."""

    def __init__(self, cfg: ModelConfig, d_ff: int | None = None):
        super().__init__()
        d_ff = d_ff or cfg.d_ff
        self.gate_proj = nn.Linear(cfg.d_model, d_ff, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, d_ff, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(d_ff, cfg.d_model, bias=cfg.mlp_bias)
        self.act = activation(cfg.activation)
        self.fused = cfg.kernels and cfg.activation == "silu"  # Triton SwiGLU on CUDA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    """The two-layer MLP of GPT-2: down( act(up(x)) )."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)
        self.act = activation(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))

"""Model FLOPs per token and MFU (model FLOPs utilisation).

Training FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B):

    6 * N  +  12 * L * H * Q * T

N = parameters doing matmuls per token (non-embedding weights plus the LM head; for MoE
only the experts a token is routed to), L layers, H query heads, Q head dim, T the
attention context (seq_len, or the window for sliding-window layers). The 6 is forward (2)
plus backward (4) per multiply-add; the second term is attention's QK^T and AV.

MFU = achieved model FLOPs/s / peak FLOPs/s of the hardware (per device).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

# Dense (no sparsity) peak tensor FLOPs/s for 16-bit matmuls; fp32 uses the TF32 figure.
PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def _routing_fraction(module: nn.Module) -> Optional[float]:
    """For a MoE layer, the fraction of routed experts each token uses (k / n_experts)."""
    for k_name, n_name in (("n_experts_per_tok", "n_routed_experts"), ("k", "n_experts"), ("top_k", "n_experts"),
                           ("top_k", "num_experts")):
        k, n = getattr(module, k_name, None), getattr(module, n_name, None)
        if isinstance(k, int) and isinstance(n, int) and n > 0:
            return k / n
    return None


def active_matmul_params(model: nn.Module) -> float:
    """Weights a token multiplies through: every >=2-D parameter except embedding tables,
    plus the LM head (counted even when tied to the embedding, since it is a matmul).
    Parameters under a MoE layer's ``experts`` are scaled by k / n_experts."""
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    scale: dict[int, float] = {}
    for m in model.modules():
        frac = _routing_fraction(m)
        experts = getattr(m, "experts", None)
        if frac is not None and isinstance(experts, nn.Module):
            for p in experts.parameters():
                scale[id(p)] = frac
    total, seen = 0.0, set()
    for p in model.parameters():
        if id(p) in seen or p.dim() < 2 or id(p) in embed_ids:
            continue
        seen.add(id(p))
        total += p.numel() * scale.get(id(p), 1.0)
    head = getattr(model, "lm_head", None)
    if head is not None and id(head.weight) in embed_ids:
        total += head.weight.numel()
    return total


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of ``model`` at context ``seq_len``."""
    cfg = getattr(model, "cfg", None)
    n = active_matmul_params(model)
    attn = 0.0
    if cfg is not None and getattr(cfg, "attention", "standard") != "linear":
        for layer in range(cfg.n_layers):
            window = cfg.layer_window(layer)
            ctx = min(seq_len, window) if window else seq_len
            attn += 12 * cfg.n_heads * cfg.head_dim * ctx
    return 6 * n + attn


def device_peak_flops(device: torch.device, dtype: str) -> Optional[float]:
    """Peak FLOPs/s of one device from the table, or None when unknown (e.g. CPU)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16, key=len, reverse=True):  # "A10G" before "A10"
        if key in name:
            peak = PEAK_BF16[key]
            return peak / 2 if dtype == "fp32" else peak  # TF32 runs at half the 16-bit rate
    return None


def mfu(tokens_per_s: float, flops_per_tok: Optional[float], peak: Optional[float], n_devices: int = 1) -> Optional[float]:
    if not flops_per_tok or not peak:
        return None
    return tokens_per_s * flops_per_tok / (peak * n_devices)

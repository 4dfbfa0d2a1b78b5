"""4-bit NF4 base weights for QLoRA (Dettmers et al. 2023), through bitsandbytes.

``quantize_model`` swaps the selected ``nn.Linear`` layers for ``bitsandbytes.nn.Linear4bit``
(NF4 codes, blocks of 64, double quantization of the block scales) and the stacked routed experts
of MoE layers for ``NF4Experts`` (the same codes, one bitsandbytes tensor per stacked projection).
The forward pass dequantizes on the fly and computes in ``compute_dtype``; LoRA adapters wrapped
around these layers (``model.lora.apply_lora``) stay in full precision and are the only trainable part.

Storage per weight: 4 bits of code + one 8-bit block scale per 64 weights + one fp32 scale
per 256 block scales (double quantization) = 0.5 + 1/64 + 4/(64*256) ~ 0.516 bytes/param.

bitsandbytes has a CPU backend as well as CUDA, so the same code runs in CI and on a GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from model.linear_layers import Targets, is_4bit, is_quantized, match_linears, set_module
from model.moe import PROJECTIONS, Experts, run_experts
from utils.device import DType, torch_dtype
from utils.errors import UserError


@dataclass
class QLoRAConfig:
    """Recipe section ``qlora`` (SFT and alignment): how the frozen base is quantized (NF4, bitsandbytes)."""

    compute_dtype: DType = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    double_quant: bool = True  # quantize the block scales too (~0.516 instead of ~0.56 bytes/param)
    targets: Targets = "all-linear"  # which base linear layers are stored in 4 bits (lm_head stays full)


def _bnb():
    try:
        import bitsandbytes as bnb
    except Exception as err:  # ImportError, or a broken native library raising at import
        raise UserError(
            f"QLoRA needs bitsandbytes, which cannot be imported here ({type(err).__name__}: {err}). "
            "Install it (pip install bitsandbytes>=0.45) or use the LoRA recipe (finetune/peft/lora/sft_lora_train.py)."
        ) from None
    return bnb


def check_bnb(device: str | torch.device = "cpu") -> None:
    """Quantize and run one tiny layer on ``device``; a UserError says why when that fails."""
    bnb = _bnb()
    try:
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
        layer = layer.to(device)
        layer(torch.randn(2, 64, device=device))
    except Exception as err:
        raise UserError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot quantize to 4 bits on {device} "
            f"({type(err).__name__}: {err}). Use a bitsandbytes build with a backend for this device "
            "(CPU support needs >= 0.45), or use the LoRA recipe instead of QLoRA."
        ) from None


def quantize_linear(layer: nn.Linear, compute_dtype: torch.dtype = torch.float32, double_quant: bool = True) -> nn.Module:
    """One nn.Linear -> bitsandbytes Linear4bit (NF4) holding the same weight, quantized."""
    bnb = _bnb()
    device = layer.weight.device
    q = bnb.nn.Linear4bit(
        layer.in_features, layer.out_features, bias=layer.bias is not None,
        compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4",
    )
    q.weight = bnb.nn.Params4bit(
        layer.weight.detach().float().cpu().clone(), requires_grad=False,
        compress_statistics=double_quant, quant_type="nf4", module=q,
    )
    if layer.bias is not None:
        q.bias = nn.Parameter(layer.bias.detach().to(compute_dtype).clone(), requires_grad=False)
    # On CPUs with AVX512-BF16, bitsandbytes repacks weights at the first no-grad eval call and
    # stores the scales in bf16 (un-nesting them): that loses the exact dequantized weight and
    # the double-quant savings, so keep the portable layout.
    q.support_avx512bf16_for_cpu = False
    return q.to(device)  # Params4bit quantizes when moved to a device


class NF4Experts(nn.Module):
    """Routed experts (model/moe.py ``Experts``) stored in NF4: each stacked projection (E, out, in)
    is one bitsandbytes ``Params4bit`` holding it as one row (blocks of 64 consecutive weights, as
    for a Linear4bit), dequantized to ``compute_dtype`` when the layer runs, then the same sorted
    dispatch as the full-precision experts. One row, not (E*out, in): bitsandbytes 0.50's CPU
    dequantize kernel misplaces blocks that span rows shorter than 64 (4x the NF4 error, measured)."""

    def __init__(self, experts: Experts, compute_dtype: torch.dtype = torch.float32, double_quant: bool = True):
        super().__init__()
        bnb = _bnb()
        self.n_experts, self.act_name, self.act = experts.n_experts, experts.act_name, experts.act
        self.compute_dtype = compute_dtype
        self.shapes = {p: getattr(experts, p).shape for p in PROJECTIONS}
        for p in PROJECTIONS:
            w = getattr(experts, p).detach().float().cpu()
            q = bnb.nn.Params4bit(w.reshape(1, -1).clone(), requires_grad=False,
                                  compress_statistics=double_quant, quant_type="nf4")
            setattr(self, p, q.to(getattr(experts, p).device))  # Params4bit quantizes when moved to a device

    def stacked(self, name: str) -> torch.Tensor:
        q = getattr(self, name)
        return _bnb().functional.dequantize_4bit(q.data, q.quant_state).view(self.shapes[name]).to(self.compute_dtype)

    def stacked_shape(self, name: str) -> torch.Size:
        return self.shapes[name]

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``Experts.forward``: x (N, d), experts/weights (N, k) -> (y (N, d), tokens per expert)."""
        y, counts = run_experts(self, x.to(self.compute_dtype), experts, weights)
        return y.to(x.dtype), counts

    def extra_repr(self) -> str:
        return f"experts={self.n_experts}, nf4, compute_dtype={self.compute_dtype}"


def quantize_model(model: nn.Module, targets: Targets = "all-linear", compute_dtype: torch.dtype = torch.float32,
                   double_quant: bool = True) -> list[str]:
    """Swap the selected linear layers of ``model`` for NF4 Linear4bit in place, and the selected
    stacked experts for ``NF4Experts``; returns their names.

    Call on the loaded base model, before ``apply_lora``. Embeddings, norms, lm_head and MoE
    routers stay in full precision ("all-linear" leaves them out; routing reads its weight in fp32).
    """
    check_bnb(next(model.parameters()).device)
    names = match_linears(model, targets)
    for name in names:
        layer = model.get_submodule(name)
        if name.split(".")[-1] in ("router", "shared_gate"):
            raise UserError(f"{name} routes tokens and stays in full precision; leave it out of qlora.targets.")
        if isinstance(layer, Experts):
            set_module(model, name, NF4Experts(layer, compute_dtype, double_quant))
        elif not is_quantized(layer):
            set_module(model, name, quantize_linear(layer, compute_dtype, double_quant))
    return names


def quantize_for_qlora(model: nn.Module, cfg: QLoRAConfig) -> list[str]:
    """QLoRA's first step, as a recipe's ``qlora`` section says: the base's selected linear layers
    in NF4 on the model's device (call before ``apply_lora``). Returns the quantized names."""
    device = next(model.parameters()).device
    return quantize_model(model, cfg.targets, torch_dtype(cfg.compute_dtype, device, "qlora.compute_dtype"), cfg.double_quant)


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a Linear4bit layer computes with, as a float tensor (out, in)."""
    if not is_4bit(layer):
        return layer.weight.detach()
    bnb = _bnb()
    qs = layer.weight.quant_state
    if getattr(qs, "packing_format_for_cpu", False):
        raise UserError("this Linear4bit was repacked for AVX512-BF16 inference; build it with model.quant.quantize_linear.")
    return bnb.functional.dequantize_4bit(layer.weight.data, qs).detach()


def _packed_bytes(q: torch.Tensor) -> int:
    """Bytes one Params4bit occupies: packed codes + block scales (+ nested scales)."""
    qs = q.quant_state
    total = q.data.numel() * q.data.element_size()
    total += qs.absmax.numel() * qs.absmax.element_size() + qs.code.numel() * qs.code.element_size()
    if qs.nested:
        s2 = qs.state2
        total += s2.absmax.numel() * s2.absmax.element_size() + s2.code.numel() * s2.code.element_size()
    return total


def quantized_bytes(layer: nn.Module) -> int:
    """Bytes the 4-bit weights of a Linear4bit (or NF4Experts) occupy."""
    if isinstance(layer, NF4Experts):
        return sum(_packed_bytes(getattr(layer, p)) for p in PROJECTIONS)
    return _packed_bytes(layer.weight)


def quantized_params(layer: nn.Module) -> int:
    """Logical parameter count of a Linear4bit's (or NF4Experts') 4-bit weights."""
    if isinstance(layer, NF4Experts):
        return sum(math.prod(layer.shapes[p]) for p in PROJECTIONS)
    return layer.in_features * layer.out_features


def base_bytes_per_param(model: nn.Module) -> Optional[float]:
    """Average storage of the quantized base weights in bytes per parameter (None if none are quantized)."""
    layers = [m for m in model.modules() if is_quantized(m)]
    if not layers:
        return None
    return sum(quantized_bytes(m) for m in layers) / sum(quantized_params(m) for m in layers)

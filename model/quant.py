"""4-bit NF4 base weights for QLoRA (Dettmers et al. 2023), through bitsandbytes.

``quantize_model`` swaps the selected ``nn.Linear`` layers for ``bitsandbytes.nn.Linear4bit``
(NF4 codes, blocks of 64, double quantization of the block scales). The forward pass
dequantizes on the fly and computes in ``compute_dtype``; LoRA adapters wrapped around these
layers (``model.lora.apply_lora``) stay in full precision and are the only trainable part.

Storage per weight: 4 bits of code + one 8-bit block scale per 64 weights + one fp32 scale
per 256 block scales (double quantization) = 0.5 + 1/64 + 4/(64*256) ~ 0.516 bytes/param.

bitsandbytes has a CPU backend as well as CUDA, so the same code runs in CI and on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from model.linear_layers import Targets, is_4bit, match_linears, set_module
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


def quantize_model(model: nn.Module, targets: Targets = "all-linear", compute_dtype: torch.dtype = torch.float32,
                   double_quant: bool = True) -> list[str]:
    """Swap the selected linear layers of ``model`` for NF4 Linear4bit in place; returns their names.

    Call on the loaded base model, before ``apply_lora``. Embeddings, norms and lm_head
    stay in full precision ("all-linear" excludes lm_head).
    """
    check_bnb(next(model.parameters()).device)
    names = match_linears(model, targets)
    for name in names:
        layer = model.get_submodule(name)
        if not is_4bit(layer):
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


def quantized_bytes(layer: nn.Module) -> int:
    """Bytes a Linear4bit's weight occupies: packed codes + block scales (+ nested scales)."""
    qs = layer.weight.quant_state
    total = layer.weight.data.numel() * layer.weight.data.element_size()
    total += qs.absmax.numel() * qs.absmax.element_size() + qs.code.numel() * qs.code.element_size()
    if qs.nested:
        s2 = qs.state2
        total += s2.absmax.numel() * s2.absmax.element_size() + s2.code.numel() * s2.code.element_size()
    return total


def base_bytes_per_param(model: nn.Module) -> Optional[float]:
    """Average storage of the quantized base weights in bytes per parameter (None if none are quantized)."""
    layers = [m for m in model.modules() if is_4bit(m)]
    if not layers:
        return None
    n = sum(m.in_features * m.out_features for m in layers)
    return sum(quantized_bytes(m) for m in layers) / n

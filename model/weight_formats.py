"""Weight-only low precision for inference: fewer bytes of weights read per generated token.

    apply_weight_format(model, "int4", group_size=128)   # after loading; model/load.py calls it

Batch-1 decode reads every weight once per token, so its speed is set by memory bandwidth,
not arithmetic: halving the bytes per weight nearly doubles tokens/s. Each format replaces
the model's ``nn.Linear`` layers (all but MoE routers and gates, which stay exact) by a layer
that stores the weight in fewer bits and multiplies with the fastest kernel this CPU has
(measured in bench/bench_quant.py, which also records the rejected candidates):

    full  the weights as loaded, in the model's dtype (4 bytes/weight in fp32)
    bf16  bfloat16 weights, 2 bytes; F.linear on bf16 inputs accumulates in fp32 (oneDNN)
    int8  per-output-channel symmetric: w ~ q * s, q in [-127, 127], one fp32 scale per row
          (1 byte/weight + 4 bytes/row); one token: the dequantizing product compiled by
          torch.compile into one vectorized loop; more tokens: aten._weight_int8pack_mm, bf16 inputs
    int4  group-wise asymmetric: each run of ``group_size`` weights of a row keeps a bf16 scale
          and zero, w ~ (q - 8) * s + z with q in [0, 15]; aten._weight_int4pack_mm_for_cpu
          with bf16 inputs (0.5 byte/weight + 4 bytes per group)

Activations, norms, attention, embeddings and the KV cache keep the model's dtype; only the
matrix products see bf16 inputs (the kernels take them) and give a bf16-rounded result. The
int8/int4 kernels above exist on CPU; on other devices the layers dequantize the weight at
each call (correct, not fast: the GPU path of this repository is bf16). The routed experts of
an MoE layer are stacked parameters, not linear layers, and keep the model's dtype.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.linear_layers import is_4bit, set_module
from utils.errors import UserError

WeightFormat = Literal["full", "bf16", "int8", "int4"]
WEIGHT_FORMATS = ("full", "bf16", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what aten's CPU int4 kernel accepts
KEEP_EXACT = ("router", "shared_gate")  # routing decisions stay in the model's dtype


# ----------------------------------------------------------------------------- quantizers (pure)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> int8 codes (out, in) and fp32 scales (out,): w ~ q * s[:, None]."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> codes (out, in) uint8 in [0, 15], scales and zeros (out, in/group) bf16.

    Min-max per group: s = (max - min) / 15, z = min + 8 s, so w ~ (q - 8) s + z. Codes are
    rounded against the bf16 scale and zero the kernel will use, so rounding error stays <= s/2."""
    out_f, in_f = w.shape
    g = w.float().view(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8).bfloat16()
    zero = (lo + 8 * scale.float()).bfloat16()
    q = torch.round((g - zero.float()[..., None]) / scale.float()[..., None]) + 8
    return q.clamp(0, 15).to(torch.uint8).view(out_f, in_f), scale, zero


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """codes (out, in) in [0, 15] with scales/zeros (out, in/group) -> the fp32 weight they stand for."""
    out_f, in_f = codes.shape
    g = codes.view(out_f, scale.shape[1], -1).float() - 8
    return (g * scale.float()[..., None] + zero.float()[..., None]).view(out_f, in_f)


# ----------------------------------------------------------------------------- layers


class BF16Linear(nn.Module):
    """y = x W^T + b with W stored in bf16; the product runs on bf16 inputs, fp32 accumulate."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight = nn.Parameter(layer.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # .to(bf16) is free when the weight is bf16; it guards against a later model.to(dtype)
        y = F.linear(x.to(torch.bfloat16), self.weight.to(torch.bfloat16)).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def weight_bytes(self) -> int:
        return self.weight.numel() * 2


_MATVEC: dict = {}  # the compiled int8 matrix-vector product, or None where compiling failed


def _int8_matvec_eager(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (1, K) times the int8 rows q (N, K), each scaled: (1, N), accumulated in fp32."""
    return (x[:, None, :] * q.to(x.dtype)[None]).sum(-1) * scale


def int8_matvec(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> Optional[torch.Tensor]:
    """The one-token int8 product through torch.compile (inductor fuses the dequantize into the
    reduction: 1.6-2x aten's int8 kernel here); None when compiling is not possible on this
    machine (no C++ compiler), and the caller uses aten's kernel from then on."""
    if "fn" not in _MATVEC:
        _MATVEC["fn"] = torch.compile(_int8_matvec_eager, dynamic=True)
    if _MATVEC["fn"] is None:
        return None
    try:
        return _MATVEC["fn"](x, q, scale)
    except Exception:  # noqa: BLE001 - inductor's errors vary (missing compiler, unsupported CPU)
        _MATVEC["fn"] = None
        return None


class Int8Linear(nn.Module):
    """Per-channel int8 weight. On CPU one token goes through ``int8_matvec``; several (prefill)
    through aten._weight_int8pack_mm with bf16 inputs (its fp32-input path is ~2.5x slower than an
    fp32 matmul here), the fp32 scale applied to the bf16 result."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        q, scale = quantize_int8(layer.weight.detach())
        self.register_buffer("qweight", q)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,) fp32
        self.register_buffer("_ones", torch.ones(self.out_features, dtype=torch.bfloat16, device=q.device), persistent=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = None
        if x.device.type != "cpu":
            y = F.linear(x2, self.dequantize().to(x.dtype))
        elif x2.shape[0] == 1 and x.dtype == torch.float32:  # decode: one token
            y = int8_matvec(x2, self.qweight, self.scale)
        if y is None:
            ones = self._ones.to(torch.bfloat16)  # unit scales: the fp32 ones multiply the result
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, ones)
            y = y.to(x.dtype) * self.scale.to(x.dtype)
        y = y.view(*lead, self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def weight_bytes(self) -> int:
        return self.qweight.numel() + self.scale.numel() * 4


class Int4Linear(nn.Module):
    """Group-wise int4 weight. On CPU the codes are packed once into the layout of
    aten._weight_int4pack_mm_for_cpu (which needs out_features % 16 == 0: zero rows pad it and
    are sliced off). Elsewhere (or with ``portable``) two codes per byte, dequantized at each call."""

    def __init__(self, layer: nn.Linear, group_size: int, portable: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.group_size = layer.in_features, layer.out_features, group_size
        codes, scale, zero = quantize_int4(layer.weight.detach(), group_size)
        self.on_cpu = codes.device.type == "cpu" and not portable
        if self.on_cpu:
            pad = -self.out_features % 16
            codes, scale, zero = (F.pad(t, (0, 0, 0, pad)) for t in (codes, scale, zero))
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
            self.register_buffer("packed", packed)  # (out + pad, in / 2) uint8, the kernel's own layout
        else:
            self.register_buffer("packed", codes[:, 0::2] | (codes[:, 1::2] << 4))  # (out, in / 2), low nibble first
        # (in / group, out (+ pad), 2): the scale and zero of each group, as the kernel reads them
        self.register_buffer("scales_and_zeros", torch.stack([scale.t(), zero.t()], dim=-1).contiguous())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.on_cpu and x.device.type != "cpu":
            raise RuntimeError("Int4Linear was packed for the CPU kernel; apply the weight format after moving the model")
        if self.on_cpu:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.packed, self.group_size,
                                                            self.scales_and_zeros.to(torch.bfloat16))
            y = y[:, : self.out_features].to(x.dtype)
        else:
            y = F.linear(x2, self._dequantize_generic().to(x.dtype))
        y = y.view(*lead, self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _dequantize_generic(self) -> torch.Tensor:
        codes = torch.stack([self.packed & 15, self.packed >> 4], dim=-1).view(self.out_features, self.in_features)
        sz = self.scales_and_zeros.transpose(0, 1)  # (out, in / group, 2)
        return dequantize_int4(codes, sz[..., 0], sz[..., 1])

    def weight_bytes(self) -> int:
        return self.out_features * self.in_features // 2 + self.out_features * (self.in_features // self.group_size) * 4


# ----------------------------------------------------------------------------- the model


def _targets(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] not in KEEP_EXACT]


def check_settings(fmt: str, group_size: int) -> None:
    """UserError for a format name or int4 group size that no model can take (recipes call this
    before loading)."""
    if fmt not in WEIGHT_FORMATS:
        raise UserError(f"weights={fmt!r} is not one of {', '.join(WEIGHT_FORMATS)}.")
    if fmt == "int4" and group_size not in INT4_GROUP_SIZES:
        raise UserError(f"group_size={group_size}: the int4 kernel takes groups of {', '.join(map(str, INT4_GROUP_SIZES))} "
                        "weights; pick one of those.")


def check_weight_format(model: nn.Module, fmt: str, group_size: int = 128) -> None:
    """UserError when ``fmt`` cannot be applied to ``model`` (before any layer is changed)."""
    check_settings(fmt, group_size)
    if fmt == "full":
        return
    if any(is_4bit(m) for m in model.modules()):
        raise UserError(f"weights={fmt}: this model already holds bitsandbytes 4-bit layers (an unmerged QLoRA "
                        "base); load it merged (the default) or serve it with weights=full.")
    if fmt != "int4":
        return
    bad = [(n, model.get_submodule(n).in_features) for n in _targets(model)
           if model.get_submodule(n).in_features % group_size]
    if bad:
        widths = sorted({w for _, w in bad})
        fits = [g for g in INT4_GROUP_SIZES if all(w % g == 0 for w in widths)]
        hint = f"use group_size={max(fits)}" if fits else "use weights=int8 (per-row scales fit any width)"
        raise UserError(f"weights=int4 with group_size={group_size}: {len(bad)} linear layer(s) have input widths "
                        f"{widths} that the group size does not divide (e.g. {bad[0][0]}); {hint}.")


def apply_weight_format(model: nn.Module, fmt: str, group_size: int = 128) -> nn.Module:
    """Swap ``model``'s linear layers for ``fmt`` in place (on the device they are on); returns the model.

    Call after loading and moving the model (int4 packs for the device it finds). ``full``
    changes nothing. Tied embeddings stay as they are: the head gets its own low-precision copy."""
    check_weight_format(model, fmt, group_size)
    if fmt == "full":
        return model
    for name in _targets(model):
        layer = model.get_submodule(name)
        if fmt == "bf16":
            new: nn.Module = BF16Linear(layer)
        elif fmt == "int8":
            new = Int8Linear(layer)
        else:
            new = Int4Linear(layer, group_size)
        set_module(model, name, new)
    model.weight_format = fmt
    return model


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of linear-layer weights one decode step reads (every linear layer once)."""
    total = 0
    for m in model.modules():
        if hasattr(m, "weight_bytes"):
            total += m.weight_bytes()
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total

"""The one device resolver and the one dtype vocabulary, for recipes and command-line flags.

    device = resolve_device("auto")                 # cuda when visible, else cpu
    dtype = torch_dtype("auto", device)             # bf16 on a bf16-capable GPU, else fp32

Dtypes are spelled ``fp32 | bf16 | fp16`` everywhere (training, QLoRA compute, eval, serving),
plus ``auto``. The long torch names (``float32``, ``bfloat16``, ``float16``) are refused with a
message naming the short spelling, so a recipe never means two things.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch

from utils.errors import UserError

DType = Literal["auto", "fp32", "bf16", "fp16"]
DTYPE_NAMES = ("auto", "fp32", "bf16", "fp16")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_LONG_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float": "fp32", "half": "fp16"}


def resolve_device(name: str = "auto", local_rank: int = 0, what: str = "device") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a torch.device that exists here.

    ``cuda`` without an index picks ``local_rank`` (one GPU per torchrun process).
    ``what`` names the setting in the error (e.g. ``train.device``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"{what}={name!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"{what}={name!r}: only cpu and cuda devices are supported; use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{what}={name!r} but no CUDA GPU is visible; use cpu (or auto).")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UserError(f"{what}={name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible.")
        device = torch.device("cuda", index)
    return device


def check_dtype_name(name: str, what: str = "dtype") -> str:
    """``name`` if it is one of the vocabulary, else a UserError naming the right spelling."""
    if name in DTYPE_NAMES:
        return name
    hint = f" (spelled {_LONG_NAMES[name]!r} here)" if name in _LONG_NAMES else ""
    raise UserError(f"{what}={name!r} is not one of {', '.join(DTYPE_NAMES)}{hint}.")


def dtype_name(name: str, device: torch.device, what: str = "dtype") -> str:
    """Resolve ``auto`` to a concrete name: bf16 on a CUDA device that supports it, else fp32."""
    name = check_dtype_name(name, what)
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return name


def torch_dtype(name: str, device: Optional[torch.device] = None, what: str = "dtype") -> torch.dtype:
    """The torch dtype of a vocabulary name (``auto`` resolved for ``device``, default cpu)."""
    return TORCH_DTYPES[dtype_name(name, device or torch.device("cpu"), what)]

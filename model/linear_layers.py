"""Finding and swapping a model's linear layers by name: what LoRA wraps and QLoRA quantizes.

    names = match_linears(model, "all-linear")       # or patterns: ["q_proj", "layers.*.ffn.*", "experts"]
    set_module(model, names[0], new_layer)

Besides ``nn.Linear`` layers, the stacked routed experts of an MoE layer (model/moe.py
``Experts``, one module holding every expert's gate/up/down weights) are a target: LoRA gives
each expert its own adapters (model/lora_experts.py), QLoRA stores them in NF4 (model/quant.py).

Both ``model/lora.py`` and ``model/quant.py`` select layers through here, so a recipe's
``targets`` means the same thing to both.
"""
from __future__ import annotations

import fnmatch
from typing import Union

import torch.nn as nn

from utils.errors import UserError

Targets = Union[str, list[str]]
ALL_LINEAR_EXCLUDES = ("lm_head", "router", "shared_gate")  # see match_linears
# HuggingFace's names for our modules, accepted as targets: DeepSeek and Qwen-MoE call the router ``gate``.
HF_TARGET_NAMES = {"gate": "router"}


def is_4bit(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Linear4bit"  # bitsandbytes is optional; avoid importing it here


def is_linear(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or is_4bit(layer)


def is_quantized(layer: nn.Module) -> bool:
    """A 4-bit layer: bitsandbytes Linear4bit or NF4 experts (model/quant.py)."""
    return is_4bit(layer) or type(layer).__name__ == "NF4Experts"


def is_expert_stack(layer: nn.Module) -> bool:
    """The stacked routed experts of an MoE layer, in full precision or NF4 (not yet LoRA-wrapped)."""
    return type(layer).__name__ in ("Experts", "NF4Experts")  # model/moe.py imports nothing from here


def _selected(name: str, pattern: str) -> bool:
    """``pattern`` names the module ``name`` or one of its parents, in full or by its trailing part."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if fnmatch.fnmatchcase(prefix, pattern) or fnmatch.fnmatchcase(prefix, "*." + pattern):
            return True
    return False


def match_linears(model: nn.Module, targets: Targets) -> list[str]:
    """Names of the linear layers (and stacked experts) that ``targets`` selects, in module order.

    ``"all-linear"``: every linear layer and every stack of routed experts, except ``lm_head``
    (the output head is usually tied or too large to be worth adapting), MoE ``router``s
    (routing stays exact, in fp32, as PEFT/Unsloth recipes leave the gate alone) and the
    one-output ``shared_gate`` of Qwen2-MoE (no rank above 1 fits it). Otherwise a list of fnmatch
    patterns; a pattern selects a layer when it matches the layer's full name
    (``layers.*.attn.q_proj``), its trailing part (``q_proj``, ``attn.*``) or a module the layer
    sits in (``shared_experts``: all three projections of the shared experts; ``experts``: the
    routed experts; ``gate``, HF's name, is the ``router``). A pattern that is a layer's full name
    selects that layer alone (``layers.0.attn.q_proj`` is not also the vision tower's
    ``vision.tower.layers.0.attn.q_proj``; adapter checkpoints record full names). A pattern that
    matches no target is a UserError.
    """
    linears = [n for n, m in model.named_modules() if is_linear(m) or is_expert_stack(m)]
    if targets == "all-linear":
        chosen = [n for n in linears if n.split(".")[-1] not in ALL_LINEAR_EXCLUDES]
        if not chosen:
            raise UserError(f"targets='all-linear' found no linear layers besides {ALL_LINEAR_EXCLUDES} in this model.")
        return chosen
    if isinstance(targets, str):
        targets = [targets]
    picked: set[str] = set()
    full_names = set(linears)
    for pattern in targets:
        if pattern in full_names:
            picked.add(pattern)
            continue
        hits = [n for n in linears if _selected(n, HF_TARGET_NAMES.get(pattern, pattern))]
        if not hits:
            kinds = sorted({n.split(".")[-1] for n in linears})
            raise UserError(
                f"target pattern {pattern!r} matches no linear layer of this model; "
                f"linear layers are named like {kinds} (full names like {linears[0]!r}), or use 'all-linear'."
            )
        picked.update(hits)
    return [n for n in linears if n in picked]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)

"""Building the models an alignment stage trains: the policy (full-parameter, LoRA or QLoRA),
its frozen reference, and what the training loop should save.

    tok, tok_path = load_tokenizer(cfg.model)
    policy = load_model(cfg.model.init_from)
    reference = frozen_copy(policy)            # before adapters: the reference is the start point
    trainable = make_trainable(policy, cfg.model)
    train(policy, ..., params=trainable.params, weights_fn=trainable.weights_fn, checkpoint_meta=trainable.meta)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from align.recipe import PolicyConfig
from utils.errors import UserError


def load_tokenizer(cfg: PolicyConfig) -> tuple[Any, str]:
    """The tokenizer named by the recipe, else the one saved beside the starting checkpoint."""
    from inference.engine import load_tokenizer as _load

    path = cfg.tokenizer_path or str(Path(cfg.init_from) / "tokenizer.json")
    if not Path(path).is_file():
        raise UserError(f"no tokenizer at {path}; set model.tokenizer_path to the tokenizer.json the "
                        "checkpoint was trained with (data/tokenizer/tokenizer.json by default).")
    return _load(Path(path)), path


def load_policy(cfg: PolicyConfig, device: torch.device) -> nn.Module:
    from utils.checkpoint import load_model

    return load_model(cfg.init_from, device=device)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with every parameter frozen (the reference model)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@dataclass
class Trainable:
    """What the loop needs to train only part of a model and save only that part."""

    params: Optional[list] = None  # None: every requires_grad parameter
    weights_fn: Optional[Callable[[nn.Module], dict]] = None  # None: the full model state
    meta: dict = field(default_factory=dict)


def live_adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors under ``lora_state_dict`` names, sharing storage with the parameters
    (the loop copies resumed values into them)."""
    from model.lora import lora_layers

    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A"] = layer.lora_A.detach()
        out[f"{name}.lora_B"] = layer.lora_B.detach()
    return out


def quantize_base(model: nn.Module, cfg: PolicyConfig) -> None:
    """QLoRA: swap the LoRA targets' frozen base weights for NF4 (before apply_lora)."""
    if cfg.qlora:
        from model.quant import quantize_model

        quantize_model(model, cfg.lora.targets)


def make_trainable(model: nn.Module, cfg: PolicyConfig) -> Trainable:
    """Full-parameter (nothing to do) or wrap LoRA adapters (QLoRA: call ``quantize_base`` first)."""
    if cfg.lora is None:
        return Trainable()
    from model.lora import adapter_meta, apply_lora, trainable_parameters

    lora = cfg.lora
    apply_lora(model, lora.targets, lora.r, lora.alpha, lora.dropout, lora.rslora)
    meta = adapter_meta(model, lora, base_model=str(cfg.init_from), qlora=cfg.qlora)
    return Trainable(trainable_parameters(model), live_adapters, meta)

"""Building the models an alignment stage trains: the policy (full-parameter, LoRA or QLoRA),
its frozen reference, and what the training loop should save.

    tok, tok_path = load_tokenizer(cfg.model)
    policy = load_policy(cfg.model, device)    # through model/load.py: a full checkpoint or an adapter (merged)
    quantized = quantize_base(policy, cfg.model)
    reference = frozen_copy(policy)            # before adapters: the reference is the start point
    trainable = make_trainable(policy, cfg.model, quantized)
    train(policy, ..., params=trainable.params, weights_fn=trainable.weights_fn, checkpoint_meta=trainable.meta)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from align.recipe import PolicyConfig


def load_tokenizer(cfg: PolicyConfig) -> tuple[Any, str]:
    """The starting checkpoint's tokenizer (or the recipe's model.tokenizer_path), and its path."""
    from model.load import load_tokenizer as load_tok
    from model.load import tokenizer_path

    path = tokenizer_path(cfg.init_from, cfg.tokenizer_path or None)
    return load_tok(cfg.init_from, path), str(path)


def load_policy(cfg: PolicyConfig, device: torch.device) -> nn.Module:
    """The starting model in train mode: a full checkpoint as is, an adapter merged onto its base."""
    from model.load import load_model

    return load_model(cfg.init_from, device=device, train=True, expect="lm")


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


def quantize_base(model: nn.Module, cfg: PolicyConfig) -> list[str]:
    """QLoRA: store the frozen base's linear layers in NF4 (before apply_lora); returns their names."""
    if cfg.qlora is None:
        return []
    from model.quant import quantize_for_qlora

    return quantize_for_qlora(model, cfg.qlora)


def make_trainable(model: nn.Module, cfg: PolicyConfig, quantized: Optional[list[str]] = None) -> Trainable:
    """Full-parameter (nothing to do) or wrap LoRA adapters (QLoRA: call ``quantize_base`` first
    and pass its result, so the adapter's meta.json says which base layers were NF4)."""
    if cfg.lora is None:
        return Trainable()
    from model.lora import adapter_meta, apply_lora, live_adapter_weights, trainable_parameters

    lora = cfg.lora
    apply_lora(model, lora.targets, lora.r, lora.alpha, lora.dropout, lora.rslora, lora.modules_to_save)
    meta = adapter_meta(model, lora, base_checkpoint=str(cfg.init_from), qlora=cfg.qlora is not None,
                        quantized=quantized or [])
    return Trainable(trainable_parameters(model), live_adapter_weights(lora.modules_to_save), meta)

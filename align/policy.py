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
    """The starting model as a plain Transformer: a full checkpoint as is, an SFT adapter
    merged onto the base its meta.json names (finetune.sft.load_finetuned)."""
    from finetune.sft import load_finetuned

    return load_finetuned(cfg.init_from, device)


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
    from finetune.sft import resolve_compute_dtype
    from model.quant import quantize_model

    q = cfg.qlora
    device = next(model.parameters()).device
    return quantize_model(model, q.targets, resolve_compute_dtype(q.compute_dtype, device), q.double_quant)


def make_trainable(model: nn.Module, cfg: PolicyConfig, quantized: Optional[list[str]] = None) -> Trainable:
    """Full-parameter (nothing to do) or wrap LoRA adapters (QLoRA: call ``quantize_base`` first
    and pass its result, so the adapter's meta.json says which base layers were NF4)."""
    if cfg.lora is None:
        return Trainable()
    from finetune.sft import lora_weights_fn
    from model.lora import adapter_meta, apply_lora, trainable_parameters

    lora = cfg.lora
    apply_lora(model, lora.targets, lora.r, lora.alpha, lora.dropout, lora.rslora, lora.modules_to_save)
    meta = adapter_meta(model, lora, base_checkpoint=str(cfg.init_from), qlora=cfg.qlora is not None,
                        quantized=quantized or [])
    return Trainable(trainable_parameters(model), lora_weights_fn(lora), meta)

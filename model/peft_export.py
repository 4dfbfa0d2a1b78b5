"""Export a LoRA-finetuned model for the HuggingFace ecosystem (PEFT adapter, or merged).

Two forms:
- merged: ``export_merged_hf`` folds the adapters into the weights (dequantizing a QLoRA
  base) and writes a plain HF model directory (``AutoModelForCausalLM.from_pretrained``).
- adapter: ``export_peft_adapter`` writes ``adapter_model.safetensors`` +
  ``adapter_config.json`` in PEFT's layout, so ``PeftModel.from_pretrained(hf_base, dir)``
  loads our adapters onto the base exported with ``model.hf_interop.export_hf``.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from model.hf_interop import FAMILIES, export_hf, family_of
from model.lora import LoRAConfig, lora_layers, merge_and_unload
from utils.errors import UserError
from utils.fs import atomic_dir


def export_merged_hf(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Merge a copy of ``model``'s adapters into its weights and write the HF layout (model untouched)."""
    return export_hf(merge_and_unload(copy.deepcopy(model)), out_dir)


def hf_module_name(name: str, cfg) -> str:
    """Our module name (``layers.0.attn.q_proj``) -> the HF one (``model.layers.0.self_attn.q_proj``)."""
    fam = FAMILIES[family_of(cfg)]
    try:
        renamed = fam.to_hf_state({name + ".weight": torch.empty(0)}, cfg)
    except (KeyError, UserError):
        renamed = {}
    if len(renamed) != 1:  # e.g. GPT-2 fuses q|k|v into one Conv1D: no per-projection counterpart
        raise UserError(f"{name} has no single HF counterpart in the {family_of(cfg)} layout; export the merged model instead.")
    return next(iter(renamed)).removesuffix(".weight")


def to_peft_adapter(model: nn.Module, lora_cfg: LoRAConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """Our adapters -> (PEFT state dict, PEFT adapter_config dict) for the HF-exported base."""
    if lora_cfg.modules_to_save:
        raise UserError("this adapter also trains whole modules (lora.modules_to_save); PEFT export covers LoRA "
                        "matrices only, so export the merged model (export_merged_hf) instead.")
    state, targets = {}, []
    for name, layer in lora_layers(model).items():
        hf = hf_module_name(name, model.cfg)
        targets.append(hf)
        # PEFT stores A as Linear(in, r).weight (r, in) and B as Linear(r, out).weight (out, r): same as ours.
        state[f"base_model.model.{hf}.lora_A.weight"] = layer.lora_A.detach().cpu().contiguous()
        state[f"base_model.model.{hf}.lora_B.weight"] = layer.lora_B.detach().cpu().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora_cfg.r,
        "lora_alpha": lora_cfg.alpha,
        "lora_dropout": lora_cfg.dropout,
        "use_rslora": lora_cfg.rslora,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    return state, config


def write_peft_adapter(model: nn.Module, lora_cfg: LoRAConfig, directory: Path) -> None:
    """adapter_model.safetensors + adapter_config.json of ``model``'s adapters, into an existing directory."""
    from safetensors.torch import save_file

    state, config = to_peft_adapter(model, lora_cfg)
    save_file(state, str(Path(directory) / "adapter_model.safetensors"), metadata={"format": "pt"})
    (Path(directory) / "adapter_config.json").write_text(json.dumps(config, indent=2))


def export_peft_adapter(model: nn.Module, lora_cfg: LoRAConfig, out_dir: str | os.PathLike) -> Path:
    """``write_peft_adapter`` into a new directory, written atomically."""
    with atomic_dir(out_dir) as tmp:
        write_peft_adapter(model, lora_cfg, tmp)
    return Path(out_dir)

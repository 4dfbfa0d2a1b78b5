"""A LoRA adapter as PEFT writes it (``adapter_config.json`` + ``adapter_model.safetensors``, the
form adapters are published in), merged onto its base as it loads.

    model = load_model("adapters/my-lora", base="models/Llama-3.2-1B")   # or the base the config names

The merge happens in the base's HuggingFace names, where PEFT's module names live, so every family
the loader reads works the same way (fused projections included) before model/hf_interop.py maps
the merged weights onto ours:

    W' = W + (alpha / r) * B @ A          (alpha / sqrt(r) with use_rslora; per module with
                                           rank_pattern / alpha_pattern; transposed for GPT-2's
                                           fan_in_fan_out Conv1D and for embeddings)

``modules_to_save`` (whole trained tensors) and saved embedding layers replace the base's. What
changes the math in other ways (DoRA, LoRA biases, trained bias terms, extra trainable token rows,
layer replication, adapters on parameters) is refused by name. The result is a plain model; to train
further, put a new LoRA on it.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

from utils.errors import UserError
from utils.fs import read_json_object

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# settings that change what the saved tensors mean: (key, its harmless value, what it does)
UNSUPPORTED = (("use_dora", False, "DoRA's magnitude vectors"), ("lora_bias", False, "trained LoRA biases"),
               ("bias", "none", "trained bias terms"), ("layer_replication", None, "replicated layers"),
               ("trainable_token_indices", None, "extra trainable token rows"), ("target_parameters", None,
                                                                                 "adapters on parameters"),
               ("use_qalora", False, "QA-LoRA pooling"))
PLAIN_INITS = (True, False, "gaussian")  # PiSSA/OLoRA/... adapters are relative to a changed base


def read_peft_config(path: Path) -> dict:
    """The adapter's adapter_config.json, checked for what this merge can express."""
    cfg = read_json_object(path / PEFT_CONFIG)
    if cfg.get("peft_type") != "LORA":
        raise UserError(f"{path} holds a PEFT {cfg.get('peft_type')!r} adapter; LoRA adapters (peft_type LORA) are read.")
    for key, harmless, what in UNSUPPORTED:
        if cfg.get(key) not in (harmless, None, [], {}):
            raise UserError(f"{path}: {key}={cfg[key]!r} ({what}) is not implemented; LoRA adapters without it are.")
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    if not (_number(r) and r == int(r) and r >= 1 and _number(alpha)):
        raise UserError(f"{path / PEFT_CONFIG}: r must be a positive integer and lora_alpha a number, got r={r!r}, "
                        f"lora_alpha={alpha!r}.")
    for patterns in (cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}):
        if not isinstance(patterns, dict) or not all(map(_number, patterns.values())):
            raise UserError(f"{path / PEFT_CONFIG}: rank_pattern and alpha_pattern map module names to numbers.")
    if cfg.get("init_lora_weights", True) not in PLAIN_INITS:
        raise UserError(f"{path}: init_lora_weights={cfg['init_lora_weights']!r} adapters are relative to a base that "
                        "initialisation changed; convert it with PEFT's path_initial_model_for_weight_conversion first.")
    return cfg


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def peft_base(path: Path, base: Optional[Any] = None, cfg: Optional[dict] = None) -> Path:
    """The base the adapter goes on: ``base`` if given, else the directory its config (``cfg``, read
    when not given) names."""
    chosen = base or (cfg or read_peft_config(path)).get("base_model_name_or_path")
    if not chosen or not Path(chosen).is_dir():
        raise UserError(f"the PEFT adapter {path} goes on {str(chosen or 'a base it does not name')!r}, which is not a "
                        "directory here; pass the base model's directory (base_checkpoint=<dir>).")
    return Path(chosen)


def _pattern(patterns: dict, module: str, default: Any) -> Any:
    """PEFT's per-module override: the first key that matches the module's name or its tail."""
    for key, value in (patterns or {}).items():
        try:
            if re.fullmatch(rf"(.*\.)?{key}", module):
                return value
        except re.error as err:
            raise UserError(f"the adapter's rank_pattern / alpha_pattern key {key!r} is not a valid pattern ({err}).") from None
    return default


def merge_peft(hf_state: dict, adapter: dict, cfg: dict, where: str) -> tuple[dict, bool]:
    """The base's HF-named weights with the adapter merged in; also whether a tied head came apart
    (the adapter trained ``lm_head`` alone, as modules_to_save)."""
    out, untied = dict(hf_state), False
    tensors = {k.removeprefix("base_model.model."): t for k, t in adapter.items()}
    lora = sorted({k.split(".lora_")[0] for k in tensors if ".lora_" in k})
    for name, t in tensors.items():  # whole tensors: modules_to_save, saved embedding layers
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        if name == "lm_head.weight" and name not in out:
            untied = True
        elif name not in out:
            raise UserError(f"{where}: {name} is not a weight of the base; is it the model the adapter was trained on?")
        elif out[name].shape != t.shape:
            raise UserError(f"{where}: {name} is {tuple(t.shape)} but the base's is {tuple(out[name].shape)}.")
        out[name] = t
    for module in lora:
        embedding = f"{module}.lora_embedding_A" in tensors
        a_key, b_key = ((f"{module}.lora_embedding_A", f"{module}.lora_embedding_B") if embedding
                        else (f"{module}.lora_A.weight", f"{module}.lora_B.weight"))
        if a_key not in tensors or b_key not in tensors or f"{module}.weight" not in out:
            raise UserError(f"{where}: the adapter on {module} is incomplete or has no weight {module}.weight in the base.")
        a, b = tensors[a_key].float(), tensors[b_key].float()
        r = _pattern(cfg.get("rank_pattern"), module, cfg.get("r", 8))
        if a.shape[0] != r:
            raise UserError(f"{where}: {module}'s lora_A has rank {a.shape[0]} but the config says r={r}.")
        alpha = _pattern(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
        delta = (b @ a) * (alpha / (math.sqrt(r) if cfg.get("use_rslora") else r))
        weight = out[f"{module}.weight"]
        if embedding or cfg.get("fan_in_fan_out"):
            delta = delta.T
        if delta.shape != weight.shape:
            raise UserError(f"{where}: {module}'s update is {tuple(delta.shape)} but its weight is {tuple(weight.shape)}.")
        out[f"{module}.weight"] = (weight.float() + delta).to(weight.dtype)
    return out, untied

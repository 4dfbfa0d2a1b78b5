"""Export a LoRA-finetuned model for the HuggingFace ecosystem (PEFT adapter, or merged).

Two forms:
- merged: ``export_merged_hf`` folds the adapters into the weights (dequantizing a QLoRA
  base) and writes a plain HF model directory (``AutoModelForCausalLM.from_pretrained``).
- adapter: ``export_peft_adapter`` writes ``adapter_model.safetensors`` +
  ``adapter_config.json`` in PEFT's layout, so ``PeftModel.from_pretrained(hf_base, dir)``
  loads our adapters onto the base exported with ``model.hf_interop.export_hf``.

Where a LoRA'd weight lands in the HF layout is not guessed from names: the family's own state
mapping is run on row numbers (``hf_rows``), so whatever it does to the weight's rows (renaming,
DeepSeek's RoPE row permutation, fusing q|k|v into Phi-3's qkv_proj or GPT-2's c_attn) happens
to lora_B's rows too (delta W = s B A has W's rows). Several of our adapters fused into one HF
module become one adapter of rank n*r: A = [A_1; ...; A_n], B block-diagonal, alpha scaled so
the scale stays alpha/r (PEFT's rank_pattern / alpha_pattern).
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from model.hf_interop import FAMILIES, export_hf, family_of
from model.lora import LoRAConfig, lora_layers, merge_and_unload
from model.lora_experts import LoRAExperts
from utils.errors import UserError
from utils.fs import atomic_dir

# PEFT >= 0.18 on transformers 5 reads these target names, in these families, as the fused MoE
# experts (its weight conversion for checkpoints saved before the fusion), so an adapter on a
# dense or shared-expert MLP of that name would be moved onto the experts or dropped.
PEFT_READS_AS_EXPERTS = {"deepseek_v3": ("gate_proj", "up_proj", "down_proj"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}
MERGED = "python model/hf_convert.py export --checkpoint ... --out ... (without --peft)"


def export_merged_hf(model: nn.Module, out_dir: str | os.PathLike) -> Path:
    """Merge a copy of ``model``'s adapters into its weights and write the HF layout (model untouched)."""
    return export_hf(merge_and_unload(copy.deepcopy(model)), out_dir)


def hf_rows(cfg, names: list[str]) -> dict[str, tuple[str, torch.Tensor, bool, int]]:
    """For each of our linear modules ``names``: (HF module, where each of its output rows lands in
    that module's output, whether HF stores the weight transposed as GPT-2's Conv1D does, the HF
    module's number of outputs).

    The family's state mapping runs on a state dict of row numbers (every other tensor zero, its
    trailing dims cut to 1, so this costs the model's row counts, not its weights)."""
    from model.transformer import Transformer

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    traced, starts, owners, next_id = {}, [], [], 1
    for key, shape in shapes.items():
        small = (shape[0], *[1] * (len(shape) - 1)) if shape else shape
        if key.removesuffix(".weight") in names and len(shape) == 2:
            traced[key] = torch.arange(next_id, next_id + shape[0], dtype=torch.float64).view(small)
            starts.append(next_id)
            owners.append(key.removesuffix(".weight"))
            next_id += shape[0]
        else:
            traced[key] = torch.zeros(small, dtype=torch.float64)
    found: dict[str, tuple[str, torch.Tensor, bool, int]] = {}
    for hf_key, t in FAMILIES[family_of(cfg)].to_hf_state(traced, cfg).items():
        if t.dim() != 2 or not t.any():
            continue
        transposed = t.shape[0] == 1 and t.shape[1] > 1  # Conv1D: (in, out), our rows along dim 1
        flat = t.reshape(-1)
        pos = flat.nonzero().flatten()
        which = torch.searchsorted(torch.tensor(starts, dtype=torch.float64), flat[pos], right=True) - 1
        for j in which.unique().tolist():
            module, sel = owners[j], which == j
            if module in found:  # its rows went to two HF tensors
                found[module] = ("", torch.empty(0), False, 0)
                continue
            positions = torch.full((shapes[module + ".weight"][0],), -1, dtype=torch.long)
            positions[(flat[pos[sel]] - starts[j]).long()] = pos[sel]
            found[module] = (hf_key.removesuffix(".weight"), positions, transposed, flat.numel())
    for module in names:
        if module not in found or not found[module][0] or (found[module][1] < 0).any():
            raise UserError(f"{module} has no single HF counterpart in the {family_of(cfg)} layout; export the merged "
                            f"model instead: {MERGED}.")
    return {m: found[m] for m in names}


def hf_module_name(name: str, cfg) -> str:
    """Our module name (``layers.0.attn.q_proj``) -> the HF one (``model.layers.0.self_attn.q_proj``)."""
    return hf_rows(cfg, [name])[name][0]


def to_peft_adapter(model: nn.Module, lora_cfg: LoRAConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """Our adapters -> (PEFT state dict, PEFT adapter_config dict) for the HF-exported base."""
    if lora_cfg.modules_to_save:
        raise UserError("this adapter also trains whole modules (lora.modules_to_save); PEFT export covers LoRA "
                        f"matrices only, so export the merged model instead: {MERGED}.")
    layers = lora_layers(model)
    family = family_of(model.cfg)
    stacked = [n for n, layer in layers.items() if isinstance(layer, LoRAExperts)]
    if stacked:
        raise UserError(f"{stacked[0]} adapts the routed experts (one adapter per expert), which a PEFT adapter "
                        f"cannot say for the {family} layout; export the merged model instead: {MERGED}, or leave "
                        "experts out of lora.targets.")
    rows = hf_rows(model.cfg, sorted(layers))
    parts: dict[str, list[str]] = {}  # HF module -> our modules in it
    for name, (hf, _, _, _) in rows.items():
        if hf.rsplit(".", 1)[-1] in PEFT_READS_AS_EXPERTS.get(family, ()):
            raise UserError(f"{name} is {hf} in the {family} layout, which PEFT (>= 0.18 on transformers 5) reads as "
                            f"the fused MoE experts, so the adapter would not load as trained; export the merged "
                            f"model instead: {MERGED}, or leave the MLPs out of lora.targets.")
        parts.setdefault(hf, []).append(name)
    if len({t for _, _, t, _ in rows.values()}) > 1:
        raise UserError(f"the {family} layout stores some adapted weights transposed and some not, which one PEFT "
                        f"adapter cannot say; export the merged model instead: {MERGED}.")
    state, rank_pattern, alpha_pattern = {}, {}, {}
    r = lora_cfg.r
    for hf, names in sorted(parts.items()):
        n = len(names)
        A = torch.cat([layers[m].lora_A.detach().float() for m in names])  # (n r, in)
        B = torch.zeros(rows[names[0]][3], n * r)  # (HF outputs, n r)
        for i, m in enumerate(names):  # block-diagonal: part i's rows read only its own A rows
            B[rows[m][1], i * r : (i + 1) * r] = layers[m].lora_B.detach().float()
        state[f"base_model.model.{hf}.lora_A.weight"] = A.to(layers[names[0]].lora_A.dtype).cpu().contiguous()
        state[f"base_model.model.{hf}.lora_B.weight"] = B.to(layers[names[0]].lora_B.dtype).cpu().contiguous()
        if n > 1:  # rank n r keeps the scale alpha/r (rsLoRA: alpha/sqrt(r)) with alpha n (alpha sqrt(n))
            rank_pattern[re.escape(hf)] = n * r
            alpha_pattern[re.escape(hf)] = lora_cfg.alpha * (math.sqrt(n) if lora_cfg.rslora else n)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": lora_cfg.alpha,
        "lora_dropout": lora_cfg.dropout,
        "use_rslora": lora_cfg.rslora,
        "target_modules": sorted(parts),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": any(t for _, _, t, _ in rows.values()),
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

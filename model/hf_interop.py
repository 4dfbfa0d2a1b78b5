"""Convert between our Transformer and the HuggingFace `transformers` layout.

Each family is a pair: a function ModelConfig <-> HF config dict, and a renaming of the
state dict (model/hf_common.py holds the Family record and what the families share). Nothing
here imports `transformers`; the config is written as plain JSON, so an exported directory
loads with ``AutoModelForCausalLM.from_pretrained`` (and with vLLM or the llama.cpp
converters, which read the same files).

Families: llama, mistral, qwen2, qwen3, phi3, olmo2 (model/hf_llama.py); gemma, gemma2,
gemma3_text (model/hf_gemma.py); mixtral, qwen2_moe, qwen3_moe (model/hf_moe.py); deepseek_v3
(model/hf_deepseek.py); gpt2 (model/hf_gpt2.py).

Strict both ways, nothing lost silently:
- import: each family reads the config keys its transformers class reads (with that class's
  defaults) and refuses a value we do not implement (a RoPE type, a window layout, an activation...);
- export: a family is chosen only if its config holds ours exactly: the config written for it
  reads back to the same forward math (``forward_math``); otherwise export refuses, naming the
  fields the closest family would lose.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

import model.hf_deepseek  # noqa: F401  (each family module registers itself in FAMILIES)
import model.hf_gemma  # noqa: F401
import model.hf_gpt2  # noqa: F401
import model.hf_llama  # noqa: F401
import model.hf_moe  # noqa: F401
from model.config import ModelConfig
from model.hf_common import FAMILIES, Family  # noqa: F401  (re-exported)
from utils.errors import UserError

# Export preference: the first family that holds a config exactly.
EXPORT_ORDER = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "phi3", "gemma", "gemma2", "gemma3_text", "mixtral",
                "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt2")
# Settings of training or of the runtime, and notes: a forward in eval mode does not read them.
NOT_MATH = ("dropout", "kernels", "init_std", "hf_family", "extra")


def forward_math(cfg: ModelConfig) -> dict:
    """The fields of cfg that decide its forward, each spelled one way, so two configs with the
    same math compare equal (a default query scale written out, windows as the per-layer list...)."""
    d = cfg.to_dict()
    for key in NOT_MATH:
        d.pop(key)
    d["ffn"] = "gated" if cfg.ffn in ("swiglu", "geglu") else cfg.ffn  # both are GatedMLP with cfg.activation
    d["query_pre_attn_scalar"] = float(cfg.query_pre_attn_scalar or cfg.head_dim)
    windows = [cfg.layer_window(i) for i in range(cfg.n_layers)]
    d["sliding_window"], d["sliding_window_pattern"] = windows, None
    local = (cfg.rope_local_theta, None) if cfg.rope_local_theta is not None else (cfg.rope_theta, cfg.rope_scaling)
    d["rope_local_theta"] = local if any(w is not None for w in windows) else None
    if cfg.pos_emb != "rope" and cfg.attention != "mla":
        for key in ("rope_theta", "rope_scaling", "partial_rotary", "rope_local_theta"):
            d[key] = None
    if cfg.norm == "rmsnorm":
        d["norm_bias"] = None  # only LayerNorm has a bias
    else:
        d["norm_unit_offset"] = None  # only RMSNorm has Gemma's (1 + w)
    if cfg.ffn == "moe" and cfg.moe["first_k_dense"] == 0:
        d["d_ff"] = None  # no dense layer uses it (shared experts have the experts' width)
    if cfg.mla is not None:
        d["mla"] = {**cfg.mla, "q_lora_rank": cfg.mla["q_lora_rank"] or None}
    return d


def _hf_round_trip(name: str, cfg: ModelConfig) -> dict[str, tuple]:
    """What family ``name`` would lose of cfg: {field: (ours, as it reads back)}; {} if nothing."""
    fam = FAMILIES[name]
    try:
        back = fam.from_hf_config(json.loads(json.dumps(fam.to_hf_config(cfg))))
    except UserError as err:
        return {"config": (str(err), None)}
    ours, theirs = forward_math(cfg), forward_math(back)
    return {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}


def family_of(cfg: ModelConfig) -> str:
    """The HF family whose config holds cfg exactly (cfg.hf_family first, when set); UserError naming
    what the closest would lose."""
    if cfg.hf_family is not None and cfg.hf_family not in FAMILIES:
        raise UserError(f"model.hf_family={cfg.hf_family!r} is not a supported HF family: {sorted(FAMILIES)}.")
    lost: dict[str, dict] = {}
    for name in dict.fromkeys([cfg.hf_family, *EXPORT_ORDER] if cfg.hf_family else EXPORT_ORDER):
        if FAMILIES[name].matches(cfg):
            lost[name] = _hf_round_trip(name, cfg)
            if not lost[name]:
                return name
    if not lost:
        raise UserError(
            "this model's combination of parts has no HuggingFace counterpart to export to "
            f"(attention={cfg.attention}, ffn={cfg.ffn}, norm={cfg.norm}, pos_emb={cfg.pos_emb}); "
            f"supported families: {sorted(FAMILIES)}.")
    best = min(lost, key=lambda n: len(lost[n]))
    what = "; ".join(f"{k}={ours!r} (would read back as {back!r})" for k, (ours, back) in lost[best].items())
    raise UserError(f"no HuggingFace family holds this model exactly, so exporting it would change its outputs. "
                    f"The closest, {best}, cannot express: {what}. Other candidates: "
                    f"{', '.join(f'{n} ({len(v)} fields)' for n, v in lost.items() if n != best) or 'none'}.")


def to_hf(state_dict: dict, cfg: ModelConfig) -> tuple[dict, dict]:
    """Our (state_dict, config) -> (HF state dict, HF config dict)."""
    if cfg.vision is not None:  # a vision-language model: LLaVA around its text model's family
        from model.hf_vision import llava_to_hf

        return llava_to_hf(state_dict, cfg)
    fam = FAMILIES[family_of(cfg)]
    return fam.to_hf_state(state_dict, cfg), fam.to_hf_config(cfg)


def config_from_hf(hf_config: dict) -> ModelConfig:
    model_type = hf_config.get("model_type")
    quant = hf_config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise UserError(f"this checkpoint's weights are quantized (quantization_config, quant_method={method!r}); "
                        "import reads full-precision weights: use the unquantized (bf16/fp16/fp32) release.")
    if model_type == "llava":  # a vision-language model: its text model's config with a vision section
        from model.hf_vision import llava_config_from_hf

        return llava_config_from_hf(hf_config)
    if model_type == "gemma3":
        raise UserError("model_type 'gemma3' is Gemma-3's vision-language model; its text model (model_type "
                        "'gemma3_text', e.g. google/gemma-3-1b-pt) is supported, the vision tower is not.")
    if model_type not in FAMILIES:
        raise UserError(f"HF model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}.")
    try:
        cfg = FAMILIES[model_type].from_hf_config(hf_config)
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # a hand-edited or truncated config.json
        raise UserError(f"this {model_type} config.json cannot be read ({type(err).__name__}: {err}); a key is missing "
                        "or holds a value of the wrong type.") from None
    return replace(cfg, hf_family=model_type)


def from_hf(hf_state: dict, hf_config: dict) -> tuple[dict, ModelConfig]:
    """HF (state dict, config dict) -> (our state dict, ModelConfig)."""
    if hf_config.get("model_type") == "llava":
        from model.hf_vision import llava_from_hf

        return llava_from_hf(hf_state, hf_config)
    cfg = config_from_hf(hf_config)
    return FAMILIES[hf_config["model_type"]].from_hf_state(hf_state, cfg, hf_config), cfg


def write_hf(model: torch.nn.Module, directory: Path) -> None:
    """Write ``config.json`` + ``model.safetensors`` of ``model`` into an existing directory."""
    from safetensors.torch import save_file

    cfg: ModelConfig = model.cfg
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    hf_state, hf_config = to_hf(state, cfg)
    save_file(hf_state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))


def export_hf(model: torch.nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``AutoModelForCausalLM`` loads (a
    vision-language model: ``LlavaForConditionalGeneration``).

    Written into a temporary sibling directory and renamed into place.
    """
    from utils.fs import atomic_dir

    with atomic_dir(out_dir) as tmp:
        write_hf(model, tmp)
    return Path(out_dir)


def read_hf_json(path: str | os.PathLike) -> dict:
    """An HF model directory's config.json as a dict (UserError naming what is wrong)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise UserError(f"{path} has no config.json; point at a HuggingFace model directory.")
    try:
        hf_config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file} is not valid JSON ({err}).") from None
    if not isinstance(hf_config, dict):
        raise UserError(f"{file} must hold a JSON object.")
    return hf_config


def read_hf_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of an HF model directory's config.json (UserError naming what is wrong)."""
    return config_from_hf(read_hf_json(path))


def read_hf_weights(path: str | os.PathLike) -> dict:
    """Every tensor of an HF model directory's *.safetensors files (one, or the shards), by HF name."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no *.safetensors weights.")
    state: dict = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"{f} cannot be read ({err}); the download is incomplete or damaged.") from None
    return state


def load_hf_dir(path: str | os.PathLike) -> tuple[dict, ModelConfig]:
    """Read an HF model directory (config.json + one or sharded *.safetensors) into our layout."""
    hf_config = read_hf_json(path)
    config_from_hf(hf_config)  # the clear errors before reading the weights
    return from_hf(read_hf_weights(path), hf_config)

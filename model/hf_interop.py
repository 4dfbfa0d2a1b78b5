"""Convert between our Transformer and the HuggingFace `transformers` layout.

Each family is a pair: a function ModelConfig <-> HF config dict, and a renaming of the
state dict (model/hf_common.py holds the Family record and what the families share). Nothing
here imports `transformers`; the config is written as plain JSON, so an exported directory
loads with ``AutoModelForCausalLM.from_pretrained`` (a vision-language model with
``LlavaForConditionalGeneration``), and with vLLM or the llama.cpp converters, which read the
same files.

Families: llama, mistral, qwen2, qwen3, phi3, olmo2 (model/hf_llama.py); gemma, gemma2,
gemma3_text (model/hf_gemma.py); mixtral, qwen2_moe, qwen3_moe (model/hf_moe.py); deepseek_v3
(model/hf_deepseek.py); gpt2 (model/hf_gpt2.py); and llava around the Llama-, Mistral-, Qwen-,
Phi-3-, OLMo-2- and MoE-style ones, with a SigLIP tower (below, and model/hf_vision.py).

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
from model import hf_vision
from model.config import ModelConfig
from model.hf_common import FAMILIES, Family, read_hf_json, read_hf_weights  # noqa: F401  (re-exported)
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
        return llava_config_from_hf(hf_config)
    if model_type == "gemma3":
        raise UserError("model_type 'gemma3' is Gemma-3's vision-language model; its text model (model_type "
                        "'gemma3_text', e.g. google/gemma-3-1b-pt) is supported, the vision tower is not.")
    if model_type not in FAMILIES:
        raise UserError(f"HF model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}, and llava "
                        "(a SigLIP tower around one of them).")
    try:
        cfg = FAMILIES[model_type].from_hf_config(hf_config)
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # a hand-edited or truncated config.json
        raise UserError(f"this {model_type} config.json cannot be read ({type(err).__name__}: {err}); a key is missing "
                        "or holds a value of the wrong type.") from None
    return replace(cfg, hf_family=model_type)


def from_hf(hf_state: dict, hf_config: dict) -> tuple[dict, ModelConfig]:
    """HF (state dict, config dict) -> (our state dict, ModelConfig)."""
    if hf_config.get("model_type") == "llava":
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


def read_hf_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of an HF model directory's config.json (UserError naming what is wrong)."""
    return config_from_hf(read_hf_json(path))


def load_hf_dir(path: str | os.PathLike) -> tuple[dict, ModelConfig]:
    """Read an HF model directory (config.json + one or sharded *.safetensors) into our layout."""
    hf_config = read_hf_json(path)
    config_from_hf(hf_config)  # the clear errors before reading the weights
    return from_hf(read_hf_weights(path), hf_config)


# ----------------------------------------------------------------------------- LLaVA
# A LLaVA is a SigLIP tower (model/hf_vision.py), a GELU projector and a text model of one of the
# families above whose HF weights sit under model.* / lm_head.* (not GPT-2's transformer.*) and that
# neither scales its embeddings nor soft-caps its logits (not Gemma's).

LLAVA_TEXT_NAMES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                    ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))


def llava_config_from_hf(hf: dict) -> ModelConfig:
    """A ``LlavaForConditionalGeneration`` config.json -> our ModelConfig: the text model's, with a
    vision section (SigLIP tower cut at ``vision_feature_layer``, LLaVA's GELU projector)."""
    text, vision = hf.get("text_config"), hf.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise UserError("this llava config.json has no text_config / vision_config object.")
    if vision.get("model_type") != "siglip_vision_model":
        raise UserError(f"this LLaVA's vision tower is {vision.get('model_type')!r}; towers are read from SigLIP "
                        "(siglip_vision_model), whose [-1, 1] pixel normalisation and patch-only features ours "
                        "match; a CLIP tower normalises differently and has a CLS token.")
    if text.get("model_type") == "gpt2":
        raise UserError("this LLaVA's language model is GPT-2, whose weights LLaVA keeps outside model.*; LLaVA is "
                        "read with Llama-, Mistral- and Qwen-style language models.")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy != "full":
        raise UserError(f"this LLaVA drops the tower's first feature (vision_feature_select_strategy={strategy!r}, "
                        "meant for CLIP's CLS token); SigLIP-tower LLaVAs use 'full', which is what is implemented.")
    act, bias = hf.get("projector_hidden_act", "gelu"), hf.get("multimodal_projector_bias", True)
    if act != "gelu" or not bias:
        raise UserError("this LLaVA's projector is not linear -> GELU -> linear with biases "
                        f"(projector_hidden_act {act!r}, multimodal_projector_bias {bias!r}).")
    sizes = hf_vision.siglip_sizes(vision, "vision_config")
    layer, total = hf.get("vision_feature_layer", -2), sizes["n_layers"]
    if not isinstance(layer, int) or isinstance(layer, bool) or not (-total <= layer <= total) or layer == 0:
        raise UserError(f"vision_feature_layer {layer!r}: one layer of the tower's {total} (1..{total} or "
                        f"-1..-{total}) is implemented, not the embeddings or a list of layers.")
    sizes["n_layers"] = layer if layer > 0 else total + 1 + layer  # the layers up to the one read
    token = hf.get("image_token_id", hf.get("image_token_index"))
    cfg = config_from_hf(text)
    _llava_text_check(cfg)
    return ModelConfig.from_dict({**cfg.to_dict(), "vision": {**sizes, "image_token_id": token, "post_norm": False}})


def _llava_text_check(cfg: ModelConfig) -> None:
    """LLaVA computes the logits outside its language model (no final soft-cap) and, around Gemma 1/2,
    scales the image features with the text embeddings; neither is what our model does."""
    if cfg.embed_scale or cfg.final_logit_softcap:
        raise UserError("a LLaVA around a Gemma-style language model (embeddings scaled by sqrt(d_model), logits "
                        "soft-capped) is not implemented: LLaVA would scale the image features and drop the cap. "
                        "Llama-, Mistral- and Qwen-style language models are.")


def llava_from_hf(weights: dict, hf: dict) -> tuple[dict, ModelConfig]:
    """A LLaVA checkpoint's (weights, config.json) -> (our state dict, ModelConfig). Names as transformers 5
    writes them (model.language_model.*, model.vision_tower.*, model.multi_modal_projector.*, lm_head.*) or
    transformers 4 (language_model.model.*, language_model.lm_head.*, vision_tower.vision_model.*, ...)."""
    cfg = llava_config_from_hf(hf)
    text = {}
    for name, t in weights.items():
        theirs, ours = next(((a, b) for a, b in LLAVA_TEXT_NAMES if name.startswith(a)), (None, None))
        if theirs is not None:
            text[ours + name[len(theirs):]] = t
    state, _ = from_hf(text, hf["text_config"])
    n = cfg.vision["n_layers"]  # the tower's layers after the one LLaVA reads are left out
    tower = {k: t for k, t in hf_vision.tower_weights(weights, "the LLaVA checkpoint").items()
             if not k.startswith("post_layernorm.") and not (k.startswith("encoder.layers.") and int(k.split(".")[2]) >= n)}
    state.update({f"vision.tower.{k}": t for k, t in hf_vision.tower_from_siglip(tower).items()})
    anchor = "multi_modal_projector.linear_1.weight"
    projector = next((k[: -len("linear_1.weight")] for k in weights if k.endswith(anchor)), None)
    if projector is not None:  # else load_into names the missing projector weights
        state.update({f"vision.projector.{k[len(projector):]}": t for k, t in weights.items() if k.startswith(projector)})
    return state, cfg


def llava_to_hf(state: dict, cfg: ModelConfig) -> tuple[dict, dict]:
    """Our vision-language model -> a ``LlavaForConditionalGeneration`` (state dict, config.json), in the
    names llava-hf's releases use (transformers 4's, which transformers 5 reads too)."""
    v = cfg.vision
    if v["post_norm"] or v["pool"] != 1:
        raise UserError("LLaVA reads every patch of the tower's last layer before its final LayerNorm; this model "
                        f"has vision.post_norm={v['post_norm']} and vision.pool={v['pool']}, which it cannot express.")
    act = {ours: theirs for theirs, ours in hf_vision.HF_ACTIVATIONS.items()}.get(v["activation"])
    if act is None:
        raise UserError(f"vision.activation {v['activation']!r} has no SigLIP equivalent "
                        f"({', '.join(hf_vision.HF_ACTIVATIONS.values())}).")
    _llava_text_check(cfg)
    text_state, text = to_hf({k: t for k, t in state.items() if not k.startswith("vision.")},
                             ModelConfig.from_dict({**cfg.to_dict(), "vision": None}))
    if text["model_type"] == "gpt2":
        raise UserError("a GPT-2 language model has no LLaVA layout (its weights are not under model.*); "
                        "export a vision-language model with a Llama-, Mistral- or Qwen-style language model.")
    out = {("language_model." if k.startswith("lm_head.") else "language_model.model.") + k.removeprefix("model."): t
           for k, t in text_state.items()}
    tower = hf_vision.tower_to_siglip({k[len("vision.tower."):]: t for k, t in state.items()
                                       if k.startswith("vision.tower.")})
    d = v["d_model"]
    tower.update({"post_layernorm.weight": torch.ones(d), "post_layernorm.bias": torch.zeros(d)})  # unread by LLaVA
    out.update({f"vision_tower.vision_model.{k}": t for k, t in tower.items()})
    out.update({f"multi_modal_projector.{k[len('vision.projector.'):]}": t for k, t in state.items()
                if k.startswith("vision.projector.")})
    vision = {theirs: v[ours] for theirs, ours in hf_vision.SIZE_KEYS.items()}
    config = {
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "text_config": text,
        "vision_config": {"model_type": "siglip_vision_model", **vision, "hidden_act": act, "vision_use_head": False},
        "image_token_index": v["image_token_id"], "image_seq_length": cfg.image_tokens, "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full", "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "tie_word_embeddings": bool(text.get("tie_word_embeddings", False)),
    }
    return out, config

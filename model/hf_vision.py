"""Our vision tower's weights to and from transformers' SigLIP vision tower (``SiglipVisionModel``'s
``vision_model``, the tower LLaVA-style models hold as ``vision_tower``): same math, other names.

Key renames only; the tower's math is checked against transformers in tests/model/test_vision.py.
``tower_from_siglip_dir`` reads a published SigLIP checkpoint directory (``save_pretrained`` of
``SiglipVisionModel`` or ``SiglipModel``) into our sizes and weights, so a VLM can start from a
pretrained tower as LLaVA does (finetune/vlm.py, ``model.vision_tower``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from model.config import ModelConfig
from utils.errors import UserError

# ours -> SigLIP, per encoder layer
LAYER_KEYS = {
    "attn_norm": "layer_norm1", "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj", "attn.o_proj": "self_attn.out_proj", "ffn_norm": "layer_norm2",
    "ffn.up_proj": "mlp.fc1", "ffn.down_proj": "mlp.fc2",
}
TOP_KEYS = {"patch_embed": "embeddings.patch_embedding", "pos_embed": "embeddings.position_embedding",
            "post_norm": "post_layernorm"}


def _rename(name: str, table: dict[str, str]) -> str:
    for ours, theirs in table.items():
        if name == ours or name.startswith(ours + "."):
            return theirs + name[len(ours):]
    raise KeyError(name)


def tower_to_siglip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our VisionTower state dict -> the SigLIP vision transformer's (no pooling head)."""
    out = {}
    for name, t in state.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            out[f"encoder.layers.{i}.{_rename(rest, LAYER_KEYS)}"] = t
        else:
            out[_rename(name, TOP_KEYS)] = t
    return out


def tower_from_siglip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The SigLIP vision transformer's state dict -> our VisionTower's (its pooling head is dropped:
    a LLaVA-style model reads the patch features)."""
    layer_back = {v: k for k, v in LAYER_KEYS.items()}
    top_back = {v: k for k, v in TOP_KEYS.items()}
    out = {}
    for name, t in state.items():
        if name.startswith("head.") or name.endswith("position_ids"):  # the pooling head; a saved index buffer
            continue
        if name.startswith("encoder.layers."):
            _, _, i, rest = name.split(".", 3)
            out[f"layers.{i}.{_rename(rest, layer_back)}"] = t
        else:
            out[_rename(name, top_back)] = t
    return out


# SigLIP's config keys -> our vision section's
SIZE_KEYS = {"image_size": "image_size", "patch_size": "patch_size", "num_channels": "n_channels",
             "hidden_size": "d_model", "num_attention_heads": "n_heads", "num_hidden_layers": "n_layers",
             "intermediate_size": "d_ff", "layer_norm_eps": "norm_eps"}
HF_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
SIGLIP_DEFAULTS = {"image_size": 224, "patch_size": 16, "num_channels": 3, "hidden_size": 768, "num_attention_heads": 12,
                   "num_hidden_layers": 12, "intermediate_size": 3072, "layer_norm_eps": 1e-6}  # SiglipVisionConfig's


def tower_from_siglip_dir(path: str | Path, post_norm: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """A SigLIP checkpoint directory -> (our vision section's tower keys, our tower's state dict).
    ``post_norm=False`` (LLaVA's choice: features before SigLIP's final LayerNorm) leaves that norm out."""
    from model.hf_interop import read_hf_json, read_hf_weights

    hf = read_hf_json(path)
    kind = hf.get("model_type")
    if kind == "siglip":  # the image-text model: its vision half
        hf = hf.get("vision_config") or {}
    elif kind != "siglip_vision_model":
        raise UserError(f"{path} holds a {kind!r} model; a vision tower is read from a SigLIP checkpoint "
                        "(model_type siglip or siglip_vision_model), whose [-1, 1] pixel normalisation ours matches.")
    sizes = _siglip_sizes(hf, str(path))
    tower = _tower_weights(read_hf_weights(path), str(path))
    if not post_norm:
        tower = {k: t for k, t in tower.items() if not k.startswith("post_layernorm.")}
    return sizes, tower_from_siglip(tower)


def _siglip_sizes(hf: dict, where: str) -> dict:
    """A SiglipVisionConfig dict -> our vision section's tower keys."""
    act = hf.get("hidden_act", "gelu_pytorch_tanh")
    if act not in HF_ACTIVATIONS:
        raise UserError(f"{where}: hidden_act {act!r} is not one the tower implements ({', '.join(HF_ACTIVATIONS)}).")
    sizes = {ours: hf.get(theirs, SIGLIP_DEFAULTS[theirs]) for theirs, ours in SIZE_KEYS.items()}
    return {**sizes, "activation": HF_ACTIVATIONS[act]}


def _tower_weights(weights: dict, where: str) -> dict:
    """The SigLIP tower's tensors of a checkpoint, by their names inside the tower. Their prefix is
    "vision_model." (SiglipModel; SiglipVisionModel before transformers 5), nothing (SiglipVisionModel
    from transformers 5) or LLaVA's "vision_tower.vision_model." / "model.vision_tower.": found from the
    patch embedding's name."""
    anchor = "embeddings.patch_embedding.weight"
    prefix = next((k[: -len(anchor)] for k in weights if k.endswith(anchor)), None)
    if prefix is None:
        raise UserError(f"{where} has no {anchor}; is it a SigLIP vision checkpoint?")
    return {k[len(prefix):]: t for k, t in weights.items() if k.startswith(prefix) and not k.startswith("text_model.")}


# ----------------------------------------------------------------------------- LLaVA


def llava_config_from_hf(hf: dict) -> ModelConfig:
    """A ``LlavaForConditionalGeneration`` config.json -> our ModelConfig: the text model's, with a
    vision section (SigLIP tower cut at ``vision_feature_layer``, LLaVA's GELU projector)."""
    from model.hf_interop import config_from_hf

    text, vision = hf.get("text_config"), hf.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise UserError("this llava config.json has no text_config / vision_config object.")
    if vision.get("model_type") != "siglip_vision_model":
        raise UserError(f"this LLaVA's vision tower is {vision.get('model_type')!r}; towers are read from SigLIP "
                        "(siglip_vision_model), whose [-1, 1] pixel normalisation and patch-only features ours match; "
                        "a CLIP tower normalises differently and has a CLS token.")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy != "full":
        raise UserError(f"this LLaVA drops the tower's first feature (vision_feature_select_strategy={strategy!r}, "
                        "meant for CLIP's CLS token); SigLIP-tower LLaVAs use 'full', which is what is implemented.")
    if hf.get("projector_hidden_act", "gelu") != "gelu" or not hf.get("multimodal_projector_bias", True):
        raise UserError("this LLaVA's projector is not linear -> GELU -> linear with biases (projector_hidden_act "
                        f"{hf.get('projector_hidden_act')!r}, multimodal_projector_bias {hf.get('multimodal_projector_bias')!r}).")
    sizes = _siglip_sizes(vision, "vision_config")
    layer, total = hf.get("vision_feature_layer", -2), sizes["n_layers"]
    if not isinstance(layer, int) or not (-total <= layer <= total) or layer == 0:
        raise UserError(f"vision_feature_layer {layer!r}: one layer of the tower's {total} (1..{total} or -1..-{total}) "
                        "is implemented, not the embeddings or a list of layers.")
    sizes["n_layers"] = layer if layer > 0 else total + 1 + layer  # the layers up to the one read
    token = hf.get("image_token_id", hf.get("image_token_index"))
    cfg = config_from_hf(text)
    return ModelConfig.from_dict({**cfg.to_dict(), "vision": {**sizes, "image_token_id": token, "post_norm": False}})


def llava_from_hf(weights: dict, hf: dict) -> tuple[dict, ModelConfig]:
    """A LLaVA checkpoint's (weights, config.json) -> (our state dict, ModelConfig). Names as transformers 5
    writes them (model.language_model.*, model.vision_tower.*, model.multi_modal_projector.*, lm_head.*) or
    transformers 4 (language_model.model.*, language_model.lm_head.*, vision_tower.vision_model.*, ...)."""
    from model.hf_interop import from_hf

    cfg = llava_config_from_hf(hf)
    text = {}
    for name, t in weights.items():
        for theirs, ours in (("model.language_model.", "model."), ("language_model.model.", "model."),
                             ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head.")):
            if name.startswith(theirs):
                text[ours + name[len(theirs):]] = t
                break
    state, _ = from_hf(text, hf["text_config"])
    n = cfg.vision["n_layers"]
    tower = {k: t for k, t in _tower_weights(weights, "the LLaVA checkpoint").items()
             if not k.startswith("post_layernorm.") and not (k.startswith("encoder.layers.") and int(k.split(".")[2]) >= n)}
    state.update({f"vision.tower.{k}": t for k, t in tower_from_siglip(tower).items()})
    projector = next((k[: -len("linear_1.weight")] for k in weights if k.endswith("multi_modal_projector.linear_1.weight")), "")
    state.update({f"vision.projector.{k[len(projector):]}": t for k, t in weights.items() if projector and k.startswith(projector)})
    return state, cfg


def llava_to_hf(state: dict, cfg: ModelConfig) -> tuple[dict, dict]:
    """Our vision-language model -> a ``LlavaForConditionalGeneration`` (state dict, config.json), in the
    names llava-hf's releases use (transformers 4's, which transformers 5 reads too)."""
    from model.hf_interop import to_hf

    v = cfg.vision
    if v["post_norm"] or v["pool"] != 1:
        raise UserError("LLaVA reads every patch of the tower's last layer before its final LayerNorm; this model "
                        f"has vision.post_norm={v['post_norm']} and vision.pool={v['pool']}, which it cannot express.")
    act = {ours: theirs for theirs, ours in HF_ACTIVATIONS.items()}.get(v["activation"])
    if act is None:
        raise UserError(f"vision.activation {v['activation']!r} has no SigLIP equivalent ({', '.join(HF_ACTIVATIONS)}).")
    text_state, text = to_hf({k: t for k, t in state.items() if not k.startswith("vision.")},
                             ModelConfig.from_dict({**cfg.to_dict(), "vision": None}))
    out = {("language_model." if k.startswith("lm_head.") else "language_model.model.") + k.removeprefix("model."): t
           for k, t in text_state.items()}
    tower = tower_to_siglip({k[len("vision.tower."):]: t for k, t in state.items() if k.startswith("vision.tower.")})
    d = v["d_model"]
    tower.update({"post_layernorm.weight": torch.ones(d), "post_layernorm.bias": torch.zeros(d)})  # unread by LLaVA
    out.update({f"vision_tower.vision_model.{k}": t for k, t in tower.items()})
    out.update({f"multi_modal_projector.{k[len('vision.projector.'):]}": t for k, t in state.items()
                if k.startswith("vision.projector.")})
    vision = {theirs: v[ours] for theirs, ours in SIZE_KEYS.items()}
    config = {
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "text_config": text,
        "vision_config": {"model_type": "siglip_vision_model", **vision, "hidden_act": act, "vision_use_head": False},
        "image_token_index": v["image_token_id"], "image_seq_length": cfg.image_tokens, "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full", "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "tie_word_embeddings": bool(text.get("tie_word_embeddings", False)),
    }
    return out, config

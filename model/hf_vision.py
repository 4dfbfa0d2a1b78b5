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
from model.hf_common import read_hf_json, read_hf_weights
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
    hf = read_hf_json(path)
    kind = hf.get("model_type")
    if kind == "siglip":  # the image-text model: its vision half
        hf = hf.get("vision_config") or {}
    elif kind != "siglip_vision_model":
        raise UserError(f"{path} holds a {kind!r} model; a vision tower is read from a SigLIP checkpoint "
                        "(model_type siglip or siglip_vision_model), whose [-1, 1] pixel normalisation ours matches.")
    sizes = siglip_sizes(hf, str(path))
    tower = tower_weights(read_hf_weights(path), str(path))
    if not post_norm:
        tower = {k: t for k, t in tower.items() if not k.startswith("post_layernorm.")}
    return sizes, tower_from_siglip(tower)


def siglip_sizes(hf: dict, where: str) -> dict:
    """A SiglipVisionConfig dict -> our vision section's tower keys."""
    act = hf.get("hidden_act", "gelu_pytorch_tanh")
    if act not in HF_ACTIVATIONS:
        raise UserError(f"{where}: hidden_act {act!r} is not one the tower implements ({', '.join(HF_ACTIVATIONS)}).")
    sizes = {ours: hf.get(theirs, SIGLIP_DEFAULTS[theirs]) for theirs, ours in SIZE_KEYS.items()}
    return {**sizes, "activation": HF_ACTIVATIONS[act]}


def tower_weights(weights: dict, where: str) -> dict:
    """The SigLIP tower's tensors of a checkpoint, by their names inside the tower. Their prefix is
    "vision_model." (SiglipModel; SiglipVisionModel before transformers 5), nothing (SiglipVisionModel
    from transformers 5) or LLaVA's "vision_tower.vision_model." / "model.vision_tower.": found from the
    patch embedding's name."""
    anchor = "embeddings.patch_embedding.weight"
    prefix = next((k[: -len(anchor)] for k in weights if k.endswith(anchor)), None)
    if prefix is None:
        raise UserError(f"{where} has no {anchor}; is it a SigLIP vision checkpoint?")
    return {k[len(prefix):]: t for k, t in weights.items() if k.startswith(prefix) and not k.startswith("text_model.")}


def write_llava_processor(out: Path, cfg: ModelConfig, image_token: str) -> None:
    """preprocessor_config.json + processor_config.json beside an exported LLaVA, so transformers'
    ``AutoProcessor`` prepares images and prompts as our engine does: resized to the tower's size
    (bilinear), scaled to [-1, 1] (SigLIP's mean = std = 0.5), each ``image_token`` expanded to the
    image's tokens."""
    import json

    v = cfg.vision
    image = {"image_processor_type": "SiglipImageProcessor", "processor_class": "LlavaProcessor",
             "do_resize": True, "size": {"height": v["image_size"], "width": v["image_size"]}, "resample": 2,
             "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
             "image_std": [0.5] * 3, "do_convert_rgb": True}
    processor = {"processor_class": "LlavaProcessor", "image_token": image_token, "patch_size": v["patch_size"],
                 "vision_feature_select_strategy": "full", "num_additional_image_tokens": 0}
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))

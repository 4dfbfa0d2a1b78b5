"""Our vision tower's weights to and from transformers' SigLIP vision tower (``SiglipVisionModel``'s
``vision_model``, the tower LLaVA-style models hold as ``vision_tower``): same math, other names.

Key renames only; the tower's math is checked against transformers in tests/model/test_vision.py.
"""
from __future__ import annotations

import torch

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
        if name.startswith("head."):
            continue
        if name.startswith("encoder.layers."):
            _, _, i, rest = name.split(".", 3)
            out[f"layers.{i}.{_rename(rest, layer_back)}"] = t
        else:
            out[_rename(name, top_back)] = t
    return out

"""What the HuggingFace family mappings share: the Family record and its registry, strict
reading of a config.json (a value we do not implement is refused, never dropped), the RoPE and
sliding-window keys, and renaming a state dict through a per-layer table.

The family files (hf_llama.py, hf_gemma.py, hf_moe.py, hf_gpt2.py) register themselves in
FAMILIES; model/hf_interop.py is the public door. Nothing here imports ``transformers``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch

from model.config import ModelConfig
from utils.errors import UserError
from utils.fs import read_json_object


@dataclass
class Family:
    to_hf_config: Callable[[ModelConfig], dict]
    from_hf_config: Callable[[dict], ModelConfig]
    to_hf_state: Callable[[dict, ModelConfig], dict]
    from_hf_state: Callable[[dict, ModelConfig, dict], dict]  # (HF state, our config, HF config dict)
    matches: Callable[[ModelConfig], bool]  # structural pre-filter: could this family hold cfg at all?


FAMILIES: dict[str, Family] = {}

# ----------------------------------------------------------------------------- strict reading


def refuse(family: str, key: str, value: Any, why: str) -> NoReturn:
    raise UserError(f"{family} config.json: {key}={value!r} {why}, which this project does not implement; "
                    "the model cannot be imported exactly (nothing is dropped silently).")


def required(h: dict, key: str, family: str) -> Any:
    if h.get(key) is None:
        raise UserError(f"{family} config.json has no {key!r}; it is not a complete HuggingFace config.")
    return h[key]


def only(h: dict, family: str, key: str, default: Any, allowed: tuple, why: str) -> Any:
    """h[key] (or the transformers default), refused unless it is one of ``allowed``."""
    value = h.get(key, default)
    if value not in allowed:
        refuse(family, key, value, why)
    return value


HF_ACT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}  # ours -> hidden_act
ACT_FROM_HF = {**{v: k for k, v in HF_ACT.items()}, "gelu_new": "gelu_tanh", "swish": "silu"}


def act_from_hf(name: str, family: str, key: str = "hidden_act") -> str:
    if name not in ACT_FROM_HF:
        refuse(family, key, name, f"is an activation outside {sorted(ACT_FROM_HF)}")
    return ACT_FROM_HF[name]


def reject_keys(h: dict, family: str, checks: dict[str, tuple[Any, str]]) -> None:
    """Refuse each key whose value differs from the harmless one: {key: (harmless, what it would do)}.
    A flag whose harmless value is False may also be null (transformers tests its truth: Gemma-2's
    config in transformers 5 writes use_bidirectional_attention: null)."""
    for key, (harmless, why) in checks.items():
        value = h.get(key, harmless)
        if value != harmless and not (harmless is False and value is None):
            refuse(family, key, value, why)


# ----------------------------------------------------------------------------- RoPE

_ROPE_EXTRA = {  # our rope_scaling keys beyond type/factor/original context, per type (same names in HF)
    "linear": (),
    "llama3": ("low_freq_factor", "high_freq_factor"),
    "yarn": ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"),
}


def rope_parameters(cfg: ModelConfig, theta: float | None = None, scaling: dict | None | str = "cfg") -> dict:
    """An HF ``rope_parameters`` dict: cfg's RoPE, or the given base and scaling (Gemma-3's local layers)."""
    s = cfg.rope_scaling if scaling == "cfg" else scaling
    params = {"rope_type": "default", "rope_theta": cfg.rope_theta if theta is None else theta}
    if s is None:
        return params
    params.update(rope_type=s["type"], factor=s["factor"])
    if "original_max_seq_len" in s:
        params["original_max_position_embeddings"] = s["original_max_seq_len"]
    params.update({k: s[k] for k in _ROPE_EXTRA[s["type"]] if k in s})
    return params


def rope_source(h: dict) -> dict:
    """The dict transformers reads RoPE from: a legacy ``rope_scaling`` replaces ``rope_parameters``."""
    return dict(h.get("rope_scaling") or h.get("rope_parameters") or {})


def rope_from_params(params: dict, h: dict, family: str, default_theta: float) -> tuple[float, dict | None]:
    """(theta, our rope_scaling) from one HF RoPE dict; a RoPE type we do not implement is refused."""
    theta = params.get("rope_theta", h.get("rope_theta", default_theta))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in _ROPE_EXTRA:
        refuse(family, "rope_parameters.rope_type", kind, "is a RoPE scaling outside linear, llama3 and yarn "
               "(dynamic NTK and LongRoPE/su change the frequencies with the sequence length)")
    max_pos = h.get("max_position_embeddings")
    original = params.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor")
    if factor is None and kind == "yarn" and original:  # DeepSeek: the stretch is max / original context
        factor = max_pos / original
    out = {"type": kind, "factor": factor}
    if kind != "linear":
        out["original_max_seq_len"] = original
    out.update({k: params[k] for k in _ROPE_EXTRA[kind] if params.get(k) is not None})
    if out.get("truncate") is True:
        out.pop("truncate")  # the default
    return theta, out


def partial_rotary_from_hf(params: dict, h: dict) -> float:
    return params.get("partial_rotary_factor", h.get("partial_rotary_factor", 1.0))


def refuse_partial_rotary(params: dict, h: dict, family: str) -> None:
    value = partial_rotary_from_hf(params, h)
    if value != 1.0:
        refuse(family, "partial_rotary_factor", value, f"rotates part of each head, which transformers' {family} "
               "does not (it ignores the key or fails)")


# ----------------------------------------------------------------------------- sliding windows


def layer_types(cfg: ModelConfig) -> list[str]:
    return ["sliding_attention" if cfg.layer_window(i) is not None else "full_attention" for i in range(cfg.n_layers)]


def window_from_layer_types(types: list[str], window: int | None, n_layers: int, family: str) -> tuple[int | None, int]:
    """(sliding_window, sliding_window_pattern) for per-layer types; refused unless 'every k-th layer global'."""
    if len(types) != n_layers:
        refuse(family, "layer_types", types, f"does not name each of the {n_layers} layers")
    windowed = [t == "sliding_attention" and window is not None for t in types]
    if not any(windowed):
        return None, 1
    if all(windowed):
        return window, 1
    k = windowed.index(False) + 1
    if windowed != [(i + 1) % k != 0 for i in range(n_layers)]:
        refuse(family, "layer_types", types, "is not a pattern of 'every k-th layer global, the rest windowed'")
    return window, k


# ----------------------------------------------------------------------------- shared config keys
# Llama, Mistral, Qwen, Phi-3, OLMo-2, Gemma and DeepSeek-V3 configs name the model's sizes, norm
# epsilon, RoPE and embedding tying the same way; each family adds its own keys to these.


def common_hf_config(cfg: ModelConfig, model_type: str, arch: str, gqa: bool = True) -> dict:
    """The keys every Llama-style HF config shares. ``gqa=False`` leaves out the key/value heads
    and head_dim, which DeepSeek-V3's config derives from its MLA sizes."""
    h = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope_parameters(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
    }
    if cfg.rope_scaling is not None:  # older readers (vLLM, transformers 4) look here
        h["rope_scaling"] = dict(h["rope_parameters"], type=h["rope_parameters"]["rope_type"])
    if gqa:
        h.update(num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim)
    return h


def common_from_hf_config(h: dict, family: str, defaults: dict, gqa: bool = True) -> dict:
    """ModelConfig keywords from those keys (RMSNorm and RoPE, as in every such family).
    ``defaults``: the transformers config class's values for keys a config.json may leave out
    (max_position_embeddings, rms_norm_eps, tie_word_embeddings, rope_theta)."""
    params = rope_source(h)
    theta, scaling = rope_from_params(params, {**defaults, **h}, family, defaults["rope_theta"])
    n_heads = required(h, "num_attention_heads", family)
    d_model = required(h, "hidden_size", family)
    kw = dict(
        vocab_size=required(h, "vocab_size", family),
        d_model=d_model,
        n_layers=required(h, "num_hidden_layers", family),
        n_heads=n_heads,
        d_ff=required(h, "intermediate_size", family),
        max_seq_len=h.get("max_position_embeddings", defaults["max_position_embeddings"]),
        norm="rmsnorm",
        norm_eps=h.get("rms_norm_eps", defaults["rms_norm_eps"]),
        pos_emb="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=h.get("tie_word_embeddings", defaults["tie_word_embeddings"]),
    )
    if gqa:
        # A key left out takes the config class's default (Qwen3: 8 KV heads of 128), a null one is derived.
        kw.update(n_kv_heads=h.get("num_key_value_heads", defaults.get("num_key_value_heads")) or n_heads,
                  head_dim=h.get("head_dim", defaults.get("head_dim")) or d_model // n_heads)
    return kw


# ----------------------------------------------------------------------------- state dicts

TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}


def rename_layers(sd: dict, layer_keys: dict, ours_prefix: str, theirs_prefix: str, top: dict, to_hf: bool) -> dict:
    """Rename a state dict through a per-layer table and a table of top-level keys."""
    src_prefix, dst_prefix = (ours_prefix, theirs_prefix) if to_hf else (theirs_prefix, ours_prefix)
    table = layer_keys if to_hf else {v: k for k, v in layer_keys.items()}
    top_table = top if to_hf else {v: k for k, v in top.items()}
    out = {}
    for key, value in sd.items():
        if key in top_table:
            out[top_table[key]] = value
            continue
        if not key.startswith(src_prefix):
            raise UserError(f"weight {key!r} has no counterpart in the target layout; is this the right architecture?")
        idx, rest = key[len(src_prefix) :].split(".", 1)
        if rest not in table:
            raise UserError(f"weight {key!r} has no counterpart in the target layout; is this the right architecture?")
        out[f"{dst_prefix}{idx}.{table[rest]}"] = value
    return out


def to_hf_layers(sd: dict, cfg: ModelConfig, layer_keys: dict) -> dict:
    """Our state dict -> HF names, the tied head written once (as the embedding)."""
    sd = {k: v for k, v in sd.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    return rename_layers(sd, layer_keys, "layers.", "model.layers.", TOP, to_hf=True)


def from_hf_layers(sd: dict, cfg: ModelConfig, layer_keys: dict) -> dict:
    """HF names -> ours (rotary caches dropped, a tied head pointed at the embedding)."""
    sd = {k: v for k, v in sd.items() if "rotary_emb" not in k and not (cfg.tie_embeddings and k == "lm_head.weight")}
    out = rename_layers(sd, layer_keys, "layers.", "model.layers.", TOP, to_hf=False)
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out


def fuse(sd: dict, parts: dict[str, tuple[str, ...]]) -> dict:
    """Concatenate row blocks into one weight per layer: {fused suffix: (part suffixes, in order)}."""
    out = dict(sd)
    for fused, names in parts.items():
        for key in [k for k in sd if k.endswith("." + names[0])]:
            prefix = key[: -len(names[0])]
            out[prefix + fused] = torch.cat([out.pop(prefix + n) for n in names], dim=0)
    return out


def split(sd: dict, parts: dict[str, dict[str, int]]) -> dict:
    """Inverse of ``fuse``: {fused suffix: {part suffix: rows}} (rows in order)."""
    out = dict(sd)
    for fused, sizes in parts.items():
        for key in [k for k in sd if k.endswith("." + fused)]:
            prefix, w = key[: -len(fused)], out.pop(key)
            if w.shape[0] != sum(sizes.values()):
                raise UserError(f"weight {key!r} has {w.shape[0]} rows; the config implies {sum(sizes.values())}.")
            for name, chunk in zip(sizes, w.split(list(sizes.values()), dim=0)):
                out[prefix + name] = chunk.contiguous()
    return out


# ----------------------------------------------------------------------------- reading a directory


def read_hf_json(path: str | os.PathLike) -> dict:
    """An HF model directory's config.json as a dict (UserError naming what is wrong)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise UserError(f"{path} has no config.json; point at a HuggingFace model directory.")
    return read_json_object(file)


def read_hf_weights(path: str | os.PathLike) -> dict:
    """Every tensor of an HF model directory's *.safetensors files (one, or the shards), by HF name."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no *.safetensors weights.")
    state: dict = {}
    for f in files:
        state.update(read_safetensors(f))
    return state


def read_safetensors(file: Path) -> dict:
    """One downloaded .safetensors file's tensors (UserError when it is damaged or cut short)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{file} cannot be read ({err}); the download is incomplete or damaged.") from None

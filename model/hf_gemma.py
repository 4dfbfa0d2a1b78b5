"""HuggingFace Gemma families: Gemma (1), Gemma-2 and Gemma-3 (text).

All three: RMSNorm weight applied as (1 + w), embeddings times sqrt(d_model), a gated MLP with
tanh-GELU (``hidden_act`` / ``hidden_activation``), tied embeddings, attention_bias on all four
projections. Gemma-2 adds norms after attention and after the MLP, tanh soft-caps on attention
and final logits, the scale query_pre_attn_scalar^-0.5 and a sliding window on every other
layer. Gemma-3 drops the attention soft-cap (transformers ignores the key, so a value is
refused), adds per-head QK-RMSNorm, windows on five layers of six and a RoPE per layer type:
local (sliding) layers turn at 10k, global ones at 1M, optionally stretched (linear x8 in the
4B+ models). Bidirectional attention (``use_bidirectional_attention``, an encoder use) is refused.
"""
from __future__ import annotations

from model.config import ModelConfig
from model.hf_common import (
    FAMILIES, HF_ACT, Family, act_from_hf, common_from_hf_config, common_hf_config, from_hf_layers, layer_types,
    refuse, refuse_partial_rotary, reject_keys, rope_from_params, rope_parameters, rope_source, to_hf_layers,
    window_from_layer_types,
)
from model.hf_llama import LLAMA_LAYER_KEYS, dense_rope

_BASE = dict(rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=10000.0, head_dim=256)
DEFAULTS = {
    "gemma": {**_BASE, "max_position_embeddings": 8192, "num_key_value_heads": 16},
    "gemma2": {**_BASE, "max_position_embeddings": 8192, "num_key_value_heads": 4, "sliding_window": 4096,
               "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3_text": {**_BASE, "max_position_embeddings": 131072, "num_key_value_heads": 4, "sliding_window": 4096,
                    "query_pre_attn_scalar": 256, "attn_logit_softcapping": None, "final_logit_softcapping": None,
                    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window_pattern": 6},
}
_NOT_CAUSAL = {"use_bidirectional_attention": (False, "makes attention bidirectional (an encoder)")}

_GEMMA2_LAYER_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_post_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "ffn_post_norm.weight": "post_feedforward_layernorm.weight",
    **{f"attn.{n}_proj.{w}": f"self_attn.{n}_proj.{w}" for n in "qkvo" for w in ("weight", "bias")},
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    **{f"ffn.{n}_proj.weight": f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")},
}


def _num(x):
    return int(x) if x is not None and float(x).is_integer() else x


def _gemma_like(c: ModelConfig) -> bool:
    return dense_rope(c) and c.norm_unit_offset and c.embed_scale


# ----------------------------------------------------------------------------- config: ours -> HF


def _config(cfg: ModelConfig, model_type: str, arch: str) -> dict:
    h = common_hf_config(cfg, model_type, arch)
    h["attention_bias"] = cfg.qkv_bias
    if model_type == "gemma":
        h["hidden_act"] = HF_ACT[cfg.activation]
        return h
    h.update({
        "hidden_activation": HF_ACT[cfg.activation],
        "query_pre_attn_scalar": _num(cfg.query_pre_attn_scalar or cfg.head_dim),
        # transformers' Gemma-2/3 build a sliding mask even when no layer uses it, so never write null
        "sliding_window": cfg.sliding_window or cfg.max_seq_len,
        "layer_types": layer_types(cfg),
        "attn_logit_softcapping": cfg.attn_logit_softcap,
        "final_logit_softcapping": cfg.final_logit_softcap,
    })
    if model_type == "gemma3_text":  # one RoPE per layer type
        local = rope_parameters(cfg, cfg.rope_local_theta, None) if cfg.rope_local_theta else rope_parameters(cfg)
        h["rope_parameters"] = {"full_attention": rope_parameters(cfg), "sliding_attention": local}
        h["rope_local_base_freq"] = local["rope_theta"]  # the older key, for readers that predate rope_parameters
    return h


# ----------------------------------------------------------------------------- config: HF -> ours


def _common(h: dict, family: str, **kw) -> ModelConfig:
    reject_keys(h, family, _NOT_CAUSAL)
    key = "hidden_act" if family == "gemma" else "hidden_activation"
    act = h.get(key, "gelu_pytorch_tanh")
    if family == "gemma" and act == "gelu":  # transformers reads Gemma's legacy "gelu" as the tanh GELU
        act = "gelu_pytorch_tanh"
    return ModelConfig(ffn="geglu", activation=act_from_hf(act, family, key), norm_unit_offset=True, embed_scale=True,
                       qkv_bias=h.get("attention_bias", False), attn_out_bias=h.get("attention_bias", False), **kw)


def _gemma(h: dict) -> ModelConfig:
    refuse_partial_rotary(rope_source(h), h, "gemma")
    return _common(h, "gemma", **common_from_hf_config(h, "gemma", DEFAULTS["gemma"]))


def _gemma2_extras(h: dict, family: str, types: list[str]) -> dict:
    d = DEFAULTS[family]
    window, pattern = window_from_layer_types(types, h.get("sliding_window", d["sliding_window"]), h["num_hidden_layers"],
                                              family)
    return dict(post_norms=True, sliding_window=window, sliding_window_pattern=pattern,
                query_pre_attn_scalar=h.get("query_pre_attn_scalar", d["query_pre_attn_scalar"]),
                attn_logit_softcap=h.get("attn_logit_softcapping", d["attn_logit_softcapping"]),
                final_logit_softcap=h.get("final_logit_softcapping", d["final_logit_softcapping"]))


def _gemma2(h: dict) -> ModelConfig:
    refuse_partial_rotary(rope_source(h), h, "gemma2")
    n = h["num_hidden_layers"]
    types = h.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    return _common(h, "gemma2", **common_from_hf_config(h, "gemma2", DEFAULTS["gemma2"]), **_gemma2_extras(h, "gemma2", types))


def _gemma3_rope(h: dict) -> tuple[float, dict | None, float | None]:
    """(global theta, global scaling, local theta or None when the local layers turn as the global ones)."""
    fam, d = "gemma3_text", DEFAULTS["gemma3_text"]
    nested = dict(h.get("rope_parameters") or {})
    full = {**(nested.get("full_attention") or {}), **(h.get("rope_scaling") or {})}  # a legacy rope_scaling updates it
    local = dict(nested.get("sliding_attention") or {})
    local.setdefault("rope_theta", h.get("rope_local_base_freq", d["rope_local_base_freq"]))
    for params in (full, local):
        refuse_partial_rotary(params, h, fam)
    theta, scaling = rope_from_params(full, {**d, **h}, fam, d["rope_theta"])
    if scaling is not None and scaling.get("truncate") is False:  # transformers reads it only from a flat dict
        refuse(fam, "rope_parameters.full_attention.truncate", False, "is ignored by transformers' per-layer-type RoPE")
    local_theta, local_scaling = rope_from_params(local, {**d, **h}, fam, d["rope_local_base_freq"])
    if (local_theta, local_scaling) == (theta, scaling):
        return theta, scaling, None
    if local_scaling is not None:
        refuse(fam, "rope_parameters.sliding_attention", local, "stretches the local layers' RoPE differently from "
               "the global ones (only plain local RoPE is implemented)")
    return theta, scaling, local_theta


def _gemma3(h: dict) -> ModelConfig:
    fam = "gemma3_text"
    reject_keys(h, fam, {"attn_logit_softcapping": (None, "soft-caps attention logits, which transformers' Gemma-3 "
                                                           "attention does not apply")})
    n = h["num_hidden_layers"]
    k = h.get("sliding_window_pattern", DEFAULTS[fam]["sliding_window_pattern"])
    types = h.get("layer_types") or ["sliding_attention" if (i + 1) % k else "full_attention" for i in range(n)]
    theta, scaling, local_theta = _gemma3_rope(h)
    kw = {**common_from_hf_config({**h, "rope_parameters": None, "rope_scaling": None}, fam, DEFAULTS[fam]),
          "rope_theta": theta, "rope_scaling": scaling}
    extras = _gemma2_extras(h, fam, types)
    if extras["sliding_window"] is None and local_theta is not None:
        if "sliding_attention" in types:  # unwindowed "sliding" layers that still turn at the local base
            refuse(fam, "sliding_window", None, "leaves the sliding layers unwindowed while they keep their own RoPE")
        local_theta = None  # no local layers to turn
    return _common(h, fam, **kw, **extras, qk_norm=True, rope_local_theta=local_theta)


def _register(name: str, arch: str, from_config, layer_keys: dict) -> None:
    FAMILIES[name] = Family(
        to_hf_config=lambda c: _config(c, name, arch),
        from_hf_config=from_config,
        to_hf_state=lambda sd, c: to_hf_layers(sd, c, layer_keys),
        from_hf_state=lambda sd, c, h: from_hf_layers(sd, c, layer_keys),
        matches=_gemma_like,
    )


_register("gemma", "GemmaForCausalLM", _gemma, LLAMA_LAYER_KEYS)
_register("gemma2", "Gemma2ForCausalLM", _gemma2, _GEMMA2_LAYER_KEYS)
_register("gemma3_text", "Gemma3ForCausalLM", _gemma3, _GEMMA2_LAYER_KEYS)

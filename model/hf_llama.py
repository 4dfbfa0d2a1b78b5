"""HuggingFace families with Llama's dense decoder: Llama, Mistral, Qwen2, Qwen3, Phi-3, OLMo-2.

They share the sizes, RMSNorm, RoPE and the SwiGLU MLP; each adds its own traits:
  llama    attention_bias (q, k, v and o together), mlp_bias
  mistral  one sliding window on every layer; no biases
  qwen2    q/k/v biases always (o none); windows from use_sliding_window + layer_types
  qwen3    per-head QK-RMSNorm, attention_bias on all four projections; windows as qwen2
  phi3     fused qkv_proj and gate_up_proj weights, partial_rotary_factor, a window on every
           layer; LongRoPE ("longrope"/"su") is refused
  olmo2    no input norms: RMSNorm on each sublayer's output (post_attention/post_feedforward),
           q/k RMSNorm over the whole projection
Each reader takes a key's transformers default when config.json leaves it out, and refuses
a value we do not implement.
"""
from __future__ import annotations

from model.config import ModelConfig
from model.hf_common import (
    FAMILIES, HF_ACT, Family, act_from_hf, common_from_hf_config, common_hf_config, from_hf_layers, fuse, layer_types,
    only, partial_rotary_from_hf, refuse_partial_rotary, rope_source, split, to_hf_layers, window_from_layer_types,
)

# transformers' config class defaults for the keys a config.json may leave out
_BASE = dict(rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, num_key_value_heads=None, head_dim=None)
DEFAULTS = {
    "llama": {**_BASE, "max_position_embeddings": 2048},
    "mistral": {**_BASE, "max_position_embeddings": 131072, "num_key_value_heads": 8, "sliding_window": 4096},
    "qwen2": {**_BASE, "max_position_embeddings": 32768, "num_key_value_heads": 32, "sliding_window": 4096,
              "max_window_layers": 28},
    "qwen3": {**_BASE, "max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": 128,
              "sliding_window": 4096, "max_window_layers": 28},
    "phi3": {**_BASE, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "sliding_window": None},
    "olmo2": {**_BASE, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5},
}

LLAMA_LAYER_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{n}_proj.{w}": f"self_attn.{n}_proj.{w}" for n in "qkvo" for w in ("weight", "bias")},
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    **{f"ffn.{n}_proj.{w}": f"mlp.{n}_proj.{w}" for n in ("gate", "up", "down") for w in ("weight", "bias")},
}
# OLMo-2 has no input norms; its two norms sit on the sublayers' outputs.
_OLMO2_LAYER_KEYS = {
    **{k: v for k, v in LLAMA_LAYER_KEYS.items() if "_norm.weight" not in k or "attn.q" in k or "attn.k" in k},
    "attn_post_norm.weight": "post_attention_layernorm.weight",
    "ffn_post_norm.weight": "post_feedforward_layernorm.weight",
}
_PHI3_FUSED = {"self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
               "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}


def dense_rope(c: ModelConfig) -> bool:
    """Structurally a Llama-style decoder (the round trip in hf_interop decides the rest)."""
    return c.attention == "standard" and c.ffn in ("swiglu", "geglu") and c.norm == "rmsnorm" and c.pos_emb == "rope"


def _gated(h: dict, family: str, **kw) -> ModelConfig:
    return ModelConfig(ffn="swiglu", activation=act_from_hf(h.get("hidden_act", "silu"), family), **kw)


# ----------------------------------------------------------------------------- config: ours -> HF


def _config(cfg: ModelConfig, model_type: str, arch: str) -> dict:
    h = common_hf_config(cfg, model_type, arch)
    h["hidden_act"] = HF_ACT[cfg.activation]
    if model_type in ("llama", "qwen3", "olmo2"):
        h["attention_bias"] = cfg.qkv_bias
    if model_type == "llama":
        h["mlp_bias"] = cfg.mlp_bias
    if model_type in ("mistral", "phi3"):
        h["sliding_window"] = cfg.sliding_window
    if model_type in ("qwen2", "qwen3"):  # explicit layer types: any 'every k-th layer global' pattern
        h.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                 max_window_layers=0 if cfg.sliding_window is not None else cfg.n_layers, layer_types=layer_types(cfg))
    if model_type == "phi3":
        h["rope_parameters"]["partial_rotary_factor"] = h["partial_rotary_factor"] = cfg.partial_rotary
        h["pad_token_id"] = None  # Phi3Config's default (32000) lies outside a smaller vocabulary
    return h


# ----------------------------------------------------------------------------- config: HF -> ours


def _llama(h: dict) -> ModelConfig:
    refuse_partial_rotary(rope_source(h), h, "llama")
    bias = h.get("attention_bias", False)
    return _gated(h, "llama", **common_from_hf_config(h, "llama", DEFAULTS["llama"]), qkv_bias=bias, attn_out_bias=bias,
                  mlp_bias=h.get("mlp_bias", False))


def _mistral(h: dict) -> ModelConfig:
    refuse_partial_rotary(rope_source(h), h, "mistral")
    return _gated(h, "mistral", **common_from_hf_config(h, "mistral", DEFAULTS["mistral"]),
                  sliding_window=h.get("sliding_window", DEFAULTS["mistral"]["sliding_window"]))


def _qwen_windows(h: dict, family: str) -> dict:
    """Qwen2/Qwen3: a window only with use_sliding_window, on the layers layer_types names
    (by default those from max_window_layers on)."""
    n = h["num_hidden_layers"]
    window = h.get("sliding_window", DEFAULTS[family]["sliding_window"]) if h.get("use_sliding_window", False) else None
    first = h.get("max_window_layers", DEFAULTS[family]["max_window_layers"])
    types = h.get("layer_types") or [
        "sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n)]
    window, pattern = window_from_layer_types(types, window, n, family)
    return dict(sliding_window=window, sliding_window_pattern=pattern)


def _qwen2(h: dict) -> ModelConfig:
    refuse_partial_rotary(rope_source(h), h, "qwen2")
    # Qwen2 always biases q, k and v (its config has no key for it), never o.
    return _gated(h, "qwen2", **common_from_hf_config(h, "qwen2", DEFAULTS["qwen2"]), **_qwen_windows(h, "qwen2"),
                  qkv_bias=True)


def _qwen3(h: dict) -> ModelConfig:
    refuse_partial_rotary(rope_source(h), h, "qwen3")
    bias = h.get("attention_bias", False)
    return _gated(h, "qwen3", **common_from_hf_config(h, "qwen3", DEFAULTS["qwen3"]), **_qwen_windows(h, "qwen3"),
                  qk_norm=True, qkv_bias=bias, attn_out_bias=bias)


def _phi3(h: dict) -> ModelConfig:
    params = rope_source(h)
    # transformers reads legacy "su"/"yarn" Phi-3 scalings as LongRoPE; only plain RoPE maps exactly.
    only(params, "phi3", "rope_type", params.get("type", "default"), ("default",),
         "is LongRoPE (per-frequency short/long factors switched by sequence length)")
    return _gated(h, "phi3", **common_from_hf_config(h, "phi3", DEFAULTS["phi3"]),
                  partial_rotary=partial_rotary_from_hf(params, h), sliding_window=h.get("sliding_window"))


def _olmo2(h: dict) -> ModelConfig:
    refuse_partial_rotary(rope_source(h), h, "olmo2")
    bias = h.get("attention_bias", False)
    return _gated(h, "olmo2", **common_from_hf_config(h, "olmo2", DEFAULTS["olmo2"]), qkv_bias=bias,
                  attn_out_bias=bias, pre_norms=False, post_norms=True, qk_norm=True, qk_norm_scope="all")


# ----------------------------------------------------------------------------- state dicts


def _phi3_to_state(sd: dict, cfg: ModelConfig) -> dict:
    return fuse(to_hf_layers(sd, cfg, LLAMA_LAYER_KEYS), _PHI3_FUSED)


def _phi3_from_state(sd: dict, cfg: ModelConfig, hf_config: dict) -> dict:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    sizes = {"self_attn.qkv_proj.weight": dict(zip(_PHI3_FUSED["self_attn.qkv_proj.weight"], (q, kv, kv))),
             "mlp.gate_up_proj.weight": dict(zip(_PHI3_FUSED["mlp.gate_up_proj.weight"], (cfg.d_ff, cfg.d_ff)))}
    return from_hf_layers(split(sd, sizes), cfg, LLAMA_LAYER_KEYS)


def _register(name: str, arch: str, from_config, layer_keys: dict = LLAMA_LAYER_KEYS, to_state=None, from_state=None):
    FAMILIES[name] = Family(
        to_hf_config=lambda c: _config(c, name, arch),
        from_hf_config=from_config,
        to_hf_state=to_state or (lambda sd, c: to_hf_layers(sd, c, layer_keys)),
        from_hf_state=from_state or (lambda sd, c, h: from_hf_layers(sd, c, layer_keys)),
        matches=dense_rope,
    )


_register("llama", "LlamaForCausalLM", _llama)
_register("mistral", "MistralForCausalLM", _mistral)
_register("qwen2", "Qwen2ForCausalLM", _qwen2)
_register("qwen3", "Qwen3ForCausalLM", _qwen3)
_register("phi3", "Phi3ForCausalLM", _phi3, to_state=_phi3_to_state, from_state=_phi3_from_state)
_register("olmo2", "Olmo2ForCausalLM", _olmo2, layer_keys=_OLMO2_LAYER_KEYS)

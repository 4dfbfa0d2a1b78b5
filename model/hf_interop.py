"""Convert between our Transformer and the HuggingFace `transformers` layout.

Each family is a pair: a function ModelConfig -> HF config dict, and a renaming of the
state dict. Nothing here imports `transformers`; the config is written as plain JSON, so
an exported directory loads with ``AutoModelForCausalLM.from_pretrained`` (and with vLLM or
the llama.cpp converters, which read the same files).

Families: llama, mistral (sliding window), qwen2 (qkv bias), qwen3 (QK-norm), gpt2 here;
gemma2 and deepseek_v3 in model/hf_families.py, which registers them in FAMILIES.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from model.config import ModelConfig
from utils.errors import UserError


@dataclass
class Family:
    to_hf_config: Callable[[ModelConfig], dict]
    from_hf_config: Callable[[dict], ModelConfig]
    to_hf_state: Callable[[dict, ModelConfig], dict]
    from_hf_state: Callable[[dict, ModelConfig], dict]
    matches: Callable[[ModelConfig], bool]
    # When set, from_hf_state is called as f(hf_state, cfg, hf_config) (DeepSeek-V3 reads
    # rope_interleave, which changes the weights but not our config).
    state_needs_hf_config: bool = False


FAMILIES: dict[str, Family] = {}


# ----------------------------------------------------------------------------- helpers


def _rope_parameters(cfg: ModelConfig) -> dict:
    s = cfg.rope_scaling
    params = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if s is None:
        return params
    params.update(rope_type=s["type"], factor=s["factor"])
    if "original_max_seq_len" in s:
        params["original_max_position_embeddings"] = s["original_max_seq_len"]
    for key in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
        if key in s:
            params[key] = s[key]
    return params


def _rope_from_hf(h: dict) -> tuple[float, dict | None]:
    params = h.get("rope_parameters") or {}
    scaling = h.get("rope_scaling") or {}
    theta = params.get("rope_theta", h.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind == "default":
        return theta, None
    out = {"type": kind, "factor": merged["factor"]}
    if "original_max_position_embeddings" in merged:
        out["original_max_seq_len"] = merged["original_max_position_embeddings"]
    for key in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
        if merged.get(key) is not None:
            out[key] = merged[key]
    return theta, out


# ----------------------------------------------------------------------------- shared config fields
# Llama, Mistral, Qwen, Gemma-2 and DeepSeek-V3 configs name the model's sizes, norm epsilon, RoPE
# and embedding tying the same way; each family adds its own keys to these.

HF_ACT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}  # ours -> hidden_act
ACT_FROM_HF = {**{v: k for k, v in HF_ACT.items()}, "gelu_new": "gelu_tanh"}


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
        "rope_parameters": _rope_parameters(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.qkv_bias,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
    }
    if gqa:
        h.update(num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim)
    return h


def common_from_hf_config(h: dict, max_positions: int, tied: bool, gqa: bool = True) -> dict:
    """ModelConfig keywords from those keys (RMSNorm and RoPE, as in every such family).
    ``max_positions`` and ``tied`` are the family's defaults for a config that leaves the key
    out, as its transformers config class has them."""
    theta, scaling = _rope_from_hf(h)
    n_heads = h["num_attention_heads"]
    kw = dict(
        vocab_size=h["vocab_size"],
        d_model=h["hidden_size"],
        n_layers=h["num_hidden_layers"],
        n_heads=n_heads,
        d_ff=h["intermediate_size"],
        max_seq_len=h.get("max_position_embeddings", max_positions),
        norm="rmsnorm",
        norm_eps=h.get("rms_norm_eps", 1e-6),
        pos_emb="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=h.get("tie_word_embeddings", tied),
        qkv_bias=h.get("attention_bias", False),
    )
    if gqa:
        kw.update(n_kv_heads=h.get("num_key_value_heads") or n_heads,
                  head_dim=h.get("head_dim") or h["hidden_size"] // n_heads)
    return kw


# ----------------------------------------------------------------------------- Llama-like


def _llama_config(cfg: ModelConfig, model_type: str, arch: str) -> dict:
    h = common_hf_config(cfg, model_type, arch)
    h.update(hidden_act=HF_ACT[cfg.activation], mlp_bias=cfg.mlp_bias)
    if model_type == "mistral":
        h["sliding_window"] = cfg.sliding_window
    if model_type in ("qwen2", "qwen3"):
        h["use_sliding_window"] = False
        h["sliding_window"] = None
    if cfg.rope_scaling is not None:
        h["rope_scaling"] = dict(h["rope_parameters"], type=h["rope_parameters"]["rope_type"])
    return h


def _llama_from_config(h: dict, **extra) -> ModelConfig:
    return ModelConfig(
        **common_from_hf_config(h, max_positions=2048, tied=False),
        ffn="swiglu",
        activation=ACT_FROM_HF[h.get("hidden_act", "silu")],
        attn_out_bias=h.get("attention_bias", False) and h.get("model_type") == "llama",
        mlp_bias=h.get("mlp_bias", False),
        **extra,
    )


_LLAMA_LAYER_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn.q_proj.bias": "self_attn.q_proj.bias",
    "attn.k_proj.bias": "self_attn.k_proj.bias",
    "attn.v_proj.bias": "self_attn.v_proj.bias",
    "attn.o_proj.bias": "self_attn.o_proj.bias",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "ffn.gate_proj.weight": "mlp.gate_proj.weight",
    "ffn.up_proj.weight": "mlp.up_proj.weight",
    "ffn.down_proj.weight": "mlp.down_proj.weight",
    "ffn.gate_proj.bias": "mlp.gate_proj.bias",
    "ffn.up_proj.bias": "mlp.up_proj.bias",
    "ffn.down_proj.bias": "mlp.down_proj.bias",
}


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


def _llama_to_state(sd: dict, cfg: ModelConfig) -> dict:
    top = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
    sd = {k: v for k, v in sd.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    return rename_layers(sd, _LLAMA_LAYER_KEYS, "layers.", "model.layers.", top, to_hf=True)


def _llama_from_state(sd: dict, cfg: ModelConfig) -> dict:
    top = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
    sd = {k: v for k, v in sd.items() if "rotary_emb" not in k}
    out = rename_layers(sd, _LLAMA_LAYER_KEYS, "layers.", "model.layers.", top, to_hf=False)
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out


def _is_llama_like(cfg: ModelConfig) -> bool:
    return (
        cfg.attention == "standard"
        and cfg.ffn == "swiglu"
        and cfg.norm == "rmsnorm"
        and cfg.pos_emb == "rope"
        and not cfg.norm_unit_offset
        and not cfg.post_norms
        and not cfg.embed_scale
    )


for _name, _arch, _match, _extra in (
    ("qwen3", "Qwen3ForCausalLM", lambda c: _is_llama_like(c) and c.qk_norm, {"qk_norm": True}),
    ("mistral", "MistralForCausalLM", lambda c: _is_llama_like(c) and not c.qk_norm and c.sliding_window is not None, {}),
    ("qwen2", "Qwen2ForCausalLM", lambda c: _is_llama_like(c) and not c.qk_norm and c.qkv_bias and not c.attn_out_bias, {}),
    ("llama", "LlamaForCausalLM", lambda c: _is_llama_like(c) and not c.qk_norm and c.sliding_window is None, {}),
):

    def _cfg_fn(h, _name=_name, _extra=_extra):
        extra = dict(_extra)
        if _name == "mistral":
            extra["sliding_window"] = h.get("sliding_window")
        cfg = _llama_from_config(h, **extra)
        if _name == "qwen2":  # Qwen2 always biases q, k, v (its config has no key for it)
            cfg.qkv_bias = True
        if _name in ("qwen2", "qwen3"):
            cfg.attn_out_bias = False
        return cfg

    FAMILIES[_name] = Family(
        to_hf_config=lambda c, _n=_name, _a=_arch: _llama_config(c, _n, _a),
        from_hf_config=_cfg_fn,
        to_hf_state=_llama_to_state,
        from_hf_state=_llama_from_state,
        matches=_match,
    )


# ----------------------------------------------------------------------------- GPT-2


def _gpt2_config(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff,
        "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
    }


def _gpt2_from_config(h: dict) -> ModelConfig:
    act = h.get("activation_function", "gelu_new")
    return ModelConfig(
        vocab_size=h["vocab_size"],
        d_model=h["n_embd"],
        n_layers=h["n_layer"],
        n_heads=h["n_head"],
        d_ff=h.get("n_inner") or 4 * h["n_embd"],
        max_seq_len=h["n_positions"],
        norm="layernorm",
        norm_eps=h.get("layer_norm_epsilon", 1e-5),
        ffn="gelu_mlp",
        activation="gelu_tanh" if act in ("gelu_new", "gelu_pytorch_tanh") else "gelu",
        pos_emb="learned",
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        tie_embeddings=h.get("tie_word_embeddings", True),
    )


def _gpt2_to_state(sd: dict, cfg: ModelConfig) -> dict:
    # HF GPT-2 uses Conv1D (weight stored (in, out)) and a fused q|k|v projection.
    out = {
        "transformer.wte.weight": sd["embed.weight"],
        "transformer.wpe.weight": sd["pos_embed.weight"],
        "transformer.ln_f.weight": sd["norm.weight"],
        "transformer.ln_f.bias": sd["norm.bias"],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        p, h = f"layers.{i}.", f"transformer.h.{i}."
        out[h + "ln_1.weight"], out[h + "ln_1.bias"] = sd[p + "attn_norm.weight"], sd[p + "attn_norm.bias"]
        out[h + "ln_2.weight"], out[h + "ln_2.bias"] = sd[p + "ffn_norm.weight"], sd[p + "ffn_norm.bias"]
        qkv_w = torch.cat([sd[p + f"attn.{n}_proj.weight"] for n in "qkv"], dim=0)
        out[h + "attn.c_attn.weight"] = qkv_w.t().contiguous()
        out[h + "attn.c_attn.bias"] = torch.cat([sd[p + f"attn.{n}_proj.bias"] for n in "qkv"])
        out[h + "attn.c_proj.weight"] = sd[p + "attn.o_proj.weight"].t().contiguous()
        out[h + "attn.c_proj.bias"] = sd[p + "attn.o_proj.bias"]
        out[h + "mlp.c_fc.weight"] = sd[p + "ffn.up_proj.weight"].t().contiguous()
        out[h + "mlp.c_fc.bias"] = sd[p + "ffn.up_proj.bias"]
        out[h + "mlp.c_proj.weight"] = sd[p + "ffn.down_proj.weight"].t().contiguous()
        out[h + "mlp.c_proj.bias"] = sd[p + "ffn.down_proj.bias"]
    return out


def _gpt2_from_state(sd: dict, cfg: ModelConfig) -> dict:
    sd = {k.removeprefix("transformer."): v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    try:
        out = {
            "embed.weight": sd["wte.weight"],
            "pos_embed.weight": sd["wpe.weight"],
            "norm.weight": sd["ln_f.weight"],
            "norm.bias": sd["ln_f.bias"],
            "lm_head.weight": sd["wte.weight"] if cfg.tie_embeddings else sd["lm_head.weight"],
        }
        d = cfg.d_model
        for i in range(cfg.n_layers):
            p, h = f"layers.{i}.", f"h.{i}."
            out[p + "attn_norm.weight"], out[p + "attn_norm.bias"] = sd[h + "ln_1.weight"], sd[h + "ln_1.bias"]
            out[p + "ffn_norm.weight"], out[p + "ffn_norm.bias"] = sd[h + "ln_2.weight"], sd[h + "ln_2.bias"]
            qkv_w, qkv_b = sd[h + "attn.c_attn.weight"].t(), sd[h + "attn.c_attn.bias"]
            for j, n in enumerate("qkv"):
                out[p + f"attn.{n}_proj.weight"] = qkv_w[j * d : (j + 1) * d].contiguous()
                out[p + f"attn.{n}_proj.bias"] = qkv_b[j * d : (j + 1) * d]
            out[p + "attn.o_proj.weight"] = sd[h + "attn.c_proj.weight"].t().contiguous()
            out[p + "attn.o_proj.bias"] = sd[h + "attn.c_proj.bias"]
            out[p + "ffn.up_proj.weight"] = sd[h + "mlp.c_fc.weight"].t().contiguous()
            out[p + "ffn.up_proj.bias"] = sd[h + "mlp.c_fc.bias"]
            out[p + "ffn.down_proj.weight"] = sd[h + "mlp.c_proj.weight"].t().contiguous()
            out[p + "ffn.down_proj.bias"] = sd[h + "mlp.c_proj.bias"]
    except KeyError as missing:
        raise UserError(f"GPT-2 weights are missing {missing}; is this a GPT2LMHeadModel state dict?") from None
    return out


FAMILIES["gpt2"] = Family(
    to_hf_config=_gpt2_config,
    from_hf_config=_gpt2_from_config,
    to_hf_state=_gpt2_to_state,
    from_hf_state=_gpt2_from_state,
    matches=lambda c: c.pos_emb == "learned" and c.norm == "layernorm" and c.ffn == "gelu_mlp" and c.attention == "standard",
)


# ----------------------------------------------------------------------------- public API


def _load_extra_families() -> None:
    # Families defined beside their parts (Gemma, DeepSeek-V3) register on import.
    for module in ("model.hf_families",):
        try:
            __import__(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def family_of(cfg: ModelConfig) -> str:
    _load_extra_families()
    for name, fam in FAMILIES.items():
        if fam.matches(cfg):
            return name
    raise UserError(
        "this model's combination of parts has no HuggingFace counterpart to export to "
        f"(attention={cfg.attention}, ffn={cfg.ffn}, norm={cfg.norm}, pos_emb={cfg.pos_emb}); "
        f"supported families: {sorted(FAMILIES)}."
    )


def to_hf(state_dict: dict, cfg: ModelConfig) -> tuple[dict, dict]:
    """Our (state_dict, config) -> (HF state dict, HF config dict)."""
    fam = FAMILIES[family_of(cfg)]
    return fam.to_hf_state(state_dict, cfg), fam.to_hf_config(cfg)


def config_from_hf(hf_config: dict) -> ModelConfig:
    _load_extra_families()
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise UserError(f"HF model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}.")
    return FAMILIES[model_type].from_hf_config(hf_config)


def from_hf(hf_state: dict, hf_config: dict) -> tuple[dict, ModelConfig]:
    """HF (state dict, config dict) -> (our state dict, ModelConfig)."""
    cfg = config_from_hf(hf_config)
    fam = FAMILIES[hf_config["model_type"]]
    if fam.state_needs_hf_config:
        return fam.from_hf_state(hf_state, cfg, hf_config), cfg
    return fam.from_hf_state(hf_state, cfg), cfg


def write_hf(model: torch.nn.Module, directory: Path) -> None:
    """Write ``config.json`` + ``model.safetensors`` of ``model`` into an existing directory."""
    from safetensors.torch import save_file

    cfg: ModelConfig = model.cfg
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    hf_state, hf_config = to_hf(state, cfg)
    save_file(hf_state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))


def export_hf(model: torch.nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``AutoModelForCausalLM`` loads.

    Written into a temporary sibling directory and renamed into place.
    """
    from utils.fs import atomic_dir

    with atomic_dir(out_dir) as tmp:
        write_hf(model, tmp)
    return Path(out_dir)


def read_hf_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of an HF model directory's config.json (UserError naming what is wrong)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise UserError(f"{path} has no config.json; point at a HuggingFace model directory.")
    try:
        hf_config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file} is not valid JSON ({err}).") from None
    if not isinstance(hf_config, dict):
        raise UserError(f"{file} must hold a JSON object.")
    return config_from_hf(hf_config)


def load_hf_dir(path: str | os.PathLike) -> tuple[dict, ModelConfig]:
    """Read an HF model directory (config.json + one or sharded *.safetensors) into our layout."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    read_hf_config(path)  # the clear errors first
    hf_config = json.loads((path / "config.json").read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no *.safetensors weights.")
    state: dict = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"{f} cannot be read ({err}); the download is incomplete or damaged.") from None
    return from_hf(state, hf_config)

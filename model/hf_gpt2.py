"""GPT-2 (``GPT2LMHeadModel``): LayerNorm, learned positions, a GELU MLP, biases everywhere.

HF stores its projections as Conv1D (weight (in, out)) and q|k|v as one ``c_attn``. Config
keys that change the math and are mapped: ``scale_attn_weights=false`` (no 1/sqrt(d): our
query_pre_attn_scalar=1). Refused: ``scale_attn_by_inverse_layer_idx`` (scores / (layer+1))
and ``add_cross_attention`` (encoder-decoder layers).
"""
from __future__ import annotations

import torch

from model.config import ModelConfig
from model.hf_common import FAMILIES, Family, act_from_hf, reject_keys, required
from utils.errors import UserError

_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}


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
        "activation_function": _ACT[cfg.activation],
        "layer_norm_epsilon": cfg.norm_eps,
        "scale_attn_weights": cfg.query_pre_attn_scalar != 1.0,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
    }


def _gpt2_from_config(h: dict) -> ModelConfig:
    reject_keys(h, "gpt2", {
        "scale_attn_by_inverse_layer_idx": (False, "divides layer i's attention scores by i+1"),
        "add_cross_attention": (False, "adds cross-attention to an encoder"),
    })
    n_embd = required(h, "n_embd", "gpt2")
    return ModelConfig(
        vocab_size=required(h, "vocab_size", "gpt2"),
        d_model=n_embd,
        n_layers=required(h, "n_layer", "gpt2"),
        n_heads=required(h, "n_head", "gpt2"),
        d_ff=h.get("n_inner") or 4 * n_embd,
        max_seq_len=h.get("n_positions", 1024),
        norm="layernorm",
        norm_eps=h.get("layer_norm_epsilon", 1e-5),
        ffn="gelu_mlp",
        activation=act_from_hf(h.get("activation_function", "gelu_new"), "gpt2", "activation_function"),
        pos_emb="learned",
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        tie_embeddings=h.get("tie_word_embeddings", True),
        query_pre_attn_scalar=None if h.get("scale_attn_weights", True) else 1.0,
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


def _gpt2_from_state(sd: dict, cfg: ModelConfig, hf_config: dict) -> dict:
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

"""HuggingFace families beyond the Llama-like ones: Gemma-2 and DeepSeek-V3.

Imported by ``model.hf_interop`` (which registers these in ``FAMILIES``). Same contract as
there: ModelConfig <-> HF config dict, our state dict <-> the HF checkpoint layout.

Gemma-2 specifics: RMSNorm weight applied as (1 + w), embeddings times sqrt(d_model),
extra norms after attention and after the MLP, tanh soft-caps on attention and final logits,
scale query_pre_attn_scalar^-0.5, sliding window on every other layer (0, 2, ...), GeGLU
with tanh-GELU, tied embeddings.

DeepSeek-V3 specifics: MLA (q/kv low-rank with latent RMSNorms) and DeepSeekMoE with
sigmoid scoring, group-limited routing and the e_score_correction_bias. Real checkpoints set
``rope_interleave``: the rope channels come in (even, odd) pairs. Rotating interleaved pairs
of x is rotating halves of x[perm] with perm = (0, 2, 4, ..., 1, 3, 5, ...), so on import we
permute the rope rows of the q and kv_a projections once and our (halves) RoPE is exact;
export applies the inverse permutation and writes rope_interleave=True. Experts are written
one tensor per expert (the original layout ``transformers`` and vLLM read); fused HF tensors
(``experts.gate_up_proj``) are accepted on import.
"""
from __future__ import annotations

import torch

from model.config import ModelConfig
from model.hf_interop import (
    ACT_FROM_HF, FAMILIES, HF_ACT, Family, common_from_hf_config, common_hf_config, rename_layers,
)
from utils.errors import UserError

_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}

# ----------------------------------------------------------------------------- Gemma-2

_GEMMA2_LAYER_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_post_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "ffn_post_norm.weight": "post_feedforward_layernorm.weight",
    **{f"attn.{n}_proj.{w}": f"self_attn.{n}_proj.{w}" for n in "qkvo" for w in ("weight", "bias")},
    **{f"ffn.{n}_proj.weight": f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")},
}


def _num(x):
    return int(x) if x is not None and float(x).is_integer() else x


def _gemma2_config(cfg: ModelConfig) -> dict:
    h = common_hf_config(cfg, "gemma2", "Gemma2ForCausalLM")
    h.update({
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": _num(cfg.query_pre_attn_scalar or cfg.head_dim),
        "sliding_window": cfg.sliding_window,
        "layer_types": [
            "sliding_attention" if cfg.layer_window(i) is not None else "full_attention" for i in range(cfg.n_layers)
        ],
        "attn_logit_softcapping": cfg.attn_logit_softcap,
        "final_logit_softcapping": cfg.final_logit_softcap,
    })
    return h


def _window_pattern(layer_types: list[str] | None, n_layers: int) -> int:
    """Inverse of ModelConfig.layer_window: every k-th layer full -> k; all sliding -> 1."""
    if not layer_types:
        return 2  # Gemma-2's default alternation
    full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    if not full:
        return 1
    k = full[0] + 1
    if full != list(range(k - 1, n_layers, k)):
        raise UserError(f"Gemma-2 layer_types {layer_types} is not 'every k-th layer global'; cannot map it.")
    return k


def _gemma2_from_config(h: dict) -> ModelConfig:
    window = h.get("sliding_window")
    return ModelConfig(
        **common_from_hf_config(h, max_positions=8192, tied=True),
        norm_unit_offset=True,
        ffn="geglu",
        activation="gelu_tanh",
        sliding_window=window,
        sliding_window_pattern=_window_pattern(h.get("layer_types"), h["num_hidden_layers"]) if window else 1,
        attn_out_bias=h.get("attention_bias", False),
        embed_scale=True,
        post_norms=True,
        attn_logit_softcap=h.get("attn_logit_softcapping"),
        final_logit_softcap=h.get("final_logit_softcapping"),
        query_pre_attn_scalar=h.get("query_pre_attn_scalar"),
    )


def _gemma2_to_state(sd: dict, cfg: ModelConfig) -> dict:
    sd = {k: v for k, v in sd.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    return rename_layers(sd, _GEMMA2_LAYER_KEYS, "layers.", "model.layers.", _TOP, to_hf=True)


def _gemma2_from_state(sd: dict, cfg: ModelConfig) -> dict:
    sd = {k: v for k, v in sd.items() if "rotary_emb" not in k}
    out = rename_layers(sd, _GEMMA2_LAYER_KEYS, "layers.", "model.layers.", _TOP, to_hf=False)
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out


def _is_gemma2(c: ModelConfig) -> bool:
    return (
        c.attention == "standard" and c.ffn == "geglu" and c.activation == "gelu_tanh" and c.norm == "rmsnorm"
        and c.pos_emb == "rope" and c.norm_unit_offset and c.embed_scale and c.post_norms and not c.qk_norm
    )


FAMILIES["gemma2"] = Family(_gemma2_config, _gemma2_from_config, _gemma2_to_state, _gemma2_from_state, _is_gemma2)

# ----------------------------------------------------------------------------- DeepSeek-V3

_DSV3_ATTN = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.q_a_proj.weight": "self_attn.q_a_proj.weight",
    "attn.q_a_proj.bias": "self_attn.q_a_proj.bias",
    "attn.q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.q_b_proj.weight": "self_attn.q_b_proj.weight",
    "attn.kv_a_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_a_proj.bias": "self_attn.kv_a_proj_with_mqa.bias",
    "attn.kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.kv_b_proj.weight": "self_attn.kv_b_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn.o_proj.bias": "self_attn.o_proj.bias",
    "ffn.router.weight": "mlp.gate.weight",
    "ffn.expert_bias": "mlp.gate.e_score_correction_bias",
    **{f"ffn.{n}_proj.weight": f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")},
    **{f"ffn.shared_experts.{n}_proj.weight": f"mlp.shared_experts.{n}_proj.weight" for n in ("gate", "up", "down")},
}
_EXPERT_KINDS = ("gate_proj", "up_proj", "down_proj")


def _dsv3_config(cfg: ModelConfig) -> dict:
    m = cfg.mla
    moe = cfg.moe or {}
    dense = cfg.ffn != "moe"  # an MLA model with dense FFNs: every layer "before" the first MoE
    h = common_hf_config(cfg, "deepseek_v3", "DeepseekV3ForCausalLM", gqa=False)
    h.update({
        "num_key_value_heads": cfg.n_heads,  # MLA: every head gets its own keys from the shared latent
        "moe_intermediate_size": moe.get("moe_d_ff", cfg.d_ff),
        "n_shared_experts": moe.get("n_shared_experts", 0),
        "n_routed_experts": moe.get("n_routed_experts", 1),
        "num_experts_per_tok": moe.get("n_experts_per_tok", 1),
        "routed_scaling_factor": moe.get("routed_scaling_factor", 1.0),
        "n_group": moe.get("n_group", 1),
        "topk_group": moe.get("topk_group", 1),
        "norm_topk_prob": moe.get("norm_topk_prob", True),
        "first_k_dense_replace": cfg.n_layers if dense else moe["first_k_dense"],
        "kv_lora_rank": m["kv_lora_rank"],
        "q_lora_rank": m["q_lora_rank"] or None,
        "qk_rope_head_dim": m["qk_rope_head_dim"],
        "qk_nope_head_dim": m["qk_nope_head_dim"],
        "v_head_dim": m["v_head_dim"],
        "hidden_act": HF_ACT[cfg.activation],
        "rope_interleave": True,
        "num_nextn_predict_layers": 0,
    })
    return h


def _dsv3_from_config(h: dict) -> ModelConfig:
    n_layers = h["num_hidden_layers"]
    first_dense = h.get("first_k_dense_replace", 0)
    moe = None
    if first_dense < n_layers:
        moe = {
            "n_routed_experts": h["n_routed_experts"],
            "n_shared_experts": h.get("n_shared_experts") or 0,
            "n_experts_per_tok": h["num_experts_per_tok"],
            "moe_d_ff": h["moe_intermediate_size"],
            "scoring": "sigmoid",  # DeepSeek-V3 (HF's DeepseekV3TopkRouter) always uses sigmoid
            "norm_topk_prob": h.get("norm_topk_prob", True),
            "routed_scaling_factor": h.get("routed_scaling_factor", 1.0),
            "n_group": h.get("n_group") or 1,
            "topk_group": h.get("topk_group") or 1,
            "first_k_dense": first_dense,
        }
    return ModelConfig(
        **common_from_hf_config(h, max_positions=4096, tied=False, gqa=False),
        ffn="moe" if moe else "swiglu",
        activation=ACT_FROM_HF[h.get("hidden_act", "silu")],
        attention="mla",
        attn_out_bias=h.get("attention_bias", False),
        moe=moe,
        mla={
            "q_lora_rank": h.get("q_lora_rank"),
            "kv_lora_rank": h["kv_lora_rank"],
            "qk_nope_head_dim": h["qk_nope_head_dim"],
            "qk_rope_head_dim": h["qk_rope_head_dim"],
            "v_head_dim": h["v_head_dim"],
        },
    )


def _rope_rows(cfg: ModelConfig, to_hf: bool) -> dict[str, tuple[int, int, torch.Tensor]]:
    """Which rows of which MLA weights hold rope channels: name -> (period, offset, row order).

    A weight's rows are grouped in blocks of ``period``; rows offset..offset+d_rope of each block
    are the rope channels. Import reorders them by perm (even, then odd); export by its inverse.
    """
    m = cfg.mla
    d_r = m["qk_rope_head_dim"]
    perm = torch.cat([torch.arange(0, d_r, 2), torch.arange(1, d_r, 2)])
    order = perm.argsort() if to_hf else perm
    d_qk = m["qk_nope_head_dim"] + d_r
    q_name = "q_b_proj" if m["q_lora_rank"] else "q_proj"
    return {
        f"attn.{q_name}.weight": (d_qk, m["qk_nope_head_dim"], order),
        "attn.kv_a_proj.weight": (m["kv_lora_rank"] + d_r, m["kv_lora_rank"], order),
        "attn.kv_a_proj.bias": (m["kv_lora_rank"] + d_r, m["kv_lora_rank"], order),
    }


def _reorder_rope(sd: dict, cfg: ModelConfig, to_hf: bool) -> dict:
    rows = _rope_rows(cfg, to_hf)
    out = dict(sd)
    for key, w in sd.items():
        rest = key.split(".", 2)[-1] if key.startswith("layers.") else None
        if rest not in rows:
            continue
        period, offset, order = rows[rest]
        blocks = w.reshape(-1, period, *w.shape[1:]).clone()
        d_r = order.numel()
        blocks[:, offset : offset + d_r] = blocks[:, offset : offset + d_r][:, order]
        out[key] = blocks.reshape(w.shape)
    return out


def _dsv3_to_state(sd: dict, cfg: ModelConfig) -> dict:
    sd = _reorder_rope(sd, cfg, to_hf=True)
    sd = {k: v for k, v in sd.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    experts = {k: sd.pop(k) for k in [k for k in sd if ".ffn.experts." in k]}
    out = rename_layers(sd, _DSV3_ATTN, "layers.", "model.layers.", _TOP, to_hf=True)
    for key, stacked in experts.items():  # layers.{i}.ffn.experts.{kind} (E, ., .)
        i, kind = key.split(".")[1], key.rsplit(".", 1)[-1]
        for e, w in enumerate(stacked.unbind(0)):
            out[f"model.layers.{i}.mlp.experts.{e}.{kind}.weight"] = w.contiguous()
    return out


def _dsv3_from_state(sd: dict, cfg: ModelConfig, hf_config: dict | None = None) -> dict:
    sd = {k: v for k, v in sd.items() if "rotary_emb" not in k}
    interleaved = (hf_config or {}).get("rope_interleave", True)  # HF's default, as in the real checkpoints
    # Collect experts: per-expert tensors (original layout) or HF's fused stacks.
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    rest = {}
    for key, w in sd.items():
        parts = key.split(".")
        if len(parts) > 5 and parts[3:5] == ["mlp", "experts"]:
            i = parts[2]
            if parts[5].isdigit():
                experts.setdefault((i, parts[6]), {})[int(parts[5])] = w
            elif parts[5] == "gate_up_proj":
                gate, up = w.chunk(2, dim=1)
                experts[(i, "gate_proj")] = dict(enumerate(gate))
                experts[(i, "up_proj")] = dict(enumerate(up))
            elif parts[5] == "down_proj":
                experts[(i, "down_proj")] = dict(enumerate(w))
            else:
                raise UserError(f"weight {key!r} has no counterpart in our DeepSeek-V3 layout.")
        else:
            rest[key] = w
    out = rename_layers(rest, _DSV3_ATTN, "layers.", "model.layers.", _TOP, to_hf=False)
    for (i, kind), per in experts.items():
        out[f"layers.{i}.ffn.experts.{kind}"] = torch.stack([per[e] for e in range(len(per))])
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return _reorder_rope(out, cfg, to_hf=False) if interleaved else out


def _is_dsv3(c: ModelConfig) -> bool:
    moe_ok = c.ffn == "swiglu" or (c.ffn == "moe" and c.moe["scoring"] == "sigmoid")
    return c.attention == "mla" and moe_ok and c.norm == "rmsnorm" and not c.norm_unit_offset and not c.post_norms \
        and not c.embed_scale and c.sliding_window is None and c.qkv_bias == c.attn_out_bias


FAMILIES["deepseek_v3"] = Family(
    _dsv3_config, _dsv3_from_config, _dsv3_to_state, _dsv3_from_state, _is_dsv3, state_needs_hf_config=True
)

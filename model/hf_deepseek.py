"""HuggingFace DeepSeek-V3: MLA (q/kv low-rank with latent RMSNorms) and DeepSeekMoE with
sigmoid scoring, group-limited routing and the e_score_correction_bias.

Real checkpoints set ``rope_interleave``: the rope channels come in (even, odd) pairs. Rotating
interleaved pairs of x is rotating halves of x[perm] with perm = (0, 2, 4, ..., 1, 3, 5, ...), so on
import we permute the rope rows of the q and kv_a projections once and our (halves) RoPE is exact;
export applies the inverse permutation and writes rope_interleave=True. Experts are written one
tensor per expert (the original layout ``transformers`` and vLLM read); fused HF tensors
(``experts.gate_up_proj``) are accepted on import. The multi-token-prediction layers of the
published checkpoints (layer index >= num_hidden_layers) are a training/speculation extra outside
the next-token forward: import leaves them out. Our balancing rates travel as extra config keys.
"""
from __future__ import annotations

import torch

from model.config import ModelConfig
from model.hf_common import (
    FAMILIES, HF_ACT, TOP, Family, act_from_hf, common_from_hf_config, common_hf_config, refuse, refuse_partial_rotary,
    rename_layers, required, rope_source,
)
from model.hf_moe import experts_from_hf, experts_to_hf, training_from_hf, training_keys

DEFAULTS = dict(max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0)

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


def _dsv3_config(cfg: ModelConfig) -> dict:
    m = cfg.mla
    moe = cfg.moe or {}
    dense = cfg.ffn != "moe"  # an MLA model with dense FFNs: every layer "before" the first MoE
    h = common_hf_config(cfg, "deepseek_v3", "DeepseekV3ForCausalLM", gqa=False)
    h.update({
        "num_key_value_heads": cfg.n_heads,  # MLA: every head gets its own keys from the shared latent
        "attention_bias": cfg.qkv_bias,
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
        **training_keys(cfg),
    })
    return h


def _dsv3_from_config(h: dict) -> ModelConfig:
    fam = "deepseek_v3"
    refuse_partial_rotary(rope_source(h), h, fam)
    n_layers = required(h, "num_hidden_layers", fam)
    first_dense = h.get("first_k_dense_replace", 3)
    moe = None
    if first_dense < n_layers:
        moe = {
            "n_routed_experts": required(h, "n_routed_experts", fam),
            "n_shared_experts": h.get("n_shared_experts", 1) or 0,
            "n_experts_per_tok": h.get("num_experts_per_tok", 8),
            "moe_d_ff": required(h, "moe_intermediate_size", fam),
            "scoring": "sigmoid",  # DeepSeek-V3 (HF's DeepseekV3TopkRouter) always uses sigmoid
            "norm_topk_prob": h.get("norm_topk_prob", True),
            "routed_scaling_factor": h.get("routed_scaling_factor", 2.5),
            "n_group": h.get("n_group", 8) or 1,
            "topk_group": h.get("topk_group", 4) or 1,
            "first_k_dense": first_dense,
            **training_from_hf(h),
        }
    if moe is not None and moe["n_shared_experts"] == 0:
        refuse(fam, "n_shared_experts", 0, "makes transformers build a zero-width shared expert")
    bias = h.get("attention_bias", False)
    return ModelConfig(
        **common_from_hf_config(h, fam, DEFAULTS, gqa=False),
        ffn="moe" if moe else "swiglu",
        activation=act_from_hf(h.get("hidden_act", "silu"), fam),
        attention="mla",
        qkv_bias=bias,
        attn_out_bias=bias,
        moe=moe,
        mla={
            "q_lora_rank": h.get("q_lora_rank", 1536),
            "kv_lora_rank": required(h, "kv_lora_rank", fam),
            "qk_nope_head_dim": required(h, "qk_nope_head_dim", fam),
            "qk_rope_head_dim": required(h, "qk_rope_head_dim", fam),
            "v_head_dim": required(h, "v_head_dim", fam),
        },
    )


def rope_rows(cfg: ModelConfig, to_hf: bool) -> dict[str, tuple[int, int, torch.Tensor]]:
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


def reorder_rope(sd: dict, cfg: ModelConfig, to_hf: bool) -> dict:
    rows = rope_rows(cfg, to_hf)
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
    sd = reorder_rope(sd, cfg, to_hf=True)
    sd = {k: v for k, v in sd.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    experts = {k: sd.pop(k) for k in [k for k in sd if ".ffn.experts." in k]}
    return {**rename_layers(sd, _DSV3_ATTN, "layers.", "model.layers.", TOP, to_hf=True), **experts_to_hf(experts)}


def _dsv3_from_state(sd: dict, cfg: ModelConfig, hf_config: dict) -> dict:
    def mtp(key: str) -> bool:  # model.layers.{i >= n_layers}: the multi-token-prediction module
        parts = key.split(".")
        return key.startswith("model.layers.") and int(parts[2]) >= cfg.n_layers

    sd = {k: v for k, v in sd.items() if "rotary_emb" not in k and not mtp(k)}
    interleaved = hf_config.get("rope_interleave", True)  # HF's default, as in the real checkpoints
    rest, experts = experts_from_hf(sd, cfg.moe["n_routed_experts"] if cfg.moe else 0)
    out = {**rename_layers(rest, _DSV3_ATTN, "layers.", "model.layers.", TOP, to_hf=False), **experts}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return reorder_rope(out, cfg, to_hf=False) if interleaved else out


def _is_dsv3(c: ModelConfig) -> bool:
    moe_ok = c.ffn == "swiglu" or (c.ffn == "moe" and c.moe["scoring"] == "sigmoid")
    return c.attention == "mla" and moe_ok and c.norm == "rmsnorm"


FAMILIES["deepseek_v3"] = Family(_dsv3_config, _dsv3_from_config, _dsv3_to_state, _dsv3_from_state, _is_dsv3)

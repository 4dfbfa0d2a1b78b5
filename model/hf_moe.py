"""HuggingFace MoE families: Mixtral, Qwen2-MoE, Qwen3-MoE (DeepSeek-V3 is in hf_deepseek.py).

Routing, mapped onto model/moe.py's ``route``:
  mixtral    softmax over the experts, top-k, the k weights renormalised; a window on every
             layer when sliding_window is set
  qwen2_moe  softmax, top-k, renormalised only with norm_topk_prob (off by default); one shared
             expert of width shared_expert_intermediate_size (a whole number of experts here),
             gated per token by sigmoid(w . x); q/k/v biases (qkv_bias)
  qwen3_moe  qwen2_moe's routing without a shared expert, Qwen3's QK-norm attention
Dense layers: Qwen's mlp_only_layers / decoder_sparse_step when they make the first k layers
dense (our moe.first_k_dense); other patterns are refused.

Experts are written one tensor per expert, the layout of the published checkpoints (Mixtral:
block_sparse_moe.experts.{e}.w1/w3/w2), which transformers fuses on load; the fused tensors
(experts.gate_up_proj / down_proj) are read too. Our balancing settings (aux_free_bias_update_rate,
seq_aux_loss_coef) have no HF key: they ride along as extra config keys, which transformers keeps
and ignores. A learned aux-free balance bias cannot be expressed by these families: export refuses it.
"""
from __future__ import annotations

import torch

from model.config import ModelConfig
from model.hf_common import (
    FAMILIES, HF_ACT, Family, act_from_hf, common_from_hf_config, common_hf_config, from_hf_layers, layer_types,
    refuse, refuse_partial_rotary, required, rope_source, to_hf_layers,
)
from model.hf_llama import DEFAULTS as DENSE_DEFAULTS
from model.hf_llama import LLAMA_LAYER_KEYS
from utils.errors import UserError

TRAINING_KEYS = ("aux_free_bias_update_rate", "seq_aux_loss_coef")  # ours, written as extra config keys
DEFAULTS = {
    "mixtral": {**DENSE_DEFAULTS["mistral"], "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                "rope_theta": 1_000_000.0, "sliding_window": None, "num_experts_per_tok": 2},
    "qwen2_moe": {**DENSE_DEFAULTS["qwen2"], "num_key_value_heads": 16, "num_experts_per_tok": 4,
                  "shared_expert_intermediate_size": 5632, "norm_topk_prob": False},
    "qwen3_moe": {**DENSE_DEFAULTS["qwen2"], "num_key_value_heads": 4, "num_experts_per_tok": 8, "norm_topk_prob": False},
}
_ATTN_KEYS = {k: v for k, v in LLAMA_LAYER_KEYS.items() if not k.startswith("ffn.")}
_DENSE_MLP = {f"ffn.{n}_proj.weight": f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
LAYER_KEYS = {**_ATTN_KEYS, **_DENSE_MLP, "ffn.router.weight": "mlp.gate.weight"}
_QWEN2_LAYER_KEYS = {
    **LAYER_KEYS,
    **{f"ffn.shared_experts.{n}_proj.weight": f"mlp.shared_expert.{n}_proj.weight" for n in ("gate", "up", "down")},
    "ffn.shared_gate.weight": "mlp.shared_expert_gate.weight",
}
_MIXTRAL_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def training_keys(cfg: ModelConfig) -> dict:
    return {k: cfg.moe[k] for k in TRAINING_KEYS} if cfg.moe else {}


def training_from_hf(h: dict) -> dict:
    return {k: h.get(k, 0.0) for k in TRAINING_KEYS}


def _softmax_moe(c: ModelConfig) -> bool:
    return (c.attention == "standard" and c.ffn == "moe" and c.moe["scoring"] == "softmax" and c.norm == "rmsnorm"
            and c.pos_emb == "rope")


# ----------------------------------------------------------------------------- config: ours -> HF


def _config(cfg: ModelConfig, model_type: str, arch: str) -> dict:
    m = cfg.moe
    h = common_hf_config(cfg, model_type, arch)
    h.update(hidden_act=HF_ACT[cfg.activation], num_experts_per_tok=m["n_experts_per_tok"], **training_keys(cfg))
    if model_type == "mixtral":
        h.update(intermediate_size=m["moe_d_ff"], num_local_experts=m["n_routed_experts"], sliding_window=cfg.sliding_window,
                 router_jitter_noise=0.0)
        return h
    h.update(num_experts=m["n_routed_experts"], moe_intermediate_size=m["moe_d_ff"], norm_topk_prob=m["norm_topk_prob"],
             decoder_sparse_step=1, mlp_only_layers=list(range(m["first_k_dense"])),
             use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window)
    if model_type == "qwen2_moe":
        h.update(qkv_bias=cfg.qkv_bias, shared_expert_intermediate_size=m["n_shared_experts"] * m["moe_d_ff"],
                 layer_types=layer_types(cfg))
    else:
        h["attention_bias"] = cfg.qkv_bias
    return h


# ----------------------------------------------------------------------------- config: HF -> ours


def _moe(h: dict, family: str, n_experts_key: str, **extra) -> dict:
    return {"n_routed_experts": required(h, n_experts_key, family),
            "n_experts_per_tok": h.get("num_experts_per_tok", DEFAULTS[family]["num_experts_per_tok"]),
            "scoring": "softmax", **training_from_hf(h), **extra}


def _first_dense(h: dict, family: str) -> int:
    """Qwen: layer i is dense if listed in mlp_only_layers or (i+1) is not a multiple of
    decoder_sparse_step. Mapped when those are exactly the first k layers (k < n)."""
    n, step = h["num_hidden_layers"], h.get("decoder_sparse_step", 1)
    listed = set(h.get("mlp_only_layers") or [])
    dense = sorted(i for i in range(n) if i in listed or (i + 1) % step)
    if dense != list(range(len(dense))) or len(dense) == n:
        refuse(family, "mlp_only_layers/decoder_sparse_step", (sorted(listed), step),
               f"make layers {dense} dense, not the first k of {n} (followed by MoE layers)")
    return len(dense)


def _mixtral(h: dict) -> ModelConfig:
    fam = "mixtral"
    refuse_partial_rotary(rope_source(h), h, fam)
    kw = common_from_hf_config(h, fam, DEFAULTS[fam])
    moe = _moe(h, fam, "num_local_experts", moe_d_ff=kw["d_ff"], norm_topk_prob=True)
    return ModelConfig(**kw, ffn="moe", moe=moe, activation=act_from_hf(h.get("hidden_act", "silu"), fam),
                       sliding_window=h.get("sliding_window"))


def _qwen_moe(h: dict, fam: str) -> dict:
    refuse_partial_rotary(rope_source(h), h, fam)
    return dict(**common_from_hf_config(h, fam, DEFAULTS[fam]), ffn="moe",
                activation=act_from_hf(h.get("hidden_act", "silu"), fam))


def _qwen2_moe(h: dict) -> ModelConfig:
    fam = "qwen2_moe"
    width = required(h, "moe_intermediate_size", fam)
    shared = h.get("shared_expert_intermediate_size", DEFAULTS[fam]["shared_expert_intermediate_size"])
    if shared <= 0 or shared % width:
        refuse(fam, "shared_expert_intermediate_size", shared, f"is not a whole number of experts of width {width}")
    n, first = h["num_hidden_layers"], h.get("max_window_layers", DEFAULTS[fam]["max_window_layers"])
    types = h.get("layer_types") or ["sliding_attention" if h.get("use_sliding_window", False) and i % 2 == 0 and i < first
                                     else "full_attention" for i in range(n)]
    if "sliding_attention" in types:
        refuse(fam, "layer_types", types, "windows some layers (Qwen2-MoE's windows are not implemented)")
    moe = _moe(h, fam, "num_experts", moe_d_ff=width, norm_topk_prob=h.get("norm_topk_prob", False),
               n_shared_experts=shared // width, shared_expert_gate=True, first_k_dense=_first_dense(h, fam))
    return ModelConfig(**_qwen_moe(h, fam), moe=moe, qkv_bias=h.get("qkv_bias", True))


def _qwen3_moe(h: dict) -> ModelConfig:
    fam = "qwen3_moe"
    experts = "num_experts" if "num_experts" in h else "num_local_experts"  # transformers 5 writes the second
    moe = _moe(h, fam, experts, moe_d_ff=required(h, "moe_intermediate_size", fam),
               norm_topk_prob=h.get("norm_topk_prob", False), first_k_dense=_first_dense(h, fam))
    bias = h.get("attention_bias", False)
    window = h.get("sliding_window", 4096) if h.get("use_sliding_window", False) else None  # every layer
    return ModelConfig(**_qwen_moe(h, fam), moe=moe, qk_norm=True, qkv_bias=bias,
                       attn_out_bias=bias, sliding_window=window)


# ----------------------------------------------------------------------------- state dicts


def experts_to_hf(experts: dict, block: str = "mlp", names: dict | None = None) -> dict:
    """layers.{i}.ffn.experts.{kind} (E, ., .) -> model.layers.{i}.{block}.experts.{e}.{name}.weight."""
    out = {}
    for key, stacked in experts.items():
        i, kind = key.split(".")[1], key.rsplit(".", 1)[-1]
        for e, w in enumerate(stacked.unbind(0)):
            out[f"model.layers.{i}.{block}.experts.{e}.{(names or {}).get(kind, kind)}.weight"] = w.contiguous()
    return out


def experts_from_hf(sd: dict, n_experts: int) -> tuple[dict, dict]:
    """Split off the experts (per-expert tensors or transformers' fused stacks) -> (rest, ours stacked)."""
    per: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    rest = {}
    for key, w in sd.items():
        parts = key.split(".")  # model.layers.{i}.mlp.experts.{e}.{kind}.weight | ....experts.{gate_up_proj|down_proj}
        if not (len(parts) > 5 and parts[3:5] == ["mlp", "experts"]):
            rest[key] = w
        elif parts[5].isdigit():
            per.setdefault((parts[2], parts[6]), {})[int(parts[5])] = w
        elif parts[5] == "gate_up_proj":
            gate, up = w.chunk(2, dim=1)
            per[(parts[2], "gate_proj")], per[(parts[2], "up_proj")] = dict(enumerate(gate)), dict(enumerate(up))
        elif parts[5] == "down_proj":
            per[(parts[2], "down_proj")] = dict(enumerate(w))
        else:
            raise UserError(f"weight {key!r} has no counterpart in our MoE layout.")
    out = {}
    for (i, kind), tensors in per.items():
        if sorted(tensors) != list(range(n_experts)):
            raise UserError(f"layer {i} holds {len(tensors)} {kind} experts; the config says {n_experts}.")
        out[f"layers.{i}.ffn.experts.{kind}"] = torch.stack([tensors[e] for e in range(n_experts)])
    return rest, out


def _without_balance_bias(sd: dict, family: str) -> dict:
    for key in [k for k in sd if k.endswith("ffn.expert_bias")]:
        if sd[key].abs().max() > 0:
            raise UserError(f"this model selects experts with a learned balance bias ({key}, aux-free balancing), "
                            f"which {family} cannot express (in HF only DeepSeek-V3's sigmoid routing has one); "
                            "to export to HF, train with moe.aux_free_bias_update_rate: 0.")
    return {k: v for k, v in sd.items() if not k.endswith("ffn.expert_bias")}


def _to_state(sd: dict, cfg: ModelConfig, family: str, layer_keys: dict) -> dict:
    sd = _without_balance_bias(sd, family)
    experts = {k: sd.pop(k) for k in [k for k in sd if ".ffn.experts." in k]}
    out = to_hf_layers(sd, cfg, layer_keys)
    if family != "mixtral":
        return {**out, **experts_to_hf(experts)}
    out = {k.replace(".mlp.", ".block_sparse_moe."): v for k, v in out.items()}
    return {**out, **experts_to_hf(experts, "block_sparse_moe", _MIXTRAL_NAMES)}


def _from_state(sd: dict, cfg: ModelConfig, layer_keys: dict) -> dict:
    legacy = {f".experts.{i}.{w}.": f".experts.{i}.{n}." for i in range(cfg.moe["n_routed_experts"])
              for n, w in _MIXTRAL_NAMES.items()}
    renamed = {}
    for key, w in sd.items():  # Mixtral's original names -> transformers' (a no-op for the Qwen families)
        key = key.replace(".block_sparse_moe.", ".mlp.")
        for old, new in legacy.items():
            key = key.replace(old, new)
        renamed[key] = w
    rest, experts = experts_from_hf(renamed, cfg.moe["n_routed_experts"])
    out = {**from_hf_layers(rest, cfg, layer_keys), **experts}
    for i in range(cfg.moe["first_k_dense"], cfg.n_layers):  # no balance bias in these families
        out[f"layers.{i}.ffn.expert_bias"] = torch.zeros(cfg.moe["n_routed_experts"])
    return out


def _register(name: str, arch: str, from_config, layer_keys: dict = LAYER_KEYS) -> None:
    FAMILIES[name] = Family(
        to_hf_config=lambda c: _config(c, name, arch),
        from_hf_config=from_config,
        to_hf_state=lambda sd, c: _to_state(sd, c, name, layer_keys),
        from_hf_state=lambda sd, c, h: _from_state(sd, c, layer_keys),
        matches=_softmax_moe,
    )


_register("mixtral", "MixtralForCausalLM", _mixtral)
_register("qwen2_moe", "Qwen2MoeForCausalLM", _qwen2_moe, _QWEN2_LAYER_KEYS)
_register("qwen3_moe", "Qwen3MoeForCausalLM", _qwen3_moe)

"""ModelConfig: the one description of an architecture.

A named architecture (Llama-3, Qwen, Mistral/Mixtral, Phi-3, Gemma 1/2/3, OLMo-2, GPT-2,
DeepSeek-V3) is a set of
values for this dataclass, not a new class. Derived sizes (head_dim, d_ff, n_kv_heads)
are computed in ``__post_init__`` so recipes name only what they choose.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from utils.errors import UserError

NORMS = ("rmsnorm", "layernorm")
QK_NORM_SCOPES = ("head", "all")
FFNS = ("swiglu", "geglu", "gelu_mlp", "moe")
POSITIONS = ("rope", "learned", "alibi", "none")
ATTENTIONS = ("standard", "mla", "linear")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")

# Sub-blocks with their defaults; None marks a key the recipe must give. Filled in by
# __post_init__ so a saved config states every value it ran with.
MLA_DEFAULTS: dict[str, Any] = {
    "q_lora_rank": None,  # None/0: queries are projected at full rank (DeepSeek-V2-Lite)
    "kv_lora_rank": None,  # width of the cached latent c_kv
    "qk_nope_head_dim": None,  # per-head query/key channels without position
    "qk_rope_head_dim": None,  # decoupled RoPE channels (one key shared by all heads)
    "v_head_dim": None,
}
MOE_DEFAULTS: dict[str, Any] = {
    "n_routed_experts": None,
    "n_shared_experts": 0,
    "shared_expert_gate": False,  # Qwen2-MoE: the shared experts' output times sigmoid(w . x)
    "n_experts_per_tok": None,  # top-k
    "moe_d_ff": None,  # hidden width of one expert (and of one shared expert)
    "scoring": "softmax",  # "softmax" (DeepSeek-V2) | "sigmoid" (DeepSeek-V3)
    "norm_topk_prob": True,  # renormalise the k selected scores to sum to 1
    "routed_scaling_factor": 1.0,
    "n_group": 1,  # node-limited routing: experts split in groups, only topk_group groups eligible
    "topk_group": 1,
    "first_k_dense": 0,  # layers [0, first_k_dense) use a dense gated MLP of width d_ff
    "aux_free_bias_update_rate": 0.0,  # DeepSeek-V3 gamma; 0 disables bias balancing
    "seq_aux_loss_coef": 0.0,  # DeepSeek-V3 alpha of the sequence-wise balance loss
}
# The vision part of a vision-language model (model/vision.py): a SigLIP-style ViT whose patch
# features a projector maps into the LM's embedding space, spliced in at placeholder tokens.
VISION_DEFAULTS: dict[str, Any] = {
    "image_size": None,  # square images of image_size x image_size pixels (384 with 14-pixel patches: 27 x 27 read)
    "patch_size": None,
    "n_channels": 3,
    "d_model": None,  # the ViT's width, heads, depth and MLP width
    "n_heads": None,
    "n_layers": None,
    "d_ff": None,
    "norm_eps": 1e-6,
    "activation": "gelu_tanh",  # SigLIP's MLP; the projector uses exact GELU (LLaVA)
    "post_norm": False,  # a final LayerNorm on the ViT's output (SigLIP's last_hidden_state; LLaVA reads before it)
    "pool": 1,  # average-pool k x k patch features before the projector (fewer image tokens); 1: off
    "image_token_id": None,  # the placeholder id the image's tokens replace in the prompt
}


def _fill(block: Optional[dict], defaults: dict[str, Any], name: str) -> Optional[dict]:
    if block is None:
        return None
    unknown = sorted(set(block) - set(defaults))
    if unknown:
        raise UserError(f"model: {name} has unknown keys {unknown}; known keys: {sorted(defaults)}.")
    out = {**defaults, **block}
    missing = [k for k, v in out.items() if v is None and k != "q_lora_rank"]  # the only optional None
    if missing:
        raise UserError(f"model: {name} needs values for {missing}.")
    return out


@dataclass
class ModelConfig:
    # sizes
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None -> n_heads (MHA); 1 -> MQA; between -> GQA
    head_dim: Optional[int] = None  # None -> d_model // n_heads
    d_ff: Optional[int] = None  # None -> 4*d_model (MLP) or 8/3*d_model rounded (gated)
    max_seq_len: int = 512
    # parts
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False  # Gemma: weight stored as w, applied as (1 + w)
    ffn: str = "swiglu"
    activation: str = "silu"
    attention: str = "standard"
    pos_emb: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # e.g. {"type": "yarn", "factor": 4.0, "original_max_seq_len": 512}
    rope_local_theta: Optional[float] = None  # RoPE base of the sliding-window layers (Gemma-3: 10k, global 1M)
    partial_rotary: float = 1.0  # fraction of head_dim that is rotated
    sliding_window: Optional[int] = None  # tokens each query sees (incl. itself)
    sliding_window_pattern: int = 1  # every k-th layer is global (Gemma alternates); 1 -> all windowed
    qk_norm: bool = False  # Qwen3 / Gemma-3 / OLMo-2: RMSNorm on q and k
    qk_norm_scope: str = "head"  # "head": over each head's head_dim (Qwen3, Gemma-3); "all": whole projection (OLMo-2)
    qkv_bias: bool = False  # Qwen2 / GPT-2
    attn_out_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = True  # only used by LayerNorm
    tie_embeddings: bool = False
    embed_scale: bool = False  # Gemma: multiply embeddings by sqrt(d_model)
    pre_norms: bool = True  # norm on each sublayer's input; False (OLMo-2): only the post_norms
    post_norms: bool = False  # Gemma-2/3, OLMo-2: norm on each sublayer's output, before the residual add
    attn_logit_softcap: Optional[float] = None
    final_logit_softcap: Optional[float] = None
    query_pre_attn_scalar: Optional[float] = None  # attention scale = this ** -0.5 when set
    dropout: float = 0.0
    kernels: bool = False  # fused Triton kernels (model/kernels) on CUDA tensors; PyTorch elsewhere
    init_std: float = 0.02
    # MoE (DeepSeekMoE)
    moe: Optional[dict] = None
    # MLA (DeepSeek-V2/V3)
    mla: Optional[dict] = None
    # vision encoder + projector (a vision-language model); None: text only
    vision: Optional[dict] = None
    # The HuggingFace model_type to export as (an import sets it, so Phi-3 goes back out as Phi-3, not
    # as the Mistral that holds the same math); None: the first family that holds this config exactly.
    hf_family: Optional[str] = None
    extra: dict = field(default_factory=dict)  # free-form notes (e.g. source of published dims)

    def __post_init__(self) -> None:
        self.mla = _fill(self.mla, MLA_DEFAULTS, "mla") if self.attention == "mla" else self.mla
        self.moe = _fill(self.moe, MOE_DEFAULTS, "moe") if self.ffn == "moe" else self.moe
        self.vision = _fill(self.vision, VISION_DEFAULTS, "vision")
        if self.attention == "mla" and self.mla is not None:
            # MLA has one latent shared by every head, so there are no KV heads to choose, and
            # the query/key head size is fixed by the mla block.
            if self.n_kv_heads not in (None, self.n_heads):
                raise UserError(
                    f"model: attention='mla' shares one latent across heads; n_kv_heads={self.n_kv_heads} "
                    "does not apply (leave it unset)."
                )
            qk_dim = self.mla["qk_nope_head_dim"] + self.mla["qk_rope_head_dim"]
            if self.head_dim not in (None, qk_dim):
                raise UserError(
                    f"model: with MLA head_dim is qk_nope_head_dim + qk_rope_head_dim = {qk_dim}; "
                    f"got head_dim={self.head_dim} (leave it unset)."
                )
            self.head_dim = qk_dim
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise UserError(
                    f"model: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "choose sizes that divide, or set head_dim explicitly."
                )
            self.head_dim = self.d_model // self.n_heads
        if self.d_ff is None:
            if self.ffn in ("swiglu", "geglu"):
                # 2/3 of 4*d keeps the parameter count of a 4*d MLP; round up to 64 (Llama).
                self.d_ff = 64 * ((int(8 * self.d_model / 3) + 63) // 64)
            else:
                self.d_ff = 4 * self.d_model
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise UserError(f"model: {msg}")

        for name, value, allowed in (
            ("norm", self.norm, NORMS),
            ("ffn", self.ffn, FFNS),
            ("pos_emb", self.pos_emb, POSITIONS),
            ("attention", self.attention, ATTENTIONS),
            ("activation", self.activation, ACTIVATIONS),
            ("qk_norm_scope", self.qk_norm_scope, QK_NORM_SCOPES),
        ):
            if value not in allowed:
                bad(f"{name}={value!r} is not one of {', '.join(allowed)}.")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}.")
        if self.n_heads % self.n_kv_heads:
            bad(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                "each KV head must serve a whole group of query heads (GQA)."
            )
        if self.pos_emb == "rope" and self.rotary_dim % 2:
            bad(f"the rotated part of head_dim ({self.rotary_dim}) must be even for RoPE.")
        if self.sliding_window is not None and self.sliding_window <= 0:
            bad(f"sliding_window must be positive or null, got {self.sliding_window}.")
        if self.sliding_window_pattern < 1:
            bad(f"sliding_window_pattern must be >= 1 (1: every layer windowed), got {self.sliding_window_pattern}.")
        if not (self.pre_norms or self.post_norms):
            bad("pre_norms and post_norms are both off: a block needs a norm on the input or the output of its sublayers.")
        if self.qk_norm_scope != "head" and not self.qk_norm:
            bad(f"qk_norm_scope={self.qk_norm_scope!r} says how q/k are normalised, but qk_norm is off; set qk_norm: true.")
        if self.rope_local_theta is not None:
            if self.pos_emb != "rope" or self.attention != "standard":
                bad("rope_local_theta is the RoPE base of the windowed layers; it needs pos_emb='rope' and standard attention.")
            if self.sliding_window is None:
                bad("rope_local_theta applies to the sliding-window layers, but sliding_window is not set.")
            if not self.rope_local_theta > 0:
                bad(f"rope_local_theta must be positive, got {self.rope_local_theta}.")
        if self.mla is not None and self.attention != "mla":
            bad(f"an 'mla' block is set but attention={self.attention!r}; set attention: mla or remove the block.")
        if self.moe is not None and self.ffn != "moe":
            bad(f"a 'moe' block is set but ffn={self.ffn!r}; set ffn: moe or remove the block.")
        if self.attention == "mla":
            self._validate_mla(bad)
        if self.attention == "linear":
            for what, on in (
                ("pos_emb='alibi'", self.pos_emb == "alibi"),
                ("sliding_window", self.sliding_window is not None),
                ("attn_logit_softcap", self.attn_logit_softcap is not None),
                ("qk_norm_scope='all'", self.qk_norm_scope == "all"),
            ):
                if on:
                    bad(f"attention='linear' has no attention matrix to apply {what} to; remove one of them.")
        if self.ffn == "moe":
            self._validate_moe(bad)
        if self.vision is not None:
            self._validate_vision(bad)
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type")
            if kind not in ("linear", "yarn", "llama3"):
                bad(f"rope_scaling.type={kind!r} is not one of linear, yarn, llama3.")
            if not self.rope_scaling.get("factor", 0) > 0:
                bad(f"rope_scaling.factor must be a positive number, got {self.rope_scaling.get('factor')!r}.")
            if kind in ("yarn", "llama3") and not self.rope_scaling.get("original_max_seq_len"):
                bad(f"rope_scaling type {kind} needs original_max_seq_len (the context the model was trained at).")

    def _validate_mla(self, bad) -> None:
        if self.mla is None:
            bad("attention='mla' needs an 'mla' block (q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim).")
        if self.pos_emb == "alibi":
            bad("MLA uses decoupled RoPE keys; it cannot be combined with pos_emb='alibi'.")
        if self.pos_emb != "rope":
            bad(f"MLA needs pos_emb='rope' (its decoupled RoPE key carries the positions), got {self.pos_emb!r}.")
        if self.qk_norm or self.attn_logit_softcap is not None:
            bad("MLA does not support qk_norm or attn_logit_softcap (its latent norms play that role).")
        for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if not isinstance(self.mla[key], int) or self.mla[key] <= 0:
                bad(f"mla.{key} must be a positive integer, got {self.mla[key]!r}.")
        if self.mla["q_lora_rank"] is not None and self.mla["q_lora_rank"] < 0:
            bad(f"mla.q_lora_rank must be >= 0 or null, got {self.mla['q_lora_rank']}.")

    def _validate_moe(self, bad) -> None:
        m = self.moe
        if m is None:
            bad("ffn='moe' needs a 'moe' block (n_routed_experts, n_experts_per_tok, moe_d_ff, ...).")
        n_exp, k = m["n_routed_experts"], m["n_experts_per_tok"]
        if not (0 < k <= n_exp):
            bad(f"MoE top-k n_experts_per_tok={k} must be between 1 and n_routed_experts={n_exp}.")
        if m["moe_d_ff"] <= 0 or m["n_shared_experts"] < 0:
            bad(f"moe.moe_d_ff must be positive and n_shared_experts >= 0, got {m['moe_d_ff']}, {m['n_shared_experts']}.")
        if m["scoring"] not in ("softmax", "sigmoid"):
            bad(f"moe.scoring={m['scoring']!r} is not one of softmax, sigmoid.")
        g, tg = m["n_group"], m["topk_group"]
        if g <= 0 or n_exp % g:
            bad(f"moe.n_group={g} must divide n_routed_experts={n_exp}.")
        if not (0 < tg <= g):
            bad(f"moe.topk_group={tg} must be between 1 and n_group={g}.")
        if k > tg * (n_exp // g):
            bad(f"moe: top-k={k} experts cannot be chosen from topk_group={tg} groups of {n_exp // g} experts.")
        if not (0 <= m["first_k_dense"] <= self.n_layers):
            bad(f"moe.first_k_dense={m['first_k_dense']} must be between 0 and n_layers={self.n_layers}.")
        if m["shared_expert_gate"] and not m["n_shared_experts"]:
            bad("moe.shared_expert_gate gates the shared experts, but n_shared_experts is 0.")
        if m["aux_free_bias_update_rate"] < 0 or m["seq_aux_loss_coef"] < 0:
            bad("moe.aux_free_bias_update_rate and moe.seq_aux_loss_coef must be >= 0.")

    def _validate_vision(self, bad) -> None:
        v = self.vision
        for key in ("image_size", "patch_size", "n_channels", "d_model", "n_heads", "n_layers", "d_ff", "pool"):
            if not isinstance(v[key], int) or v[key] <= 0:
                bad(f"vision.{key} must be a positive integer, got {v[key]!r}.")
        # a size that is not a multiple of the patch reads whole patches only, as SigLIP does
        if v["image_size"] < v["patch_size"]:
            bad(f"vision.image_size={v['image_size']} is smaller than vision.patch_size={v['patch_size']}.")
        if (v["image_size"] // v["patch_size"]) % v["pool"]:
            bad(f"vision.pool={v['pool']} does not divide the {v['image_size'] // v['patch_size']} patches per side.")
        if v["d_model"] % v["n_heads"]:
            bad(f"vision.d_model={v['d_model']} is not divisible by vision.n_heads={v['n_heads']}.")
        if v["activation"] not in ACTIVATIONS:
            bad(f"vision.activation={v['activation']!r} is not one of {', '.join(ACTIVATIONS)}.")
        if not isinstance(v["image_token_id"], int) or not 0 <= v["image_token_id"] < self.vocab_size:
            bad(f"vision.image_token_id={v['image_token_id']!r} must be a token id below vocab_size={self.vocab_size}.")

    @property
    def image_tokens(self) -> int:
        """Tokens one image occupies in the LM's sequence (0 for a text-only model)."""
        if self.vision is None:
            return 0
        side = self.vision["image_size"] // self.vision["patch_size"] // self.vision["pool"]
        return side * side

    @property
    def rotary_dim(self) -> int:
        if self.attention == "mla" and self.mla is not None:
            return self.mla["qk_rope_head_dim"]  # only the decoupled part is rotated
        return int(self.head_dim * self.partial_rotary)

    def layer_window(self, layer: int) -> Optional[int]:
        """Sliding window of one layer; with pattern k, every k-th layer (1-based) is global."""
        if self.sliding_window is None:
            return None
        if self.sliding_window_pattern > 1 and (layer + 1) % self.sliding_window_pattern == 0:
            return None
        return self.sliding_window

    def with_context(self, max_seq_len: Optional[int] = None, rope_scaling: Optional[dict] = None) -> "ModelConfig":
        """This config with a longer (or shorter) context and/or RoPE scaling, for weights trained
        at ``self.max_seq_len``. Scaling without ``original_max_seq_len`` stretches from this
        config's context (the length the weights were trained at, what YaRN / Llama-3 scale from).
        Learned absolute positions cannot be extended; a model without RoPE cannot be scaled."""
        d = copy.deepcopy(self.to_dict())
        if max_seq_len is not None and max_seq_len != self.max_seq_len:
            if self.pos_emb == "learned" and max_seq_len > self.max_seq_len:
                raise UserError(f"max_seq_len={max_seq_len} exceeds the base's {self.max_seq_len}, but the base has learned "
                                "absolute positions that cannot be extended; long-context SFT needs a RoPE model.")
            d["max_seq_len"] = max_seq_len
        if rope_scaling is not None:
            if self.pos_emb != "rope" and self.attention != "mla":
                raise UserError(f"rope_scaling is set but the base uses pos_emb={self.pos_emb!r}; remove rope_scaling.")
            scaling = dict(rope_scaling)
            if scaling.get("type") in ("yarn", "llama3"):
                scaling.setdefault("original_max_seq_len", self.max_seq_len)
            d["rope_scaling"] = scaling
        return ModelConfig.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"model config has unknown keys {unknown}; known keys: {sorted(known)}.")
        return cls(**d)

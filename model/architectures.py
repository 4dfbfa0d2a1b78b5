"""Named architectures: the published models this project reproduces, as ModelConfig values.

Each family comes in two sizes. The nano size keeps the family's traits at d_model 256,
6 layers and the project's 4096-token vocabulary, so it trains on a CPU in minutes
(utils/setup_classic_models.py writes its staged recipes). The published size has the
dimensions of the released config.json; the tests check its parameter count against the
published one, and nothing here trains it.

    from model import architectures
    cfg = architectures.get("llama/llama3_nano")   # a ModelConfig
    architectures.names()                          # every name

Each entry names the HuggingFace family (``model_type``) that model/hf_interop.py exports
it as; tests/model/test_hf_parity.py runs a parity test for every entry, shrunk to a tiny width.
Phi-3's math is Mistral's (a window on every layer), so its values name ``hf_family`` to be
exported in Phi-3's own layout.
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Any

from model.config import ModelConfig
from utils.errors import UserError

NANO_VOCAB = 4096  # the project's BPE tokenizer (data_pipeline/tokenizer/train_tokenizer.py --vocab_size 4096)


@dataclass(frozen=True)
class Architecture:
    description: str  # one line: the family's traits (nano) or where the dimensions come from (published)
    values: dict[str, Any]  # ModelConfig keyword arguments, as a recipe's model: section names them
    hf_family: str  # the transformers model_type that model/hf_interop.py maps it to
    published_params: float | None = None  # published sizes only; DeepSeek's count excludes its MTP module


# Per family: the nano size (the family's traits at d_model 256 / 6 layers / vocab 4096), then the
# published size (its config.json dimensions and parameter count).
ARCHITECTURES: dict[str, Architecture] = {
    "llama/llama3_nano": Architecture(
        "Llama-3: GQA (4 query heads per KV head), SwiGLU, RMSNorm, RoPE theta 500k, untied head.",
        dict(vocab_size=NANO_VOCAB, d_model=256, n_layers=6, n_heads=8, n_kv_heads=2, d_ff=704, max_seq_len=512,
             norm="rmsnorm", norm_eps=1e-5, ffn="swiglu", activation="silu", pos_emb="rope", rope_theta=500000.0,
             tie_embeddings=False),
        hf_family="llama",
    ),
    "llama/llama3_8b": Architecture(
        "Meta Llama-3-8B (config.json of meta-llama/Meta-Llama-3-8B): 8.03B parameters.",
        dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, max_seq_len=8192,
             norm_eps=1e-5, ffn="swiglu", pos_emb="rope", rope_theta=500000.0, tie_embeddings=False),
        hf_family="llama",
        published_params=8.03e9,
    ),
    "qwen/qwen3_nano": Architecture(
        "Qwen3: GQA with per-head QK-RMSNorm, head_dim decoupled from d_model, RoPE theta 1M, tied embeddings.",
        dict(vocab_size=NANO_VOCAB, d_model=256, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=768,
             max_seq_len=512, norm="rmsnorm", norm_eps=1e-6, ffn="swiglu", activation="silu", pos_emb="rope",
             rope_theta=1000000.0, qk_norm=True, tie_embeddings=True),
        hf_family="qwen3",
    ),
    "qwen/qwen3_0_6b": Architecture(
        "Qwen3-0.6B (config.json of Qwen/Qwen3-0.6B): 0.6B parameters (0.44B without embeddings).",
        dict(vocab_size=151936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128, d_ff=3072,
             max_seq_len=40960, norm_eps=1e-6, ffn="swiglu", pos_emb="rope", rope_theta=1000000.0, qk_norm=True,
             tie_embeddings=True),
        hf_family="qwen3",
        published_params=0.596e9,
    ),
    "gemma/gemma_nano": Architecture(
        "Gemma-2: (1+w) RMSNorm, sqrt(d) embedding scale, pre+post norms, tanh soft-caps 50/30, GeGLU (tanh GELU), "
        "local sliding window (128) on every other layer, query_pre_attn_scalar, tied embeddings.",
        dict(vocab_size=NANO_VOCAB, d_model=256, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=1024,
             max_seq_len=512, norm="rmsnorm", norm_eps=1e-6, norm_unit_offset=True, ffn="geglu",
             activation="gelu_tanh", pos_emb="rope", rope_theta=10000.0, sliding_window=128, sliding_window_pattern=2,
             embed_scale=True, post_norms=True, attn_logit_softcap=50.0, final_logit_softcap=30.0,
             query_pre_attn_scalar=64, tie_embeddings=True),
        hf_family="gemma2",
    ),
    "gemma/gemma2_2b": Architecture(
        "Gemma-2-2B (config.json of google/gemma-2-2b): 2.61B parameters.",
        dict(vocab_size=256000, d_model=2304, n_layers=26, n_heads=8, n_kv_heads=4, head_dim=256, d_ff=9216,
             max_seq_len=8192, norm_eps=1e-6, norm_unit_offset=True, ffn="geglu", activation="gelu_tanh",
             pos_emb="rope", rope_theta=10000.0, sliding_window=4096, sliding_window_pattern=2, embed_scale=True,
             post_norms=True, attn_logit_softcap=50.0, final_logit_softcap=30.0, query_pre_attn_scalar=256,
             tie_embeddings=True),
        hf_family="gemma2",
        published_params=2.614e9,
    ),
    "deepseek/v3_nano": Architecture(
        "DeepSeek-V3: MLA (low-rank q and KV, decoupled RoPE key; the cache holds 64+16 numbers per token and layer) "
        "and DeepSeekMoE (16 fine-grained routed experts, top-4 by sigmoid score within the best 2 of 4 groups, "
        "1 shared expert, first layer dense, aux-loss-free bias balancing plus a small sequence-wise aux loss).",
        dict(vocab_size=NANO_VOCAB, d_model=256, n_layers=6, n_heads=8, d_ff=704, max_seq_len=512, norm="rmsnorm",
             norm_eps=1e-6, ffn="moe", activation="silu", attention="mla", pos_emb="rope", rope_theta=10000.0,
             tie_embeddings=False,
             mla=dict(q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
             moe=dict(n_routed_experts=16, n_shared_experts=1, n_experts_per_tok=4, moe_d_ff=128, scoring="sigmoid",
                      norm_topk_prob=True, routed_scaling_factor=2.5, n_group=4, topk_group=2, first_k_dense=1,
                      aux_free_bias_update_rate=0.001, seq_aux_loss_coef=0.0001)),
        hf_family="deepseek_v3",
    ),
    "deepseek/v3_671b": Architecture(
        "DeepSeek-V3 (config.json of deepseek-ai/DeepSeek-V3; YaRN 40x over 4k): 671B parameters, 37B active per token.",
        dict(vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, d_ff=18432, max_seq_len=163840, norm_eps=1e-6,
             ffn="moe", attention="mla", pos_emb="rope", rope_theta=10000.0, tie_embeddings=False,
             rope_scaling={"type": "yarn", "factor": 40.0, "original_max_seq_len": 4096, "beta_fast": 32.0,
                           "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
             mla=dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
             moe=dict(n_routed_experts=256, n_shared_experts=1, n_experts_per_tok=8, moe_d_ff=2048, scoring="sigmoid",
                      norm_topk_prob=True, routed_scaling_factor=2.5, n_group=8, topk_group=4, first_k_dense=3,
                      aux_free_bias_update_rate=0.001, seq_aux_loss_coef=0.0001)),
        hf_family="deepseek_v3",
        published_params=671.0e9,
    ),
    "gemma/gemma1_nano": Architecture(
        "Gemma (1): (1+w) RMSNorm, sqrt(d) embedding scale, GeGLU (tanh GELU) 8x wide, MQA with head_dim 64 "
        "decoupled from d_model, tied embeddings; no post-norms, soft-caps or windows (those came with Gemma-2).",
        dict(vocab_size=NANO_VOCAB, d_model=256, n_layers=6, n_heads=4, n_kv_heads=1, head_dim=64, d_ff=2048,
             max_seq_len=512, norm="rmsnorm", norm_eps=1e-6, norm_unit_offset=True, ffn="geglu",
             activation="gelu_tanh", pos_emb="rope", rope_theta=10000.0, embed_scale=True, tie_embeddings=True),
        hf_family="gemma",
    ),
    "gemma/gemma_2b": Architecture(
        "Gemma-2B (config.json of google/gemma-2b): 2.51B parameters.",
        dict(vocab_size=256000, d_model=2048, n_layers=18, n_heads=8, n_kv_heads=1, head_dim=256, d_ff=16384,
             max_seq_len=8192, norm_eps=1e-6, norm_unit_offset=True, ffn="geglu", activation="gelu_tanh",
             pos_emb="rope", rope_theta=10000.0, embed_scale=True, tie_embeddings=True),
        hf_family="gemma",
        published_params=2.506e9,
    ),
    "gemma/gemma3_nano": Architecture(
        "Gemma-3 (text): Gemma-2's (1+w) norms, embedding scale and pre+post norms, per-head QK-norm instead of "
        "the attention soft-cap, sliding window (128) on five layers of six, local RoPE base 10k and global 1M, MQA.",
        dict(vocab_size=NANO_VOCAB, d_model=256, n_layers=6, n_heads=4, n_kv_heads=1, head_dim=64, d_ff=1536,
             max_seq_len=512, norm="rmsnorm", norm_eps=1e-6, norm_unit_offset=True, ffn="geglu",
             activation="gelu_tanh", pos_emb="rope", rope_theta=1000000.0, rope_local_theta=10000.0,
             sliding_window=128, sliding_window_pattern=6, qk_norm=True, embed_scale=True, post_norms=True,
             query_pre_attn_scalar=64, tie_embeddings=True),
        hf_family="gemma3_text",
    ),
    "gemma/gemma3_1b": Architecture(
        "Gemma-3-1B (config.json of google/gemma-3-1b-pt, text only): 1.0B parameters.",
        dict(vocab_size=262144, d_model=1152, n_layers=26, n_heads=4, n_kv_heads=1, head_dim=256, d_ff=6912,
             max_seq_len=32768, norm_eps=1e-6, norm_unit_offset=True, ffn="geglu", activation="gelu_tanh",
             pos_emb="rope", rope_theta=1000000.0, rope_local_theta=10000.0, sliding_window=512,
             sliding_window_pattern=6, qk_norm=True, embed_scale=True, post_norms=True, query_pre_attn_scalar=256,
             tie_embeddings=True),
        hf_family="gemma3_text",
        published_params=1.0e9,
    ),
    "qwen/qwen2_moe_nano": Architecture(
        "Qwen2-MoE (Qwen1.5-MoE): q/k/v biases, 16 fine-grained experts, top-4 by softmax without renormalising "
        "(norm_topk_prob off), one always-on shared expert four experts wide, gated per token by sigmoid(w . x).",
        dict(vocab_size=NANO_VOCAB, d_model=256, n_layers=6, n_heads=4, n_kv_heads=4, d_ff=256, max_seq_len=512,
             norm="rmsnorm", norm_eps=1e-6, ffn="moe", activation="silu", pos_emb="rope", rope_theta=1000000.0,
             qkv_bias=True, tie_embeddings=False,
             moe=dict(n_routed_experts=16, n_shared_experts=4, shared_expert_gate=True, n_experts_per_tok=4,
                      moe_d_ff=64, scoring="softmax", norm_topk_prob=False)),
        hf_family="qwen2_moe",
    ),
    "qwen/qwen1_5_moe_a2_7b": Architecture(
        "Qwen1.5-MoE-A2.7B (config.json of Qwen/Qwen1.5-MoE-A2.7B, model_type qwen2_moe): 14.3B parameters, "
        "2.7B active.",
        dict(vocab_size=151936, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=5632, max_seq_len=8192,
             norm_eps=1e-6, ffn="moe", pos_emb="rope", rope_theta=1000000.0, qkv_bias=True, tie_embeddings=False,
             moe=dict(n_routed_experts=60, n_shared_experts=4, shared_expert_gate=True, n_experts_per_tok=4,
                      moe_d_ff=1408, scoring="softmax", norm_topk_prob=False)),
        hf_family="qwen2_moe",
        published_params=14.316e9,
    ),
    "qwen/qwen3_moe_nano": Architecture(
        "Qwen3-MoE: Qwen3's QK-norm GQA attention, 32 fine-grained experts, top-4 by softmax renormalised, "
        "no shared expert.",
        dict(vocab_size=NANO_VOCAB, d_model=256, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=512,
             max_seq_len=512, norm="rmsnorm", norm_eps=1e-6, ffn="moe", activation="silu", pos_emb="rope",
             rope_theta=1000000.0, qk_norm=True, tie_embeddings=False,
             moe=dict(n_routed_experts=32, n_experts_per_tok=4, moe_d_ff=64, scoring="softmax", norm_topk_prob=True)),
        hf_family="qwen3_moe",
    ),
    "qwen/qwen3_30b_a3b": Architecture(
        "Qwen3-30B-A3B (config.json of Qwen/Qwen3-30B-A3B): 30.5B parameters, 3.3B active.",
        dict(vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128, d_ff=6144,
             max_seq_len=40960, norm_eps=1e-6, ffn="moe", pos_emb="rope", rope_theta=1000000.0, qk_norm=True,
             tie_embeddings=False,
             moe=dict(n_routed_experts=128, n_experts_per_tok=8, moe_d_ff=768, scoring="softmax", norm_topk_prob=True)),
        hf_family="qwen3_moe",
        published_params=30.53e9,
    ),
    "mixtral/mixtral_nano": Architecture(
        "Mixtral: Mistral's GQA attention with 8 SwiGLU experts per layer, top-2 by softmax renormalised (the "
        "weights of the two chosen sum to 1), no shared expert, RoPE theta 1M.",
        dict(vocab_size=NANO_VOCAB, d_model=256, n_layers=6, n_heads=8, n_kv_heads=2, d_ff=256, max_seq_len=512,
             norm="rmsnorm", norm_eps=1e-5, ffn="moe", activation="silu", pos_emb="rope", rope_theta=1000000.0,
             tie_embeddings=False,
             moe=dict(n_routed_experts=8, n_experts_per_tok=2, moe_d_ff=256, scoring="softmax", norm_topk_prob=True)),
        hf_family="mixtral",
    ),
    "mixtral/mixtral_8x7b": Architecture(
        "Mixtral-8x7B (config.json of mistralai/Mixtral-8x7B-v0.1): 46.7B parameters, 12.9B active.",
        dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, max_seq_len=32768,
             norm_eps=1e-5, ffn="moe", pos_emb="rope", rope_theta=1000000.0, tie_embeddings=False,
             moe=dict(n_routed_experts=8, n_experts_per_tok=2, moe_d_ff=14336, scoring="softmax", norm_topk_prob=True)),
        hf_family="mixtral",
        published_params=46.70e9,
    ),
    "phi/phi3_nano": Architecture(
        "Phi-3: Llama-like MHA with a sliding window on every layer (half the context), SwiGLU; HF stores q|k|v and "
        "gate|up fused (qkv_proj, gate_up_proj), which only the conversion sees.",
        dict(vocab_size=NANO_VOCAB, d_model=256, n_layers=6, n_heads=8, n_kv_heads=8, d_ff=704, max_seq_len=512,
             norm="rmsnorm", norm_eps=1e-5, ffn="swiglu", activation="silu", pos_emb="rope", rope_theta=10000.0,
             sliding_window=256, tie_embeddings=False, hf_family="phi3"),
        hf_family="phi3",
    ),
    "phi/phi3_mini": Architecture(
        "Phi-3-mini-4k (config.json of microsoft/Phi-3-mini-4k-instruct): 3.82B parameters.",
        dict(vocab_size=32064, d_model=3072, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=8192, max_seq_len=4096,
             norm_eps=1e-5, ffn="swiglu", pos_emb="rope", rope_theta=10000.0, sliding_window=2047,
             tie_embeddings=False, hf_family="phi3"),
        hf_family="phi3",
        published_params=3.821e9,
    ),
    "olmo/olmo2_nano": Architecture(
        "OLMo-2: no input norms; RMSNorm on the output of attention and of the MLP before each residual add, "
        "q/k RMSNorm over the whole projection (not per head), RoPE theta 500k, untied head.",
        dict(vocab_size=NANO_VOCAB, d_model=256, n_layers=6, n_heads=8, n_kv_heads=8, d_ff=704, max_seq_len=512,
             norm="rmsnorm", norm_eps=1e-6, ffn="swiglu", activation="silu", pos_emb="rope", rope_theta=500000.0,
             pre_norms=False, post_norms=True, qk_norm=True, qk_norm_scope="all", tie_embeddings=False),
        hf_family="olmo2",
    ),
    "olmo/olmo2_7b": Architecture(
        "OLMo-2-7B (config.json of allenai/OLMo-2-1124-7B): 7.30B parameters.",
        dict(vocab_size=100352, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008, max_seq_len=4096,
             norm_eps=1e-6, ffn="swiglu", pos_emb="rope", rope_theta=500000.0, pre_norms=False, post_norms=True,
             qk_norm=True, qk_norm_scope="all", tie_embeddings=False),
        hf_family="olmo2",
        published_params=7.30e9,
    ),
    "gpt2/gpt2_small": Architecture(
        "GPT-2: LayerNorm, learned absolute positions, GELU (tanh) MLP, biases everywhere, tied embeddings; "
        "the architecture at nano width (the published 124M GPT-2 small is in gpt2/gpt2_124m/model.yaml).",
        dict(vocab_size=NANO_VOCAB, d_model=256, n_layers=6, n_heads=8, d_ff=1024, max_seq_len=512, norm="layernorm",
             norm_eps=1e-5, ffn="gelu_mlp", activation="gelu_tanh", pos_emb="learned", qkv_bias=True,
             attn_out_bias=True, mlp_bias=True, tie_embeddings=True),
        hf_family="gpt2",
    ),
    "gpt2/gpt2_124m": Architecture(
        "OpenAI GPT-2 small (config.json of openai-community/gpt2): 124M parameters.",
        dict(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=1024, norm="layernorm",
             norm_eps=1e-5, ffn="gelu_mlp", activation="gelu_tanh", pos_emb="learned", qkv_bias=True,
             attn_out_bias=True, mlp_bias=True, tie_embeddings=True),
        hf_family="gpt2",
        published_params=124.4e6,
    ),
}


def names() -> list[str]:
    """Every named architecture, e.g. 'llama/llama3_nano', 'deepseek/v3_671b'."""
    return list(ARCHITECTURES)


def architecture(name: str) -> Architecture:
    """The table entry for ``name``; UserError naming the closest valid name if there is none."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    close = difflib.get_close_matches(name, names(), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UserError(f"unknown architecture {name!r}.{hint} Valid names: {', '.join(names())}")


def get(name: str) -> ModelConfig:
    """The ModelConfig of a named architecture (a fresh copy: changing it leaves the table alone)."""
    return ModelConfig(**copy.deepcopy(architecture(name).values))

"""Parity with HuggingFace transformers: same weights -> same logits (fp32, <= 1e-4).

Every named architecture (model/architectures.py) is tested at a tiny size made by
``shrink``, and so is each hand-written config in CONFIGS with a trait no named
architecture has (COVERED_BY lists the others).
"""
from dataclasses import fields, replace

import pytest
import torch

from model import ModelConfig, Transformer, architectures
from model.hf_interop import family_of, from_hf, to_hf

transformers = pytest.importorskip("transformers")


def _even(x: float) -> int:
    return max(2, 2 * round(x / 2))  # RoPE rotates channel pairs


def shrink(cfg: ModelConfig, d_model: int = 64, n_layers: int = 2, vocab_size: int = 128, max_seq_len: int = 64,
           window: int = 8, experts_per_group: int = 4) -> ModelConfig:
    """A tiny ModelConfig with cfg's structure, for a parity test that runs in well under a second.

    Kept: every switch (attention and FFN kind, norms, biases, softcaps, tying, RoPE theta and
    scaling), MHA/MQA/GQA and the GQA ratio, attention width / d_model (Qwen3's and Gemma's
    head_dim decoupled from d_model), d_ff / d_model, MLA ranks / d_model, MoE groups, top
    groups, shared experts and routing, dense layers before the MoE ones, the window pattern.
    Cannot survive: the window length (8, so the 40-token test reaches past it), the layer
    count (a window pattern or dense-first MoE still gets one layer of each kind), the number
    of experts per group (at most 4), a top-k larger than the experts of the top groups, and
    a query_pre_attn_scalar that differs from head_dim (CONFIGS has one).
    """
    scale = d_model / cfg.d_model  # widths (d_model, d_ff, latent ranks) shrink by this
    groups = cfg.n_heads // cfg.n_kv_heads  # query heads per KV head
    if cfg.n_kv_heads == 1:  # MQA: the ratio is the head count; keep one KV head
        n_kv, n_heads = 1, min(cfg.n_heads, 4)
    else:  # MHA and GQA: the ratio exactly, over at least two KV heads
        n_kv = min(cfg.n_kv_heads, max(2, 4 // groups))
        n_heads = n_kv * groups
    per_head = scale * cfg.n_heads / n_heads  # head widths shrink by this (attention width / d_model kept)
    small = {**cfg.to_dict(), "vocab_size": vocab_size, "d_model": d_model, "n_heads": n_heads, "n_kv_heads": n_kv,
             "head_dim": _even(cfg.head_dim * per_head), "d_ff": round(cfg.d_ff * scale), "max_seq_len": max_seq_len}
    if cfg.sliding_window is not None:
        small["sliding_window"] = min(cfg.sliding_window, window)
    if cfg.query_pre_attn_scalar is not None:
        small["query_pre_attn_scalar"] = cfg.query_pre_attn_scalar * small["head_dim"] / cfg.head_dim
    if cfg.mla is not None:
        small["mla"], small["head_dim"] = _shrink_mla(cfg.mla, scale, per_head), None  # head_dim follows the mla block
    first_dense = 0
    if cfg.moe is not None:
        small["moe"] = _shrink_moe(cfg.moe, scale, experts_per_group)
        first_dense = small["moe"]["first_k_dense"]
    small["n_layers"] = max(n_layers, cfg.sliding_window_pattern, first_dense + 1)
    return ModelConfig(**small)


def _shrink_mla(m: dict, scale: float, per_head: float) -> dict:
    """Latent ranks shrink with d_model, per-head widths with the heads; no q compression stays none."""
    return {"q_lora_rank": m["q_lora_rank"] and round(m["q_lora_rank"] * scale),
            "kv_lora_rank": round(m["kv_lora_rank"] * scale),
            "qk_nope_head_dim": round(m["qk_nope_head_dim"] * per_head),
            "qk_rope_head_dim": _even(m["qk_rope_head_dim"] * per_head),
            "v_head_dim": round(m["v_head_dim"] * per_head)}


def _shrink_moe(m: dict, scale: float, experts_per_group: int) -> dict:
    """Same groups, top groups, shared experts and routing; fewer experts per group, one dense layer."""
    per_group = min(m["n_routed_experts"] // m["n_group"], experts_per_group)
    return {**m, "n_routed_experts": per_group * m["n_group"],
            "n_experts_per_tok": min(m["n_experts_per_tok"], per_group * m["topk_group"]),
            # a multiple of 4: transformers' grouped expert matmul needs rows of 16 bytes
            "moe_d_ff": 4 * round(m["moe_d_ff"] * scale / 4),
            "first_k_dense": min(m["first_k_dense"], 1)}


TINY = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
# Tiny hand-written configs; the KV-cache, engine and speculative-decoding tests use them too.
CONFIGS = {
    "llama3": ModelConfig(**TINY, n_kv_heads=2, d_ff=96, rope_theta=500000.0, norm_eps=1e-5),
    "llama_mqa_tied": ModelConfig(**TINY, n_kv_heads=1, d_ff=96, tie_embeddings=True),
    "llama3_rope_scaled": ModelConfig(
        **TINY, n_kv_heads=2, d_ff=96,
        rope_scaling={"type": "llama3", "factor": 8.0, "original_max_seq_len": 16, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    ),
    "llama_yarn": ModelConfig(**TINY, n_kv_heads=2, d_ff=96, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_seq_len": 16}),
    "qwen3": ModelConfig(**TINY, n_kv_heads=2, d_ff=96, qk_norm=True, head_dim=32, norm_eps=1e-6),
    "qwen2": ModelConfig(**TINY, n_kv_heads=2, d_ff=96, qkv_bias=True),
    "mistral": ModelConfig(**TINY, n_kv_heads=2, d_ff=96, sliding_window=8),
    # query_pre_attn_scalar != head_dim, as in Gemma-2-27B (144 vs 128); the named Gemmas have them equal.
    "gemma2": ModelConfig(
        **TINY, n_kv_heads=2, head_dim=32, d_ff=96, norm_eps=1e-6, norm_unit_offset=True, ffn="geglu",
        activation="gelu_tanh", embed_scale=True, post_norms=True, attn_logit_softcap=50.0, final_logit_softcap=30.0,
        query_pre_attn_scalar=24, sliding_window=8, sliding_window_pattern=2, tie_embeddings=True,
    ),
    # MLA + DeepSeekMoE: dense first layer, shared expert, sigmoid group-limited routing, YaRN with mscale.
    "deepseek_v3": ModelConfig(
        **{**TINY, "n_layers": 3}, d_ff=96, norm_eps=1e-6, attention="mla",
        mla=dict(q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
        ffn="moe",
        moe=dict(n_routed_experts=8, n_shared_experts=1, n_experts_per_tok=2, moe_d_ff=32, scoring="sigmoid",
                 n_group=4, topk_group=2, first_k_dense=1, routed_scaling_factor=2.5),
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_seq_len": 16, "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
    # MLA without query compression and with dense FFNs (DeepSeek-V2-Lite-like attention).
    "deepseek_v3_mla_dense": ModelConfig(
        **TINY, d_ff=96, norm_eps=1e-6, attention="mla",
        mla=dict(q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=16, v_head_dim=12),
    ),
    "gpt2": ModelConfig(
        **TINY, norm="layernorm", ffn="gelu_mlp", activation="gelu_tanh", pos_emb="learned",
        qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True,
    ),
}
# Hand-written configs a named architecture already covers: not parity-tested twice.
COVERED_BY = {"llama3": "llama/llama3_nano", "qwen3": "qwen/qwen3_0_6b", "gpt2": "gpt2/gpt2_small",
              "deepseek_v3": "deepseek/v3_671b"}
CASES = {**{name: shrink(architectures.get(name)) for name in architectures.names()},
         **{name: cfg for name, cfg in CONFIGS.items() if name not in COVERED_BY}}


def randomize(model: torch.nn.Module) -> None:
    # Non-trivial norms, biases and MoE balance biases so a mis-mapped weight cannot hide
    # behind ones and zeros.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
        for name, b in model.named_buffers():
            # DeepSeek's selection bias (HF: e_score_correction_bias); softmax-routed families have none
            if name.endswith("expert_bias") and model.cfg.moe["scoring"] == "sigmoid":
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def hf_model(hf_state, hf_config):
    """Load through the real path: files on disk + from_pretrained (key conversions included)."""
    import json
    import tempfile

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        save_file({k: v.contiguous() for k, v in hf_state.items()}, f"{d}/model.safetensors", metadata={"format": "pt"})
        with open(f"{d}/config.json", "w") as f:
            json.dump(hf_config, f)
        auto = (transformers.LlavaForConditionalGeneration if hf_config.get("model_type") == "llava"
                else transformers.AutoModelForCausalLM)  # a vision-language model exports as a LLaVA
        model, info = auto.from_pretrained(d, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    return model.eval()


@pytest.mark.parametrize("name", architectures.names())
def test_shrink_keeps_structure(name):
    cfg, small = architectures.get(name), CASES[name]
    sizes = {"vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len",
             "sliding_window", "query_pre_attn_scalar", "mla", "moe"}
    for f in fields(ModelConfig):
        if f.name not in sizes:
            assert getattr(small, f.name) == getattr(cfg, f.name), f.name
    if cfg.n_kv_heads > 1:  # MQA keeps one KV head over at most 4 query heads (shrink's docstring)
        assert small.n_heads // small.n_kv_heads == cfg.n_heads // cfg.n_kv_heads  # GQA ratio
    assert (small.n_kv_heads == 1) == (cfg.n_kv_heads == 1)  # MQA stays MQA
    assert (small.n_heads * small.head_dim == small.d_model) == (cfg.n_heads * cfg.head_dim == cfg.d_model)
    layer_kinds = [{c.layer_window(i) is None for i in range(c.n_layers)} for c in (small, cfg)]
    assert layer_kinds[0] == layer_kinds[1]  # windowed layers, global layers or both, as in cfg
    if cfg.mla is not None:
        assert bool(small.mla["q_lora_rank"]) == bool(cfg.mla["q_lora_rank"])  # query compression or not
    if cfg.moe is not None:
        for key in ("n_shared_experts", "scoring", "norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group"):
            assert small.moe[key] == cfg.moe[key], key
        assert (small.moe["first_k_dense"] > 0) == (cfg.moe["first_k_dense"] > 0)
        assert small.moe["first_k_dense"] < small.n_layers  # at least one MoE layer
    assert family_of(small) == architectures.architecture(name).hf_family


def test_covered_configs_have_a_named_architecture_of_their_family():
    for name, named in COVERED_BY.items():
        assert family_of(CONFIGS[name]) == architectures.architecture(named).hf_family, name


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_hf(name):
    torch.manual_seed(0)
    cfg = CASES[name]
    ours = Transformer(cfg).eval()
    randomize(ours)
    hf_state, hf_config = to_hf(ours.state_dict(), cfg)
    theirs = hf_model(hf_state, hf_config)
    idx = torch.randint(0, cfg.vocab_size, (2, 40))  # longer than the sliding window / old context
    with torch.no_grad():
        diff = (ours(idx) - theirs(idx).logits).abs().max().item()
    assert diff <= 1e-4, f"{name}: max abs logit diff {diff}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_from_hf(name):
    cfg = CASES[name]
    ours = Transformer(cfg)
    randomize(ours)
    hf_state, hf_config = to_hf(ours.state_dict(), cfg)
    back_state, back_cfg = from_hf(hf_state, hf_config)
    # everything, the MoE balancing rates too (as extra config keys); the import notes the family
    assert back_cfg == replace(cfg, hf_family=hf_config["model_type"])
    again = Transformer(back_cfg)
    again.load_state_dict(back_state)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


@pytest.mark.parametrize("name", architectures.names())
def test_export_hf_loads_with_auto_model(tmp_path, name):
    from model.hf_interop import export_hf, load_hf_dir

    cfg = CASES[name]
    ours = Transformer(cfg).eval()
    randomize(ours)
    export_hf(ours, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() <= 1e-4
    state, back_cfg = load_hf_dir(tmp_path / "hf")
    assert back_cfg == replace(cfg, hf_family=architectures.architecture(name).hf_family)


@pytest.mark.parametrize("name", [*architectures.names(), "mistral"])
def test_cached_greedy_matches_hf_generate(name):
    """32 greedy tokens through our KV cache, and through the inference engine (paged cache,
    continuous batching), == HF generate (its own cache implementation)."""
    from inference.engine import LLMEngine
    from inference.sampling_params import SamplingParams
    from tests.model.test_kv_cache import greedy_cached

    torch.manual_seed(3)
    cfg = CASES[name]
    ours = Transformer(cfg).eval()
    randomize(ours)
    theirs = hf_model(*to_hf(ours.state_dict(), cfg))
    prompt = torch.randint(0, cfg.vocab_size, (2, 6))
    with torch.no_grad():
        want = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, min_new_tokens=32,
                               do_sample=False, pad_token_id=0, eos_token_id=None)[:, 6:]
        got = greedy_cached(ours, prompt, 32)
    assert torch.equal(got, want)
    outs = LLMEngine(ours, block_size=4).generate(prompt.tolist(), SamplingParams(max_tokens=32, temperature=0.0,
                                                                                  ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == want.tolist()


def test_deepseek_without_rope_interleave():
    """rope_interleave=False checkpoints keep the halves layout: imported without a permutation."""
    from model.hf_deepseek import reorder_rope as _reorder_rope

    cfg = CONFIGS["deepseek_v3_mla_dense"]
    ours = Transformer(cfg).eval()
    randomize(ours)
    # pre-apply the import permutation so export's inverse cancels it: HF gets our layout as is
    hf_state, hf_config = to_hf(_reorder_rope(ours.state_dict(), cfg, to_hf=False), cfg)
    hf_config["rope_interleave"] = False
    theirs = hf_model(hf_state, hf_config)
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() <= 1e-4
    back, _ = from_hf(hf_state, hf_config)
    assert all(torch.equal(v, back[k]) for k, v in ours.state_dict().items())

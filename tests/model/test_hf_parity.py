"""Parity with HuggingFace transformers: same weights -> same logits (fp32, <= 1e-4)."""
import pytest
import torch

from model import ModelConfig, Transformer
from model.hf_interop import from_hf, to_hf

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
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


def randomize(model: torch.nn.Module) -> None:
    # Non-trivial norms, biases and MoE balance biases so a mis-mapped weight cannot hide
    # behind ones and zeros.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
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
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            d, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    return model.eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_hf(name):
    torch.manual_seed(0)
    cfg = CONFIGS[name]
    ours = Transformer(cfg).eval()
    randomize(ours)
    hf_state, hf_config = to_hf(ours.state_dict(), cfg)
    theirs = hf_model(hf_state, hf_config)
    idx = torch.randint(0, cfg.vocab_size, (2, 40))  # longer than the sliding window / old context
    with torch.no_grad():
        diff = (ours(idx) - theirs(idx).logits).abs().max().item()
    assert diff <= 1e-4, f"{name}: max abs logit diff {diff}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_from_hf(name):
    cfg = CONFIGS[name]
    ours = Transformer(cfg)
    randomize(ours)
    hf_state, hf_config = to_hf(ours.state_dict(), cfg)
    back_state, back_cfg = from_hf(hf_state, hf_config)
    assert back_cfg == cfg
    again = Transformer(back_cfg)
    again.load_state_dict(back_state)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


@pytest.mark.parametrize("name", ["llama3", "gpt2", "qwen3", "gemma2", "deepseek_v3"])
def test_export_hf_loads_with_auto_model(tmp_path, name):
    from model.hf_interop import export_hf, load_hf_dir

    cfg = CONFIGS[name]
    ours = Transformer(cfg).eval()
    randomize(ours)
    export_hf(ours, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() <= 1e-4
    state, back_cfg = load_hf_dir(tmp_path / "hf")
    assert back_cfg == cfg


@pytest.mark.parametrize("name", ["llama3", "qwen3", "mistral", "gemma2", "gpt2", "deepseek_v3"])
def test_cached_greedy_matches_hf_generate(name):
    """32 greedy tokens through our KV cache == HF generate (its own cache implementation)."""
    from tests.model.test_kv_cache import greedy_cached

    torch.manual_seed(3)
    cfg = CONFIGS[name]
    ours = Transformer(cfg).eval()
    randomize(ours)
    theirs = hf_model(*to_hf(ours.state_dict(), cfg))
    prompt = torch.randint(0, cfg.vocab_size, (2, 6))
    with torch.no_grad():
        want = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, min_new_tokens=32,
                               do_sample=False, pad_token_id=0, eos_token_id=None)[:, 6:]
        got = greedy_cached(ours, prompt, 32)
    assert torch.equal(got, want)


def test_deepseek_without_rope_interleave():
    """rope_interleave=False checkpoints keep the halves layout: imported without a permutation."""
    from model.hf_families import _reorder_rope

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

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
    "gpt2": ModelConfig(
        **TINY, norm="layernorm", ffn="gelu_mlp", activation="gelu_tanh", pos_emb="learned",
        qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True,
    ),
}


def randomize(model: torch.nn.Module) -> None:
    # Non-trivial norms and biases so a mis-mapped weight cannot hide behind ones and zeros.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 and p.shape[0] in (32, 64) else 0.0))


def hf_model(hf_state, hf_config):
    cfg = transformers.AutoConfig.for_model(**hf_config)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in m or (hf_config.get("tie_word_embeddings") and "lm_head" in m) for m in missing), missing
    if hf_config.get("tie_word_embeddings"):
        model.tie_weights()
    return model


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


@pytest.mark.parametrize("name", ["llama3", "gpt2", "qwen3"])
def test_export_hf_loads_with_auto_model(tmp_path, name):
    from model.hf_interop import export_hf, load_hf_dir

    cfg = CONFIGS[name]
    ours = Transformer(cfg).eval()
    randomize(ours)
    export_hf(ours, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() <= 1e-4
    state, back_cfg = load_hf_dir(tmp_path / "hf")
    assert back_cfg == cfg

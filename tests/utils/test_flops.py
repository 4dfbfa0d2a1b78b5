"""FLOPs per token (PaLM's 6N + attention), MoE's routed share, windows, and MFU."""
import pytest
import torch

from model import ModelConfig, Transformer
from tests.utils.helpers import MOE, tiny_model
from utils.flops import active_matmul_params, flops_per_token, mfu


def test_flops_per_token_dense_matches_the_palm_formula():
    model = tiny_model()
    cfg = model.cfg
    d, L, H, Hkv, Dh, ff, V = cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    per_layer = d * H * Dh + 2 * d * Hkv * Dh + H * Dh * d + 3 * d * ff
    n = L * per_layer + d * V  # the LM head is a matmul; the embedding lookup is not
    assert active_matmul_params(model) == n
    assert flops_per_token(model, 128) == 6 * n + 12 * L * H * Dh * 128


def test_flops_counts_only_routed_experts_and_windows():
    torch.manual_seed(0)
    model = Transformer(MOE)
    dense = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n)
    experts = sum(p.numel() for p in model.layers[1].ffn.experts.parameters())
    assert active_matmul_params(model) == pytest.approx(dense - experts + experts * 2 / 8)
    win = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, sliding_window=16))
    full = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4))
    assert flops_per_token(full, 64) - flops_per_token(win, 64) == 12 * 2 * 4 * 8 * (64 - 16)


def test_mfu():
    assert mfu(1000.0, 6e9, 989e12) == pytest.approx(1000 * 6e9 / 989e12)
    assert mfu(1000.0, 6e9, 989e12, n_devices=2) == pytest.approx(1000 * 6e9 / 989e12 / 2)
    assert mfu(1000.0, 6e9, None) is None

"""MoE models in the loop (aux loss, bias updates, load logging) and the FLOPs/MFU arithmetic."""
import pytest
import torch

from model import ModelConfig, Transformer
from model.loss import with_aux_loss
from pretrain.train import lm_loss
from tests.pretrain.helpers import SEQ, StreamLoader, tiny_model
from utils.flops import active_matmul_params, flops_per_token, mfu
from utils.optim import OptimConfig
from utils.train_loop import TrainConfig, train

MOE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, ffn="moe", max_seq_len=64,
                  moe=dict(n_routed_experts=8, n_shared_experts=1, n_experts_per_tok=2, moe_d_ff=16, first_k_dense=1,
                           aux_free_bias_update_rate=0.01, seq_aux_loss_coef=0.01))


def test_moe_model_trains_with_aux_loss_bias_updates_and_load_metrics(tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Transformer(MOE)
    moe = model.layers[1].ffn
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=3, batch_size=2, seq_len=SEQ, device="cpu", progress=False,
                      log_every=1)
    res = train(model, StreamLoader(2), with_aux_loss(lm_loss), cfg, OptimConfig(lr=1e-2, warmup_steps=0))
    rec = res.history[-1]
    assert rec["aux_loss"] > 0 and rec["loss"] == pytest.approx(rec["ce_loss"] + rec["aux_loss"], rel=1e-5)
    assert rec["expert_load_max_over_mean"] >= 1.0
    assert moe.expert_bias.abs().sum() > 0  # update_bias() ran after the optimizer steps


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

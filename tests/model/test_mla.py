"""MLA: the absorbed (latent-space) path equals the naive one, the cache holds only the
latent and the rope key, and the DeepSeek YaRN softmax scale follows the formula."""
import math

import pytest
import torch

from model import KVCache, ModelConfig, Transformer
from model.mla import MLAttention, mla_softmax_scale

MLA = dict(q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12)


def make(**kw):
    base = dict(vocab_size=64, d_model=48, n_layers=2, n_heads=4, max_seq_len=64, attention="mla", mla=MLA)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**base, **kw})).eval()


@pytest.fixture
def path():
    """Force MLAttention's path for one test, restore auto after."""
    yield lambda p: setattr(MLAttention, "path", p)
    MLAttention.path = None


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_absorbed_equals_naive_full_sequence(path, q_lora_rank):
    model = make(mla={**MLA, "q_lora_rank": q_lora_rank})
    idx = torch.randint(0, 64, (2, 20))
    path("naive")
    naive = model(idx)
    path("absorbed")
    absorbed = model(idx)
    assert (naive - absorbed).abs().max().item() < 1e-5


def test_absorbed_equals_naive_gradients(path):
    idx = torch.randint(0, 64, (2, 12))
    grads = []
    for p in ("naive", "absorbed"):
        model = make()
        path(p)
        model(idx).logsumexp(-1).mean().backward()
        grads.append({n: w.grad.clone() for n, w in model.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_decode_uses_absorbed_path_and_matches_full(monkeypatch):
    model = make()
    calls = []
    orig = MLAttention._attend_absorbed
    monkeypatch.setattr(MLAttention, "_attend_absorbed", lambda self, *a: calls.append(1) or orig(self, *a))
    idx = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(24)
        prefill = model(idx[:, :10], cache=cache)
        assert not calls  # prefill (no earlier keys) takes the naive path
        steps = [model(idx[:, i : i + 1], cache=cache) for i in range(10, 24)]
    assert len(calls) == 14 * 2  # every decode step, every layer
    assert (torch.cat([prefill, *steps], 1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype,nbytes", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_cache_holds_only_latent_and_rope_key(dtype, nbytes):
    model = make().to(dtype)
    cache = KVCache(16)
    with torch.no_grad():
        model(torch.randint(0, 64, (3, 5)), cache=cache)
    for layer, bufs in cache.store.items():
        assert [tuple(b.shape) for b in bufs] == [(3, 1, 16, MLA["kv_lora_rank"]), (3, 1, 16, MLA["qk_rope_head_dim"])]
    expected = (MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"]) * 2 * nbytes  # 2 layers
    assert cache.nbytes_per_token() == expected


def test_yarn_mscale_softmax_scale():
    yarn = {"type": "yarn", "factor": 40.0, "original_max_seq_len": 16, "mscale": 1.0, "mscale_all_dim": 1.0}
    cfg = ModelConfig(vocab_size=64, d_model=48, n_heads=4, attention="mla", mla=MLA, rope_scaling=yarn)
    m = 0.1 * 1.0 * math.log(40.0) + 1.0
    assert mla_softmax_scale(cfg) == pytest.approx((8 + 4) ** -0.5 * m * m)
    plain = ModelConfig(vocab_size=64, d_model=48, n_heads=4, attention="mla", mla=MLA)
    assert mla_softmax_scale(plain) == pytest.approx(12**-0.5)
    assert cfg.rotary_dim == 4 and cfg.head_dim == 12  # only the decoupled part rotates


def test_sliding_window_mla_cache_matches_full():
    model = make(sliding_window=6)
    idx = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(20)
        parts = [model(idx[:, :4], cache=cache)] + [model(idx[:, i : i + 1], cache=cache) for i in range(4, 20)]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5

"""Sliding-window attention: the window is exact, also through the KV cache over long decodes."""
import pytest
import torch

from model import KVCache, ModelConfig, Transformer

W = 6


def windowed(n_layers=1, pattern=1, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, max_seq_len=128,
                      sliding_window=W, sliding_window_pattern=pattern, **kw)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("kw", [{}, {"attn_logit_softcap": 5.0}])  # fused SDPA path and explicit path
def test_one_layer_sees_exactly_the_window(kw):
    model = windowed(**kw)
    idx = torch.randint(0, 64, (1, 20))
    changed = idx.clone()
    changed[0, 5] = (idx[0, 5] + 1) % 64
    with torch.no_grad():
        a, b = model(idx), model(changed)
    diff = (a - b).abs().amax(-1)[0]
    # query i sees keys i-W+1..i: token 5 reaches queries 5..5+W-1 and no later one
    assert (diff[5 : 5 + W] > 0).all() and (diff[5 + W :] == 0).all() and (diff[:5] == 0).all()


@pytest.mark.parametrize("pattern", [1, 2])  # all windowed (Mistral) / alternating (Gemma-2)
def test_long_decode_through_cache_matches_full(pattern):
    model = windowed(n_layers=2, pattern=pattern)
    idx = torch.randint(0, 64, (2, 60))  # 10 windows long
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(60)
        parts = [model(idx[:, :9], cache=cache)] + [model(idx[:, i : i + 1], cache=cache) for i in range(9, 60)]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


def test_windowed_decode_step_ignores_keys_outside_window():
    # One decode step at position 40 must not depend on cache entries older than the window.
    model = windowed()
    idx = torch.randint(0, 64, (1, 41))
    with torch.no_grad():
        cache = KVCache(41)
        model(idx[:, :40], cache=cache)
        cache.store[0][0][..., : 40 - W + 1, :] = 1e3  # corrupt keys the query must not see
        cache.store[0][1][..., : 40 - W + 1, :] = 1e3
        step = model(idx[:, 40:], cache=cache)
    assert (step - model(idx)[:, 40:]).abs().max().item() < 1e-5

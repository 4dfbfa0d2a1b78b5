"""Causal linear attention: chunked parallel form == recurrent form == quadratic definition."""
import pytest
import torch

from model import KVCache, ModelConfig, Transformer
from model.linear_attention import feature_map, linear_attention_parallel, linear_attention_recurrent


def quadratic(q, k, v):
    """The definition: y_i = sum_{j<=i} (phi_q_i . phi_k_j) v_j / sum_{j<=i} phi_q_i . phi_k_j."""
    T = q.shape[2]
    a = (q @ k.transpose(-2, -1)).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), 0.0)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("T,chunk", [(1, 4), (13, 4), (16, 16), (37, 8)])
def test_parallel_equals_recurrent_equals_definition(T, chunk):
    torch.manual_seed(0)
    q, k = feature_map(torch.randn(2, 3, T, 8, dtype=torch.float64)), feature_map(torch.randn(2, 3, T, 8, dtype=torch.float64))
    v = torch.randn(2, 3, T, 5, dtype=torch.float64)
    y_par, (S_par, z_par) = linear_attention_parallel(q, k, v, chunk=chunk)
    y_rec, (S_rec, z_rec) = linear_attention_recurrent(q, k, v)
    assert torch.allclose(y_par, y_rec, atol=1e-10) and torch.allclose(y_par, quadratic(q, k, v), atol=1e-10)
    assert torch.allclose(S_par, S_rec, atol=1e-10) and torch.allclose(z_par, z_rec, atol=1e-10)


def test_state_carries_across_calls():
    torch.manual_seed(1)
    q, k = feature_map(torch.randn(1, 2, 20, 4)), feature_map(torch.randn(1, 2, 20, 4))
    v = torch.randn(1, 2, 20, 4)
    whole, _ = linear_attention_parallel(q, k, v, chunk=8)
    first, state = linear_attention_parallel(q[:, :, :9], k[:, :, :9], v[:, :, :9], chunk=8)
    rest, _ = linear_attention_parallel(q[:, :, 9:], k[:, :, 9:], v[:, :, 9:], state, chunk=8)
    assert torch.allclose(torch.cat([first, rest], 2), whole, atol=1e-5)


@pytest.mark.parametrize("pos_emb", ["none", "rope"])
def test_model_decode_with_recurrent_state_matches_full(pos_emb):
    torch.manual_seed(2)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                      attention="linear", pos_emb=pos_emb)
    model = Transformer(cfg).eval()
    model.layers[0].attn.chunk = 8  # several chunks in the 70-token prefix
    idx = torch.randint(0, 64, (2, 90))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(90)
        parts = [model(idx[:, :70], cache=cache)] + [model(idx[:, i : i + 1], cache=cache) for i in range(70, 90)]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5
    assert set(cache.states) == {0, 1} and not cache.store  # state only, nothing grows with length


def test_is_causal():
    torch.manual_seed(3)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, attention="linear", pos_emb="none")).eval()
    idx = torch.randint(0, 64, (1, 12))
    changed = idx.clone()
    changed[0, 8] = (idx[0, 8] + 1) % 64
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :8], b[:, :8]) and not torch.allclose(a[:, 8:], b[:, 8:])

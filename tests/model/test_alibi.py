"""ALiBi: slopes and biased attention against BLOOM in transformers and a hand computation."""
import math

import pytest
import torch

from model import KVCache, ModelConfig, Transformer
from model.attention import Attention, AttnMask, alibi_slopes

bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")


@pytest.mark.parametrize("n_heads", [1, 4, 6, 12, 16])
def test_slopes_match_bloom(n_heads):
    assert torch.allclose(alibi_slopes(n_heads), bloom._get_alibi_slopes(n_heads, torch.device("cpu")).float())


def test_slopes_by_hand():
    # 8 heads: 2^-1, 2^-2, ..., 2^-8; 6 heads: the 4-head slopes then every other 8-head slope
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)]))
    assert torch.allclose(alibi_slopes(6), torch.tensor([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]))


def alibi_attention(n_heads: int) -> Attention:
    cfg = ModelConfig(vocab_size=32, d_model=48, n_heads=n_heads, pos_emb="alibi", qkv_bias=True, attn_out_bias=True)
    torch.manual_seed(0)
    attn = Attention(cfg, 0)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return attn


@pytest.mark.parametrize("n_heads", [4, 6])
def test_attention_matches_bloom_attention(n_heads):
    attn = alibi_attention(n_heads)
    cfg = bloom.BloomConfig(hidden_size=48, n_head=n_heads, hidden_dropout=0.0, attention_dropout=0.0)
    theirs = bloom.BloomAttention(cfg, layer_idx=0).eval()
    D = 48 // n_heads
    with torch.no_grad():  # BLOOM's fused projection is laid out per head as [q | k | v]
        w = torch.stack([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).view(3, n_heads, D, 48)
        b = torch.stack([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]).view(3, n_heads, D)
        theirs.query_key_value.weight.copy_(w.transpose(0, 1).reshape(3 * 48, 48))
        theirs.query_key_value.bias.copy_(b.transpose(0, 1).reshape(3 * 48))
        theirs.dense.weight.copy_(attn.o_proj.weight)
        theirs.dense.bias.copy_(attn.o_proj.bias)
    B, T = 2, 11
    x = torch.randn(B, T, 48)
    pos = torch.arange(T).expand(B, T)
    causal = torch.full((T, T), torch.finfo(torch.float32).min).triu(1).expand(B, 1, T, T)
    alibi = bloom.build_alibi_tensor(torch.ones(B, T), n_heads, torch.float32)
    with torch.no_grad():
        ours = attn(x, None, AttnMask(pos, pos, None))
        ref, _ = theirs(x, torch.zeros_like(x), alibi, causal)
    assert (ours - ref).abs().max().item() < 1e-5


def test_attention_by_hand():
    attn = alibi_attention(4)
    T = 5
    x = torch.randn(1, T, 48)
    pos = torch.arange(T)[None]
    with torch.no_grad():
        ours = attn(x, None, AttnMask(pos, pos, None))
        q = attn.q_proj(x).view(T, 4, 12)
        k = attn.k_proj(x).view(T, 4, 12)
        v = attn.v_proj(x).view(T, 4, 12)
        heads = torch.zeros(T, 4, 12)
        for h in range(4):
            m = 2 ** (-8 / 4 * (h + 1))
            for i in range(T):
                logits = torch.tensor([q[i, h] @ k[j, h] / math.sqrt(12) - m * (i - j) for j in range(i + 1)])
                heads[i, h] = logits.softmax(0) @ v[: i + 1, h]
        ref = attn.o_proj(heads.reshape(1, T, 48))
    assert (ours - ref).abs().max().item() < 1e-5


def test_alibi_model_cache_matches_full():
    torch.manual_seed(1)
    model = Transformer(ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, pos_emb="alibi")).eval()
    idx = torch.randint(0, 32, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(20)
        parts = [model(idx[:, :7], cache=cache)] + [model(idx[:, i : i + 1], cache=cache) for i in range(7, 20)]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5

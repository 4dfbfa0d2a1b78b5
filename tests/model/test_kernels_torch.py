"""The PyTorch side of model/kernels (no Triton needed): references equal the model's own
modules bit for bit, chunked cross-entropy equals F.cross_entropy (loss and grads), the paged
attention reference equals SDPA over a contiguous cache, and the API falls back on CPU."""
import pytest
import torch
import torch.nn.functional as F

from model import kernels
from model.config import ModelConfig
from model.ffn import GatedMLP
from model.kernels import chunked_ce, reference
from model.norms import RMSNorm
from model.positions import Rotary, apply_rotary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm_ref_is_the_model_norm(dtype, unit_offset):
    torch.manual_seed(0)
    norm = RMSNorm(37, eps=1e-6, unit_offset=unit_offset).to(dtype)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 37, dtype=dtype)
    assert torch.equal(reference.rms_norm_ref(x, norm.weight, 1e-6, unit_offset), norm(x))


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_rotary_ref_is_the_model_rotary(partial):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=48, n_heads=2, partial_rotary=partial, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_seq_len": 64})
    cos, sin = Rotary(cfg)(torch.arange(7)[None] + 100, torch.float32)
    x = torch.randn(1, 2, 7, 24)
    assert torch.equal(reference.rotary_ref(x, cos, sin), apply_rotary(x, cos, sin))


def test_swiglu_ref_is_the_model_activation():
    torch.manual_seed(0)
    mlp = GatedMLP(ModelConfig(d_model=32, d_ff=40))
    x = torch.randn(2, 3, 32)
    assert torch.equal(mlp.down_proj(reference.swiglu_ref(mlp.gate_proj(x), mlp.up_proj(x))), mlp(x))


def _ce_reference(h, w, targets, softcap):
    z = h @ w.t()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z.float(), targets, ignore_index=-100)


@pytest.mark.parametrize(
    "N,d,V,chunk,softcap",
    [(13, 16, 100, 4, None), (6, 8, 1500, None, None), (9, 16, 77, 5, 3.0), (1, 4, 3, None, None)],
)
def test_chunked_cross_entropy_matches_full(N, d, V, chunk, softcap):
    torch.manual_seed(0)
    h = torch.randn(N, d, requires_grad=True)
    w = torch.randn(V, d, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    targets[0] = -100  # an ignored token
    targets[-1] = V - 1  # the last vocabulary row
    if N == 1:
        targets[0] = 2
    loss = chunked_ce.chunked_cross_entropy(h, w, targets, softcap=softcap, chunk_size=chunk)
    gh, gw = torch.autograd.grad(loss * 3.0, (h, w))  # a non-unit upstream grad
    ref = _ce_reference(h, w, targets, softcap)
    rh, rw = torch.autograd.grad(ref * 3.0, (h, w))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_bf16_and_edge_cases():
    torch.manual_seed(0)
    h = torch.randn(10, 32, dtype=torch.bfloat16, requires_grad=True)
    w = (0.2 * torch.randn(300, 32)).bfloat16().requires_grad_()
    targets = torch.randint(0, 300, (10,))
    loss = chunked_ce.chunked_cross_entropy(h, w, targets, chunk_size=3)
    loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    ref_h, ref_w = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = _ce_reference(ref_h, ref_w, targets, None)
    ref.backward()
    # bf16 logits (8-bit mantissa) feed the fp32 softmax: loss to ~1e-2, grads to ~2 bf16 ulps
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(h.grad.float(), ref_h.grad, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(w.grad.float(), ref_w.grad, rtol=2e-2, atol=2e-3)
    # every token ignored: 0, not F.cross_entropy's nan; under no_grad no gradient work is done
    with torch.no_grad():
        none = chunked_ce.chunked_cross_entropy(h, w, torch.full((10,), -100))
    assert none.item() == 0.0


def test_default_chunk_size():
    assert chunked_ce.default_chunk_size(16384, 50304) == 2048  # 8 chunks
    assert chunked_ce.default_chunk_size(16384, 262144) == 1024  # capped at 1 GiB of fp32 logits
    assert chunked_ce.default_chunk_size(13, 100) == 2
    assert chunked_ce.default_chunk_size(5, 10) == 1


def make_paged(B, H, Hkv, D, block_size, lens, dtype=torch.float32, seed=0):
    """Random contiguous caches scattered into a shuffled block pool.

    Returns q (B,H,D), k_pool, v_pool, block_tables, context_lens and the contiguous k, v
    (B, Hkv, Tmax, D) they came from."""
    g = torch.Generator().manual_seed(seed)
    Tmax = max(lens)
    max_blocks = -(-Tmax // block_size)
    n_blocks = B * max_blocks + 3  # spare blocks hold garbage that must never be read
    k = torch.randn(B, Hkv, Tmax, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Tmax, D, generator=g).to(dtype)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k_pool = torch.randn(n_blocks, block_size, Hkv, D, generator=g).to(dtype) * 100
    v_pool = torch.randn(n_blocks, block_size, Hkv, D, generator=g).to(dtype) * 100
    block_tables = torch.randperm(n_blocks, generator=g)[: B * max_blocks].view(B, max_blocks).int()
    for b in range(B):
        for t in range(lens[b]):
            page, slot = block_tables[b, t // block_size], t % block_size
            k_pool[page, slot], v_pool[page, slot] = k[b, :, t], v[b, :, t]
    return q, k_pool, v_pool, block_tables, torch.tensor(lens, dtype=torch.int32), k, v


def test_paged_attention_ref_matches_sdpa_on_contiguous_cache():
    B, H, Hkv, D, lens = 3, 4, 2, 8, [1, 6, 11]
    q, kp, vp, bt, cl, k, v = make_paged(B, H, Hkv, D, 4, lens)
    out = reference.paged_attention_ref(q, kp, vp, bt, cl, D**-0.5)
    valid = torch.arange(max(lens))[None, :] < cl[:, None]  # (B, Tmax)
    ref = F.scaled_dot_product_attention(
        q[:, :, None], k, v, attn_mask=valid[:, None, None, :], scale=D**-0.5, enable_gqa=True
    )[:, :, 0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_api_falls_back_to_pytorch_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 3, 8)
    assert not kernels.use_triton(x)
    w = torch.randn(8)
    assert torch.equal(kernels.rms_norm(x, w, 1e-5), reference.rms_norm_ref(x, w, 1e-5))
    g, u = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.equal(kernels.swiglu(g, u), F.silu(g) * u)
    h, W, t = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))
    torch.testing.assert_close(kernels.linear_cross_entropy(h, W, t), F.cross_entropy(h @ W.t(), t))


def test_works_without_triton():
    """With triton unimportable, model.kernels imports and every entry point runs in PyTorch."""
    import pathlib
    import subprocess
    import sys

    code = """
import sys
class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoTriton())
import torch
from model import kernels
assert not kernels.triton_available()
x = torch.randn(2, 3, 4, 8, requires_grad=True)
kernels.rms_norm(x, torch.ones(8), 1e-5).sum().backward()
kernels.apply_rotary(x, torch.ones(1, 1, 4, 8), torch.zeros(1, 1, 4, 8))
kernels.swiglu(x, x)
kernels.linear_cross_entropy(torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3]))
q, pool = torch.randn(1, 2, 8), torch.randn(3, 4, 2, 8)
kernels.paged_attention_decode(q, pool, pool, torch.tensor([[2, 0]]), torch.tensor([5]), 0.3)
assert "triton" not in sys.modules
print("ok")
"""
    root = pathlib.Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]

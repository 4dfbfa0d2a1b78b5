"""Triton kernels under TRITON_INTERPRET=1 on CPU tensors, against the PyTorch references.

Tolerances. fp32: rtol=atol=1e-5 (the kernels and the references do the same fp32 math in a
different order). bf16: outputs are compared with the fp32 reference evaluated on the same
bf16 inputs, rtol=atol=1.6e-2 (2 bf16 ulps): the kernel rounds once where PyTorch rounds
after every op, and Triton's interpreter converts fp32 -> bf16 by truncation, not
round-to-nearest as the GPU does. (The interpreter also gets bf16 *arithmetic* and bf16
tl.dot wrong, which is why every kernel upcasts its loads to fp32 first.)
"""
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

# Triton picks interpreter or compiler when a function is *decorated*, including its own
# standard library (tl.sum, tl.sigmoid) at `import triton`, and it checks the variable again
# when it lazily imports more of itself, so TRITON_INTERPRET=1 must be set before triton is
# first imported and stay set. When this module is the first to import triton (e.g.
# `pytest tests/model`), it sets the variable for the rest of this pytest process (which only
# routes model.kernels calls on CPU tensors through the interpreter). When something collected
# earlier (bitsandbytes, transformers) already imported triton, the tests run in a fresh
# subprocess instead (test_in_fresh_process).
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton is not installed (pip install -r requirements-dev.txt)")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from model.kernels import triton_ce, triton_paged, triton_rmsnorm, triton_rope, triton_swiglu  # noqa: E402

INTERPRETED = all(
    isinstance(f, InterpretedFunction)
    for f in (triton.language.standard.sigmoid, triton_rmsnorm._rmsnorm_fwd, triton_ce._ce_rows_kernel)
)

from model import kernels  # noqa: E402
from model.kernels import reference  # noqa: E402
from tests.model.test_kernels_torch import make_paged  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
interpreted_only = pytest.mark.skipif(
    not INTERPRETED, reason="triton was imported before TRITON_INTERPRET=1; covered by test_in_fresh_process"
)


@pytest.mark.skipif(INTERPRETED, reason="already running under the interpreter in this process")
def test_in_fresh_process():
    root = pathlib.Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(pathlib.Path(__file__))],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    progress = r.stdout.split("[")[0]  # e.g. "s......" (this test itself is skipped in there)
    assert progress.count(".") >= 20, r.stdout[-2000:]


def _grads(fn, inputs, dy):
    """Output of fn(*inputs) and the grads of every input for upstream grad dy."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(dy)
    return out.detach(), [t.grad for t in inputs]


def _check(got, want, dtype):
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@interpreted_only
@pytest.mark.parametrize(
    "shape,unit_offset,dtype,transpose",
    [
        ((3, 5, 37), False, torch.float32, False),  # non-power-of-two width, 15 rows
        ((4, 64), True, torch.float32, False),  # Gemma's (1 + w)
        ((2, 3, 6, 24), False, torch.float32, True),  # a strided (B, H, T, D) view, as in QK-norm
        ((7, 48), False, torch.bfloat16, False),
        ((5, 40), True, torch.bfloat16, False),
    ],
)
def test_rms_norm(shape, unit_offset, dtype, transpose):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype)
    if transpose:
        x = x.transpose(1, 2)
    w = (0.5 * torch.randn(shape[-1]) + (0 if unit_offset else 1)).to(dtype)
    dy = torch.randn(x.shape, dtype=dtype)
    eps = 1e-5
    y, (dx, dw) = _grads(lambda a, b: triton_rmsnorm.rms_norm(a, b, eps, unit_offset), [x, w], dy)
    ref = lambda a, b: reference.rms_norm_ref(a, b, eps, unit_offset)  # noqa: E731
    y_ref, (dx_ref, dw_ref) = _grads(ref, [x.float(), w.float()], dy.float())
    assert y.dtype == ref(x, w).dtype and dx.dtype == dtype and dw.dtype == dtype
    _check(y, y_ref, dtype)
    _check(dx, dx_ref, dtype)
    # dW sums over all rows: compare relative to its scale
    torch.testing.assert_close(dw.float(), dw_ref, **TOL[dtype]) if dtype == torch.float32 else \
        torch.testing.assert_close(dw.float(), dw_ref, rtol=1.6e-2, atol=1.6e-2 * dw_ref.abs().max().item())


@interpreted_only
@pytest.mark.parametrize(
    "B,H,T,D,R,dtype,cos_batch",
    [
        (2, 3, 5, 8, 8, torch.float32, 2),
        (1, 2, 7, 12, 8, torch.float32, 1),  # partial rotary: 4 channels pass through
        (2, 2, 19, 20, 20, torch.float32, 1),  # half = 10 (non-power-of-two), T over one tile
        (2, 2, 5, 16, 16, torch.bfloat16, 2),
    ],
)
def test_rotary(B, H, T, D, R, dtype, cos_batch):
    torch.manual_seed(0)
    x = torch.randn(B, T, H, D, dtype=dtype).transpose(1, 2)  # (B, H, T, D) strided like q
    # random cos/sin with different halves test the general formula, not just cos1 == cos2
    cos, sin = torch.randn(cos_batch, 1, T, R, dtype=dtype), torch.randn(cos_batch, 1, T, R, dtype=dtype)
    dy = torch.randn(B, H, T, D, dtype=dtype)
    rope = triton_rope.apply_rotary
    y, (dx,) = _grads(lambda a: rope(a, cos, sin), [x], dy)
    y_ref, (dx_ref,) = _grads(lambda a: reference.rotary_ref(a, cos.float(), sin.float()), [x.float()], dy.float())
    assert y.dtype == dtype and dx.dtype == dtype
    _check(y, y_ref, dtype)
    _check(dx, dx_ref, dtype)


@interpreted_only
@pytest.mark.parametrize("shape,dtype", [((3, 37), torch.float32), ((2, 5, 129), torch.float32), ((4, 300), torch.bfloat16)])
def test_swiglu(shape, dtype):
    torch.manual_seed(0)
    g, u, dy = (3 * torch.randn(shape)).to(dtype), torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    y, (dg, du) = _grads(triton_swiglu.swiglu, [g, u], dy)
    y_ref, (dg_ref, du_ref) = _grads(reference.swiglu_ref, [g.float(), u.float()], dy.float())
    for got, want in ((y, y_ref), (dg, dg_ref), (du, du_ref)):
        _check(got, want, dtype)


@interpreted_only
@pytest.mark.parametrize(
    "N,d,V,chunk,softcap,dtype",
    [
        (13, 16, 100, 4, None, torch.float32),  # 4 chunks, the last one short
        (6, 8, 1500, None, None, torch.float32),  # V over two 1024-wide tiles of the kernel
        (9, 16, 77, 5, 3.0, torch.float32),  # Gemma-2 final-logit soft-cap
        (10, 32, 300, 3, None, torch.bfloat16),
    ],
)
def test_fused_linear_cross_entropy(N, d, V, chunk, softcap, dtype):
    torch.manual_seed(0)
    h = torch.randn(N, d).to(dtype)
    w = (torch.randn(V, d) * (0.2 if dtype == torch.bfloat16 else 1.0)).to(dtype)
    targets = torch.randint(0, V, (N,))
    targets[1] = -100
    targets[-1] = V - 1
    fused = triton_ce.fused_linear_cross_entropy
    loss, (gh, gw) = _grads(lambda a, b: 2.0 * fused(a, b, targets, -100, softcap, chunk), [h, w], torch.tensor(1.0))

    def full(a, b):
        z = a @ b.t()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return 2.0 * F.cross_entropy(z, targets, ignore_index=-100)

    loss_ref, (gh_ref, gw_ref) = _grads(full, [h.float(), w.float()], torch.tensor(1.0))
    assert gh.dtype == dtype and gw.dtype == dtype
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)  # grads are ~1/N small
    torch.testing.assert_close(loss, loss_ref, **TOL[dtype])
    torch.testing.assert_close(gh.float(), gh_ref, **tol)
    torch.testing.assert_close(gw.float(), gw_ref, **tol)


@interpreted_only
def test_fused_cross_entropy_without_grad_and_all_ignored():
    torch.manual_seed(0)
    h, w = torch.randn(4, 8), torch.randn(50, 8)
    targets = torch.randint(0, 50, (4,))
    fused = triton_ce.fused_linear_cross_entropy
    torch.testing.assert_close(fused(h, w, targets), F.cross_entropy(h @ w.t(), targets), **TOL[torch.float32])
    assert fused(h, w, torch.full((4,), -100)).item() == 0.0


@interpreted_only
@pytest.mark.parametrize(
    "B,H,Hkv,D,block_size,lens,dtype",
    [
        (3, 4, 2, 24, 5, [1, 7, 13], torch.float32),  # GQA, non-power-of-two D and block size
        (2, 3, 1, 16, 4, [9, 4], torch.float32),  # MQA, 3 query heads
        (2, 2, 2, 8, 16, [20, 33], torch.float32),  # MHA, pages larger than the key tile
        (2, 4, 2, 32, 8, [5, 18], torch.bfloat16),
    ],
)
def test_paged_attention_decode(B, H, Hkv, D, block_size, lens, dtype):
    q, kp, vp, bt, cl, _, _ = make_paged(B, H, Hkv, D, block_size, lens, dtype)
    out = triton_paged.paged_attention_decode(q, kp, vp, bt, cl, D**-0.5)
    ref = reference.paged_attention_ref(q.float(), kp.float(), vp.float(), bt, cl, D**-0.5)
    assert out.dtype == dtype
    _check(out, ref, dtype)


@interpreted_only
def test_api_dispatches_to_triton_under_interpreter(monkeypatch):
    x = torch.randn(2, 8)
    assert kernels.use_triton(x)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not kernels.use_triton(x)  # plain CPU: the PyTorch path
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # the dispatching API gives the kernels' result, and autograd flows through it
    w = torch.randn(8, requires_grad=True)
    y = kernels.rms_norm(x, w, 1e-5)
    assert type(y.grad_fn).__name__ == "RMSNormFnBackward"
    y.sum().backward()
    torch.testing.assert_close(w.grad, reference.rms_norm_ref(x, w, 1e-5).detach().sum(0) / w.detach())


@interpreted_only
def test_tiny_transformer_with_kernels_matches_pytorch(monkeypatch):
    """The integration the model owner applies (RMSNorm, RoPE, SwiGLU, fused LM-head CE behind
    a config flag), emulated with monkeypatch: same loss and same grad for every parameter."""
    import model.attention as attention_mod
    from model.config import ModelConfig
    from model.ffn import GatedMLP
    from model.norms import RMSNorm
    from model.transformer import Transformer

    torch.manual_seed(0)
    # small on purpose: the interpreter runs each program in Python (qk_norm's strided rows
    # and non-power-of-two widths are covered by the per-kernel tests above)
    cfg = ModelConfig(vocab_size=67, d_model=24, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=40, max_seq_len=16)
    net = Transformer(cfg)
    for p in net.parameters():  # move norm weights off 1 so their grads are tested
        p.data.add_(0.1 * torch.randn_like(p))
    idx, targets = torch.randint(0, 67, (1, 6)), torch.randint(0, 67, (1, 6))
    targets[0, :2] = -100

    def loss_and_grads(fused: bool):
        net.zero_grad()
        if fused:
            hidden = net(idx, return_hidden=True)
            loss = kernels.linear_cross_entropy(hidden.flatten(0, 1), net.lm_head.weight, targets.flatten())
        else:
            loss = F.cross_entropy(net(idx).flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    ref_loss, ref_grads = loss_and_grads(fused=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(RMSNorm, "forward", lambda self, x: kernels.rms_norm(x, self.weight, self.eps, self.unit_offset))
    monkeypatch.setattr(attention_mod, "apply_rotary", kernels.apply_rotary)
    monkeypatch.setattr(
        GatedMLP, "forward", lambda self, x: self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))
    )
    loss, grads = loss_and_grads(fused=True)
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float32])
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], **TOL[torch.float32], msg=lambda m: f"{name}: {m}")


@interpreted_only
def test_paged_kernel_reads_the_engine_pool():
    """Layout contract with inference/paged_cache.py: after a prefill and a decode write through
    PagedView.update, the kernel reading the raw pools (through ``kernels.blocks_view`` when the
    engine keeps them slot-major) gives what SDPA gives on the keys the view gathered."""
    paged_cache = pytest.importorskip("inference.paged_cache")
    torch.manual_seed(0)
    Hkv, H, D, bs = 2, 4, 8, 4
    cache = paged_cache.PagedKVCache(num_blocks=10, block_size=bs)
    tables, prompt = [[7, 2, 5], [0, 9]], [9, 3]
    pre = cache.view(tables, starts=[0, 0], q_lens=prompt)
    pre.update(0, torch.randn(2, Hkv, 9, D), torch.randn(2, Hkv, 9, D))
    dec = cache.view(tables, starts=prompt, q_lens=[1, 1])  # one new token per row
    k, v = dec.update(0, torch.randn(2, Hkv, 1, D), torch.randn(2, Hkv, 1, D))  # (B, Hkv, Tk, D)
    q = torch.randn(2, H, D)
    _, valid = dec.key_positions(torch.tensor([[9], [3]]))
    ref = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=valid[:, None, None, :], enable_gqa=True)
    pools = [p if p.dim() == 4 else kernels.blocks_view(p, bs) for p in cache.pools[0]]  # either layout
    table = torch.tensor([[7, 2, 5], [0, 9, 0]], dtype=torch.int32)
    lens = torch.tensor([10, 4], dtype=torch.int32)
    out = triton_paged.paged_attention_decode(q, pools[0], pools[1], table, lens, D**-0.5)
    _check(out, ref[:, :, 0], torch.float32)


@interpreted_only
def test_kernels_trace_under_torch_compile():
    """Every launch is a torch custom op, so torch.compile(fullgraph=True) captures the kernels
    (fwd and bwd) without graph breaks; aot_eager runs the captured graph on CPU."""
    torch.manual_seed(0)
    x = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    head = torch.randn(11, 16, requires_grad=True)
    cos, sin = torch.randn(1, 1, 6, 16), torch.randn(1, 1, 6, 16)
    targets = torch.tensor([1, 2, -100, 4, 10, 0])

    def step(x, w, head):
        h = triton_rmsnorm.rms_norm(x, w, 1e-5)
        h = triton_swiglu.swiglu(h, triton_rope.apply_rotary(h.view(1, 1, 6, 16), cos, sin).view(6, 16))
        return triton_ce.fused_linear_cross_entropy(h, head, targets, softcap=5.0)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    eager_loss, eager_grads = _grads(step, [x, w, head], torch.tensor(1.0))
    loss, grads = _grads(compiled, [x, w, head], torch.tensor(1.0))
    torch.testing.assert_close(loss, eager_loss, rtol=0, atol=0)
    for g, ref in zip(grads, eager_grads):
        torch.testing.assert_close(g, ref, rtol=0, atol=0)
    q, kp, vp, bt, cl, _, _ = make_paged(2, 4, 2, 16, 4, [3, 7])
    decode = torch.compile(triton_paged.paged_attention_decode, backend="aot_eager", fullgraph=True)
    _check(decode(q, kp, vp, bt, cl, 0.25), reference.paged_attention_ref(q, kp, vp, bt, cl, 0.25), torch.float32)

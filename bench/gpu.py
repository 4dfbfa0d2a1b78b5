"""GPU benchmarks of model/kernels against PyTorch eager and torch.compile (needs CUDA + Triton).

    python bench/gpu.py                      # everything (~5-10 min on an H100, mostly compiles)
    python bench/gpu.py --only kernels,ce    # a subset: kernels, ce, paged, mfu, engine
    python bench/gpu.py --quick              # smaller shapes, fewer steps (a smoke run)

Sections, each measured against its reference in the same run:
  kernels  RMSNorm, RoPE, SwiGLU: time, achieved GB/s (minimum bytes each must move) and the
           ratio to the measured device-to-device copy bandwidth (target >= 70%), fwd and fwd+bwd.
  ce       LM-head cross-entropy, fwd+bwd: full logits (eager, compiled) vs chunked PyTorch vs
           fused Triton: time and peak memory above the inputs (target >= 3x less at equal speed).
  paged    decode attention over the block pool: the engine's gather + SDPA (eager, compiled)
           vs the paged Triton kernel reading the block table.
  mfu      training step of a GPT-2-124M-sized Llama-style model (fp32 master weights, bf16
           autocast, as utils/train_loop.py runs): eager, compile, kernels, kernels + compile.
  engine   inference/engine.py decode tokens/s at batch 1 and batched, gather + SDPA vs the paged
           kernel (decode_kernel) vs the kernel + CUDA graphs (cuda_graphs), each against the HBM
           ceiling: rows x copy bandwidth / (weight bytes + KV bytes read per step).
The "kernels" variants of mfu patch the model's parts in this process, as ModelConfig.kernels does.
Writes a markdown report to stdout and to bench/results/gpu_<date>.md.
"""
from __future__ import annotations

import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import contextlib
import datetime
import time
from typing import Callable

import torch
import torch.nn.functional as F

from model import kernels
from model.kernels import reference
from utils.cli import main_guard
from utils.errors import UserError
from utils.fs import atomic_file

SECTIONS = ("kernels", "ce", "paged", "mfu", "engine")


def bench_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy rate: bytes read + written per second, 1 GiB buffers."""
    src = torch.empty(256 * 2**20, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


def table(title: str, header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------- kernels


def fwd_bwd(fn, inputs, dy):
    def run():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(dy)

    return run


def bench_elementwise(quick: bool, copy_bw: float) -> str:
    from model.kernels.triton_rmsnorm import rms_norm
    from model.kernels.triton_rope import apply_rotary
    from model.kernels.triton_swiglu import swiglu

    dev, bf16 = "cuda", torch.bfloat16
    M = 4096 if quick else 32768
    cases = []
    # RMSNorm over the residual stream, fp32 (autocast keeps it fp32) and bf16; minimum traffic:
    # fwd reads x, writes y; bwd reads x, dy, writes dx (weights are negligible).
    for N, dt in ((4096, bf16), (768, torch.float32)):
        x = torch.randn(M, N, device=dev, dtype=dt, requires_grad=True)
        w = torch.randn(N, device=dev, dtype=dt, requires_grad=True)
        nb = x.numel() * x.element_size()
        cases.append((f"rmsnorm {M}x{N} {str(dt)[6:]}", [x, w], lambda a, b: reference.rms_norm_ref(a, b, 1e-5),
                      lambda a, b: rms_norm(a, b, 1e-5), 2 * nb, 5 * nb))
    # RoPE on q as the model holds it: (B, T, H, D) viewed as (B, H, T, D); cos/sin (B, 1, T, D)
    B, T, H, D = (4, 1024, 32, 128) if quick else (16, 2048, 32, 128)
    q = torch.randn(B, T, H, D, device=dev, dtype=bf16).transpose(1, 2).detach().requires_grad_()
    cos, sin = torch.randn(B, 1, T, D, device=dev, dtype=bf16), torch.randn(B, 1, T, D, device=dev, dtype=bf16)
    nb, nc = q.numel() * 2, 2 * cos.numel() * 2
    cases.append((f"rope {B}x{H}x{T}x{D} bf16", [q], lambda a: reference.rotary_ref(a, cos, sin),
                  lambda a: apply_rotary(a, cos, sin), 2 * nb + nc, 4 * nb + 2 * nc))
    # SwiGLU: fwd reads g, u, writes y; bwd reads dy, g, u, writes dg, du
    Fd = 11008
    g = torch.randn(M // 2, Fd, device=dev, dtype=bf16, requires_grad=True)
    u = torch.randn(M // 2, Fd, device=dev, dtype=bf16, requires_grad=True)
    nb = g.numel() * 2
    cases.append((f"swiglu {M // 2}x{Fd} bf16", [g, u], reference.swiglu_ref, swiglu, 3 * nb, 8 * nb))

    rows = []
    for name, inputs, ref_fn, fused_fn, bytes_fwd, bytes_fb in cases:
        with torch.no_grad():
            y_ref = ref_fn(*inputs)
        dy = torch.randn_like(y_ref)
        compiled = torch.compile(ref_fn)
        err = max_err(fused_fn(*inputs), y_ref)
        for impl, fn in (("eager", ref_fn), ("compile", compiled), ("triton", fused_fn)):
            ms_f = bench_ms(lambda: fn(*inputs))
            ms_fb = bench_ms(fwd_bwd(fn, inputs, dy))
            gbs_f, gbs_fb = bytes_fwd / ms_f / 1e6, bytes_fb / ms_fb / 1e6
            rows.append([name, impl, ms_f, gbs_f, f"{100 * gbs_f / copy_bw:.0f}%", ms_fb, gbs_fb,
                         f"{100 * gbs_fb / copy_bw:.0f}%", f"{err:.2e}" if impl == "triton" else ""])
    header = ["kernel", "impl", "fwd ms", "fwd GB/s", "fwd % copy", "fwd+bwd ms", "fwd+bwd GB/s", "fwd+bwd % copy",
              "max err vs eager"]
    return table(f"Fused kernels (copy bandwidth {copy_bw:.0f} GB/s)", header, rows)


# ----------------------------------------------------------------------------- cross-entropy


def bench_ce(quick: bool) -> str:
    from model.kernels.chunked_ce import chunked_cross_entropy
    from model.kernels.triton_ce import fused_linear_cross_entropy

    N, d = (4096, 1024) if quick else (16384, 2048)
    rows = []
    for V in (32768, 128256):
        torch.manual_seed(0)
        h = (torch.randn(N, d, device="cuda") * 0.5).bfloat16().requires_grad_()
        w = (torch.randn(V, d, device="cuda") * 0.02).bfloat16().requires_grad_()
        tgt = torch.randint(0, V, (N,), device="cuda")

        def full(a, b):  # what a plain trainer does: bf16 logits, an fp32 copy for the loss
            return F.cross_entropy((a @ b.t()).float(), tgt)

        impls = {
            "full eager": full,
            "full compile": torch.compile(full),
            "chunked torch": lambda a, b: chunked_cross_entropy(a, b, tgt),
            "fused triton": lambda a, b: fused_linear_cross_entropy(a, b, tgt),
        }
        ref_loss = full(h, w).item()
        base = None
        for name, fn in impls.items():
            run = fwd_bwd(fn, [h, w], torch.tensor(1.0, device="cuda"))
            run()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
            ms = bench_ms(run)
            base = base or (ms, peak)
            err = abs(fn(h, w).item() - ref_loss)
            rows.append([f"{N}x{d} V={V}", name, ms, peak, f"{base[1] / peak:.1f}x", f"{base[0] / ms:.2f}x", f"{err:.1e}"])
    header = ["shape", "impl", "fwd+bwd ms", "peak MiB", "memory vs eager", "speed vs eager", "|loss - eager|"]
    return table("LM-head cross-entropy (bf16 hidden and weight)", header, rows)


# ----------------------------------------------------------------------------- paged attention


def gather_sdpa(q, k_pool, v_pool, read_slots, valid, scale):
    """What inference/paged_cache.py does today: gather every row's slots from the slot-major
    pools (Hkv, slots, D) into (B, Hkv, Tk, D), mask the padding, SDPA."""
    B, Tk = valid.shape
    n_kv, _, D = k_pool.shape
    k = k_pool.index_select(1, read_slots).view(n_kv, B, Tk, D).transpose(0, 1)
    v = v_pool.index_select(1, read_slots).view(n_kv, B, Tk, D).transpose(0, 1)
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=valid[:, None, None, :], scale=scale,
                                         enable_gqa=True)
    return out[:, :, 0]


def bench_paged(quick: bool, copy_bw: float) -> str:
    from model.kernels.triton_paged import paged_attention_decode

    rows = []
    H, Hkv, D, bs = 32, 8, 128, 16
    for B, ctx in ((8, 512), (64, 2048)) if not quick else ((8, 512),):
        n_blocks = B * ctx // bs
        k_pool = torch.randn(Hkv, n_blocks * bs, D, device="cuda", dtype=torch.bfloat16)  # the engine's layout
        v_pool = torch.randn_like(k_pool)
        table = torch.randperm(n_blocks, device="cuda").view(B, ctx // bs)
        lens = torch.randint(ctx // 2, ctx + 1, (B,), device="cuda")
        read_slots = (table[:, :, None] * bs + torch.arange(bs, device="cuda")).view(-1)
        valid = torch.arange(ctx, device="cuda")[None, :] < lens[:, None]
        q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
        scale = D**-0.5
        kb, vb = kernels.blocks_view(k_pool, bs), kernels.blocks_view(v_pool, bs)
        nbytes = 2 * int(lens.sum()) * Hkv * D * 2  # K and V of every cached token, read once
        ref = gather_sdpa(q, k_pool, v_pool, read_slots, valid, scale)
        compiled = torch.compile(gather_sdpa)
        impls = (("gather+sdpa eager", lambda: gather_sdpa(q, k_pool, v_pool, read_slots, valid, scale)),
                 ("gather+sdpa compile", lambda: compiled(q, k_pool, v_pool, read_slots, valid, scale)),
                 ("paged triton", lambda: paged_attention_decode(q, kb, vb, table, lens, scale)))
        for name, fn in impls:
            err = max_err(fn(), ref)
            ms = bench_ms(fn)
            gbs = nbytes / ms / 1e6
            rows.append([f"B={B} ctx<={ctx} H={H}/{Hkv} D={D}", name, ms, gbs, f"{100 * gbs / copy_bw:.0f}%", f"{err:.1e}"])
    return table("Paged decode attention (bf16, block 16)", ["shape", "impl", "ms", "GB/s", "% copy", "max err"], rows)


# ----------------------------------------------------------------------------- model-level


def gpt2_sized_config(**kw):
    from model.config import ModelConfig

    # GPT-2 124M sizes (d 768, 12 layers, 12 heads, 50304 padded vocab) with Llama parts, so
    # every kernel is on the path: RMSNorm, RoPE, SwiGLU, untied LM head.
    return ModelConfig(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, d_ff=2048, max_seq_len=1024, **kw)


@contextlib.contextmanager
def model_kernels(enabled: bool):
    """Route RMSNorm, RoPE and SwiGLU through model.kernels, as ModelConfig.kernels will."""
    if not enabled:
        yield
        return
    import model.attention as attention_mod
    from model.ffn import GatedMLP
    from model.norms import RMSNorm

    saved = RMSNorm.forward, attention_mod.apply_rotary, GatedMLP.forward
    RMSNorm.forward = lambda self, x: kernels.rms_norm(x, self.weight, self.eps, self.unit_offset)
    attention_mod.apply_rotary = kernels.apply_rotary
    GatedMLP.forward = lambda self, x: self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))
    try:
        yield
    finally:
        RMSNorm.forward, attention_mod.apply_rotary, GatedMLP.forward = saved


def train_rate(use_kernels: bool, use_compile: bool, B: int, T: int, steps: int) -> tuple[float, float, float]:
    """Tokens/s of full training steps (fwd, bwd, AdamW) after 3 warm-up steps; and peak GiB, last loss."""
    from model.transformer import Transformer
    from utils.flops import flops_per_token

    torch.manual_seed(0)
    net = Transformer(gpt2_sized_config()).cuda()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    idx = torch.randint(0, 50304, (B, T + 1), device="cuda")
    x, y = idx[:, :-1], idx[:, 1:]

    def loss_fn(x, y):
        if use_kernels:  # the fused LM-head loss never builds the (B*T, V) logits
            hidden = net(x, return_hidden=True)
            return kernels.linear_cross_entropy(hidden.flatten(0, 1), net.lm_head.weight, y.flatten())
        return F.cross_entropy(net(x).flatten(0, 1).float(), y.flatten())

    fn = torch.compile(loss_fn) if use_compile else loss_fn
    torch.cuda.reset_peak_memory_stats()
    with model_kernels(use_kernels):
        for i in range(steps + 3):
            if i == 3:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fn(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    tok_s = B * T * steps / (time.perf_counter() - t0)
    return tok_s, tok_s * flops_per_token(net, T), torch.cuda.max_memory_allocated() / 2**30, loss.item()


def bench_mfu(quick: bool) -> str:
    from utils.flops import device_peak_flops

    B, T = (8, 1024) if quick else (16, 1024)
    steps = 5 if quick else 20
    rows, peak = [], device_peak_flops(torch.device("cuda"), "bf16")
    for name, use_kernels, use_compile in (("eager", False, False), ("compile", False, True),
                                           ("kernels", True, False), ("kernels + compile", True, True)):
        try:
            tok_s, flops_s, mem, loss = train_rate(use_kernels, use_compile, B, T, steps)
            mfu = f"{100 * flops_s / peak:.1f}%" if peak else "n/a (unknown peak)"
            rows.append([name, tok_s, mfu, mem, f"{loss:.3f}"])
        except Exception as err:  # e.g. compile cannot trace a kernel: record it, keep going
            rows.append([name, "failed", type(err).__name__, str(err).splitlines()[0][:80], ""])
        torch.cuda.empty_cache()
    return table(f"Training step, GPT-2-124M-sized Llama (B={B}, T={T}, fp32 weights, bf16 autocast)",
                 ["variant", "tokens/s", "MFU", "peak GiB", "last loss"], rows)


def bench_engine(quick: bool, copy_bw: float) -> str:
    """Engine decode with the three attention paths, against the HBM ceiling: a decode step must
    read every weight once and every cached key/value of the batch, so tokens/s <= rows * bandwidth
    / (weight bytes + KV bytes of the step)."""
    from inference.engine import LLMEngine
    from inference.sampling_params import SamplingParams
    from model.transformer import Transformer

    torch.manual_seed(0)
    net = Transformer(gpt2_sized_config(n_kv_heads=4)).to("cuda", torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    cfg = net.cfg
    kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2  # k and v, bf16
    rows, outs = [], {}
    for n, prompt_len, gen in ((1, 128, 128), (16, 128, 64) if quick else (64, 512, 256)):
        prompts = torch.randint(0, 50304, (n, prompt_len)).tolist()
        params = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
        mean_ctx = prompt_len + gen / 2
        ceiling = n * copy_bw * 1e9 / (weight_bytes + n * mean_ctx * kv_per_token)
        for name, kernel, graphs in (("gather + SDPA", False, False), ("paged kernel", True, False),
                                     ("paged kernel + CUDA graphs", True, True)):
            engine = LLMEngine(net, device="cuda", max_num_seqs=n, block_size=16, max_num_batched_tokens=8192,
                               decode_kernel=kernel, cuda_graphs=graphs)
            engine.generate(prompts[:n], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            done = engine.generate(prompts, params)
            torch.cuda.synchronize()
            secs = time.perf_counter() - t0
            outs[(n, name)] = [c.outputs[0].token_ids for c in done]
            tok_s = n * gen / secs
            rows.append([f"{n} x ({prompt_len} + {gen})", name, tok_s, f"{100 * tok_s / ceiling:.0f}%",
                         sum(a == b for a, b in zip(outs[(n, name)], outs[(n, "gather + SDPA")]))])
            del engine
            torch.cuda.empty_cache()
    return table(f"Engine decode, GPT-2-124M-sized Llama, bf16, GQA 12/4 ({weight_bytes / 1e6:.0f} MB of weights; "
                 f"ceiling = rows x {copy_bw:.0f} GB/s / (weights + KV read per step), prefill included in the time)",
                 ["requests x (prompt + new)", "attention", "generated tok/s", "of the HBM ceiling",
                  "greedy == gather path"], rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--quick", action="store_true", help="small shapes and few steps (smoke run)")
    ap.add_argument("--out_dir", default=str(pathlib.Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        raise UserError(f"bench/gpu.py: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}.")
    if not torch.cuda.is_available():
        raise UserError("bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False here); "
                        "run it on a GPU machine. The kernels' correctness tests run on CPU: "
                        "pytest tests/model/test_kernels_triton.py")
    if not kernels.triton_available():
        raise UserError("bench/gpu.py needs Triton: pip install -r requirements-dev.txt (or pip install triton).")
    import triton

    torch.backends.cuda.matmul.allow_tf32 = True
    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth_gbs()
    now = datetime.datetime.now()
    header = (f"## GPU benchmarks, {now:%Y-%m-%d %H:%M}\n\nDevice: {props.name} ({props.total_memory / 2**30:.0f} GiB), "
              f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}; "
              f"device-to-device copy {copy_bw:.0f} GB/s{' (--quick)' if args.quick else ''}.\n")
    parts = [header]
    print(parts[0], flush=True)
    runners = {"kernels": lambda: bench_elementwise(args.quick, copy_bw), "ce": lambda: bench_ce(args.quick),
               "paged": lambda: bench_paged(args.quick, copy_bw), "mfu": lambda: bench_mfu(args.quick),
               "engine": lambda: bench_engine(args.quick, copy_bw)}
    for name in only:
        try:
            part = runners[name]()
        except Exception as err:  # one failing section must not lose the others' figures
            part = f"### {name}\n\nfailed: {type(err).__name__}: {err}\n"
        print(part, flush=True)
        parts.append(part)
    out = pathlib.Path(args.out_dir) / f"gpu_{now:%Y-%m-%d_%H%M}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as f:
        f.write("\n".join(parts))
    print(f"wrote {out}")


if __name__ == "__main__":
    main_guard(main)

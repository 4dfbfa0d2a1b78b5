"""CPU: the pure-PyTorch chunked cross-entropy vs the full-logits loss (memory and time).

    python bench/bench_kernels_cpu.py [--tokens 1024] [--dim 256] [--vocab 32768]

Each variant runs fwd+bwd in its own subprocess, so the peak resident memory it reports
(ru_maxrss after the run minus before it) belongs to that variant alone. The Triton kernels
are measured by bench/gpu.py on a CUDA machine.
"""
from __future__ import annotations

import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import json
import subprocess

from utils.cli import main_guard

CHILD = """
import json, resource, sys, time
import torch, torch.nn.functional as F
sys.path.insert(0, {root!r})
from model.kernels.chunked_ce import chunked_cross_entropy
torch.manual_seed(0)
N, d, V, variant = {N}, {d}, {V}, {variant!r}
h = torch.randn(N, d, requires_grad=True)
w = (0.02 * torch.randn(V, d)).requires_grad_()
t = torch.randint(0, V, (N,))
def run():
    h.grad = w.grad = None
    if variant == "full":
        loss = F.cross_entropy(h @ w.t(), t)
    else:
        loss = chunked_cross_entropy(h, w, t)
    loss.backward()
    return loss.item()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss = run()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
t0 = time.perf_counter()
for _ in range(3):
    run()
print(json.dumps({{"loss": loss, "peak_mib": peak / 1024, "ms": (time.perf_counter() - t0) / 3 * 1000}}))
"""


def run_variant(variant: str, N: int, d: int, V: int) -> dict:
    root = str(pathlib.Path(__file__).resolve().parents[1])
    code = CHILD.format(root=root, N=N, d=d, V=V, variant=variant)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32768)
    args = ap.parse_args(argv)
    N, d, V = args.tokens, args.dim, args.vocab
    full, chunked = run_variant("full", N, d, V), run_variant("chunked", N, d, V)
    print(f"### Cross-entropy of the LM head on CPU, fp32, N={N} tokens, d={d}, V={V} (fwd+bwd)\n")
    print("| impl | ms | peak RSS MiB | |loss - full| |\n|---|---|---|---|")
    for name, r in (("full logits (F.cross_entropy)", full), ("chunked_cross_entropy", chunked)):
        print(f"| {name} | {r['ms']:.0f} | {r['peak_mib']:.0f} | {abs(r['loss'] - full['loss']):.1e} |")
    ratio_mem = full["peak_mib"] / max(chunked["peak_mib"], 1e-9)
    print(f"\nchunked: {ratio_mem:.1f}x less peak memory, {full['ms'] / chunked['ms']:.2f}x the speed of full")


if __name__ == "__main__":
    main_guard(main)

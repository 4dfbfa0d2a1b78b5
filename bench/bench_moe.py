"""MoE training throughput vs a dense model with the same ACTIVE parameters, one run.

    python bench/bench_moe.py [--rounds 5] [--batch 8] [--seq 256] [--threads N]

Two models share everything but the FFN of layers >= first_k_dense (here 0):
  moe   : DeepSeekMoE, 16 routed experts (top-2) + 1 shared expert, each of width 256
  dense : SwiGLU of width (2 + 1) * 256 = 768, i.e. the same FFN parameters per token
Each step is forward + backward (cross-entropy on random tokens), fp32. Rows are measured
interleaved over ``rounds`` so load drift hits both alike; tokens/s = batch*seq / median time.
Also reports the FFN layer alone (no attention/embedding), where the dispatch overhead shows
undiluted. Prints the ratio moe/dense (aim >= 0.6 on CPU).

Then the choice behind ``model.moe.dispatch``: the experts' matmuls (and their LoRA adapters) as a
loop over experts on contiguous sorted blocks, against two forms with no Python loop: one batched
matmul over the groups padded to the largest, and torch's grouped GEMM (``torch._grouped_mm`` over
the sorted blocks, where this torch has it), at DeepSeek-V3 nano's expert sizes, with balanced and
skewed routing.
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.transformer import Transformer
from utils.cli import main_guard

D, E, K, SHARED, DFF = 256, 16, 2, 1, 256
BASE = dict(vocab_size=4096, d_model=D, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=1024)


def configs() -> tuple[ModelConfig, ModelConfig]:
    moe = ModelConfig(**BASE, ffn="moe", moe=dict(n_routed_experts=E, n_shared_experts=SHARED, n_experts_per_tok=K,
                                                  moe_d_ff=DFF, scoring="sigmoid", first_k_dense=0))
    dense = ModelConfig(**BASE, ffn="swiglu", d_ff=(K + SHARED) * DFF)
    return moe, dense


def active_params(model: Transformer) -> int:
    """Parameters one token uses: all but the experts it is not routed to."""
    n = model.num_params()
    for layer in model.layers:
        ex = getattr(layer.ffn, "experts", None)
        if ex is not None:
            per_expert = sum(p[0].numel() for p in ex.parameters())
            n -= (E - K) * per_expert
    return n


def step_time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    moe_cfg, dense_cfg = configs()
    models = {"moe": Transformer(moe_cfg), "dense": Transformer(dense_cfg)}
    idx = torch.randint(0, 4096, (args.batch, args.seq + 1))
    x_ffn = torch.randn(args.batch, args.seq, D)
    ffns = {name: m.layers[0].ffn for name, m in models.items()}

    def model_step(m):
        logits = m(idx[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()).backward()
        m.zero_grad(set_to_none=True)

    def ffn_step(f):
        f(x_ffn).square().mean().backward()
        f.zero_grad(set_to_none=True)

    times = {f"{kind}/{name}": [] for kind in ("model", "ffn") for name in models}
    for r in range(args.rounds + 1):  # round 0 is warm-up
        for name in models:
            t_model = step_time(lambda: model_step(models[name]))
            t_ffn = step_time(lambda: ffn_step(ffns[name]))
            if r:
                times[f"model/{name}"].append(t_model)
                times[f"ffn/{name}"].append(t_ffn)
    tokens = args.batch * args.seq
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"batch {args.batch} x seq {args.seq}, fp32, fwd+bwd, median of {args.rounds}")
    for name, m in models.items():
        print(f"{name:6s} total params {m.num_params() / 1e6:6.2f}M  active/token {active_params(m) / 1e6:6.2f}M")
    for kind in ("model", "ffn"):
        print(f"{kind:6s} moe {tps[f'{kind}/moe']:9.0f} tok/s   dense {tps[f'{kind}/dense']:9.0f} tok/s   "
              f"ratio moe/dense {tps[f'{kind}/moe'] / tps[f'{kind}/dense']:.2f}x")
    padded_dispatch_ratios(args.batch * args.seq, args.rounds)


def padded_dispatch_ratios(tokens: int, rounds: int) -> None:
    """fwd+bwd time of the padded batched form / the per-expert loop, for the base weights and for
    rank-8 adapters, at 16 experts of width 128 over d_model 256 (DeepSeek-V3 nano), top-4."""
    E, d, ff, r, k = 16, 256, 128, 8, 4
    g = torch.Generator().manual_seed(0)
    W = torch.randn(E, ff, d, generator=g, requires_grad=True)
    A = torch.randn(E, r, d, generator=g, requires_grad=True)
    B = torch.randn(E, ff, r, generator=g, requires_grad=True)
    for skew in (0.0, 1.0):
        logits = torch.randn(tokens * k, E, generator=g) + skew * torch.linspace(0, 2, E)
        e = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(1).sort().values
        counts = torch.bincount(e, minlength=E)
        x = torch.randn(tokens * k, d, generator=g, requires_grad=True)
        slot = torch.arange(len(e)) - (counts.cumsum(0) - counts)[e]  # place within the expert's group
        pad = lambda: x.new_zeros(E, int(counts.max()), d).index_put((e, slot), x)  # noqa: E731
        forms = {
            "base loop": lambda: torch.cat([c @ w.t() for c, w in zip(x.split(counts.tolist()), W.unbind(0))]),
            "base padded": lambda: torch.bmm(pad(), W.transpose(1, 2))[e, slot],
            "lora loop": lambda: torch.cat([(c @ a.t()) @ b.t()
                                            for c, a, b in zip(x.split(counts.tolist()), A.unbind(0), B.unbind(0))]),
            "lora padded": lambda: torch.bmm(torch.bmm(pad(), A.transpose(1, 2)), B.transpose(1, 2))[e, slot],
        }
        if hasattr(torch, "_grouped_mm"):  # a private op: one call over the sorted groups (offs = group ends)
            offs = counts.cumsum(0).to(torch.int32)
            gmm = lambda a, w: torch._grouped_mm(a, w.transpose(1, 2), offs=offs)  # noqa: E731
            forms["base grouped"] = lambda: gmm(x, W)
            forms["lora grouped"] = lambda: gmm(gmm(x, A), B)
        times = {name: [] for name in forms}
        for i in range(rounds + 1):
            for name, f in forms.items():
                t = step_time(lambda: f().square().sum().backward())
                if i:
                    times[name].append(t)
        med = {n: statistics.median(t) for n, t in times.items()}
        print(f"dispatch, {tokens} tokens x top-{k}, busiest expert {float(counts.max() / counts.float().mean()):.2f}x the mean: "
              f"padded/loop time base {med['base padded'] / med['base loop']:.2f}x, "
              f"LoRA {med['lora padded'] / med['lora loop']:.2f}x"
              + (f"; grouped/loop time base {med['base grouped'] / med['base loop']:.2f}x, "
                 f"LoRA {med['lora grouped'] / med['lora loop']:.2f}x" if "base grouped" in med else ""))


if __name__ == "__main__":
    main_guard(main)

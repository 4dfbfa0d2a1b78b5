"""The cost of document masking in packed rows: block-diagonal causal attention vs today's packing.

    python bench/bench_packing.py [--rounds 5] [--batch 4] [--seq 512] [--threads 1]

One Llama-style model (d 256, 4 layers, 8 heads / 4 KV heads, vocab 4096), rows packed with
examples of 40-200 tokens (positions restarting per example), and the SFT loss
(``finetune.sft.sft_loss``) over every token. Rows, interleaved over ``rounds``:

  unmasked : the row as one sequence (SDPA's fused causal path; examples see earlier ones)
  masked   : positions restart per example and the document mask keeps them apart (an explicit
             (B, 1, T, T) boolean mask to SDPA)

Each step is forward + backward, fp32; time = median over rounds. Prints masked/unmasked.
FlexAttention is not measured: torch 2.13 has no FlexAttention backward on CPU.
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import os
import platform
import statistics
import time

import torch

from finetune.sft import sft_loss
from model.config import ModelConfig
from model.transformer import Transformer
from utils.cli import main_guard


def packed_batch(batch: int, seq: int, seed: int = 0):
    """(x, y, loss_mask, positions) with examples of 40-200 tokens packed back to back."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 4096, (batch, seq + 1), generator=g)
    positions = torch.zeros(batch, seq + 1, dtype=torch.long)
    n_examples = 0
    for b in range(batch):
        t = 0
        while t < seq + 1:
            n = int(torch.randint(40, 201, (1,), generator=g))
            positions[b, t:t + n] = torch.arange(min(n, seq + 1 - t))
            t += n
            n_examples += 1
    mask = torch.ones(batch, seq)
    return (x[:, :-1], x[:, 1:], mask, positions[:, :-1]), n_examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=704,
                                    max_seq_len=args.seq))
    (x, y, mask, positions), n_examples = packed_batch(args.batch, args.seq)
    rows = {"unmasked": (x, y, mask), "masked": (x, y, mask, positions)}

    def step(batch) -> float:
        t0 = time.perf_counter()
        sft_loss(model, batch)[0].backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times = {name: [] for name in rows}
    for r in range(args.rounds + 1):  # round 0 is warm-up
        for name, batch in rows.items():
            t = step(batch)
            if r:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * args.seq
    print(f"machine: {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, load "
          f"{os.getloadavg()[0]:.1f}; {model.num_params() / 1e6:.1f}M params, batch {args.batch} x seq {args.seq} "
          f"({n_examples} examples packed), fwd+bwd fp32, median of {args.rounds}")
    for name in rows:
        print(f"{name:9s} {tokens / med[name]:8.0f} tok/s")
    print(f"masked/unmasked time {med['masked'] / med['unmasked']:.2f}x")


if __name__ == "__main__":
    main_guard(main)

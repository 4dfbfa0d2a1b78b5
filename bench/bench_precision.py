"""fp16 with its loss scale on CPU, and adaptive gradient clipping against a planted spike, through the
real loop (utils/train_loop.train).

    python bench/bench_precision.py [--rounds 3] [--steps 6] [--threads 1] [--parts speed,spike]

speed : optimizer-step time of ``train.dtype`` fp16 (autocast + GradScaler) and bf16 (autocast)
        against fp32, one Llama-style model (d 256, 4 layers, 8 heads / 4 KV heads, SwiGLU 704,
        vocab 4096; ~5M parameters), batch 4 x 256; rounds interleaved, median after each run's
        first step.
spike : a smaller model (d 128, 2 layers, ~1M parameters) learns a synthetic sequence task for 40
        steps (lr 3e-3); at step 25 its gradient is multiplied by 1000 (the loss itself unchanged,
        as when one bad batch hits). Per clipping setting, against the same setting's spike-free
        run: the norm the optimizer applied at the spike, the recent applied norms before it, and
        the mean |loss - spike-free loss| over the 15 steps after it. Settings: none;
        optim.grad_clip 1.0 (the generated recipes' ceiling, here at or below the usual norms
        of ~1.1-1.5); 10 (a ceiling above them, as the usual norms fall late in training); each
        fixed ceiling alone and with optim.adaptive_clip (ZClip-style, defaults but warmup 10).
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import os
import platform
import statistics
import tempfile

import torch

from model.config import ModelConfig
from model.loss import lm_loss
from model.transformer import Transformer
from utils.cli import main_guard
from utils.grad_clip import AdaptiveClipConfig
from utils.optim import OptimConfig
from utils.train_config import TrainConfig
from utils.train_loop import train

SPIKE_AT, SPIKE_STEPS, AFTER = 25, 40, 15


class Rows:
    """Rows of x_{t+1} = (5 x_t + c) mod V from random starts and offsets c: learnable, so a bad
    update shows in the next losses. Resumable (the loop's contract)."""

    def __init__(self, batch: int, seq: int, vocab: int, seed: int = 0):
        self.batch, self.seq, self.vocab, self.i, self.seed = batch, seq, vocab, 0, seed

    def __iter__(self):
        return self

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.i)
        self.i += 1
        x = torch.randint(0, self.vocab, (self.batch, 1), generator=g)
        c = torch.randint(0, 8, (self.batch, 1), generator=g)
        cols = [x]
        for _ in range(self.seq):
            cols.append((5 * cols[-1] + c) % self.vocab)
        rows = torch.cat(cols, 1)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def run(model, data, loss_fn, steps: int, optim: OptimConfig, dtype: str = "fp32"):
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out_dir=out, max_steps=steps, batch_size=data.batch, seq_len=data.seq, device="cpu",
                          dtype=dtype, resume="never", progress=False, log_every=10**6, save_every=0)
        cfg.spike.enabled = False  # clipping alone, no rollback
        return train(model, data, loss_fn, cfg, optim).history


def plain_loss(model, batch):
    return lm_loss(model, batch[0], batch[1]), {}


def speed(rounds: int, steps: int) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=704, max_seq_len=256)
    weights = Transformer(cfg).state_dict()
    times: dict[str, list[float]] = {"fp32": [], "fp16": [], "bf16": []}
    for _ in range(rounds):
        for dtype in times:
            model = Transformer(cfg)
            model.load_state_dict(weights)
            history = run(model, Rows(4, 256, 4096), plain_loss, steps, OptimConfig(lr=1e-3, warmup_steps=0), dtype)
            times[dtype] += [h["dt_ms"] for h in history[1:]]
    ref = statistics.median(times["fp32"])
    print(f"speed: {sum(p.numel() for p in weights.values()) / 1e6:.1f}M params, batch 4 x 256, median of "
          f"{len(times['fp32'])} steps")
    for dtype, t in times.items():
        m = statistics.median(t)
        print(f"  {dtype:5s} {m:7.0f} ms/step  {4 * 256 / m * 1000:6.0f} tok/s  time {m / ref:.2f}x fp32")


def spike() -> None:
    cfg = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=352, max_seq_len=64)
    settings = {
        "no clipping": OptimConfig(lr=3e-3, warmup_steps=5, grad_clip=0.0),
        "grad_clip 1.0": OptimConfig(lr=3e-3, warmup_steps=5, grad_clip=1.0),
        "adaptive, ceiling 1.0": OptimConfig(lr=3e-3, warmup_steps=5, grad_clip=1.0,
                                             adaptive_clip=AdaptiveClipConfig(warmup_steps=10)),
        "grad_clip 10": OptimConfig(lr=3e-3, warmup_steps=5, grad_clip=10.0),
        "adaptive, ceiling 10": OptimConfig(lr=3e-3, warmup_steps=5, grad_clip=10.0,
                                            adaptive_clip=AdaptiveClipConfig(warmup_steps=10)),
    }

    def history(optim: OptimConfig, factor: float) -> list[dict]:
        calls = {"n": 0}

        def loss_fn(model, batch):
            calls["n"] += 1
            loss = lm_loss(model, batch[0], batch[1])
            if calls["n"] == SPIKE_AT:  # same value, gradient x factor
                loss = loss + (factor - 1) * (loss - loss.detach())
            return loss, {}

        torch.manual_seed(0)
        return run(Transformer(cfg), Rows(8, 64, 512), loss_fn, SPIKE_STEPS, optim)

    print(f"spike: {sum(p.numel() for p in Transformer(cfg).parameters()) / 1e6:.2f}M params, gradient x1000 at step "
          f"{SPIKE_AT} of {SPIKE_STEPS}, each setting against its own spike-free run")
    for name, optim in settings.items():
        clean, h = history(optim, 1.0), history(optim, 1000.0)
        ceiling = optim.grad_clip if optim.grad_clip > 0 else float("inf")
        applied = [x.get("grad_norm_clipped", min(x["grad_norm"], ceiling)) for x in h]  # what the optimizer used
        before = statistics.median(applied[SPIKE_AT - 6:SPIKE_AT - 1])
        gap = statistics.mean(abs(a["loss"] - b["loss"]) for a, b in zip(h[SPIKE_AT:SPIKE_AT + AFTER], clean[SPIKE_AT:]))
        print(f"  {name:22s} norm {h[SPIKE_AT - 1]['grad_norm']:8.1f} -> applied {applied[SPIKE_AT - 1]:6.2f} "
              f"(recent applied {before:.2f}); mean |loss - spike-free| over the next {AFTER} steps {gap:.3f}; "
              f"loss at the end {h[-1]['loss']:.3f} (spike-free {clean[-1]['loss']:.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parts", default="speed,spike")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.1f}")
    if "speed" in args.parts:
        speed(args.rounds, args.steps)
    if "spike" in args.parts:
        spike()


if __name__ == "__main__":
    main_guard(main)

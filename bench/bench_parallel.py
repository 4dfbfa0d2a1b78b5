"""Training throughput of each parallel layout on 2 CPU processes (gloo) against one process.

    python bench/bench_parallel.py [--rounds 2] [--steps 6] [--layouts ddp,fsdp,tp,pp]

One Llama-style model (d 256, 4 layers, 8 heads / 4 KV heads, SwiGLU 704, vocab 4096, untied;
~5M parameters), the same global batch for every layout (16 rows of 256 tokens per optimizer
step), fp32, one torch thread per process, through the real loop (utils/train_loop.train):

  one   : 1 process, 8 accumulated micro-batches of 2 rows (the reference)
  ddp   : 2 processes, DDP, 4 micro-batches each
  fsdp  : 2 processes, FSDP2, 4 micro-batches each
  tp    : 2 processes, tensor parallel (tp=2), 8 micro-batches (both ranks run every row)
  pp    : 2 processes, a 1F1B pipeline of 2 stages over 8 micro-batches

Each layout runs in fresh processes, rounds interleaved; time = median optimizer-step time after
the first step. tokens/s and the ratio to one process are printed. On one 2-core CPU this measures
what each layout's communication costs (gloo through shared memory), not the speed-up of GPUs.
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile

import torch

from utils.cli import main_guard

ROWS, BATCH, SEQ = 16, 2, 256
LAYOUTS = {"one": (1, "none", {}), "ddp": (2, "ddp", {}), "fsdp": (2, "fsdp", {}), "tp": (2, "none", {"tp": 2}),
           "pp": (2, "none", {"pp": 2})}


class Rows:
    """Random token rows, sharded by data-parallel rank; resumable (the loop's contract)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.i = rank, world, 0
        self.data = torch.randint(0, 4096, (4096, SEQ + 1), generator=torch.Generator().manual_seed(0))

    def __iter__(self):
        return self

    def __next__(self):
        start = ((self.i * self.world + self.rank) * BATCH) % (len(self.data) - BATCH)
        self.i += 1
        rows = self.data[start:start + BATCH]
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def worker(layout: str, out: str, steps: int) -> None:
    from model.config import ModelConfig
    from model.loss import lm_loss
    from model.transformer import Transformer
    from utils.distributed import setup
    from utils.optim import OptimConfig
    from utils.train_config import ParallelConfig, TrainConfig
    from utils.train_loop import train

    torch.set_num_threads(1)
    _, kind, parallel = LAYOUTS[layout]
    cfg = TrainConfig(out_dir=out, max_steps=steps, batch_size=BATCH, seq_len=SEQ, global_batch_size=ROWS, distributed=kind,
                      device="cpu", parallel=ParallelConfig(**parallel), resume="never", progress=False, log_every=1000)
    env = setup(kind, "cpu", cfg.parallel)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=704,
                                    max_seq_len=SEQ, tie_embeddings=False))
    loss = lambda m, b: (lm_loss(m, b[0], b[1]), {})  # noqa: E731
    result = train(model, Rows(env.dp_rank, env.dp_size), loss, cfg, OptimConfig(lr=1e-3, warmup_steps=0))
    if env.is_main:
        (pathlib.Path(out) / "times.json").write_text(json.dumps([h["dt_ms"] for h in result.history]))


def run_layout(layout: str, steps: int) -> list[float]:
    world = LAYOUTS[layout][0]
    with socket.socket() as s:  # a free port, released before rank 0 binds it
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as out:
        procs = []
        for rank in range(world):
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            if world > 1:
                env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", layout, "--out", out, "--steps", str(steps)],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        logs = [p.communicate()[0] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError(f"{layout} failed:\n" + "\n".join(x[-3000:] for x in logs))
        return json.loads((pathlib.Path(out) / "times.json").read_text())[1:]  # the first step warms up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--layouts", default="ddp,fsdp,tp,pp")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.out, args.steps)
    layouts = ["one"] + args.layouts.split(",")
    times: dict[str, list[float]] = {k: [] for k in layouts}
    for _ in range(args.rounds):
        for layout in layouts:
            times[layout] += run_layout(layout, args.steps)
    tokens = ROWS * SEQ
    ref = statistics.median(times["one"])
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, 1 thread per process; "
          f"{tokens} tokens per optimizer step, median of {len(times['one'])} steps")
    for layout in layouts:
        t = statistics.median(times[layout])
        print(f"{layout:5s} {LAYOUTS[layout][0]} proc  {t:8.0f} ms/step  {tokens / t * 1000:7.0f} tok/s  {ref / t:.2f}x one process")


if __name__ == "__main__":
    main_guard(main)

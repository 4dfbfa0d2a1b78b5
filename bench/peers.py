"""What the three peer benches share (bench_sft_peers.py, bench_dpo_peers.py, bench_grpo_peers.py).

Each bench runs our trainer and the tool a user would pick instead (HF ``Trainer`` + ``peft``,
TRL) on the same weights, data and hyperparameters. Every side runs in its own subprocess, so
its peak RSS is its own; the sides take turns over several rounds (A B, then B A, ...) so a
change in machine load hits both alike.

    base = make_base(tmp, "llama/llama3_nano", tokenizer_json)    # ours + HF layout, same weights
    results = alternate(["ours", "hf"], rounds, lambda side: run_worker(__file__, side, job, threads))

A worker is the bench script itself run with ``--worker SIDE --job job.json``; it prints one
JSON line: its step times (wall and CPU, from stamps at the end of each of its loop's steps),
losses and peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
PEER_INSTALL = ".venv/bin/pip install -r requirements-bench.txt"


@dataclass
class Base:
    """One set of weights in both layouts: our checkpoint dir and an HF model dir (``export_hf``)."""

    ours: Path
    hf: Path
    tokenizer: Optional[Path]
    params: int


def make_base(out: Path, arch: str = "llama/llama3_nano", tokenizer: Optional[Path] = None, init_from: str = "",
              seed: int = 0, shrink: Optional[dict] = None) -> Base:
    """Our checkpoint + its HF export. ``init_from``: a trained checkpoint (an adapter is merged onto
    its base); else a fresh ``arch`` model (seeded), with ``shrink`` overriding config values."""
    import torch

    from model import architectures
    from model.config import ModelConfig
    from model.hf_interop import export_hf
    from model.load import load_model
    from model.load import tokenizer_path as checkpoint_tokenizer
    from model.transformer import Transformer
    from utils.checkpoint import save_checkpoint

    if init_from:
        model = load_model(init_from)
        tokenizer = Path(checkpoint_tokenizer(init_from, str(tokenizer) if tokenizer else None))
    else:
        # From the named values, so sizes derived from them (head_dim) follow the overrides.
        cfg = ModelConfig(**{**architectures.architecture(arch).values, **(shrink or {})})
        torch.manual_seed(seed)
        model = Transformer(cfg)
    ours = save_checkpoint(out / "ours", model, tokenizer_path=tokenizer)
    hf = export_hf(model, out / "hf")
    return Base(ours, hf, Path(tokenizer) if tokenizer else None, model.num_params())


def hf_tokenizer(tokenizer_json: Path):
    """Our tokenizer.json as a transformers tokenizer (what TRL takes as ``processing_class``):
    <|im_end|> ends a reply, <|endoftext|> pads (id 0, as our batches pad)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), bos_token="<|bos|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")


# ----------------------------------------------------------------------------- workers


def set_threads(threads: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakWindow:
    """Peak RSS of one phase of this process: ``start()`` resets the kernel's high-water mark
    (VmHWM) to the current RSS (Linux /proc/self/clear_refs), ``stop()`` reads it."""

    def __init__(self) -> None:
        self.floor = self.peak = 0
        self.reset_ok = False

    def start(self) -> None:
        import gc

        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset_ok = True
        except OSError:  # not allowed here: the peak then covers the whole process
            pass
        self.floor = _status_kib("VmRSS") * 1024

    def stop(self) -> dict:
        self.peak = _status_kib("VmHWM") * 1024
        return {"train_peak_bytes": self.peak, "train_floor_bytes": self.floor, "peak_reset": self.reset_ok}


def memory() -> dict:
    """This process's peak RSS so far (the kernel's VmHWM; whole process unless a PeakWindow reset it)."""
    import resource

    return {"process_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def add_common_args(p, sides: Sequence[str]) -> None:
    """The flags every peer bench shares (and the hidden ones its workers are started with)."""
    p.add_argument("--worker", choices=sides, help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per side (1: steadiest on a shared CPU)")
    p.add_argument("--shrink", default="", help=argparse.SUPPRESS)  # tests: JSON overrides of the arch config


def worker_main(side: str, job_path: str, run_side: Callable[[str, dict], dict]) -> None:
    """Body of a worker process: run one side of the job, print its figures as one JSON line."""
    import torch

    job = read_job(job_path)
    set_threads(job["threads"])
    torch.manual_seed(job["seed"])
    out = run_side(side, job)
    out["step_s"], out["step_cpu_s"] = step_seconds(out.pop("stamps"), job["warmup"])
    print(json.dumps({**out, **memory(), "side": side}))


def run_worker(script: str, side: str, job: Path, threads: int) -> dict:
    """Run ``script --worker side --job job`` in a fresh process with ``threads`` OpenMP threads;
    returns the JSON it prints last, with the wall time of the whole process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or os.cpu_count()), "TOKENIZERS_PARALLELISM": "false",
           "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, script, "--worker", side, "--job", str(job)], capture_output=True, text=True,
                          env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(script).name} worker {side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = time.perf_counter() - t
    return out


def alternate(sides: Sequence[str], rounds: int, run_one: Callable[[str], dict], log=print) -> dict[str, list[dict]]:
    """Run every side once per round, the order reversed every other round; side -> results."""
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for side in order:
            res = run_one(side)
            results[side].append(res)
            log(f"  round {r + 1}/{rounds} {side}: median step {1000 * median_step(res):.0f} ms wall, "
                f"{1000 * median_step(res, 'step_cpu_s'):.0f} ms CPU (load {load_avg()})", flush=True)
    return results


# ----------------------------------------------------------------------------- figures


def stamp() -> tuple[float, float]:
    """(wall-clock, this process's CPU) seconds now. With one torch thread per side, CPU time is
    the work a step did, whatever else the shared machine was running; wall time is what a user waits."""
    return time.time(), time.process_time()


def step_seconds(stamps: Sequence[Sequence[float]], warmup: int) -> tuple[list[float], list[float]]:
    """(wall, CPU) seconds of each step from step-end stamps (stamp i = end of step i+1): the
    difference of consecutive stamps covers one whole step of that side's loop (data, forward,
    backward, optimizer, its own logging). The first ``warmup`` steps are dropped (the first
    has no start stamp; later warm-up steps pay one-off allocations)."""
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])][max(0, warmup - 1):]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])][max(0, warmup - 1):]
    return wall, cpu


def ours_step_clock() -> list[tuple[float, float]]:
    """Stamps at the end of each of our loop's steps: ``utils.train_loop.train`` logs one record
    per optimizer step through ``MetricsLogger.log``, wrapped here (bench only) to stamp it."""
    from utils.logging import MetricsLogger

    stamps: list[tuple[float, float]] = []
    log = MetricsLogger.log

    def stamped(self, record: dict) -> None:
        if "loss" in record:  # step records; eval-only records carry no loss
            stamps.append(stamp())
        log(self, record)

    MetricsLogger.log = stamped
    return stamps


def median_step(result: dict, key: str = "step_s") -> float:
    return statistics.median(result[key])


def pooled(results: list[dict], key: str = "step_s") -> list[float]:
    return [x for r in results for x in r[key]]


def ratio_rounds(ours: list[dict], peer: list[dict], key: str = "step_s") -> list[float]:
    """Per round: peer median step time / ours (> 1: ours is faster); key step_s (wall) or step_cpu_s."""
    return [median_step(p, key) / median_step(o, key) for o, p in zip(ours, peer)]


def spread(values: Sequence[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def header(title: str, threads: int) -> str:
    import platform

    import torch

    return (f"# {title}\n{os.cpu_count()} CPU(s) {platform.processor() or platform.machine()} | torch {torch.__version__} | "
            f"threads per side {threads} | load average at start {load_avg()} | {time.strftime('%Y-%m-%d %H:%M')}")


def versions(*names: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for n in names:
        try:
            out.append(f"{n} {version(n)}")
        except PackageNotFoundError:
            out.append(f"{n} (not installed)")
    return ", ".join(out)


def require(*modules: str) -> None:
    """A clear message (no traceback) when a peer library is not installed."""
    from utils.errors import UserError

    missing = []
    for m in modules:
        try:
            __import__(m)
        except ImportError:
            missing.append(m)
    if missing:
        raise UserError(f"this bench compares against {', '.join(missing)}, which is not installed; "
                        f"install the bench-only peers with: {PEER_INSTALL}")


def write_job(path: Path, job: dict) -> Path:
    path.write_text(json.dumps(job, indent=2, default=str))
    return path


def read_job(path: str) -> dict:
    return json.loads(Path(path).read_text())


def ours_history(out_dir: str | Path) -> list[dict]:
    """Our loop's per-step records (metrics.jsonl: loss and the loss function's metrics)."""
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = {}
    for r in rows:
        if "loss" in r:  # eval-only records carry no loss
            steps[r["step"]] = r
    return [steps[k] for k in sorted(steps)]


def hf_callback():
    """A transformers TrainerCallback that stamps the end of every optimizer step, keeps every
    logged record, and measures the train-phase peak RSS (from on_train_begin)."""
    from transformers import TrainerCallback

    class Stamps(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.logs: list[dict] = []
            self.window = PeakWindow()

        def on_train_begin(self, args, state, control, **kw):
            self.window.start()

        def on_step_end(self, args, state, control, **kw):
            self.stamps.append(stamp())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.logs.append({"step": state.global_step, **logs})

    return Stamps()

"""Distillation: the top-k cache's approximation error, the chunked loss's memory, the cache's speed.

    python bench/bench_distill.py --threads 1                     # the demo's teacher and student if present
    python bench/bench_distill.py --rows 4096 --vocab 65536       # bigger chunking sizes (GPU: CUDA memory)

1. top-k error: the demo's SFT model (teacher) and its half-size student (``python demo.py --distill``)
   on SFT validation rows; for each divergence and k, the loss against a top-k teacher relative to
   the full one, the cosine between their gradients (w.r.t. the student's logits), the teacher's mean
   mass outside the top k, and the cache's bytes per counted token. Without the demo's outputs, two
   random models (said so in the output).
2. memory: one loss forward + backward on random (N, d) hidden states with a (V, d) head for student
   and teacher: plain full logits against finetune.distill_losses.distill_loss in one chunk and in
   ~8 chunks, each in a fresh process (interleaved); the peak above the inputs (CPU: VmHWM reset
   through /proc/self/clear_refs; GPU: max_memory_allocated) and the time.
3. speed: one training micro-batch (loss forward + backward) of the demo student with the teacher
   run online against its cached top-k (the lookup is not timed: it is a memmap read), interleaved.
"""
from __future__ import annotations

import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import gc
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from utils.cli import main_guard

KINDS = ("forward_kl", "reverse_kl", "jsd")


def demo_models(device):
    """(teacher, student, val batch (x, y, mask), where): the demo's, or random stand-ins."""
    from model.load import load_model

    teacher_dir, student_dir = Path("out/demo/runs/sft/final"), Path("out/demo/runs/student_pretrain/final")
    if teacher_dir.is_dir() and student_dir.is_dir() and Path("data/bins/sft/meta.json").is_file():
        from data_pipeline.loader import SFTLoader

        x, y, mask = next(SFTLoader("data/bins/sft", "val", 256, 16, seed=0))
        teacher, student = load_model(teacher_dir, device=device), load_model(student_dir, device=device, train=True)
        return teacher, student, (x, y, mask), f"demo models ({teacher_dir}, {student_dir}), 16 SFT val rows"
    from model import ModelConfig, Transformer

    torch.manual_seed(0)
    teacher = Transformer(ModelConfig(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, max_seq_len=256, init_std=0.1))
    student = Transformer(ModelConfig(vocab_size=2048, d_model=96, n_layers=3, n_heads=4, max_seq_len=256, init_std=0.1))
    x = torch.randint(0, 2048, (16, 256))
    return teacher.to(device), student.to(device).train(), (x, torch.roll(x, -1, 1), torch.ones(16, 256)), \
        "RANDOM models (run `python demo.py --distill` first for the demo's)"


def topk_error(teacher, student, batch, ks, device) -> list[dict]:
    from finetune.distill_losses import token_losses, top_k

    x, y, mask = (t.to(device) for t in batch)
    keep = mask.bool().flatten()
    with torch.no_grad():
        t_logits = teacher(x).flatten(0, 1)[keep].float()
        s_logits = student(x).flatten(0, 1)[keep].float()
    V, out = t_logits.shape[-1], []
    for kind in KINDS:
        z = s_logits.clone().requires_grad_()
        full, _ = token_losses(z, t_logits, y.flatten()[keep], kind)
        (g_full,) = torch.autograd.grad(full.mean(), z)
        for k in [k for k in ks if k < V] + [V]:
            top = top_k(t_logits, k)
            z = s_logits.clone().requires_grad_()
            approx, _ = token_losses(z, top, y.flatten()[keep], kind)
            (g,) = torch.autograd.grad(approx.mean(), z)
            out.append({"divergence": kind, "k": k, "full": full.mean().item(), "topk": approx.mean().item(),
                        "rel_error": (approx.mean() / full.mean() - 1).item(),
                        "grad_cosine": F.cosine_similarity(g.flatten().double(), g_full.flatten().double(), dim=0).item(),
                        "tail_mass": top.tail.exp().mean().item(), "bytes_per_token": 8 * k + 4, "rows": int(keep.sum())})
    return out


# ----------------------------------------------------------------------------- memory


def reset_peak(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak(device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def current(device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


LOSSES = ("full logits (both models)", "distill_loss, 1 chunk", "distill_loss, ~8 chunks")


def memory_child(which: int, rows: int, vocab: int, d: int, device) -> dict:
    """In a fresh process: one loss forward + backward; its peak above the inputs and its time."""
    from finetune.distill_losses import distill_loss, token_losses

    def inputs(n: int, v: int):
        torch.manual_seed(0)
        h = torch.randn(n, d, device=device, requires_grad=True)
        w = (torch.randn(v, d, device=device) * 0.05).requires_grad_()
        h_t, w_t = torch.randn(n, d, device=device), torch.randn(v, d, device=device) * 0.05
        return h, w, h_t, w_t, torch.randint(0, v, (n,), device=device)

    def run(h, w, h_t, w_t, y):
        if which == 0:
            kd, ce = token_losses(h @ w.T, h_t @ w_t.T, y)
            (0.5 * kd + 0.5 * ce).mean().backward()
        else:
            distill_loss(h, lambda a: a @ w.T, y, lambda r: h_t[r] @ w_t.T, kd_weight=0.5,
                         chunk_size=len(y) if which == 1 else 0, vocab_size=w.shape[0])[0].backward()

    run(*inputs(64, 512))  # warm-up: the kernels' code pages and workspaces are not the loss's memory
    args = inputs(rows, vocab)
    base = current(device)
    reset_peak(device)
    t0 = time.perf_counter()
    run(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"peak": peak(device) - base, "seconds": time.perf_counter() - t0}


def memory(args) -> list[dict]:
    """Each loss in its own process (an allocator that kept a previous run's pages would hide the
    next run's peak), interleaved ``reps`` times; min peak, median time."""
    import subprocess

    stats = {i: [] for i in range(len(LOSSES))}
    for _ in range(args.reps):
        for i in stats:
            cmd = [sys.executable, __file__, "--child", str(i), "--rows", str(args.rows), "--vocab", str(args.vocab),
                   "--d_model", str(args.d_model), "--device", args.device, "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            stats[i].append(json.loads(done.stdout.strip().splitlines()[-1]))
    out = []
    for i, runs in stats.items():
        p, t = min(r["peak"] for r in runs), sorted(r["seconds"] for r in runs)[len(runs) // 2]
        out.append({"run": LOSSES[i], "peak_MiB": p / 2**20, "seconds": t})
    for r in out:
        r["peak_vs_full"], r["time_vs_full"] = r["peak_MiB"] / out[0]["peak_MiB"], r["seconds"] / out[0]["seconds"]
    return out


# ----------------------------------------------------------------------------- speed


def cache_speed(teacher, student, batch, k: int, reps: int, device) -> dict:
    from finetune.distill import make_loss_fn
    from finetune.distill_losses import top_k
    from finetune.distill_recipe import DistillLossConfig

    x, y, mask = (t.to(device) for t in batch)
    vocab = min(teacher.cfg.vocab_size, student.cfg.vocab_size)
    with torch.no_grad():
        top = top_k(teacher(x)[..., :vocab].flatten(0, 1), k)
    B, T = x.shape
    online = {"x": x, "y": y, "loss_mask": mask}
    cached = {**online, "topk_index": top.index.view(B, T, -1), "topk_logp": top.logp.view(B, T, -1),
              "topk_tail": top.tail.view(B, T)}
    loss_fn = make_loss_fn(teacher, DistillLossConfig(kd_weight=0.5), vocab)
    times = {"online": [], "cached": []}
    for _ in range(reps):
        for name, b in (("online", online), ("cached", cached)):
            student.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss_fn(student, b)[0].backward()
            times[name].append(time.perf_counter() - t0)
    med = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    return {"k": k, "online_s": med["online"], "cached_s": med["cached"], "cached_vs_online": med["cached"] / med["online"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="out/bench/distill.json")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child is not None:
        return print(json.dumps(memory_child(args.child, args.rows, args.vocab, args.d_model, device)))
    teacher, student, batch, where = demo_models(device)
    print(f"1. top-k error: {where}")
    errors = topk_error(teacher, student, batch, [1, 4, 16, 64, 256], device)
    print("| divergence | k | loss vs full | gradient cosine | teacher mass outside top k | cache bytes/token |")
    print("|---|---|---|---|---|---|")
    for r in errors:
        print(f"| {r['divergence']} | {r['k']} | {r['rel_error']:+.2%} | {r['grad_cosine']:.4f} | {r['tail_mass']:.2e} | "
              f"{r['bytes_per_token']} |")
    print(f"\n2. memory: {args.rows} rows, vocab {args.vocab}, d {args.d_model}, {device}, {args.threads} thread(s)")
    mem = memory(args)
    print("| loss | peak above inputs | vs full | time | vs full |\n|---|---|---|---|---|")
    for r in mem:
        print(f"| {r['run']} | {r['peak_MiB']:.0f} MiB | {r['peak_vs_full']:.2f}x | {r['seconds']:.3f} s | {r['time_vs_full']:.2f}x |")
    speed = cache_speed(teacher, student, batch, 64, max(args.reps, 5), device)
    print(f"\n3. speed, one micro-batch (16x256) forward + backward: online teacher {speed['online_s']:.3f} s, "
          f"cached top-{speed['k']} {speed['cached_s']:.3f} s ({speed['cached_vs_online']:.2f}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"where": where, "topk": errors, "memory": mem, "speed": speed,
                                          "threads": args.threads, "device": str(device)}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main_guard(main)

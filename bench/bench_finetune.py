"""Memory and speed of full SFT vs LoRA vs QLoRA on one >= 50M-parameter model (or a named one).

    python bench/bench_finetune.py                 # CPU: process RSS; GPU: torch.cuda.max_memory_allocated
    python bench/bench_finetune.py --steps 3 --seq_len 256 --batch_size 2
    python bench/bench_finetune.py --arch deepseek/v3_nano   # the MoE model: experts in NF4 and adapted too

Each mode runs in a fresh subprocess (so one mode's allocations cannot hide another's): build
the model, turn it into the mode (NF4 base for QLoRA, adapters for LoRA/QLoRA), then train a
few optimizer steps of the SFT loss (``finetune.sft.sft_loss``, AdamW on the trainable
parameters, bf16 autocast on CUDA as ``utils/train_loop.py`` runs). Reported per mode:

- peak memory while training (the peak is reset after the model is built; on CPU through
  /proc/self/clear_refs, on GPU through reset_peak_memory_stats) and the whole-process peak;
- bytes per parameter of the quantized base weights (QLoRA; target <= 0.55);
- tokens/s over the timed steps (after warm-up).
Full SFT is the reference: memory and speed ratios are printed against it.
"""
from __future__ import annotations

import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import gc
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from utils.cli import main_guard

MODES = ("full", "lora", "qlora")


def model_config(args):
    from model.config import ModelConfig

    if getattr(args, "arch", None):
        from model import architectures

        cfg = architectures.get(args.arch)
        cfg.max_seq_len = max(cfg.max_seq_len, args.seq_len)
        return cfg
    return ModelConfig(vocab_size=args.vocab_size, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                       n_kv_heads=args.n_heads, d_ff=args.d_ff, max_seq_len=max(args.seq_len, 256))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak(device: torch.device) -> bool:
    """Restart peak tracking; False when the OS does not allow it (CPU peak then covers the build)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


def state_bytes(model, params, opt) -> dict:
    """What each mode must hold besides activations, counted from the tensors themselves:
    weights (4-bit layers at their packed size), gradients of the trainable params, AdamW moments."""
    from model.linear_layers import is_quantized
    from model.quant import quantized_bytes

    weights, seen = 0, set()
    for m in model.modules():
        if is_quantized(m):  # Linear4bit or NF4 experts: their packed size
            bias = getattr(m, "bias", None)
            weights += quantized_bytes(m) + (bias.numel() * bias.element_size() if bias is not None else 0)
            seen.update(id(p) for p in m.parameters(recurse=False))
    weights += sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in seen)
    grads = sum(p.numel() * p.element_size() for p in params)  # one gradient per trainable param
    optim = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    return {"weight_bytes": weights, "grad_bytes": grads, "optim_bytes": optim}


def worker(args) -> dict:
    """One mode in this process; returns its measurements."""
    import resource

    from finetune.sft import sft_loss
    from model.lora import apply_lora
    from model.transformer import Transformer

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "qlora":
        import bitsandbytes  # noqa: F401  (loaded before the floor: "model memory" counts weights, not libraries)
    # Floor every mode shares: libraries loaded and their kernels initialised (one tiny step).
    tiny = Transformer(model_config(argparse.Namespace(**{**vars(args), "arch": "", "vocab_size": 64, "d_model": 32, "n_layers": 1,
                                                          "n_heads": 2, "d_ff": 64}))).to(device)
    sft_loss(tiny, [torch.ones(1, 8, dtype=torch.long, device=device)] * 2 + [torch.ones(1, 8, dtype=torch.bool, device=device)])[0].backward()
    del tiny
    gc.collect()
    base_rss = _status_kib("VmRSS") * 1024
    model = Transformer(model_config(args)).to(device)
    n_params = model.num_params()
    out = {"mode": args.worker, "device": str(device), "params": n_params}
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.worker == "qlora":
        from model.linear_layers import is_quantized
        from model.quant import base_bytes_per_param, quantize_model, quantized_params

        quantize_model(model, "all-linear", compute)
        out["base_bytes_per_param"] = base_bytes_per_param(model)
        out["quantized_params"] = sum(quantized_params(m) for m in model.modules() if is_quantized(m))
    if args.worker in ("lora", "qlora"):
        apply_lora(model, "all-linear", r=args.rank, alpha=2 * args.rank)
    params = [p for p in model.parameters() if p.requires_grad]
    out["trainable"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    out["peak_reset"] = reset_peak(device)
    out["model_bytes"] = (torch.cuda.memory_allocated() if device.type == "cuda"
                          else _status_kib("VmRSS") * 1024 - base_rss)

    g = torch.Generator().manual_seed(0)
    B, T = args.batch_size, args.seq_len
    x = torch.randint(0, args.vocab_size, (B, T), generator=g).to(device)
    y = torch.randint(0, args.vocab_size, (B, T), generator=g).to(device)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    mask[:, T // 4:] = True  # the assistant part of each row
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss, _ = sft_loss(model, (x, y, mask))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out["tokens_per_s"] = args.steps * B * T / dt
    out.update(state_bytes(model, params, opt))
    out["train_peak_bytes"] = peak_bytes(device)
    out["process_peak_bytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if device.type == "cpu"
                                 else torch.cuda.max_memory_allocated())
    out["import_floor_bytes"] = base_rss if device.type == "cpu" else 0
    return out


def run_mode(mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode] + [f"--{k}={v}" for k, v in vars(args).items()
                                                          if k not in ("worker", "cpu") and v is not None]
    if args.cpu:
        cmd.append("--cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: list[dict], args) -> str:
    gib = 1024**3
    full = results[0]
    r0 = results[0]
    what = "GPU max_memory_allocated" if r0["device"].startswith("cuda") else "process RSS (VmHWM)"
    lines = [
        f"# Finetuning memory and speed ({platform.machine()}, {r0['device']}, torch {torch.__version__})",
        f"model: {r0['params'] / 1e6:.1f}M params ({args.arch or f'd_model {args.d_model}, {args.n_layers} layers'}, "
        f"vocab {args.vocab_size}); micro-batch {args.batch_size}x{args.seq_len}; LoRA r={args.rank} on all linear "
        "layers (and routed experts); AdamW; "
        f"{args.steps} timed steps after {args.warmup} warm-up",
        f"memory = {what}; 'train peak' is reset after the model is built (CPU import floor "
        f"{r0['import_floor_bytes'] / gib:.2f} GiB is included in CPU figures; 'above floor' removes it)",
        f"load average during the run: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
        f"on {os.cpu_count()} CPUs (tokens/s on a shared CPU vary with it)",
        "",
        "| mode | trainable params | model memory | train peak | vs full | above floor | vs full | process peak | tokens/s | vs full |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        above, full_above = (x["train_peak_bytes"] - x["import_floor_bytes"] for x in (r, full))
        lines.append(
            f"| {r['mode']} | {r['trainable'] / 1e6:.2f}M | {r['model_bytes'] / gib:.3f} GiB | {r['train_peak_bytes'] / gib:.3f} GiB | "
            f"{r['train_peak_bytes'] / full['train_peak_bytes']:.2f}x | {above / gib:.3f} GiB | {above / full_above:.2f}x | "
            f"{r['process_peak_bytes'] / gib:.3f} GiB | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / full['tokens_per_s']:.2f}x |")
    lines += ["", "Tensors each mode holds besides activations (weights + gradients + AdamW moments):", "",
              "| mode | weights | gradients | optimizer | total | vs full |", "|---|---|---|---|---|---|"]
    full_total = sum(full[k] for k in ("weight_bytes", "grad_bytes", "optim_bytes"))
    for r in results:
        total = sum(r[k] for k in ("weight_bytes", "grad_bytes", "optim_bytes"))
        lines.append(f"| {r['mode']} | {r['weight_bytes'] / 2**20:.0f} MiB | {r['grad_bytes'] / 2**20:.0f} MiB | "
                     f"{r['optim_bytes'] / 2**20:.0f} MiB | {total / 2**20:.0f} MiB | {total / full_total:.2f}x |")
    q = next((r for r in results if r["mode"] == "qlora"), None)
    if q is not None:
        lines.append("")
        lines.append(f"QLoRA base: {q['quantized_params'] / 1e6:.1f}M params in NF4 (double quant) at "
                     f"{q['base_bytes_per_param']:.4f} bytes/param (target <= 0.55; fp32 is 4, bf16 is 2)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--arch", default="", help="a named architecture (model/architectures.py) instead of the sizes below")
    p.add_argument("--vocab_size", type=int, default=8192)
    p.add_argument("--d_model", type=int, default=640)
    p.add_argument("--n_layers", type=int, default=10)
    p.add_argument("--n_heads", type=int, default=10)
    p.add_argument("--d_ff", type=int, default=1728)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--cpu", action="store_true", help="stay on CPU even when CUDA is present")
    args = p.parse_args()
    if args.arch:  # the named model's own vocabulary (the workers get it on their command line)
        args.vocab_size = model_config(args).vocab_size
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = [run_mode(m, args) for m in args.modes.split(",")]
    print(report(results, args))


if __name__ == "__main__":
    main_guard(main)

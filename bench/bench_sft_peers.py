"""SFT, LoRA and QLoRA training speed and memory: ours against HF ``Trainer`` + ``peft`` (+ ``bitsandbytes``).

    python bench/bench_sft_peers.py [--modes full,lora,qlora] [--steps 10] [--rounds 2] [--threads 1]
    python bench/bench_sft_peers.py --sft_bins ''        # random tokens instead of data/bins/sft

One base model (``--arch``, fresh weights, seeded) is saved as our checkpoint and exported to
the HF layout (``model.hf_interop.export_hf``): the same weights on both sides. The batches
(``--sft_bins``, the pipeline's chat bins: x, y and the assistant-only loss mask) are read
once and replayed in the same order to both sides, fp32, dropout off. Per mode:

- ours: ``finetune.sft.run_sft`` (the SFT stage: base -> NF4 -> LoRA -> ``utils.train_loop.train``);
- HF: ``AutoModelForCausalLM`` (QLoRA: ``BitsAndBytesConfig`` NF4, double quant, fp32 compute)
  + ``PeftModel`` over the adapter we exported with ``model.peft_export.export_peft_adapter``
  (the same LoRA A init; B = 0), trained by ``transformers.Trainer``.

Same hyperparameters: AdamW (betas 0.9/0.999, eps 1e-8, no weight decay), constant LR, grad
clip 1.0, LoRA r=16 alpha=32 on every linear layer of the blocks (q, k, v, o, gate, up, down;
not lm_head). Each side runs in its own process (its peak RSS is its own); the sides take
turns over ``--rounds``. Printed per mode: tokens/s (median step), ratio ours/HF per round,
train-phase and whole-process peak RSS, and the loss curves of the first steps, which must
agree within ``--loss_tol`` (relative) -- a correctness check beside the speed figure.
"""
from __future__ import annotations

import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from bench import peers
from utils.cli import main_guard

MODES = ("full", "lora", "qlora")
SIDES = ("ours", "hf")


class Replay:
    """The same batches in the same order; the first fetch starts the train-phase peak window."""

    def __init__(self, batches: list, window: peers.PeakWindow):
        self.batches, self.i, self.window = batches, 0, window

    def __iter__(self):
        return self

    def __next__(self):
        if self.i == 0:
            self.window.start()
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


# ----------------------------------------------------------------------------- the two sides


def ours_worker(job: dict) -> dict:
    from finetune.recipe import SFTDataConfig, SFTModelConfig, SFTRecipe
    from finetune.sft import run_sft
    from model.lora import LoRAConfig
    from model.quant import QLoRAConfig
    from utils.optim import OptimConfig
    from utils.spike import SpikeConfig
    from utils.train_config import TrainConfig

    mode = job["mode"]
    x, y, mask = torch.load(job["batches"], weights_only=True)
    window, clock = peers.PeakWindow(), peers.ours_step_clock()
    batches = Replay([(x[i], y[i], mask[i]) for i in range(x.shape[0])], window)
    with tempfile.TemporaryDirectory() as out:
        train = TrainConfig(out_dir=out, max_steps=job["steps"], batch_size=x.shape[1], seq_len=x.shape[2], device="cpu",
                            dtype="fp32", resume="never", progress=False, log_every=10**6, save_every=0, seed=job["seed"],
                            spike=SpikeConfig(enabled=False))
        lora = LoRAConfig(r=job["rank"], alpha=2 * job["rank"], targets="all-linear") if mode != "full" else None
        recipe = SFTRecipe(model=SFTModelConfig(init_from=job["base"]), data=SFTDataConfig(bin_dir=out), train=train,
                           optim=OptimConfig(lr=job["lr"], weight_decay=0.0, betas=[0.9, 0.999], eps=1e-8, grad_clip=1.0,
                                             schedule="constant", warmup_steps=0),
                           lora=lora, qlora=QLoRAConfig(compute_dtype="fp32", double_quant=True) if mode == "qlora" else None,
                           format_eval_prompts=0)
        run_sft(recipe, mode, batches=batches)
        mem = window.stop()
        history = peers.ours_history(out)
    return {"stamps": clock, "loss": [h["loss"] for h in history], **mem}


def hf_worker(job: dict) -> dict:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

    mode = job["mode"]
    x, y, mask = torch.load(job["batches"], weights_only=True)
    quant = None
    if mode == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(job["hf"], dtype=torch.float32, quantization_config=quant)
    if mode != "full":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, job["peft_adapter"], is_trainable=True)

    class Rows(torch.utils.data.IterableDataset):
        """Our batches, row by row, in order (the Trainer's DataLoader regroups them)."""

        def __iter__(self):
            for i in range(x.shape[0]):
                for r in range(x.shape[1]):
                    yield {"x": x[i, r], "y": y[i, r], "mask": mask[i, r]}

    def collate(rows: list[dict]) -> dict:
        # y is already the next token of x: hand it over as shift_labels so HF scores exactly
        # our targets (its default shifts labels inside the loss and drops the last one).
        targets = torch.stack([r["y"].masked_fill(~r["mask"].bool(), -100) for r in rows])
        return {"input_ids": torch.stack([r["x"] for r in rows]), "labels": targets, "shift_labels": targets}

    stamps = peers.hf_callback()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=job["steps"], per_device_train_batch_size=x.shape[1],
                                 learning_rate=job["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                                 adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, logging_steps=1,
                                 save_strategy="no", report_to=[], use_cpu=True, seed=job["seed"], disable_tqdm=True,
                                 dataloader_num_workers=0, remove_unused_columns=False)
        Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collate, callbacks=[stamps]).train()
    return {"stamps": stamps.stamps, "loss": [r["loss"] for r in stamps.logs], **stamps.window.stop()}


def run_side(side: str, job: dict) -> dict:
    return ours_worker(job) if side == "ours" else hf_worker(job)


# ----------------------------------------------------------------------------- set-up


def read_batches(args, n: int, vocab: int) -> tuple[torch.Tensor, ...]:
    """(n, B, T) x, y and the bool loss mask: the SFT bins' first n training batches, or random
    tokens with the last three quarters of each row scored when ``--sft_bins`` is empty."""
    B, T = args.batch_size, args.seq_len
    if args.sft_bins:
        from data_pipeline.loader import SFTLoader

        loader = SFTLoader(args.sft_bins, "train", T, B, seed=args.seed)
        rows = [next(loader) for _ in range(n)]
        x, y, m = (torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in range(3))
        return x.long(), y.long(), m.bool()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(5, vocab, (n, B, T), generator=g)
    y = torch.cat([x[:, :, 1:], torch.randint(5, vocab, (n, B, 1), generator=g)], dim=2)
    m = torch.zeros(n, B, T, dtype=torch.bool)
    m[:, :, T // 4:] = True
    return x, y, m


def export_adapter(base: Path, out: Path, mode: str, rank: int, seed: int) -> Path:
    """The LoRA init our run will start from (same seed, same order: NF4 first, then adapters),
    exported in PEFT's layout for the HF side."""
    from model.peft_export import export_peft_adapter
    from model.load import load_model
    from model.lora import LoRAConfig, apply_lora
    from model.quant import quantize_model

    model = load_model(base, train=True)
    if mode == "qlora":
        quantize_model(model, "all-linear")
    torch.manual_seed(seed)  # as finetune.sft.build_sft_model seeds the adapter init
    apply_lora(model, "all-linear", r=rank, alpha=2 * rank)
    return export_peft_adapter(model, LoRAConfig(r=rank, alpha=2 * rank), out)


def loss_check(ours: list[float], hf: list[float], n: int, tol: float) -> tuple[float, bool]:
    """Largest relative difference of the first n losses, and whether it is within tol."""
    k = min(n, len(ours), len(hf))
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours[:k], hf[:k]))
    return worst, worst <= tol


def report_mode(mode: str, res: dict, args, tokens_per_step: int) -> tuple[list[str], bool]:
    o, h = res["ours"], res["hf"]
    ratios, cpu_ratios = peers.ratio_rounds(o, h), peers.ratio_rounds(o, h, "step_cpu_s")
    tps = {s: tokens_per_step / statistics.median(peers.pooled(res[s])) for s in SIDES}
    tps_cpu = {s: tokens_per_step / statistics.median(peers.pooled(res[s], "step_cpu_s")) for s in SIDES}
    mem = {s: (max(r["train_peak_bytes"] for r in res[s]), max(r["process_peak_bytes"] for r in res[s])) for s in SIDES}
    worst, ok = loss_check(o[0]["loss"], h[0]["loss"], args.loss_steps, args.loss_tol)
    same_runs = all(r["loss"] == o[0]["loss"] for r in o[1:])
    lines = [f"| {mode} | {tps['ours']:,.0f} | {tps['hf']:,.0f} | "
             f"**{statistics.median(ratios):.2f}x** ({peers.spread(ratios)}) | {tps_cpu['ours']:,.0f} | {tps_cpu['hf']:,.0f} | "
             f"**{statistics.median(cpu_ratios):.2f}x** ({peers.spread(cpu_ratios)}) | "
             f"{peers.gib(mem['ours'][0])} | {peers.gib(mem['hf'][0])} | {mem['ours'][0] / mem['hf'][0]:.2f}x | "
             f"{peers.gib(mem['ours'][1])} | {peers.gib(mem['hf'][1])} | {worst:.1e} {'ok' if ok else 'FAIL'} |"]
    curve = " ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(o[0]["loss"][: args.loss_steps], h[0]["loss"][: args.loss_steps]))
    note = "" if same_runs else " (our rounds differ from each other!)"
    return lines + [f"  {mode} loss ours/HF, steps 1..{args.loss_steps}: {curve}{note}"], ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    peers.add_common_args(p, SIDES)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--arch", default="llama/llama3_nano", help="named architecture (model/architectures.py), fresh weights")
    p.add_argument("--sft_bins", default="data/bins/sft", help="SFT bins (build_sft_bins.py); '' = random tokens")
    p.add_argument("--tokenizer", default="data/tokenizer/tokenizer.json", help="copied beside the base checkpoint")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run (the first --warmup are not timed)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="runs per side, alternating")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--loss_steps", type=int, default=10, help="steps of the loss curves compared")
    p.add_argument("--loss_tol", type=float, default=1e-3, help="largest relative loss difference allowed")
    args = p.parse_args()
    if args.worker:
        return peers.worker_main(args.worker, args.job, run_side)
    peers.require("transformers", "peft", "bitsandbytes")
    print(peers.header("SFT / LoRA / QLoRA: ours vs HF Trainer + peft", args.threads))
    print(f"peers: {peers.versions('transformers', 'peft', 'bitsandbytes', 'accelerate')}")
    all_ok = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = Path(args.tokenizer) if args.tokenizer and Path(args.tokenizer).is_file() else None
        base = peers.make_base(tmp, args.arch, tok, seed=args.seed, shrink=json.loads(args.shrink or "{}"))
        from model.load import read_config

        x, y, m = read_batches(args, args.steps, read_config(base.ours).vocab_size)
        torch.save((x, y, m), tmp / "batches.pt")
        tokens_per_step = args.batch_size * args.seq_len
        print(f"model: {args.arch} ({base.params / 1e6:.2f}M params), fp32 | batch {args.batch_size}x{args.seq_len} "
              f"({'SFT bins ' + args.sft_bins if args.sft_bins else 'random tokens'}, {m.float().mean():.0%} of targets "
              f"scored) | {args.steps} steps per run, first {args.warmup} untimed | {args.rounds} rounds | LoRA r={args.rank}")
        rows = ["| mode | ours tok/s wall | HF | ours/HF wall (per-round spread) | ours tok/s CPU | HF | ours/HF CPU | "
                "ours train peak | HF train peak | ours/HF | ours process peak | HF process peak | loss rel. diff |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        curves = []
        for mode in args.modes.split(","):
            job = {"mode": mode, "base": str(base.ours), "hf": str(base.hf), "batches": str(tmp / "batches.pt"),
                   "steps": args.steps, "warmup": args.warmup, "lr": args.lr, "rank": args.rank, "seed": args.seed,
                   "threads": args.threads}
            if mode != "full":
                job["peft_adapter"] = str(export_adapter(base.ours, tmp / f"peft_{mode}", mode, args.rank, args.seed))
            job_path = peers.write_job(tmp / f"job_{mode}.json", job)
            print(f"{mode}:", flush=True)
            res = peers.alternate(SIDES, args.rounds, lambda s: peers.run_worker(__file__, s, job_path, args.threads))
            lines, ok = report_mode(mode, res, args, tokens_per_step)
            rows.append(lines[0])
            curves += lines[1:]
            all_ok &= ok
    print(f"\nload average at end {peers.load_avg()}; tokens/s from the median step of all rounds (wall: what a user "
          "waits; CPU: the process's CPU time, steadier on a shared machine); train peak = peak RSS from the first "
          "training step on (import floor and model included)\n")
    print("\n".join(rows + [""] + curves))
    print(f"\nloss agreement (first {args.loss_steps} steps, relative tolerance {args.loss_tol:g}): "
          f"{'all modes ok' if all_ok else 'FAILED'}")
    if not all_ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main_guard(main)

"""DPO training speed and memory: ours against TRL ``DPOTrainer``, same model, pairs, order and hyperparameters.

    python bench/bench_dpo_peers.py [--steps 8] [--rounds 2] [--batch_size 8] [--threads 1]
    python bench/bench_dpo_peers.py --sides ours,trl          # leave out TRL's live-reference run

One base model (``--arch``, fresh weights, seeded; or ``--init_from`` a trained checkpoint) is
saved as our checkpoint and exported to the HF layout: the same weights on both sides. The
pairs are the preference bins' first ``steps x batch_size`` training pairs (prompt, chosen,
rejected token ids, fitted to ``--seq_len`` by our loader), served in our trainer's seeded
order; TRL gets the same ids in that order (its own tokenization and shuffling are skipped).
Full-parameter DPO, sigmoid loss, ``--beta``, fp32, dropout off, AdamW (0.9/0.999, no weight
decay), constant LR, grad clip 1.0. Sides, each in its own process, taking turns:

- ours: ``align/train_offline.py``'s ``run`` (reference log-probs computed once before training);
- trl: ``DPOTrainer`` with ``precompute_ref_log_probs=True`` (the same reference handling);
- trl_live_ref: ``DPOTrainer``'s default, a frozen reference model run at every step.

TRL's ``gradient_checkpointing`` (on by default in its configs) is off, as ours does not
recompute. Printed: steps/s (median step), the ratio per round, peak RSS, and the loss curves:
step 1 must be ln 2 on both sides (policy == reference) and the curves agree within ``--loss_tol``.
"""
from __future__ import annotations

import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

import torch

from bench import peers
from utils.cli import main_guard

SIDES = ("ours", "trl", "trl_live_ref")


def train_config(out: str, job: dict):
    from utils.spike import SpikeConfig
    from utils.train_config import TrainConfig

    return TrainConfig(out_dir=out, max_steps=job["steps"], batch_size=job["batch_size"], seq_len=job["seq_len"],
                       device="cpu", dtype="fp32", resume="never", progress=False, log_every=10**6, save_every=0,
                       eval_every=0, seed=job["seed"], spike=SpikeConfig(enabled=False))


def optim_config(job: dict):
    from utils.optim import OptimConfig

    return OptimConfig(lr=job["lr"], weight_decay=0.0, betas=[0.9, 0.999], eps=1e-8, grad_clip=1.0, schedule="constant",
                       warmup_steps=0)


# ----------------------------------------------------------------------------- the sides


def ours_worker(job: dict) -> dict:
    from align import train_offline
    from align.recipe import OfflineLossConfig, OfflineRecipe, PolicyConfig, PreferenceDataConfig

    window, clock = peers.PeakWindow(), peers.ours_step_clock()
    with tempfile.TemporaryDirectory() as out:
        recipe = OfflineRecipe(algorithm="dpo", model=PolicyConfig(init_from=job["base"]), train=train_config(out, job),
                               data=PreferenceDataConfig(bin_dir=job["pref_bins"], max_train_pairs=job["n_pairs"],
                                                         max_val_pairs=job["val_pairs"]),
                               loss=OfflineLossConfig(beta=job["beta"]), optim=optim_config(job))
        window.start()  # the whole stage: reference pass and training (TRL's peak window starts before both too)
        train_offline.run(recipe)
        mem = window.stop()
        history = peers.ours_history(out)
    return {"stamps": clock, "loss": [h["loss"] for h in history], **mem}


def trl_worker(job: dict, precompute: bool) -> dict:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    class PretokenizedDPO(DPOTrainer):
        """DPOTrainer over rows that already hold our token ids, served in the order given."""

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # prompt_ids / chosen_ids / rejected_ids: the exact ids our side trains on

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    rows = json.loads(Path(job["pairs"]).read_text())
    window = peers.PeakWindow()
    window.start()  # before the reference pass, as on our side
    model = AutoModelForCausalLM.from_pretrained(job["hf"], dtype=torch.float32)
    stamps = peers.hf_callback()
    stamps.window = window  # one window over reference pass + training
    stamps.on_train_begin = lambda *a, **k: None
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, max_steps=job["steps"], per_device_train_batch_size=job["batch_size"],
                         learning_rate=job["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                         adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, logging_steps=1,
                         save_strategy="no", report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
                         beta=job["beta"], loss_type=["sigmoid"], precompute_ref_log_probs=precompute,
                         precompute_ref_batch_size=job["batch_size"], max_length=None, remove_unused_columns=False,
                         disable_dropout=True, seed=job["seed"], disable_tqdm=True, dataloader_num_workers=0)
        trainer = PretokenizedDPO(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=peers.hf_tokenizer(Path(job["tokenizer"])), callbacks=[stamps])
        trainer.train()
    return {"stamps": stamps.stamps, "loss": [r["loss"] for r in stamps.logs], **window.stop()}


def run_side(side: str, job: dict) -> dict:
    return ours_worker(job) if side == "ours" else trl_worker(job, precompute=side == "trl")


# ----------------------------------------------------------------------------- set-up and report


def ordered_pairs(bins: str, tokenizer: Path, seq_len: int, n_pairs: int, batch_size: int, steps: int, seed: int) -> list[dict]:
    """The pairs our run trains on, in its order (align.preference.PairBatches with the run's seed)."""
    from align.preference import PairBatches
    from align.preference_data import load_preference_bins
    from data_pipeline.tokenizer.tokenizer import file_hash

    pairs, _ = load_preference_bins(bins, "train", file_hash(tokenizer), seq_len, n_pairs)
    batches = PairBatches(pairs, batch_size, seed=seed)
    order = [i for _ in range(steps) for i in batches._next_indices()]
    return [{"prompt_ids": pairs[i].prompt, "chosen_ids": pairs[i].chosen, "rejected_ids": pairs[i].rejected} for i in order]


def report(res: dict, args, sides: list[str]) -> bool:
    ours = res["ours"]
    print(f"\nload average at end {peers.load_avg()}; steps/s from the median step of all rounds; peak RSS over the "
          "reference pass and training (model and libraries included)\n")
    print("| side | steps/s wall | steps/s CPU | ours vs side, wall (per-round spread) | CPU | peak RSS | ours/side | "
          "step-1 loss |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for s in sides:
        r = res[s]
        sps, sps_cpu = (1 / statistics.median(peers.pooled(r, k)) for k in ("step_s", "step_cpu_s"))
        ratios, cpu_ratios = peers.ratio_rounds(ours, r), peers.ratio_rounds(ours, r, "step_cpu_s")
        peak = max(x["train_peak_bytes"] for x in r)
        ours_peak = max(x["train_peak_bytes"] for x in ours)
        first = r[0]["loss"][0]
        ok &= abs(first - math.log(2)) <= 1e-4
        vs = ("1.00x | 1.00x" if s == "ours" else f"**{statistics.median(ratios):.2f}x** ({peers.spread(ratios)}) | "
              f"**{statistics.median(cpu_ratios):.2f}x** ({peers.spread(cpu_ratios)})")
        print(f"| {s} | {sps:.3f} | {sps_cpu:.3f} | {vs} | {peers.gib(peak)} | {ours_peak / peak:.2f}x | {first:.6f} |")
    print()
    for s in sides[1:]:
        a, b = ours[0]["loss"][: args.loss_steps], res[s][0]["loss"][: args.loss_steps]
        worst = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))
        ok &= worst <= args.loss_tol
        print(f"loss ours/{s}, steps 1..{len(a)}: " + " ".join(f"{x:.5f}/{y:.5f}" for x, y in zip(a, b))
              + f"  | largest relative difference {worst:.1e} ({'ok' if worst <= args.loss_tol else 'FAIL'})")
    print(f"\nstep 1 = ln 2 = {math.log(2):.6f} on every side (within 1e-4) and loss curves within {args.loss_tol:g}: "
          f"{'ok' if ok else 'FAILED'}")
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    peers.add_common_args(p, SIDES)
    p.add_argument("--sides", default=",".join(SIDES), help="ours first")
    p.add_argument("--arch", default="llama/llama3_nano", help="named architecture (model/architectures.py), fresh weights")
    p.add_argument("--init_from", default="", help="a trained checkpoint instead of fresh weights (adapters merged)")
    p.add_argument("--pref_bins", default="data/bins/preference", help="preference bins (build_preference_bins.py)")
    p.add_argument("--tokenizer", default="data/tokenizer/tokenizer.json", help="the tokenizer the bins were built with")
    p.add_argument("--batch_size", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first --warmup are not timed)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--loss_steps", type=int, default=8)
    p.add_argument("--loss_tol", type=float, default=1e-3, help="largest relative loss difference allowed")
    args = p.parse_args()
    if args.worker:
        return peers.worker_main(args.worker, args.job, run_side)
    peers.require("trl", "transformers")
    sides = args.sides.split(",")
    print(peers.header("DPO: ours vs TRL DPOTrainer", args.threads))
    print(f"peers: {peers.versions('trl', 'transformers', 'accelerate', 'datasets')}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = peers.make_base(tmp, args.arch, Path(args.tokenizer), args.init_from, args.seed, json.loads(args.shrink or "{}"))
        n_pairs = args.steps * args.batch_size
        rows = ordered_pairs(args.pref_bins, base.tokenizer, args.seq_len, n_pairs, args.batch_size, args.steps, args.seed)
        (tmp / "pairs.json").write_text(json.dumps(rows))
        tokens = statistics.mean(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
        print(f"model: {args.init_from or args.arch} ({base.params / 1e6:.2f}M params), fp32 | {args.batch_size} pairs per step "
              f"({tokens:.0f} tokens per pair on average, chosen + rejected) | beta {args.beta} | lr {args.lr} | "
              f"{args.steps} steps per run, first {args.warmup} untimed | {args.rounds} rounds")
        job = {"base": str(base.ours), "hf": str(base.hf), "tokenizer": str(base.tokenizer), "pairs": str(tmp / "pairs.json"),
               "pref_bins": args.pref_bins, "n_pairs": n_pairs, "val_pairs": 8, "steps": args.steps, "warmup": args.warmup,
               "batch_size": args.batch_size, "seq_len": args.seq_len, "beta": args.beta, "lr": args.lr, "seed": args.seed,
               "threads": args.threads}
        job_path = peers.write_job(tmp / "job.json", job)
        res = peers.alternate(sides, args.rounds, lambda s: peers.run_worker(__file__, s, job_path, args.threads))
    if not report(res, args, sides):
        raise SystemExit(1)


if __name__ == "__main__":
    main_guard(main)

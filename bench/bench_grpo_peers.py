"""GRPO wall time per optimizer step, rollouts included: ours (paged, continuously batched engine)
against TRL ``GRPOTrainer`` (HF ``generate``), same policy, prompts, sampling and reward.

    python bench/bench_grpo_peers.py [--init_from out/demo/runs/dpo/final] [--steps 6] [--rounds 2] [--threads 1]
    python bench/bench_grpo_peers.py --init_from '' --arch llama/llama3_nano    # fresh weights: speed only

The policy (``--init_from``, default the demo's DPO output, so rewards are not all zero; or a
fresh ``--arch`` model) is saved as our checkpoint and exported to the HF layout. Both sides:
the demo's GRPO settings -- ``--prompts_per_step`` arithmetic prompts from the pipeline's
``rl_train.jsonl`` x ``--group_size`` samples at ``--temperature``, ``--max_new_tokens``, the
``gsm8k_combined`` rule reward, KL beta 0.04 to a frozen reference, clip 0.2, token-level loss
over the whole batch (TRL's ``dapo``), rewards scaled by the group std, one optimizer step per
rollout (the buffer in micro-batches of ``--micro_batch``), AdamW (0.9/0.999, no weight decay),
constant LR, grad clip 1.0, fp32. The prompts are our trainer's seeded choice, in its order;
TRL gets the same token ids (its tokenization and shuffling are skipped) and stops on the same
ids (<|im_end|>, <|endoftext|>). TRL's ``gradient_checkpointing`` is off, as ours does not recompute.

- ours: ``align/train_online.py``'s ``run`` (rollouts through ``inference.engine.LLMEngine``, its batch
  as wide as the rollout: ``rollout.max_num_seqs`` = prompts x group);
- trl: ``GRPOTrainer`` without vLLM, i.e. ``model.generate`` on the whole batch (left-padded).

Printed: median wall time per optimizer step (rollout, scoring, reference and old log-probs,
forward/backward, AdamW), the ratio per round, rollout tokens/s of each side, peak RSS, and the
mean reward of every step for both (sampling differs between the two, so the curves are
compared by eye, not by tolerance).
"""
from __future__ import annotations

import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from bench import peers
from utils.cli import main_guard

SIDES = ("ours", "trl")


class RolloutClock:
    """Wall and CPU seconds and completion tokens of every rollout (engine set-up + generation)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.tokens: list[int] = []

    def add(self, start: tuple[float, float], tokens: int) -> None:
        now = peers.stamp()
        self.wall.append(now[0] - start[0])
        self.cpu.append(now[1] - start[1])
        self.tokens.append(tokens)

    def summary(self) -> dict:
        return {"rollout_s": self.wall, "rollout_cpu_s": self.cpu, "rollout_tokens": self.tokens}


# ----------------------------------------------------------------------------- the sides


def ours_worker(job: dict) -> dict:
    from align import online, train_online
    from align.recipe import OnlineRecipe, PolicyConfig, RewardConfig, RLConfig, RolloutConfig
    from utils.optim import OptimConfig
    from utils.spike import SpikeConfig
    from utils.train_config import TrainConfig

    # Time each rollout as align/online.py runs it: from building the engine to the last sample.
    rollouts, make_engine, generate = RolloutClock(), online.make_engine, online.generate_rollouts
    start = {}

    def timed_engine(*a, **k):
        start["t"] = peers.stamp()
        return make_engine(*a, **k)

    def timed_generate(*a, **k):
        ro = generate(*a, **k)
        rollouts.add(start["t"], int(ro.response_lengths.sum()))
        return ro

    online.make_engine, online.generate_rollouts = timed_engine, timed_generate
    window, clock = peers.PeakWindow(), peers.ours_step_clock()
    with tempfile.TemporaryDirectory() as out:
        rows = job["group_size"] * job["prompts_per_step"]
        recipe = OnlineRecipe(
            algorithm="grpo", model=PolicyConfig(init_from=job["base"]),
            train=TrainConfig(out_dir=out, max_steps=job["steps"], batch_size=job["micro_batch"], global_batch_size=rows,
                              seq_len=256, device="cpu", dtype="fp32", resume="never", progress=False, log_every=10**6,
                              save_every=0, eval_every=0, seed=job["seed"], spike=SpikeConfig(enabled=False)),
            rollout=RolloutConfig(train_prompts=job["prompts"], test_prompts="", prompts_per_rollout=job["prompts_per_step"],
                                  group_size=job["group_size"], max_new_tokens=job["max_new_tokens"],
                                  temperature=job["temperature"], max_num_seqs=rows, eval_prompts=0),
            reward=RewardConfig(function=job["reward"]),
            rl=RLConfig(epochs=1, clip_eps=0.2, kl_beta=job["kl_beta"], aggregation="token", scale_rewards=True),
            optim=OptimConfig(lr=job["lr"], weight_decay=0.0, betas=[0.9, 0.999], eps=1e-8, grad_clip=1.0,
                              schedule="constant", warmup_steps=0))
        window.start()
        train_online.run(recipe)
        mem = window.stop()
        history = peers.ours_history(out)
    return {"stamps": clock, "reward": [h["reward_mean"] for h in history],
            "loss": [h["loss"] for h in history], **rollouts.summary(), **mem}


def trl_worker(job: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from align.rewards import get_reward_fn

    prompt_ids = {r["question"]: r["prompt_ids"] for r in job["rows"]}
    rollouts = RolloutClock()

    class SameIdsGRPO(GRPOTrainer):
        """GRPOTrainer fed our chat-rendered prompt ids (looked up by question), its rollouts timed."""

        def _tokenize_prompts(self, prompts):
            return [prompt_ids[p] for p in prompts], None, {}

        def _generate_single_turn(self, *args, **kwargs):
            t = peers.stamp()
            completion_ids, logprobs = super()._generate_single_turn(*args, **kwargs)
            rollouts.add(t, sum(len(c) for c in completion_ids))
            return completion_ids, logprobs

    rule = get_reward_fn(job["reward"])

    def reward(prompts, completions, answer, **kwargs) -> list[float]:
        return [rule(c, a) for c, a in zip(completions, answer)]

    reward.__name__ = job["reward"]
    window = peers.PeakWindow()
    window.start()
    model = AutoModelForCausalLM.from_pretrained(job["hf"], dtype=torch.float32)
    model.generation_config.eos_token_id = job["stop_ids"]  # our chat_stop_ids
    stamps = peers.hf_callback()
    stamps.window, stamps.on_train_begin = window, (lambda *a, **k: None)  # one window over everything, as ours
    rows = job["group_size"] * job["prompts_per_step"]
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, max_steps=job["steps"], per_device_train_batch_size=job["micro_batch"],
                          gradient_accumulation_steps=rows // job["micro_batch"], num_generations=job["group_size"],
                          max_completion_length=job["max_new_tokens"], temperature=job["temperature"], top_p=1.0, top_k=0,
                          beta=job["kl_beta"], epsilon=0.2, loss_type="dapo", scale_rewards="group", num_iterations=1,
                          learning_rate=job["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                          adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, logging_steps=1,
                          save_strategy="no", report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
                          shuffle_dataset=False, disable_dropout=True, seed=job["seed"], disable_tqdm=True,
                          dataloader_num_workers=0, remove_unused_columns=False)
        dataset = Dataset.from_list([{"prompt": r["question"], "answer": r["answer"]} for r in job["rows"]])
        trainer = SameIdsGRPO(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                              processing_class=peers.hf_tokenizer(Path(job["tokenizer"])), callbacks=[stamps])
        trainer.train()
    return {"stamps": stamps.stamps, "reward": [r["reward"] for r in stamps.logs], "loss": [r["loss"] for r in stamps.logs],
            **rollouts.summary(), **window.stop()}


def run_side(side: str, job: dict) -> dict:
    return ours_worker(job) if side == "ours" else trl_worker(job)


# ----------------------------------------------------------------------------- set-up and report


def ordered_prompts(path: str, tokenizer_json: Path, steps: int, per_step: int, seed: int) -> list[dict]:
    """The prompts our run draws, rollout by rollout (align.online.RolloutPhase.prompt_indices),
    with their chat-rendered ids (align.rollout.encode_prompts)."""
    from align.online import RolloutPhase
    from align.rollout import encode_prompts, load_prompts
    from data_pipeline.tokenizer.tokenizer import Tokenizer

    rows = load_prompts(path)
    phase = SimpleNamespace(prompts=rows, P=per_step, world_size=1, rank=0, seed=seed)
    order = [i for r in range(steps) for i in RolloutPhase.prompt_indices(phase, r)]
    ids = encode_prompts(Tokenizer.from_file(tokenizer_json), [rows[i]["question"] for i in order])
    return [{"question": rows[i]["question"], "answer": rows[i]["answer"], "prompt_ids": p} for i, p in zip(order, ids)]


def report(res: dict, args) -> None:
    o, t = res["ours"], res["trl"]
    ratios = peers.ratio_rounds(o, t)
    print(f"\nload average at end {peers.load_avg()}; step = one rollout of {args.prompts_per_step}x{args.group_size} samples + "
          "one optimizer step; medians over all rounds; rollout tokens/s = completion tokens / rollout seconds\n")
    cpu_ratios = peers.ratio_rounds(o, t, "step_cpu_s")
    print("| side | s/step wall | s/step CPU | ours vs side, wall (per-round spread) | CPU | rollout tok/s wall | CPU | "
          "rollout share of step (CPU) | peak RSS | ours/side |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ours_peak = max(x["train_peak_bytes"] for x in o)
    for s, r in (("ours", o), ("trl", t)):
        step, step_cpu = statistics.median(peers.pooled(r)), statistics.median(peers.pooled(r, "step_cpu_s"))
        # The first rollout is warm-up (and comes before the first step-end stamp).
        toks = sum(n for x in r for n in x["rollout_tokens"][1:])
        wall, cpu = (sum(sec for x in r for sec in x[k][1:]) for k in ("rollout_s", "rollout_cpu_s"))
        roll_cpu = statistics.median(sec for x in r for sec in x["rollout_cpu_s"][1:])
        vs = ("1.00x | 1.00x" if s == "ours" else f"**{statistics.median(ratios):.2f}x** ({peers.spread(ratios)}) | "
              f"**{statistics.median(cpu_ratios):.2f}x** ({peers.spread(cpu_ratios)})")
        peak = max(x["train_peak_bytes"] for x in r)
        print(f"| {s} | {step:.2f} | {step_cpu:.2f} | {vs} | {toks / wall:,.0f} | {toks / cpu:,.0f} | "
              f"{roll_cpu / step_cpu:.0%} | "
              f"{peers.gib(peak)} | {ours_peak / peak:.2f}x |")
    print()
    for s, r in (("ours", o), ("trl", t)):
        for i, x in enumerate(r):
            print(f"reward per step, {s} round {i + 1}: " + " ".join(f"{v:.3f}" for v in x["reward"])
                  + f"  (mean {statistics.mean(x['reward']):.3f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    peers.add_common_args(p, SIDES)
    p.add_argument("--init_from", default="out/demo/runs/dpo/final", help="policy checkpoint ('' = fresh --arch weights)")
    p.add_argument("--arch", default="llama/llama3_nano")
    p.add_argument("--tokenizer", default="data/tokenizer/tokenizer.json", help="with --init_from '': the prompts' tokenizer")
    p.add_argument("--prompts", default="data/prompts/rl_train.jsonl")
    p.add_argument("--prompts_per_step", type=int, default=16)
    p.add_argument("--group_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--micro_batch", type=int, default=32, help="rows per forward/backward (the step takes the whole rollout)")
    p.add_argument("--reward", default="gsm8k_combined")
    p.add_argument("--kl_beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps (= rollouts) per run; the first is not timed")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if args.worker:
        return peers.worker_main(args.worker, args.job, run_side)
    peers.require("trl", "transformers")
    from data_pipeline.tokenizer.chat_template import chat_stop_ids
    from data_pipeline.tokenizer.tokenizer import Tokenizer

    print(peers.header("GRPO: ours (engine rollouts) vs TRL GRPOTrainer (HF generate)", args.threads))
    print(f"peers: {peers.versions('trl', 'transformers', 'accelerate', 'datasets')}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = peers.make_base(tmp, args.arch, Path(args.tokenizer) if not args.init_from else None, args.init_from,
                               args.seed, json.loads(args.shrink or "{}"))
        rows = ordered_prompts(args.prompts, base.tokenizer, args.steps, args.prompts_per_step, args.seed)
        print(f"policy: {args.init_from or args.arch} ({base.params / 1e6:.2f}M params), fp32 | "
              f"{args.prompts_per_step} prompts x "
              f"group {args.group_size}, {args.max_new_tokens} new tokens max, T={args.temperature}, reward {args.reward}, "
              f"KL beta {args.kl_beta}, lr {args.lr} | {args.steps} steps per run | {args.rounds} rounds")
        job = {"base": str(base.ours), "hf": str(base.hf), "tokenizer": str(base.tokenizer),
               "prompts": str(Path(args.prompts).resolve()),
               "rows": rows, "stop_ids": chat_stop_ids(Tokenizer.from_file(base.tokenizer)), "steps": args.steps,
               "warmup": args.warmup, "prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
               "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "micro_batch": args.micro_batch,
               "reward": args.reward, "kl_beta": args.kl_beta, "lr": args.lr, "seed": args.seed, "threads": args.threads}
        job_path = peers.write_job(tmp / "job.json", job)
        res = peers.alternate(SIDES, args.rounds, lambda s: peers.run_worker(__file__, s, job_path, args.threads))
    report(res, args)


if __name__ == "__main__":
    main_guard(main)

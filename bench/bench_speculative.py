"""Speculative decoding's speed-up: a small draft model proposing tokens for its target, against
the target decoding alone, in the same process on the same prompts.

    python bench/bench_speculative.py --target out/demo/runs/sft/final \
        --draft out/demo/runs/student_distill/final [--k 2 4] [--batch 1 8] [--threads 1]

The draft must share the target's tokenizer (the demo's students from ``demo.py --distill`` do).
Prompts are the demo's held-out GSM8K-format questions in the chat format (or any
``--prompts`` JSONL with a "question" field). Greedy decoding, so speculative output must equal
plain output token for token (checked, and the bench fails otherwise). Rounds alternate plain /
speculative; the figure is the median tokens per second of each and their ratio, with the
draft's acceptance rate (accepted / proposed) and tokens per target step.
"""
from __future__ import annotations

import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import json
import statistics
import time

import torch

from utils.cli import main_guard


def prompts_of(path: str, tok, n: int) -> list[list[int]]:
    from data_pipeline.tokenizer.chat_template import render_chat

    rows = [json.loads(line) for line in open(path) if line.strip()][:n]
    return [render_chat(tok, [{"role": "user", "content": r["question"]}], add_generation_prompt=True)[0] for r in rows]


def run(engine, prompts, max_tokens: int, batch: int):
    from data_pipeline.tokenizer.chat_template import chat_stop_ids
    from inference.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=chat_stop_ids(engine.tokenizer))
    outs, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs += [c.outputs[0].token_ids for c in engine.generate(prompts[i : i + batch], params)]
    return outs, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--prompts", default="data/eval/gsm8k_test.jsonl")
    ap.add_argument("--n_prompts", type=int, default=32)
    ap.add_argument("--max_tokens", type=int, default=96)
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from inference.engine import LLMEngine
    from inference.speculative import load_draft
    from model.load import load

    target, tok = load(args.target, device="cpu", expect="lm")
    draft = load_draft(args.draft, target, tok, torch.device("cpu"))
    n_t, n_d = (sum(p.numel() for p in m.parameters()) for m in (target, draft))
    prompts = prompts_of(args.prompts, tok, args.n_prompts)
    print(f"target {n_t / 1e6:.2f}M params, draft {n_d / 1e6:.2f}M ({n_d / n_t:.2f}x); {len(prompts)} prompts, "
          f"{args.max_tokens} new tokens max, greedy, {args.threads} thread(s)")
    print("| batch | k | plain tok/s | speculative tok/s | speed-up | acceptance | tokens per step, plain / speculative |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batch:
        plain = LLMEngine(target, tokenizer=tok, max_num_seqs=batch)
        for k in args.k:
            spec = LLMEngine(target, tokenizer=tok, max_num_seqs=batch, draft_model=draft, num_speculative_tokens=k)
            run(plain, prompts[:batch], 8, batch), run(spec, prompts[:batch], 8, batch)  # warm-up
            rates = {"plain": [], "spec": []}
            for e in (plain, spec):
                e.stats.update(spec_proposed=0, spec_accepted=0, steps=0, generated_tokens=0)
            for _ in range(args.rounds):
                ref, t_plain = run(plain, prompts, args.max_tokens, batch)
                got, t_spec = run(spec, prompts, args.max_tokens, batch)
                if got != ref:
                    raise SystemExit("speculative output differs from plain greedy output: the acceptance rule is broken")
                n = sum(map(len, ref))
                rates["plain"].append(n / t_plain)
                rates["spec"].append(n / t_spec)
            p, s = statistics.median(rates["plain"]), statistics.median(rates["spec"])
            acc = spec.stats["spec_accepted"] / max(1, spec.stats["spec_proposed"])
            per_step = [e.stats["generated_tokens"] / max(1, e.stats["steps"]) for e in (plain, spec)]
            print(f"| {batch} | {k} | {p:.1f} | {s:.1f} | {s / p:.2f}x | {acc:.1%} | {per_step[0]:.2f} / {per_step[1]:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main_guard(main)

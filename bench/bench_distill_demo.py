"""The distillation demo's students, prompt by prompt: is the distilled student's lead over SFT alone
more than the luck of which prompts were drawn?

    python demo.py --distill                                   # first: the teacher and both students
    python bench/bench_distill_demo.py --n 1000 [--threads 1] [--students NAME=DIR ...]

Every model answers the same ``n`` held-out arithmetic prompts greedily (finetune/format_rate.py's
set; the demo's card uses the first 200 of them). Reported: each model's exact-answer rate with its
95% Wilson interval, and for each student against the SFT-only one the paired counts (right only
with distillation, right only with SFT alone) with the exact two-sided McNemar p-value: both
students answer the same prompts, so the paired test is the one that sees the difference.
Then the token-level view: each model's cross-entropy on the assistant tokens of the first
``--val_rows`` SFT validation rows, on tokens holding a digit (the arithmetic the exact answer
depends on) and on the rest (names and wording).
"""
from __future__ import annotations

import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import json
import math
from pathlib import Path

import torch

from utils.cli import main_guard
from utils.errors import UserError

DEMO = {"teacher": "out/demo/runs/sft/final", "sft_alone": "out/demo/runs/student_sft/final",
        "distilled": "out/demo/runs/student_distill/final"}


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a rate k/n."""
    p, d = k / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return mid - half, mid + half


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs (a binomial test at 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)


def answers_right(path: str, tokenizer, problems: list[dict]) -> list[bool]:
    """Whether the model at ``path`` answers each problem exactly (greedy, as the demo scores it)."""
    from data_pipeline.answer import score_answers
    from inference.answers import chat_answers
    from model.load import load_model

    outs = chat_answers(load_model(path), tokenizer, [p["question"] for p in problems], 96, max_num_seqs=16)
    return [score_answers([tokenizer.decode(o.token_ids)], [p["answer"]])["accuracy"] == 1.0
            for o, p in zip(outs, problems)]


@torch.no_grad()
def token_ce(path: str, tokenizer, rows: int) -> dict:
    """Mean next-token cross-entropy on the assistant tokens of the first ``rows`` SFT val rows,
    over target tokens that hold a digit and over the others."""
    import torch.nn.functional as F

    from data_pipeline.loader import SFTLoader
    from model.load import load_model

    model = load_model(path)
    digit = torch.tensor([any(ch.isdigit() for ch in tokenizer.id_to_token(i) or "") for i in range(tokenizer.vocab_size)])
    x, y, mask = next(SFTLoader("data/bins/sft", "val", 256, rows, shuffle=False))
    ce = F.cross_entropy(model(x)[..., :tokenizer.vocab_size].flatten(0, 1), y.flatten(), reduction="none")
    counted, is_digit = mask.flatten().bool(), digit[y.flatten()]
    return {"digits": ce[counted & is_digit].mean().item(), "other": ce[counted & ~is_digit].mean().item(),
            "digit_tokens": int((counted & is_digit).sum()), "other_tokens": int((counted & ~is_digit).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="held-out prompts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--students", nargs="*", default=[], metavar="NAME=DIR",
                    help="more distilled students to compare with SFT alone (e.g. other recipe settings)")
    ap.add_argument("--val_rows", type=int, default=64, help="SFT val rows for the token-level cross-entropy")
    ap.add_argument("--out", default="out/bench/distill_demo.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from finetune.format_rate import heldout_problems
    from model.load import load_tokenizer

    models = dict(DEMO, **dict(s.split("=", 1) for s in args.students))
    missing = [p for p in models.values() if not Path(p).is_dir()]
    if missing:
        raise UserError(f"{', '.join(missing)} not found; run `python demo.py --distill` first (and the runs you named).")
    tokenizer = load_tokenizer(models["sft_alone"])
    problems = heldout_problems(args.n)
    right = {name: answers_right(path, tokenizer, problems) for name, path in models.items()}
    print(f"exact answers on {args.n} held-out arithmetic prompts (greedy), {args.threads} thread(s)")
    print("| model | exact answers | 95% interval | right only here / only with SFT alone | McNemar p |\n|---|---|---|---|---|")
    rows = []
    for name, r in right.items():
        lo, hi = wilson(sum(r), args.n)
        row = {"model": name, "path": models[name], "accuracy": sum(r) / args.n, "interval": [lo, hi]}
        paired = ""
        if name not in ("teacher", "sft_alone"):
            b = sum(x and not s for x, s in zip(r, right["sft_alone"]))
            c = sum(s and not x for x, s in zip(r, right["sft_alone"]))
            row.update(only_here=b, only_sft=c, mcnemar_p=mcnemar_exact(b, c))
            paired = f"{b} / {c} | {row['mcnemar_p']:.3f}"
        else:
            paired = " | "
        rows.append(row)
        print(f"| {name} | {row['accuracy']:.1%} | {lo:.1%}-{hi:.1%} | {paired} |")
    ce = {name: token_ce(path, tokenizer, args.val_rows) for name, path in models.items()}
    first = next(iter(ce.values()))
    print(f"\ncross-entropy on the assistant tokens of {args.val_rows} SFT val rows ({first['digit_tokens']} targets with a "
          f"digit, {first['other_tokens']} others)\n| model | digit tokens | other tokens |\n|---|---|---|")
    for name, r in ce.items():
        print(f"| {name} | {r['digits']:.4f} | {r['other']:.4f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"n": args.n, "threads": args.threads, "rows": rows, "token_ce": ce}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main_guard(main)

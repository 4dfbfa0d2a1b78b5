"""The distillation demo's students, prompt by prompt: is the distilled student's lead over SFT alone
more than the luck of which prompts were drawn?

    python demo.py --distill                                   # first: the teacher and both students
    python bench/bench_distill_demo.py --n 1000 [--threads 1] [--students NAME=DIR[,DIR...] ...]

Every model answers the same ``n`` held-out arithmetic prompts greedily (finetune/format_rate.py's
set; the demo's card uses the first 200 of them). Reported: each model's exact-answer rate with its
95% Wilson interval, and for each student against the SFT-only one the paired counts (right only
with distillation, right only with SFT alone) with the exact two-sided McNemar p-value: both
students answer the same prompts, so the paired test is the one that sees the difference.
Then the token-level view: each model's cross-entropy on the assistant tokens of the first
``--val_rows`` SFT validation rows, on tokens holding a digit (the arithmetic the exact answer
depends on) and on the rest (names and wording).

Training seeds: an arm may name several runs (``kd=runs/a,runs/b,runs/c``, and ``sft_alone=...``
replaces the demo's SFT-only student by its seeds). Run i of an arm is paired with run i of
sft_alone (same seed, same batches), and the pairs of all seeds are pooled into one McNemar test;
each run is also listed on its own. The McNemar test sees only which prompts were drawn, not how
much a student depends on its seed; for that, each seed's difference in accuracy and an exact
sign-flip test over the seeds. Greedy answers are deterministic, so each run's answers are
kept in ``--cache`` (keyed by path, checkpoint time and n) and not recomputed.
"""
from __future__ import annotations

import sys, pathlib  # noqa: E401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # repo root

import argparse
import itertools
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


def checkpoint_key(path: str, n: int) -> str:
    """Where a run's answers live in the cache: its path, when its files were written, and n."""
    mtime = max(f.stat().st_mtime for f in Path(path).iterdir())
    return f"{Path(path).resolve()}|{mtime:.0f}|{n}"


def sign_flip_p(diffs: list[float]) -> float:
    """Two-sided exact sign-flip test that paired per-seed differences have mean 0: the share of the
    2^k sign patterns whose |sum| is at least the observed one (k seeds: never below 2 / 2^k)."""
    observed = abs(sum(diffs))
    sums = [abs(sum(s * d for s, d in zip(signs, diffs))) for signs in itertools.product((1, -1), repeat=len(diffs))]
    return sum(x >= observed - 1e-12 for x in sums) / len(sums)


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
    over target tokens that hold a digit and over the others; and how often the most likely
    digit token is the reference's (what a greedy answer needs, calibration aside)."""
    import torch.nn.functional as F

    from data_pipeline.loader import SFTLoader
    from model.load import load_model

    model = load_model(path)
    digit = torch.tensor([any(ch.isdigit() for ch in tokenizer.id_to_token(i) or "") for i in range(tokenizer.vocab_size)])
    x, y, mask = next(SFTLoader("data/bins/sft", "val", 256, rows, shuffle=False))
    logits = model(x)[..., :tokenizer.vocab_size].flatten(0, 1)
    ce = F.cross_entropy(logits, y.flatten(), reduction="none")
    counted, is_digit = mask.flatten().bool(), digit[y.flatten()]
    top1 = logits.argmax(-1) == y.flatten()
    return {"digits": ce[counted & is_digit].mean().item(), "other": ce[counted & ~is_digit].mean().item(),
            "digit_top1": top1[counted & is_digit].float().mean().item(),
            "digit_tokens": int((counted & is_digit).sum()), "other_tokens": int((counted & ~is_digit).sum())}


def paired(runs: list[list[bool]], baseline: list[list[bool]]) -> tuple[int, int]:
    """Discordant pairs over the runs of an arm, run i against the baseline's run i: (right only
    here, right only with the baseline)."""
    b = sum(x and not s for r, base in zip(runs, baseline) for x, s in zip(r, base))
    c = sum(s and not x for r, base in zip(runs, baseline) for x, s in zip(r, base))
    return b, c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="held-out prompts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--students", nargs="*", default=[], metavar="NAME=DIR[,DIR...]",
                    help="more students to compare with SFT alone (other recipe settings; several runs = seeds)")
    ap.add_argument("--val_rows", type=int, default=64, help="SFT val rows for the token-level cross-entropy")
    ap.add_argument("--out", default="out/bench/distill_demo.json")
    ap.add_argument("--cache", default="out/bench/distill_demo_answers.json", help="each run's answers, reused")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from finetune.format_rate import heldout_problems
    from model.load import load_tokenizer

    arms = {name: [path] for name, path in DEMO.items()}
    arms.update({name: dirs.split(",") for name, dirs in (s.split("=", 1) for s in args.students)})
    missing = [p for runs in arms.values() for p in runs if not Path(p).is_dir()]
    if missing:
        raise UserError(f"{', '.join(missing)} not found; run `python demo.py --distill` first (and the runs you named).")
    longer = [name for name, runs in arms.items() if name != "teacher" and len(runs) > len(arms["sft_alone"])]
    if longer:
        raise UserError(f"{', '.join(longer)} name more runs than sft_alone; run i is paired with sft_alone's run i.")
    tokenizer = load_tokenizer(arms["sft_alone"][0])
    problems = heldout_problems(args.n)
    cache = json.loads(Path(args.cache).read_text()) if Path(args.cache).is_file() else {}
    right = {}
    for name, runs in arms.items():
        right[name] = []
        for path in runs:
            key = checkpoint_key(path, args.n)
            if key not in cache:
                cache[key] = answers_right(path, tokenizer, problems)
                Path(args.cache).parent.mkdir(parents=True, exist_ok=True)
                Path(args.cache).write_text(json.dumps(cache))
            right[name].append(cache[key])
    print(f"exact answers on {args.n} held-out arithmetic prompts (greedy), {args.threads} thread(s); "
          "arms with several runs (seeds) pooled, run i paired with sft_alone's run i")
    print("| model | runs | exact answers | 95% interval | right only here / only with SFT alone | McNemar p |\n"
          "|---|---|---|---|---|---|")
    rows = []
    for name, runs in right.items():
        k, n = sum(map(sum, runs)), args.n * len(runs)
        lo, hi = wilson(k, n)
        row = {"model": name, "paths": arms[name], "accuracy": k / n, "interval": [lo, hi],
               "per_run": [sum(r) / args.n for r in runs]}
        cells = " | "
        if name not in ("teacher", "sft_alone"):
            b, c = paired(runs, right["sft_alone"])
            row.update(only_here=b, only_sft=c, mcnemar_p=mcnemar_exact(b, c))
            cells = f"{b} / {c} | {row['mcnemar_p']:.3f}"
        rows.append(row)
        print(f"| {name} | {len(runs)} | {k / n:.1%} | {lo:.1%}-{hi:.1%} | {cells} |")
    if any(len(runs) > 1 for runs in right.values()):
        print("\neach run on its own\n| model | run | exact answers | right only here / only with SFT alone | McNemar p |\n"
              "|---|---|---|---|---|")
        for name, runs in right.items():
            for i, (path, r) in enumerate(zip(arms[name], runs)):
                cells = " | "
                if name not in ("teacher", "sft_alone"):
                    b, c = paired([r], [right["sft_alone"][i]])
                    cells = f"{b} / {c} | {mcnemar_exact(b, c):.3f}"
                print(f"| {name} | {path} | {sum(r) / args.n:.1%} | {cells} |")
        print("\nseed by seed: accuracy minus SFT alone's with the same seed\n"
              "| model | per seed (points) | mean | sign-flip p |\n|---|---|---|---|")
        for row, (name, runs) in zip(rows, right.items()):
            if name in ("teacher", "sft_alone") or len(runs) < 2:
                continue
            diffs = [100 * (sum(r) - sum(base)) / args.n for r, base in zip(runs, right["sft_alone"])]
            row.update(seed_diffs=diffs, sign_flip_p=sign_flip_p(diffs))
            print(f"| {name} | {', '.join(f'{d:+.1f}' for d in diffs)} | {sum(diffs) / len(diffs):+.1f} | "
                  f"{row['sign_flip_p']:.3f} |")
    ce = {}
    for name, runs in arms.items():  # the mean over an arm's runs
        each = [token_ce(path, tokenizer, args.val_rows) for path in runs]
        ce[name] = {key: sum(e[key] for e in each) / len(each) for key in each[0]}
    first = next(iter(ce.values()))
    print(f"\ncross-entropy on the assistant tokens of {args.val_rows} SFT val rows ({first['digit_tokens']:.0f} targets "
          f"with a digit, {first['other_tokens']:.0f} others; mean over an arm's runs)\n"
          "| model | CE, digit tokens | CE, other tokens | digit tokens predicted (argmax) |\n|---|---|---|---|")
    for name, r in ce.items():
        print(f"| {name} | {r['digits']:.4f} | {r['other']:.4f} | {r['digit_top1']:.1%} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"n": args.n, "threads": args.threads, "rows": rows, "token_ce": ce}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main_guard(main)

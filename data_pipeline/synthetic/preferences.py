"""Synthetic preference pairs: a correct, well-formatted answer chosen over a worse one.

Each pair is ``{"prompt": [messages], "chosen": str, "rejected": str, "kind": str}``:
the prompt is a conversation ending with a user message; chosen and rejected are
the two candidate assistant replies. Arithmetic pairs (80%) reject a wrong final
number, a missing ``#### N`` line, or a sloppy one-liner; story pairs (20%)
reject a story about the wrong character or one cut off in the middle.
"""
from __future__ import annotations

import random
import re

from data_pipeline.synthetic import arithmetic
from data_pipeline.synthetic.splits import draw
from data_pipeline.synthetic.stories import generate_story, plot_summary

_LAST_STEP = re.compile(r"=(\d+)>>(\d+)([^\n]*)\n#### (\d+)$")


def corrupt_answer(rng: random.Random, answer: str) -> tuple[str, str]:
    """Return (worse answer, kind) for a GSM8K-format answer ending '#### N'."""
    value = int(arithmetic.final_answer(answer))
    wrong = value + rng.choice([-2, -1, 1, 2, 3, 10]) if value >= 2 else value + rng.choice([1, 2, 3])
    kind = rng.choice(["wrong_number", "no_final_line", "sloppy"])
    if kind == "wrong_number":
        # Same steps, but the last result (and the final line) is wrong.
        return _LAST_STEP.sub(f"={wrong}>>{wrong}\\3\n#### {wrong}", answer), kind
    if kind == "no_final_line":
        return answer.rsplit("\n####", 1)[0], kind
    return rng.choice([f"{wrong}", f"i think its {value} or {wrong}", f"The answer is {wrong}.",
                       "I don't know."]), kind


def _arithmetic_pair(rng: random.Random) -> dict:
    p = arithmetic.generate_problem(rng)
    rejected, kind = corrupt_answer(rng, p["answer"])
    return {"prompt": [{"role": "user", "content": p["question"]}], "chosen": p["answer"],
            "rejected": rejected, "kind": kind}


def _story_pair(rng: random.Random) -> dict:
    story, s = generate_story(rng, short=True)
    article = "an" if s["kind"][0] in "aeiou" else "a"
    prompt = (f"Write a short story about {article} {s['kind']} named {s['name']} who "
              f"{plot_summary(s)}.")
    if rng.random() < 0.5:
        other, o = generate_story(rng, short=True)
        while o["name"] == s["name"]:
            other, o = generate_story(rng, short=True)
        return {"prompt": [{"role": "user", "content": prompt}], "chosen": story, "rejected": other,
                "kind": "wrong_character"}
    words = story.split(" ")
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": story,
            "rejected": " ".join(words[: max(3, len(words) // 3)]), "kind": "cut_off"}


def generate_pairs(rng: random.Random, n: int, bucket: str) -> list[dict]:
    """``n`` preference pairs whose prompt falls in ``bucket`` ("sft" for train, "val")."""
    key = lambda pair: pair["prompt"][-1]["content"]
    n_story = n // 5
    pairs = draw(lambda: _arithmetic_pair(rng), key, bucket, n - n_story)
    pairs += draw(lambda: _story_pair(rng), key, bucket, n_story)
    rng.shuffle(pairs)
    return pairs

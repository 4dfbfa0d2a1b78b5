"""Did SFT teach the answer format? The share of held-out arithmetic prompts answered with a
last line of exactly ``#### <number>`` (GSM8K's format), plus how many are also correct.

A pretrained story model almost never ends with ``#### 8``; after SFT on the synthetic chat
mix (half of it arithmetic in GSM8K format) most answers should. The prompts come from the
SFT validation bucket (``data_pipeline.synthetic.splits``), so SFT never trained on them; the
answers come from ``inference.answers.exact_answer_check`` (the same check RL reports).

    report = format_rate(model, tokenizer, heldout_problems(64))   # {"format_rate", "accuracy", "n", "examples", ...}
"""
from __future__ import annotations

import random
from typing import Any


def heldout_problems(n: int, seed: int = 0, bucket: str = "val") -> list[dict]:
    """``n`` distinct arithmetic problems {"question", "answer"} from a split SFT does not train on."""
    from data_pipeline.synthetic.arithmetic import generate_problem
    from data_pipeline.synthetic.splits import draw

    rng = random.Random(seed)
    return draw(lambda: generate_problem(rng), lambda p: p["question"], bucket, n)


def format_rate(model: Any, tokenizer: Any, problems: list[dict], max_tokens: int = 96) -> dict:
    """Greedy answers through the engine, scored: format_rate, accuracy, n, examples."""
    from inference.answers import exact_answer_check

    return exact_answer_check(model, tokenizer, problems, max_tokens, max_num_seqs=16)

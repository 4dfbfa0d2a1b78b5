"""Did SFT teach the answer format? The share of held-out arithmetic prompts answered with a
last line of exactly ``#### <number>`` (GSM8K's format), plus how many are also correct.

A pretrained story model almost never ends with ``#### 8``; after SFT on the synthetic chat
mix (half of it arithmetic in GSM8K format) most answers should. The prompts come from the
SFT validation bucket (``data_pipeline.synthetic.splits``), so SFT never trained on them.

    rate = measure_format_rate(generate, heldout_problems(64))      # generate: questions -> answers
"""
from __future__ import annotations

import random
from typing import Callable, Optional

from eval.answer import ends_with_answer_line, extract_hash_answer, normalize_number

def in_exact_format(completion: str) -> bool:
    """True when the completion's last non-empty line is ``#### <number>`` (eval.answer's check)."""
    return ends_with_answer_line(completion)


def heldout_problems(n: int, seed: int = 0, bucket: str = "val") -> list[dict]:
    """``n`` distinct arithmetic problems {"question", "answer"} from a split SFT does not train on."""
    from data_pipeline.synthetic.arithmetic import generate_problem
    from data_pipeline.synthetic.splits import draw

    rng = random.Random(seed)
    return draw(lambda: generate_problem(rng), lambda p: p["question"], bucket, n)


def measure_format_rate(generate: Callable[[list[str]], list[str]], problems: list[dict]) -> dict:
    """Run ``generate`` (questions -> completions, same order) and score the completions.

    Returns {"format_rate": share in the exact format, "accuracy": share whose ``####``
    number is the right one, "n": count, "examples": the first three (question, completion)}.
    """
    completions = generate([p["question"] for p in problems])
    if len(completions) != len(problems):
        raise ValueError(f"generate returned {len(completions)} completions for {len(problems)} prompts")
    fmt = [in_exact_format(c) for c in completions]
    right = [extract_hash_answer(c) == normalize_number(p["answer"].rsplit("####", 1)[1]) for p, c in zip(problems, completions)]
    n = max(len(problems), 1)
    return {"format_rate": sum(fmt) / n, "accuracy": sum(right) / n, "n": len(problems),
            "examples": [(p["question"], c) for p, c in zip(problems[:3], completions[:3])]}


def engine_generate(model, tokenizer, max_tokens: int = 96, device: Optional[str] = None) -> Callable[[list[str]], list[str]]:
    """A ``generate`` over the project's engine: the one chat template, greedy, stop at <|im_end|>."""
    from data_pipeline.tokenizer.chat_template import chat_stop_ids, render_chat
    from inference.engine import LLMEngine
    from inference.sampling_params import SamplingParams

    device = device or str(next(model.parameters()).device)
    engine = LLMEngine(model, tokenizer=tokenizer, device=device, max_num_seqs=16)

    def generate(questions: list[str]) -> list[str]:
        prompts = [render_chat(tokenizer, [{"role": "user", "content": q}], add_generation_prompt=True)[0] for q in questions]
        budget = max(1, min(max_tokens, engine.max_model_len - max(len(p) for p in prompts)))
        params = SamplingParams(max_tokens=budget, temperature=0.0, stop_token_ids=chat_stop_ids(tokenizer))
        return [tokenizer.decode(c.outputs[0].token_ids) for c in engine.generate(prompts, params)]

    return generate

"""Greedy answers to one-turn chat questions through the engine, and their GSM8K-format score.

    result = exact_answer_check(model, tokenizer, problems, max_new_tokens=96)
    # {"accuracy", "format_rate", "mean_response_tokens", "n", "examples"}

The held-out checks that SFT (did it learn the ``#### N`` format?) and online RL (exact
accuracy before/after) print are the same computation; both call this. Prompts go through the
tokenizer's chat format, generation through the one engine (greedy, stop at end of turn).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from utils.errors import UserError


@torch.no_grad()
def chat_answers(model: torch.nn.Module, tokenizer: Any, questions: Sequence[Any], max_new_tokens: int,
                 **engine_kwargs: Any) -> list[Any]:
    """One greedy completion (``inference.outputs.CompletionOutput``) per question (text, or a
    list of chat messages), in order.

    The budget is ``max_new_tokens``, cut to what the longest prompt leaves of the context
    (UserError when a prompt fills it). The model's train/eval mode is restored afterwards."""
    from data_pipeline.tokenizer.chat_template import chat_stop_ids, render_chat
    from inference.engine import LLMEngine
    from inference.sampling_params import SamplingParams

    prompts = [render_chat(tokenizer, q if isinstance(q, list) else [{"role": "user", "content": q}],
                           add_generation_prompt=True)[0] for q in questions]
    room = model.cfg.max_seq_len - max(len(p) for p in prompts)
    if room < 1:
        raise UserError(f"the longest question is {max(len(p) for p in prompts)} tokens in the chat format, which fills "
                        f"the model's context ({model.cfg.max_seq_len}); drop it or use a model with a longer context.")
    was_training = model.training
    engine = LLMEngine(model.eval(), tokenizer=tokenizer, device=next(model.parameters()).device, **engine_kwargs)
    params = SamplingParams(max_tokens=min(max_new_tokens, room), temperature=0.0, stop_token_ids=chat_stop_ids(tokenizer))
    completions = engine.generate(prompts, params, use_tqdm=False)
    model.train(was_training)
    return [c.outputs[0] for c in completions]


def exact_answer_check(model: torch.nn.Module, tokenizer: Any, problems: Sequence[dict], max_new_tokens: int = 128,
                       **engine_kwargs: Any) -> dict:
    """Greedy answers to ``problems`` (rows {"question", "answer": "... #### N"}) scored by
    ``data_pipeline.answer.score_answers``, plus the mean response length in tokens and the
    first three (question, answer) pairs as examples."""
    from data_pipeline.answer import score_answers

    outs = chat_answers(model, tokenizer, [p["question"] for p in problems], max_new_tokens, **engine_kwargs)
    texts = [tokenizer.decode(o.token_ids) for o in outs]
    result = score_answers(texts, [p["answer"] for p in problems])
    result["mean_response_tokens"] = sum(len(o.token_ids) for o in outs) / max(len(outs), 1)
    result["examples"] = [(p["question"], t) for p, t in zip(problems[:3], texts[:3])]
    return result

"""Synthetic SFT conversations: arithmetic Q&A, story writing, story questions, multiple choice.

Each conversation is ``{"messages": [{"role": ..., "content": ...}, ...]}`` (the
format of HF chat datasets). The split of a conversation is decided by the hash
of its first user message (``splits.bucket_of``), so SFT prompts never overlap
the eval sets or each other's validation split.
"""
from __future__ import annotations

import random

from data_pipeline.synthetic import arithmetic, mmlu
from data_pipeline.synthetic.splits import draw
from data_pipeline.synthetic.stories import generate_story, plot_summary

SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a friendly tutor. Explain your steps.",
                  "You are a kind storyteller for children."]
# Share of each kind of conversation in the mix.
MIX = {"arithmetic": 0.50, "story_write": 0.20, "story_qa": 0.15, "multiple_choice": 0.10,
       "two_turn": 0.05}


def _maybe_system(rng: random.Random, messages: list[dict]) -> list[dict]:
    if rng.random() < 0.15:
        return [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + messages
    return messages


def _arithmetic(rng: random.Random) -> list[dict]:
    p = arithmetic.generate_problem(rng)
    return [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["answer"]}]


def _two_turn(rng: random.Random) -> list[dict]:
    return _arithmetic(rng) + _arithmetic(rng)


def _story_write(rng: random.Random) -> list[dict]:
    story, slots = generate_story(rng, short=rng.random() < 0.5)
    article = "an" if slots["kind"][0] in "aeiou" else "a"
    # Gift and honesty stories happen at home, so only the others name a place.
    where = f" at the {slots['place']}" if slots["plot"] not in ("gift", "honest") else ""
    prompt = rng.choice([
        f"Write a short story about {article} {slots['kind']} named {slots['name']} who {plot_summary(slots)}{where}.",
        f"Tell me a story about {slots['name']} the {slots['kind']}{where}.",
        f"Can you write a children's story where {slots['name']} {plot_summary(slots)}{where}?",
    ])
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": story}]


def _story_qa(rng: random.Random) -> list[dict]:
    story, s = generate_story(rng, short=True)
    options = [("Who is the main character of the story?",
                f"The main character is {s['name']}, a {s['kind']}.")]
    if f"the {s['place']}" in story:
        options.append(("Where does the story take place?", f"The story takes place at the {s['place']}."))
    if s["friend"] in story:
        options.append((f"Who is {s['name']}'s friend in the story?", f"{s['friend']} the {s['fkind']}."))
    question, answer = rng.choice(options)
    return [{"role": "user", "content": f"{story}\n\nQuestion: {question}"},
            {"role": "assistant", "content": answer}]


def _multiple_choice(rng: random.Random) -> list[dict]:
    item = mmlu.generate_question(rng)
    return [{"role": "user", "content": mmlu.format_multiple_choice(item)},
            {"role": "assistant", "content": "ABCD"[item["answer"]]}]


_MAKERS = {"arithmetic": _arithmetic, "story_write": _story_write, "story_qa": _story_qa,
           "multiple_choice": _multiple_choice, "two_turn": _two_turn}


def generate_conversations(rng: random.Random, n: int, bucket: str) -> list[dict]:
    """``n`` conversations whose first user message falls in ``bucket`` ("sft" or "val")."""
    def first_user(conv: dict) -> str:
        return next(m["content"] for m in conv["messages"] if m["role"] == "user")

    convs: list[dict] = []
    kinds = list(MIX)
    for i, kind in enumerate(kinds):
        # The last kind takes the remainder so the total is exactly n.
        k = min(round(n * MIX[kind]), n - len(convs)) if i < len(kinds) - 1 else n - len(convs)
        made = draw(lambda kind=kind: {"messages": _maybe_system(rng, _MAKERS[kind](rng))}, first_user, bucket, k)
        convs.extend(made)
    rng.shuffle(convs)
    return convs

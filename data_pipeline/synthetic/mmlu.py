"""Multiple-choice questions in the MMLU format.

Each item is ``{"subject": str, "question": str, "choices": [4 str], "answer": int}``
with ``answer`` the index (0-3) of the correct choice, exactly like the fields of
``cais/mmlu``. The subjects are things the synthetic corpora teach (small
arithmetic, number order, word problems, story facts, number patterns), so a
model trained on them can score above the 25% of chance.
"""
from __future__ import annotations

import random

from data_pipeline.synthetic import arithmetic
from data_pipeline.synthetic.stories import HIDING, NAMES, OBJECTS, PLACES

SUBJECTS = ["elementary_arithmetic", "number_comparison", "word_problems", "story_comprehension",
            "number_sequences"]


def _numeric_choices(rng: random.Random, correct: int) -> tuple[list[str], int]:
    """Four distinct non-negative numbers, one of them ``correct``, in random order."""
    options = {correct}
    while len(options) < 4:
        d = rng.choice([-10, -3, -2, -1, 1, 2, 3, 10])
        if correct + d >= 0:
            options.add(correct + d)
    choices = sorted(options, key=lambda _: rng.random())
    return [str(c) for c in choices], choices.index(correct)


def _arithmetic(rng: random.Random) -> tuple[str, list[str], int]:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    op = rng.choice(["+", "-", "x"])
    if op == "-" and b > a:
        a, b = b, a
    value = {"+": a + b, "-": a - b, "x": a * b}[op]
    return (f"What is {a} {op} {b}?", *_numeric_choices(rng, value))


def _comparison(rng: random.Random) -> tuple[str, list[str], int]:
    nums = rng.sample(range(1, 100), 4)
    largest = rng.random() < 0.5
    target = max(nums) if largest else min(nums)
    word = "largest" if largest else "smallest"
    question = f"Which number is the {word}: {nums[0]}, {nums[1]}, {nums[2]} or {nums[3]}?"
    return question, [str(n) for n in nums], nums.index(target)


def _word_problem(rng: random.Random) -> tuple[str, list[str], int]:
    problem = arithmetic.generate_problem(rng, two_step_fraction=0.0)
    return (problem["question"], *_numeric_choices(rng, int(arithmetic.final_answer(problem["answer"]))))


def _story(rng: random.Random) -> tuple[str, list[str], int]:
    he = rng.choice(["he", "she"])
    name = rng.choice(NAMES[he])
    friend = rng.choice([n for n in NAMES["he"] + NAMES["she"] if n != name])
    his = "his" if he == "he" else "her"
    obj, place, spot = rng.choice(OBJECTS), rng.choice(list(PLACES)), rng.choice(HIDING)
    story = (f"{name} took {his} {obj} to the {place}. Later, {name} could not find it. "
             f"{friend} helped {name} look, and they found the {obj} {spot}.")
    kind = rng.choice(["where", "what", "who"])
    if kind == "where":
        question, correct, pool = f"{story} Where did {name} take the {obj}?", place, list(PLACES)
    elif kind == "what":
        question, correct, pool = f"{story} What could {name} not find?", obj, OBJECTS
    else:
        question, correct = f"{story} Who helped {name} look?", friend
        pool = [n for n in NAMES["he"] + NAMES["she"] if n != name]
    options = [correct] + rng.sample([p for p in pool if p != correct], 3)
    rng.shuffle(options)
    return question, options, options.index(correct)


def _sequence(rng: random.Random) -> tuple[str, list[str], int]:
    start, step = rng.randint(0, 20), rng.randint(1, 5)
    seq = [start + i * step for i in range(4)]
    question = f"What number comes next: {seq[0]}, {seq[1]}, {seq[2]}, {seq[3]}, ...?"
    return (question, *_numeric_choices(rng, start + 4 * step))


_MAKERS = {"elementary_arithmetic": _arithmetic, "number_comparison": _comparison,
           "word_problems": _word_problem, "story_comprehension": _story, "number_sequences": _sequence}


def generate_question(rng: random.Random, subject: str | None = None) -> dict:
    """One MMLU-format item; ``subject`` picks the subject (random when None)."""
    subject = subject or rng.choice(SUBJECTS)
    question, choices, answer = _MAKERS[subject](rng)
    return {"subject": subject, "question": question, "choices": choices, "answer": answer}


def format_multiple_choice(item: dict) -> str:
    """The prompt text used by the SFT mix for a multiple-choice item (answer: one letter)."""
    lines = [item["question"]] + [f"{letter}. {c}" for letter, c in zip("ABCD", item["choices"])]
    return "\n".join(lines + ["Answer with the letter of the correct choice."])

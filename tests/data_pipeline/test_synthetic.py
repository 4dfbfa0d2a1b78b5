"""Synthetic generators: correct answers, valid formats, determinism, disjoint splits."""
from __future__ import annotations

import random
import re

from data_pipeline.synthetic import arithmetic, mmlu, preferences, sft
from data_pipeline.synthetic.humaneval import humaneval_tasks
from data_pipeline.synthetic.splits import bucket_of, draw
from data_pipeline.synthetic.stories import NAMES, generate_story

STEP = re.compile(r"<<(\d+)([-+*/])(\d+)=(\d+)>>(\d+)")


def check_solution(answer: str) -> int:
    """Evaluate every calculator step; return the final number (asserts they agree)."""
    steps = STEP.findall(answer)
    assert steps, answer
    for a, op, b, c, shown in steps:
        a, b, c = int(a), int(b), int(c)
        assert {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] == c == int(shown)
        if op == "/":
            assert a % b == 0
    final = int(arithmetic.final_answer(answer))
    assert final == int(steps[-1][3]) and answer.endswith(f"\n#### {final}")
    return final


def test_arithmetic_answers_are_right_and_small():
    rng = random.Random(0)
    for _ in range(500):
        p = arithmetic.generate_problem(rng)
        final = check_solution(p["answer"])
        assert 1 <= final <= 90  # the largest: 9 boxes of 10 items, or 9 items at 10 dollars
        assert len(STEP.findall(p["answer"])) in (1, 2)
        operands = [int(n) for n in re.findall(r"\d+", p["question"])]
        assert max(operands) <= 60  # operands <= 20, a division's total <= 6 * 9
        # right for *this* question: each step works on the question's numbers or an earlier result
        known = set(operands)
        for a, _, b, c, _ in STEP.findall(p["answer"]):
            assert {int(a), int(b)} <= known, (p["question"], p["answer"])
            known.add(int(c))


def test_generators_are_deterministic():
    a = [arithmetic.generate_problem(random.Random(5)) for _ in range(3)]
    b = [arithmetic.generate_problem(random.Random(5)) for _ in range(3)]
    assert a == b
    assert generate_story(random.Random(7)) == generate_story(random.Random(7))
    assert sft.generate_conversations(random.Random(1), 30, "sft") == sft.generate_conversations(random.Random(1), 30, "sft")


def test_story_is_consistent():
    rng = random.Random(3)
    for _ in range(200):
        text, s = generate_story(rng)
        assert s["name"] in NAMES[s["he"]] and s["name"] in text
        # The object is the hero's: it never takes the other possessive.
        wrong_his = "her" if s["he"] == "he" else "his"
        assert f"{wrong_his} {s['obj']}" not in text and f"{wrong_his} {s['color']} {s['obj']}" not in text


def test_splits_never_overlap():
    key = lambda p: p["question"]
    rng = random.Random(0)
    sets = {b: {key(p) for p in draw(lambda: arithmetic.generate_problem(rng), key, b, 150)}
            for b in ("eval", "val", "sft", "rl")}
    names = list(sets)
    for i, a in enumerate(names):
        assert all(bucket_of(q) == a for q in sets[a])
        for b in names[i + 1:]:
            assert not sets[a] & sets[b]


def test_sft_mix_and_buckets():
    convs = sft.generate_conversations(random.Random(0), 200, "val")
    assert len(convs) == 200
    for c in convs:
        roles = [m["role"] for m in c["messages"]]
        assert roles[-1] == "assistant" and "user" in roles
        first_user = next(m["content"] for m in c["messages"] if m["role"] == "user")
        assert bucket_of(first_user) == "val"
    arithmetic_replies = [m["content"] for c in convs for m in c["messages"]
                          if m["role"] == "assistant" and "####" in m["content"]]
    assert len(arithmetic_replies) > 80
    for reply in arithmetic_replies:
        check_solution(reply)


def test_mmlu_format_and_correct_answers():
    rng = random.Random(0)
    for subject in mmlu.SUBJECTS:
        for _ in range(30):
            q = mmlu.generate_question(rng, subject)
            assert q["subject"] == subject and len(q["choices"]) == 4 and len(set(q["choices"])) == 4
            assert 0 <= q["answer"] < 4
            if subject == "elementary_arithmetic":
                a, op, b = re.match(r"What is (\d+) ([-+x]) (\d+)\?", q["question"]).groups()
                value = {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op]
                assert q["choices"][q["answer"]] == str(value)
            if subject == "number_comparison":
                nums = [int(c) for c in q["choices"]]
                want = max(nums) if "largest" in q["question"] else min(nums)
                assert int(q["choices"][q["answer"]]) == want


def test_preference_pairs_prefer_the_right_answer():
    pairs = preferences.generate_pairs(random.Random(0), 200, "sft")
    kinds = {p["kind"] for p in pairs}
    assert {"wrong_number", "no_final_line", "sloppy", "cut_off", "wrong_character"} <= kinds
    for p in pairs:
        assert p["chosen"] != p["rejected"] and p["prompt"][-1]["role"] == "user"
        if "####" in p["chosen"]:
            right = check_solution(p["chosen"])
            if p["kind"] == "wrong_number":
                assert int(arithmetic.final_answer(p["rejected"])) != right
            else:
                assert "####" not in p["rejected"]


def test_humaneval_tasks_pass_their_tests_and_catch_wrong_code():
    tasks = humaneval_tasks()
    assert len(tasks) >= 10 and len({t["task_id"] for t in tasks}) == len(tasks)
    for t in tasks:
        env: dict = {}
        exec(t["prompt"] + t["canonical_solution"] + "\n" + t["test"], env)  # noqa: S102  (our own tasks)
        env["check"](env[t["entry_point"]])
        broken: dict = {}
        exec(t["prompt"] + "    return None\n" + "\n" + t["test"], broken)  # noqa: S102
        try:
            broken["check"](broken[t["entry_point"]])
        except AssertionError:
            continue
        raise AssertionError(f"{t['task_id']}: the tests accept a wrong solution")

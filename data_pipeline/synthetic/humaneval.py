"""A handful of simple Python tasks in the HumanEval format.

Fields per task, as in ``openai/openai_humaneval``: task_id, prompt (signature +
docstring), canonical_solution (the body), test (defines ``check(candidate)``),
entry_point (the function name). ``prompt + canonical_solution + test`` followed
by ``check(entry_point)`` runs clean (tested).
"""
from __future__ import annotations

import random

# (entry_point, signature, docstring, body, [(args, expected), ...])
_TASKS = [
    ("add", "a: int, b: int) -> int", "Return the sum of a and b.", "    return a + b\n",
     [("2, 3", "5"), ("0, 0", "0"), ("-1, 1", "0"), ("10, 7", "17")]),
    ("is_even", "n: int) -> bool", "Return True if n is even, else False.", "    return n % 2 == 0\n",
     [("4", "True"), ("7", "False"), ("0", "True"), ("-3", "False")]),
    ("reverse_string", "s: str) -> str", "Return s reversed.", "    return s[::-1]\n",
     [("'abc'", "'cba'"), ("''", "''"), ("'a'", "'a'"), ("'hello'", "'olleh'")]),
    ("max_of_list", "xs: list) -> int", "Return the largest number in the non-empty list xs.",
     "    best = xs[0]\n    for x in xs[1:]:\n        if x > best:\n            best = x\n    return best\n",
     [("[1, 5, 3]", "5"), ("[-2, -7]", "-2"), ("[4]", "4")]),
    ("count_vowels", "s: str) -> int", "Return how many of the letters in s are vowels (a, e, i, o, u).",
     "    return sum(1 for ch in s.lower() if ch in 'aeiou')\n",
     [("'hello'", "2"), ("'sky'", "0"), ("'AEIOU'", "5")]),
    ("factorial", "n: int) -> int", "Return n! for n >= 0.",
     "    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result\n",
     [("0", "1"), ("1", "1"), ("5", "120")]),
    ("fibonacci", "n: int) -> int", "Return the n-th Fibonacci number, with fibonacci(0) == 0 and fibonacci(1) == 1.",
     "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
     [("0", "0"), ("1", "1"), ("10", "55")]),
    ("sum_list", "xs: list) -> int", "Return the sum of the numbers in xs (0 for an empty list).",
     "    total = 0\n    for x in xs:\n        total += x\n    return total\n",
     [("[1, 2, 3]", "6"), ("[]", "0"), ("[-1, 1]", "0")]),
    ("is_palindrome", "s: str) -> bool", "Return True if s reads the same forwards and backwards.",
     "    return s == s[::-1]\n", [("'level'", "True"), ("'abc'", "False"), ("''", "True")]),
    ("count_words", "s: str) -> int", "Return the number of words in s, separated by spaces.",
     "    return len(s.split())\n", [("'the cat sat'", "3"), ("''", "0"), ("'one'", "1")]),
    ("double_all", "xs: list) -> list", "Return a new list with every number of xs doubled.",
     "    return [2 * x for x in xs]\n", [("[1, 2]", "[2, 4]"), ("[]", "[]"), ("[0, -3]", "[0, -6]")]),
    ("first_char", "s: str) -> str", "Return the first character of s, or '' when s is empty.",
     "    return s[:1]\n", [("'cat'", "'c'"), ("''", "''")]),
]


def humaneval_tasks(rng: random.Random | None = None, n: int | None = None) -> list[dict]:
    """The synthetic tasks (all of them, or ``n`` in an order shuffled by ``rng``)."""
    order = list(range(len(_TASKS)))
    if rng is not None:
        rng.shuffle(order)
    order = order[:n] if n is not None else order
    tasks = []
    for i in order:
        name, sig, doc, body, cases = _TASKS[i]
        example_args, example_out = cases[0]
        prompt = (f"def {name}({sig}:\n    \"\"\"{doc}\n    >>> {name}({example_args})\n"
                  f"    {example_out}\n    \"\"\"\n")
        test = "def check(candidate):\n" + "".join(
            f"    assert candidate({args}) == {out}\n" for args, out in cases)
        tasks.append({"task_id": f"Synthetic/{i}", "prompt": prompt, "canonical_solution": body,
                      "test": test, "entry_point": name})
    return tasks

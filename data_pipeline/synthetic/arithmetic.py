"""Arithmetic word problems in the GSM8K format.

A problem is ``{"question": str, "answer": str}`` where the answer is a short
step-by-step solution with GSM8K calculator annotations and a last line
``#### <number>``, e.g.::

    question: Tom has 5 apples. He gets 3 more apples. How many apples does Tom have now?
    answer:   Tom has 5 + 3 = <<5+3=8>>8 apples now.
              #### 8

Operands stay small (<= ``max_operand``, default 20) and problems take one or
two steps, so a model of a few million parameters can learn them on a CPU in
minutes. Every answer is checked by evaluating its own steps (see the tests).
"""
from __future__ import annotations

import random
from collections.abc import Callable

from data_pipeline.synthetic.stories import NAMES

ITEMS = [("apple", "apples"), ("sticker", "stickers"), ("marble", "marbles"), ("cookie", "cookies"),
         ("crayon", "crayons"), ("book", "books"), ("shell", "shells"), ("flower", "flowers"),
         ("card", "cards"), ("balloon", "balloons"), ("pencil", "pencils"), ("candy", "candies"),
         ("stamp", "stamps"), ("button", "buttons"), ("egg", "eggs"), ("rock", "rocks"),
         ("toy car", "toy cars"), ("cupcake", "cupcakes")]
CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("jar", "jars"),
              ("plate", "plates"), ("shelf", "shelves")]


def _step(a: int, op: str, b: int) -> tuple[str, int]:
    """Return ('a op b = <<a op b=c>>c', c) in GSM8K calculator notation."""
    c = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    return f"{a} {op} {b} = <<{a}{op}{b}={c}>>{c}", c


def _people(rng: random.Random) -> dict:
    he = rng.choice(["he", "she"])
    name = rng.choice(NAMES[he])
    friend = rng.choice([n for n in NAMES["he"] + NAMES["she"] if n != name])
    return {"name": name, "He": he.capitalize(), "he": he, "his": "his" if he == "he" else "her",
            "friend": friend}


# Each template takes (rng, people, item, container, max_operand) and returns (question, steps, result).
def _add(rng, p, item, cont, m):
    a, b = rng.randint(2, m), rng.randint(2, m)
    s, c = _step(a, "+", b)
    q, ans = rng.choice([
        ("{name} has {a} {items}. {He} gets {b} more {items}. How many {items} does {name} have now?",
         "{name} has {s} {items} now."),
        ("{name} picked {a} {items} in the morning and {b} {items} in the afternoon. How many {items} did {name} pick in all?",
         "{name} picked {s} {items} in all.")])
    kw = dict(a=a, b=b, s=s, items=item[1], **p)
    return q.format(**kw), [ans.format(**kw)], c


def _sub(rng, p, item, cont, m):
    a = rng.randint(3, m)
    b = rng.randint(1, a - 1)
    s, c = _step(a, "-", b)
    q, ans = rng.choice([
        ("{name} had {a} {items}. {He} gave {b} {items} to {friend}. How many {items} does {name} have left?",
         "{name} has {s} {items} left."),
        ("There were {a} {items} on the table. {name} took {b} of them. How many {items} are still on the table?",
         "There are {s} {items} still on the table.")])
    kw = dict(a=a, b=b, s=s, items=item[1], **p)
    return q.format(**kw), [ans.format(**kw)], c


def _mul(rng, p, item, cont, m):
    a, b = rng.randint(2, min(m, 9)), rng.randint(2, min(m, 10))
    s, c = _step(a, "*", b)
    q = "There are {a} {conts}. Each {cont} has {b} {items}. How many {items} are there in all?"
    return q.format(a=a, b=b, items=item[1], cont=cont[0], conts=cont[1]), [f"There are {s} {item[1]} in all."], c


def _cost(rng, p, item, cont, m):
    a, b = rng.randint(1, min(m, 10)), rng.randint(2, min(m, 9))
    s, c = _step(b, "*", a)
    q = "One {item} costs {a} dollars. {name} buys {b} {items}. How many dollars does {name} pay?"
    return q.format(a=a, b=b, item=item[0], items=item[1], **p), [f"{p['name']} pays {s} dollars."], c


def _div(rng, p, item, cont, m):
    k, each = rng.randint(2, min(m, 6)), rng.randint(1, min(m, 9))
    s, c = _step(k * each, "/", k)
    q = "{name} shares {t} {items} equally among {k} friends. How many {items} does each friend get?"
    return q.format(t=k * each, k=k, items=item[1], **p), [f"Each friend gets {s} {item[1]}."], c


def _more_than(rng, p, item, cont, m):
    a, b = rng.randint(1, m), rng.randint(2, m)
    s, c = _step(a, "+", b)
    q = "{name} has {a} {items}. {friend} has {b} more {items} than {name}. How many {items} does {friend} have?"
    return q.format(a=a, b=b, items=item[1], **p), [f"{p['friend']} has {s} {item[1]}."], c


def _add_sub(rng, p, item, cont, m):
    a, b = rng.randint(2, m), rng.randint(2, m)
    s1, t = _step(a, "+", b)
    s2, c = _step(t, "-", rng.randint(1, t - 1))
    q = "{name} has {a} {items}. {He} finds {b} more and then loses {l}. How many {items} does {name} have now?"
    lost = int(s2.split(" - ")[1].split(" ")[0])
    return (q.format(a=a, b=b, l=lost, items=item[1], **p),
            [f"After finding more, {p['name']} has {s1} {item[1]}.", f"After losing some, {p['name']} has {s2} {item[1]}."], c)


def _mul_add(rng, p, item, cont, m):
    a, b, extra = rng.randint(2, min(m, 6)), rng.randint(2, min(m, 8)), rng.randint(1, m)
    s1, t = _step(a, "*", b)
    s2, c = _step(t, "+", extra)
    q = "{name} has {a} {conts} with {b} {items} in each {cont}. {He} also has {e} more {items}. How many {items} does {name} have in total?"
    return (q.format(a=a, b=b, e=extra, items=item[1], cont=cont[0], conts=cont[1], **p),
            [f"In the {cont[1]} there are {s1} {item[1]}.", f"In total {p['name']} has {s2} {item[1]}."], c)


def _two_people_eat(rng, p, item, cont, m):
    a, b = rng.randint(2, m), rng.randint(2, m)
    s1, t = _step(a, "+", b)
    eaten = rng.randint(1, t - 1)
    s2, c = _step(t, "-", eaten)
    q = "{name} has {a} {items} and {friend} has {b} {items}. They use {e} of them. How many {items} are left?"
    return (q.format(a=a, b=b, e=eaten, items=item[1], **p),
            [f"Together they have {s1} {item[1]}.", f"After using some, {s2} {item[1]} are left."], c)


ONE_STEP: list[Callable] = [_add, _sub, _mul, _cost, _div, _more_than]
TWO_STEP: list[Callable] = [_add_sub, _mul_add, _two_people_eat]


def generate_problem(rng: random.Random, max_operand: int = 20, two_step_fraction: float = 0.4) -> dict:
    """One GSM8K-format problem: {"question": str, "answer": "...\\n#### N"}."""
    template = rng.choice(TWO_STEP if rng.random() < two_step_fraction else ONE_STEP)
    question, steps, result = template(rng, _people(rng), rng.choice(ITEMS), rng.choice(CONTAINERS),
                                       max_operand)
    return {"question": question, "answer": "\n".join(steps + [f"#### {result}"])}


def final_answer(answer: str) -> str:
    """The text after the last '####' of a GSM8K answer, stripped ('' if none)."""
    return answer.rsplit("####", 1)[1].strip() if "####" in answer else ""

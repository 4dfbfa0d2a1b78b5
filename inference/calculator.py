"""The calculator the model calls while it generates: GSM8K's annotations, ``<<48/2=24>>24``.

A model trained on GSM8K writes each step's arithmetic as ``<<expression=result>>``; its
remaining errors are mostly in ``result`` ("6+6=14"). With the calculator on, the engine watches
each sequence's text: when the model writes the ``=`` of an open ``<<``, the expression is
evaluated here and the tokens of ``result>>`` are fed back in place of what the model would have
sampled (all at once: the next step computes them together, as a short prefill). The model then
continues from the right number, as in nanochat's calculator tool.

Only arithmetic is evaluated (numbers, + - * / // % **, parentheses), from the parsed syntax
tree, never with ``eval``; huge powers and results are refused, and an expression that is not
arithmetic is left to the model.
"""
from __future__ import annotations

import ast
import math
import operator
from collections.abc import Sequence
from typing import Any, Optional

OPEN, EQUALS, CLOSE = "<<", "=", ">>"
MAX_EXPRESSION = 120  # characters between "<<" and "=": longer is not a calculator call
MAX_MAGNITUDE = 1e15

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def evaluate(expression: str) -> Optional[float]:
    """The value of an arithmetic expression (``1,200`` and ``$5`` allowed), None if it is not
    one or its value is out of range (division by zero, a huge power, inf/nan)."""
    text = expression.replace(",", "").replace("$", "").replace("x", "*").replace("×", "*").strip()
    if not text or len(text) > MAX_EXPRESSION:
        return None
    try:
        value = _eval(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None
    if value is None or not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        return None
    return float(value)


def _eval(node: ast.AST) -> Optional[float]:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if left is None or right is None:
            return None
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
            return None  # 9**9**9 would take the engine thread down
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        inner = _eval(node.operand)
        return None if inner is None else _UNARY[type(node.op)](inner)
    return None


def format_number(value: float) -> str:
    """GSM8K's way of writing a result: integers without a decimal point, else up to 4 decimals."""
    if abs(value - round(value)) < 1e-9:
        return str(int(round(value)))
    return f"{value:.4f}".rstrip("0").rstrip(".")


class CalculatorWatcher:
    """Follows one sequence's generated text; ``after(token)`` returns the tokens to append in
    place of ``token``: itself, or (at a call's ``=``) the piece up to ``=`` + the result + ``>>``."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        # the text since the last "<<" still open, or its last character; a prompt may open a call
        self.text = tokenizer.decode(list(prompt_ids[-(MAX_EXPRESSION + 2):])) if prompt_ids else ""
        self.calls = 0  # results the calculator supplied

    def after(self, token: int) -> list[int]:
        before = len(self.text)
        piece = self.tokenizer.decode([token])
        self.text += piece
        start = self.text.rfind(OPEN)
        if start < 0 or CLOSE in self.text[start:]:
            self.text = self.text[-1:]  # no open call: keep a lone "<" that a "<" may complete
            return [token]
        inside = self.text[start + len(OPEN):]
        eq = inside.find(EQUALS)
        if eq < 0:
            if len(inside) > MAX_EXPRESSION:
                self.text = ""  # not a calculator call
            return [token]
        self.text = ""  # this call is answered (or left to the model) either way
        value = evaluate(inside[:eq])
        cut = start + len(OPEN) + eq + 1 - before  # where the "=" ends, inside this token's piece
        if value is None or cut <= 0:
            return [token]
        self.calls += 1
        return self.tokenizer.encode(piece[:cut] + format_number(value) + CLOSE)

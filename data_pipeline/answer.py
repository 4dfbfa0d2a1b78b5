"""Pull the final numeric answer out of GSM8K-style text.

GSM8K solutions end with a line ``#### <number>``. Both the eval (accuracy) and
the RL rule rewards read answers through these functions, so "what counts as the
model's answer" is defined once.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Optional

# A number as written in text: optional sign and "$", digits (commas only as
# thousands separators, so a list "5,6" stays two numbers), optional decimals,
# optional trailing "." (end of sentence).
# Examples: 7, -3, +4, $5., 1,234, 3.50, .5, -$2
NUMBER = r"[-+]?\$?[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)"
_AFTER_HASHES = re.compile(r"####\s*(" + NUMBER + r")")
_ANY_NUMBER = re.compile(NUMBER)
_PLAIN = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


def normalize_number(s: str) -> Optional[str]:
    """Canonical string for a number so that equal numbers compare equal as strings.

    Strips whitespace, "$", thousands commas, a trailing "." and a leading "+";
    "3.0" -> "3", "0.50" -> "0.5", "-0" -> "0", "1,234" -> "1234".
    Returns None if what is left is not a plain decimal number.
    """
    s = s.strip().replace("$", "").replace(",", "")
    if s.endswith("."):
        s = s[:-1]
    if not _PLAIN.fullmatch(s):
        return None
    try:
        value = Decimal(s)
    except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
        return None
    if value == 0:
        return "0"  # also turns "-0" and "0.00" into "0"
    if value == value.to_integral_value():
        return str(int(value))
    # normalize() drops trailing zeros; format "f" avoids exponent notation.
    return format(value.normalize(), "f")


def extract_hash_answer(text: str) -> Optional[str]:
    """The normalised number right after the last ``####`` that has one, else None."""
    matches = _AFTER_HASHES.findall(text)
    return normalize_number(matches[-1]) if matches else None


def extract_gsm8k_answer(text: str) -> Optional[str]:
    """The model's final answer: the number after ``####`` if there is one (the last
    such marker wins), else the last number anywhere in the text, else None.
    The result is normalised (see ``normalize_number``)."""
    answer = extract_hash_answer(text)
    if answer is not None:
        return answer
    numbers = _ANY_NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


_ANSWER_LINE = re.compile(r"####[ \t]+" + NUMBER + r"[ \t]*")


def ends_with_answer_line(text: str) -> bool:
    """The GSM8K answer format: the last non-empty line is ``#### <number>`` (with the space)."""
    lines = [line for line in text.splitlines() if line.strip()]
    return bool(lines) and _ANSWER_LINE.fullmatch(lines[-1].strip()) is not None


def score_answers(completions: list[str], references: list[str]) -> dict:
    """Score GSM8K-format completions against their references ("... #### N" or bare "N").

    Returns {"accuracy": share whose ``####`` number equals the reference's, "format_rate":
    share whose last line is ``#### <number>``, "n": count}. Only the marked answer counts:
    a right number without ``####`` is not an exact answer."""
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions for {len(references)} references")
    right = [extract_hash_answer(c) is not None and extract_hash_answer(c) == extract_gsm8k_answer(r)
             for c, r in zip(completions, references)]
    fmt = [ends_with_answer_line(c) for c in completions]
    n = max(len(completions), 1)
    return {"accuracy": sum(right) / n, "format_rate": sum(fmt) / n, "n": len(completions)}

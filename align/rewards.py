"""Rule rewards for GSM8K-format answers, chosen by name in the RL recipe.

Every reward has the signature ``fn(completion: str, reference_answer: str) -> float``.
``reference_answer`` may be a full GSM8K solution ("... #### 72") or the bare
answer ("72").
"""
from __future__ import annotations

import difflib
import re
from typing import Callable, Dict

from data_pipeline.answer import ends_with_answer_line, extract_gsm8k_answer, extract_hash_answer, normalize_number
from utils.errors import UserError

RewardFn = Callable[[str, str], float]

# Weight of the format bonus in gsm8k_combined: small, so a well-formatted wrong
# answer (0.1) always scores below a correct one (1.0 or 1.1).
FORMAT_WEIGHT = 0.1
# Weight of the step credit in gsm8k_steps: below 1, so no partial credit outranks a right answer.
STEP_WEIGHT = 0.5
_CALCULATION = re.compile(r"<<([^<>]*)>>")
_OPERAND = re.compile(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+")  # unsigned: "25-8" is 25 and 8



def _reference_number(reference_answer: str) -> str:
    answer = extract_gsm8k_answer(reference_answer)
    if answer is None:
        raise UserError(
            f"reference answer {reference_answer[-80:]!r} contains no number; GSM8K references "
            "end with '#### <number>' (or are the bare number): fix the prompt file"
        )
    return answer


def gsm8k_exact(completion: str, reference_answer: str) -> float:
    """1.0 if the number after the completion's ``####`` equals the reference's
    numerically (1,234 == 1234, 3.0 == 3, $5. == 5), else 0.0. A completion
    without ``#### <number>`` scores 0: the reward asks for the marked answer."""
    predicted = extract_hash_answer(completion)
    return float(predicted is not None and predicted == _reference_number(reference_answer))


def gsm8k_format(completion: str, reference_answer: str) -> float:
    """1.0 if the completion's last non-empty line is ``#### <number>``, else 0.0."""
    return float(ends_with_answer_line(completion))


def gsm8k_combined(completion: str, reference_answer: str) -> float:
    """gsm8k_exact + FORMAT_WEIGHT * gsm8k_format (so in {0, 0.1, 1, 1.1})."""
    return gsm8k_exact(completion, reference_answer) + FORMAT_WEIGHT * gsm8k_format(completion, reference_answer)


def calculation_numbers(text: str) -> list[str]:
    """The numbers inside GSM8K calculator annotations, in order: "<<6+19=25>>" -> ["6", "19", "25"]."""
    return [n for calc in _CALCULATION.findall(text) for n in map(normalize_number, _OPERAND.findall(calc)) if n]


def gsm8k_steps(completion: str, reference_answer: str) -> float:
    """gsm8k_combined + STEP_WEIGHT * the share of the reference's calculator numbers that the
    completion's annotations reproduce at the same place (operands copied from the question,
    intermediate results). Partial credit on every sample: with a weak policy, almost every
    group of exact-only rewards is all zeros and carries no advantage. A bare-number reference
    has no steps, and then this is gsm8k_combined."""
    reference = calculation_numbers(reference_answer)
    share = 0.0
    if reference:
        produced = calculation_numbers(completion)
        share = sum(a == b for a, b in zip(reference, produced)) / len(reference)
    return gsm8k_combined(completion, reference_answer) + STEP_WEIGHT * share


REWARD_FUNCTIONS: Dict[str, RewardFn] = {
    "gsm8k_exact": gsm8k_exact,
    "gsm8k_format": gsm8k_format,
    "gsm8k_combined": gsm8k_combined,
    "gsm8k_steps": gsm8k_steps,
}


def get_reward_fn(name: str) -> RewardFn:
    """The reward function registered as ``name``; UserError naming the valid ones if unknown."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    valid = sorted(REWARD_FUNCTIONS)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UserError(f"unknown reward function {name!r}.{hint} Valid names: {', '.join(valid)}")

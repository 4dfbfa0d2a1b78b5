"""Rule rewards for GSM8K-format answers, chosen by name in the RL recipe.

Every reward has the signature ``fn(completion: str, reference_answer: str) -> float``.
``reference_answer`` may be a full GSM8K solution ("... #### 72") or the bare
answer ("72").
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict

from eval.answer import ends_with_answer_line, extract_gsm8k_answer, extract_hash_answer
from utils.errors import UserError

RewardFn = Callable[[str, str], float]

# Weight of the format bonus in gsm8k_combined: small, so a well-formatted wrong
# answer (0.1) always scores below a correct one (1.0 or 1.1).
FORMAT_WEIGHT = 0.1



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


REWARD_FUNCTIONS: Dict[str, RewardFn] = {
    "gsm8k_exact": gsm8k_exact,
    "gsm8k_format": gsm8k_format,
    "gsm8k_combined": gsm8k_combined,
}


def get_reward_fn(name: str) -> RewardFn:
    """The reward function registered as ``name``; UserError naming the valid ones if unknown."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    valid = sorted(REWARD_FUNCTIONS)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UserError(f"unknown reward function {name!r}.{hint} Valid names: {', '.join(valid)}")

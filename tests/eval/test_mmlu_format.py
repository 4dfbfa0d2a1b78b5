"""MMLU prompt text against a fixed string, letter choice from known logits, micro/macro."""
import math

import pytest
import torch

from eval.mmlu_format import (choose_letter, format_mmlu_prompt, group_by_subject,
                              letter_continuations, letter_logprobs_from_logits, mmlu_scores)

DEV = [
    {"subject": "high_school_physics", "question": "What is 1+1?", "choices": ["1", "2", "3", "4"], "answer": 1},
    {"subject": "high_school_physics", "question": "Unit of force?", "choices": ["newton", "joule", "watt", "pascal"], "answer": 0},
    {"subject": "high_school_physics", "question": "Not used in 2-shot", "choices": ["a", "b", "c", "d"], "answer": 3},
]
TEST = {"subject": "high_school_physics", "question": "  Speed of light in m/s?\n",
        "choices": ["3e8", "3e6", "340", "1"], "answer": 0}

EXPECTED_2_SHOT = (
    "The following are multiple choice questions (with answers) about high school physics.\n\n"
    "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
    "Unit of force?\nA. newton\nB. joule\nC. watt\nD. pascal\nAnswer: A\n\n"
    "Speed of light in m/s?\nA. 3e8\nB. 3e6\nC. 340\nD. 1\nAnswer:"
)


def test_prompt_matches_fixed_string():
    assert format_mmlu_prompt("high_school_physics", DEV, TEST, k=2) == EXPECTED_2_SHOT


def test_zero_shot_and_too_few_shots():
    zero = format_mmlu_prompt("abstract_algebra", [], TEST, k=0)
    assert zero == ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
                    "Speed of light in m/s?\nA. 3e8\nB. 3e6\nC. 340\nD. 1\nAnswer:")
    with pytest.raises(ValueError):
        format_mmlu_prompt("high_school_physics", DEV, TEST, k=5)


def test_letter_continuations():
    assert letter_continuations() == [" A", " B", " C", " D"]
    # The continuation is appended to a prompt ending in "Answer:" -> "Answer: B".
    assert (EXPECTED_2_SHOT + letter_continuations()[1]).endswith("Answer: B")


def test_scoring_known_logits():
    vocab, letter_ids = 10, [3, 5, 7, 9]
    logits = torch.full((3, vocab), -1.0)
    logits[0, 5] = 4.0                       # B clearly
    logits[1, 9] = 2.0                       # D: a non-letter token's mass must not matter
    logits[1, 0] = 50.0
    logits[2, 3] = 1.0                       # tie A/C -> first (A)
    logits[2, 7] = 1.0
    lp = letter_logprobs_from_logits(logits, letter_ids)
    assert lp.shape == (3, 4)
    # Row 0 by hand: log softmax over all 10 tokens.
    z = 4.0 + math.log(1 + 9 * math.exp(-5.0))
    assert lp[0, 1].item() == pytest.approx(4.0 - z, abs=1e-6)
    assert lp[0, 0].item() == pytest.approx(-1.0 - z, abs=1e-6)
    assert choose_letter(lp).tolist() == [1, 3, 0]
    with pytest.raises(ValueError):
        choose_letter(torch.zeros(2, 5))


def test_micro_and_macro_by_hand():
    # subject a: 3/4 correct; subject b: 0/1; subject c: 1/1.
    records = ([{"subject": "a", "pred": 0, "answer": 0}] * 3 + [{"subject": "a", "pred": 1, "answer": 0}]
               + [{"subject": "b", "pred": 2, "answer": 3}] + [{"subject": "c", "pred": 3, "answer": 3}])
    s = mmlu_scores(records)
    assert s["micro"] == pytest.approx(4 / 6)
    assert s["macro"] == pytest.approx((0.75 + 0.0 + 1.0) / 3)
    assert s["per_subject"] == {"a": 0.75, "b": 0.0, "c": 1.0}
    assert s["counts"] == {"a": 4, "b": 1, "c": 1} and s["n"] == 6
    with pytest.raises(ValueError):
        mmlu_scores([])


def test_group_by_subject_keeps_order():
    recs = [{"subject": "x", "i": 0}, {"subject": "y", "i": 1}, {"subject": "x", "i": 2}]
    assert group_by_subject(recs) == {"x": [recs[0], recs[2]], "y": [recs[1]]}

import pytest

from align.rewards import (FORMAT_WEIGHT, REWARD_FUNCTIONS, STEP_WEIGHT, calculation_numbers, get_reward_fn, gsm8k_combined,
                           gsm8k_exact, gsm8k_format, gsm8k_steps)
from utils.errors import UserError

REFERENCE = "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72"


@pytest.mark.parametrize("completion, reference, expected", [
    ("She sold 72 clips.\n#### 72", REFERENCE, 1.0),
    ("#### 72.0", REFERENCE, 1.0),            # 72.0 == 72
    ("#### $72.", "72", 1.0),                  # $ and trailing dot; bare reference
    ("#### 1,234", "#### 1234", 1.0),          # thousands comma
    ("#### 1234", "#### 1,234", 1.0),
    ("#### +5", "#### 5", 1.0),
    ("#### -0", "#### 0", 1.0),
    ("#### -3", "#### 3", 0.0),                # sign matters
    ("#### -3", "#### -3", 1.0),
    ("the answer is 72.", REFERENCE, 0.0),     # no #### marker: exact asks for the marked answer
    ("#### 70\n#### 72", REFERENCE, 1.0),      # two markers: the last one counts
    ("#### 72\n#### 70", REFERENCE, 0.0),
    ("#### seventy-two", REFERENCE, 0.0),
    ("", REFERENCE, 0.0),
])
def test_gsm8k_exact(completion, reference, expected):
    assert gsm8k_exact(completion, reference) == expected


@pytest.mark.parametrize("completion, expected", [
    ("48/2 = 24\n#### 72", 1.0),
    ("#### 72\n\n  ", 1.0),                    # trailing blank lines are fine
    ("#### 1,234.5", 1.0),
    ("#### -3", 1.0),
    ("#### 72 clips", 0.0),                    # not just a number
    ("#### 72\nThanks!", 0.0),                 # something after the answer line
    ("the answer is 72", 0.0),
    ("####", 0.0),
    ("", 0.0),
])
def test_gsm8k_format(completion, expected):
    assert gsm8k_format(completion, "unused") == expected


def test_gsm8k_combined():
    assert gsm8k_combined("work\n#### 72", REFERENCE) == 1.0 + FORMAT_WEIGHT
    assert gsm8k_combined("#### 72 clips", REFERENCE) == 1.0  # right, badly formatted
    assert gsm8k_combined("#### 71", REFERENCE) == FORMAT_WEIGHT
    assert gsm8k_combined("no idea", REFERENCE) == 0.0


STEPS_REFERENCE = "They have 6 + 19 = <<6+19=25>>25 cookies.\n25 - 8 = <<25-8=17>>17 are left.\n#### 17"


def test_calculation_numbers():
    assert calculation_numbers(STEPS_REFERENCE) == ["6", "19", "25", "25", "8", "17"]
    assert calculation_numbers("<<1,200/4=300.0>> and <<no numbers>>") == ["1200", "4", "300"]
    assert calculation_numbers("no annotations 6 + 19 = 25") == []


def test_gsm8k_steps():
    full = gsm8k_combined(STEPS_REFERENCE, STEPS_REFERENCE)
    assert gsm8k_steps(STEPS_REFERENCE, STEPS_REFERENCE) == pytest.approx(full + STEP_WEIGHT)
    # first step copied right (3 of 6 numbers in place), second wrong, final answer wrong
    half = "They have 6 + 19 = <<6+19=25>>25.\n25 - 9 = <<25-9=15>>15.\n#### 15"
    assert gsm8k_steps(half, STEPS_REFERENCE) == pytest.approx(FORMAT_WEIGHT + STEP_WEIGHT * 4 / 6)  # 6, 19, 25, 25
    # numbers out of place earn nothing; a right answer always beats any partial credit
    assert gsm8k_steps("<<19+6=25>>\n#### 3", STEPS_REFERENCE) == pytest.approx(FORMAT_WEIGHT + STEP_WEIGHT / 6)
    assert gsm8k_steps("#### 17", STEPS_REFERENCE) > gsm8k_steps(half, STEPS_REFERENCE)
    # a reference without annotations (bare number) leaves gsm8k_combined
    assert gsm8k_steps("x\n#### 72", "72") == gsm8k_combined("x\n#### 72", "72")


def test_registry_by_name():
    assert set(REWARD_FUNCTIONS) == {"gsm8k_exact", "gsm8k_format", "gsm8k_combined", "gsm8k_steps"}
    assert get_reward_fn("gsm8k_exact") is gsm8k_exact
    with pytest.raises(UserError) as err:
        get_reward_fn("gsm8k_exat")
    message = str(err.value)
    assert "Did you mean 'gsm8k_exact'" in message
    assert all(name in message for name in REWARD_FUNCTIONS)
    with pytest.raises(UserError, match="Valid names"):
        get_reward_fn("bleu")


def test_reference_without_number_is_a_user_error():
    with pytest.raises(UserError, match="contains no number"):
        gsm8k_exact("#### 3", "no answer here")

import pytest

from data_pipeline.answer import ends_with_answer_line, extract_gsm8k_answer, extract_hash_answer, normalize_number


@pytest.mark.parametrize("raw, expected", [
    ("1,234", "1234"), ("$5.", "5"), ("3.0", "3"), ("3", "3"), ("-0", "0"), ("-0.00", "0"),
    ("+4", "4"), ("0.50", "0.5"), (" 12 ", "12"), ("-$2", "-2"), ("1,000,000.250", "1000000.25"),
    (".5", "0.5"), ("1200", "1200"), ("-7.", "-7"),
    ("", None), ("abc", None), ("1.2.3", None), ("nan", None), ("inf", None), ("1e3", None), ("-", None),
])
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


@pytest.mark.parametrize("text, expected", [
    ("#### 1,234", "1234"),
    ("It costs $5.", "5"),
    ("the answer is 7.", "7"),
    ("#### -3", "-3"),
    ("no number here", None),
    ("#### 4\n#### 9", "9"),                                # two markers: the last wins
    ("step 1: 10 + 2 = 12\n#### 12", "12"),
    ("He has 3 apples and then 5. #### 8 apples", "8"),     # marker beats later numbers
    ("#### I don't know, maybe 41 or 42", "42"),            # marker without a number: last number
    ("Totals: 5,6 and 7,000", "7000"),                      # "5,6" is a list, "7,000" a number
    ("#### $1,000.50.", "1000.5"),
    ("####3.0", "3"),
])
def test_extract_gsm8k_answer(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_extract_hash_answer_is_strict():
    assert extract_hash_answer("the answer is 7.") is None
    assert extract_hash_answer("#### 7") == "7"
    assert extract_hash_answer("#### none") is None


@pytest.mark.parametrize("text,ok", [("a\n#### 12", True), ("#### 1,234.5\n\n", True), ("#### 12 apples", False),
                                     ("12", False), ("#### 3\nmore", False), ("#### -7", True)])
def test_ends_with_answer_line(text, ok):
    assert ends_with_answer_line(text) is ok

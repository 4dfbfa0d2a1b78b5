"""Assign every synthetic item to a split by a hash of its text, so splits never overlap.

The bucket depends only on the text (not on the seed or on which script made
it), so an eval question can never show up in SFT or RL training data, even when
the downloaders run separately or with different seeds.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TypeVar

from utils.errors import UserError

T = TypeVar("T")

# Percent ranges of the 100 hash buckets.
_RANGES = {
    "eval": (0, 10),    # GSM8K-test, RL test, MMLU dev/test: never trained on
    "val": (10, 15),    # SFT / preference validation
    "sft": (15, 60),    # SFT and preference training prompts
    "rl": (60, 100),    # RL training prompts
}
SPLITS = tuple(_RANGES)


def bucket_of(text: str) -> str:
    """Return the split ("eval", "val", "sft" or "rl") that owns ``text``."""
    b = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") % 100
    for name, (lo, hi) in _RANGES.items():
        if lo <= b < hi:
            return name
    raise AssertionError("unreachable: the ranges cover 0..99")


def draw(make: Callable[[], T], key: Callable[[T], str], bucket: str | tuple[str, ...],
         n: int) -> list[T]:
    """Call ``make()`` until ``n`` distinct items (by ``key``) fall in ``bucket`` (one or several).

    Raises UserError when the generator's space runs dry (asking for more
    distinct items than the grammar can produce).
    """
    buckets = (bucket,) if isinstance(bucket, str) else tuple(bucket)
    seen: set[str] = set()
    out: list[T] = []
    tries, max_tries = 0, 50 * n + 10_000
    while len(out) < n:
        tries += 1
        if tries > max_tries:
            raise UserError(f"could only generate {len(out)} distinct synthetic items for split "
                            f"'{bucket}' out of {n} asked; ask for fewer")
        item = make()
        k = key(item)
        if k in seen or bucket_of(k) not in buckets:
            continue
        seen.add(k)
        out.append(item)
    return out

"""PII scrubbing: replace emails, phone numbers, IP addresses and card-like numbers by tags.

``scrub_pii(text) -> (clean_text, counts)``. Patterns run in this order (the
first to claim a span wins): email -> [EMAIL], card-like number that passes
the Luhn check -> [CARD], IPv4 / full-form IPv6 -> [IP], phone number -> [PHONE].
Conservative by design: plain numbers ("12 apples", "1234567") are kept.
"""
from __future__ import annotations

import re
from collections import Counter

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d.])")
IPV6 = re.compile(r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![0-9A-Fa-f:])")
PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){1,3}[ .-]?\d{3,4}"     # +44 20 7946 0958, +1-555-123-4567
    r"|(?:\(\d{3}\)[ .-]?|\d{3}[ .-])?\d{3}[ .-]\d{4}"          # (555) 123-4567, 555.123.4567, 123-4567
    r")(?!\w)")


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum that payment card numbers satisfy."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(match: re.Match) -> str:
    digits = re.sub(r"\D", "", match.group())
    return "[CARD]" if luhn_ok(digits) else match.group()


def scrub_pii(text: str) -> tuple[str, Counter]:
    """Return (text with PII replaced by tags, Counter of replacements per kind)."""
    counts: Counter = Counter()
    for kind, pattern, repl in (("email", EMAIL, "[EMAIL]"), ("card", CARD, _card),
                                ("ip", IPV4, "[IP]"), ("ip", IPV6, "[IP]"), ("phone", PHONE, "[PHONE]")):
        before = text
        text, n = pattern.subn(repl, text)
        if kind == "card":  # subn counts every candidate; count only those that passed Luhn
            n = text.count("[CARD]") - before.count("[CARD]")
        if n:
            counts[kind] += n
    return text, counts

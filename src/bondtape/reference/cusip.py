"""CUSIP: 8 characters of issuer and issue, then a check digit (modulus 10, double add double)."""
from __future__ import annotations

import re

_CUSIP_RE = re.compile(r"^[0-9A-Z*@#]{8}[0-9]$")


def _value(ch: str) -> int:
    if ch.isdigit():
        return int(ch)
    if "A" <= ch <= "Z":
        return ord(ch) - ord("A") + 10
    return {"*": 36, "@": 37, "#": 38}[ch]


def cusip_check_digit(base8: str) -> int:
    total = 0
    for i, ch in enumerate(base8.upper()):
        v = _value(ch)
        if i % 2 == 1:
            v *= 2
        total += v // 10 + v % 10
    return (10 - total % 10) % 10


def cusip_problem(cusip: str) -> str | None:
    """None for a valid CUSIP, else what is wrong with it."""
    if len(cusip) != 9:
        return f"a CUSIP has 9 characters; got {len(cusip)}"
    if not _CUSIP_RE.match(cusip):
        return "a CUSIP is 8 characters of A-Z, 0-9, *, @, # and a digit"
    expected = cusip_check_digit(cusip[:8])
    if int(cusip[8]) != expected:
        return f"check digit is {cusip[8]}, expected {expected}"
    return None


def is_valid_cusip(cusip: str) -> bool:
    return cusip_problem(cusip) is None

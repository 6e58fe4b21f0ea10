"""Commands every channel builds, and parsing them from text fields.

The website, REST API, FIX gateway and bulk files all turn their input into a mapping of
the field names below and call :func:`parse_command`; from there one path validates and
journals them. Field names (also the bulk-file columns) are documented in docs/reporting.md.
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Mapping

from bondtape.clock import MARKET_TZ, to_us
from bondtape.reporting.codes import Rejected

ACTIONS = ("NEW", "CANCEL", "CORRECT", "REVERSE")
SIDES = ("B", "S")
CAPACITIES = ("P", "A")
TRADING_MARKETS = ("S1", "P1")
REMUNERATION = ("C", "M", "N")
INDICATORS = (
    "when_issued", "special_price", "weighted_average", "merger_transfer", "locked_in", "agu",
)
FIELDS = (
    "action", "client_ref", "reporting_mpid", "cusip", "side", "capacity", "contra",
    "quantity", "price", "yield", "execution_time", "settlement_date", "commission",
    *INDICATORS, "trading_market", "remuneration", "test", "allow_duplicate",
    "original_control_number", "report_time",
)
_TRUE = {"Y", "YES", "TRUE", "1"}
# A number as people write it: ASCII digits, an optional decimal point, thousands separators
# only in groups of three (so a decimal comma, 101,5, is not read as 1015), no exponent (a
# spreadsheet's 1.23E+06 has lost digits), no NaN, Infinity, underscores or other scripts' digits.
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+|[0-9]{1,3}(?:,[0-9]{3})+)?(?:\.[0-9]*)?")
_NUMBER_ACCEPTED = "digits with an optional decimal point, e.g. 101.25 or 1,000,000"
_MAX_INT_DIGITS = 16  # above any plausible par amount, price, yield or commission; keeps scaling exact
_MAX_DECIMALS = 12
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
# instants outside these years cannot be shown in market time (datetime ends at year 9999)
_MIN_US = -2_208_988_800_000_000  # 1900-01-01T00:00:00Z
_MAX_US = 253_402_128_000_000_000  # 9999-12-30T00:00:00Z
_ECHO = 40  # characters of a rejected value repeated in a message
_FALSE = {"N", "NO", "FALSE", "0", ""}
CLIENT_REF_MAX = 64
CLIENT_REF_ACCEPTED = (f"at most {CLIENT_REF_MAX} printable characters (letters, digits, punctuation, spaces; "
                       "no control characters such as NUL, tab or a line break)")


@dataclass(slots=True, unsafe_hash=True)  # not frozen: a frozen dataclass is slow to build
class Terms:
    """The terms of a trade as reported (a new report or a correction's new terms)."""

    cusip: str
    side: str
    capacity: str
    contra: str  # an MPID, C (customer) or A (non-member affiliate)
    quantity: Decimal  # par value, dollars
    price: Decimal  # percent of par
    yield_: Decimal | None
    execution_us: int
    settlement_date: dt.date | None
    commission: Decimal | None
    when_issued: bool = False
    special_price: bool = False
    weighted_average: bool = False
    trading_market: str = "S1"
    merger_transfer: bool = False  # Rule 6750(b)(2) position transfer
    remuneration: str | None = None
    locked_in: bool = False
    agu: bool = False

    @property
    def contra_type(self) -> str:
        return self.contra if self.contra in ("C", "A") else "D"


@dataclass(slots=True, unsafe_hash=True)  # not frozen: a frozen dataclass is slow to build
class Command:
    action: str
    reporting_mpid: str
    client_ref: str | None = None
    terms: Terms | None = None
    original_control_number: int | None = None
    test: bool = False
    allow_duplicate: bool = False
    channel: str = "api"
    report_us: int | None = None  # receipt time, only when an operator back-fills on a clock


def client_ref_problem(ref: str) -> str | None:
    """Why a client_ref is refused (the message of FIELD_INVALID on client_ref), or None.

    It is journaled and looked up by every channel, so it must be text every database
    holds and every channel can send back: at most 64 printable characters. A control
    character (NUL, tab, line break, escape, ...) or another invisible one is refused: PostgreSQL
    cannot store NUL at all, and the others would make two references that look alike."""
    if len(ref) > CLIENT_REF_MAX:
        return f"client_ref is at most {CLIENT_REF_MAX} characters; got {len(ref)}"
    if ref.isprintable():  # the usual case
        return None
    index, char = next((i, c) for i, c in enumerate(ref) if not c.isprintable())
    kind = "a control character" if ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F else "a character that is not printable"
    return f"client_ref {_echo(ref)} holds {kind} (U+{ord(char):04X}) at position {index + 1}: {CLIENT_REF_ACCEPTED}"


def _echo(value: str) -> str:
    """A rejected value as a message repeats it: quoted, and cut short if long."""
    return repr(value) if len(value) <= _ECHO else repr(value[:_ECHO]) + f"... ({len(value)} characters)"


def _text(fields: Mapping[str, object], name: str) -> str:
    value = fields.get(name)
    if value is None:
        return ""
    return value.strip() if type(value) is str else str(value).strip()


def _required(fields: Mapping[str, object], name: str, accepted: str) -> str:
    value = _text(fields, name)
    if not value:
        raise Rejected("FIELD_REQUIRED", name, f"{name} is required: {accepted}")
    return value


def _choice(fields: Mapping[str, object], name: str, choices: tuple[str, ...], default: str | None = None) -> str:
    value = _text(fields, name).upper()
    if not value:
        if default is not None:
            return default
        raise Rejected("FIELD_REQUIRED", name, f"{name} is required: one of {', '.join(choices)}")
    if value not in choices:
        raise Rejected("FIELD_INVALID", name, f"{name} {_echo(value)} is not accepted: one of {', '.join(choices)}")
    return value


def _flag(fields: Mapping[str, object], name: str) -> bool:
    if fields.get(name) is None:  # the usual case: the indicator is not given
        return False
    value = _text(fields, name).upper()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise Rejected("FIELD_INVALID", name, f"{name} {_echo(value)} is not accepted: Y or N (also true/false, 1/0)")


def _decimal(fields: Mapping[str, object], name: str, code: str, required: bool) -> Decimal | None:
    text = _text(fields, name)
    if not text:
        if required:
            raise Rejected("FIELD_REQUIRED", name, f"{name} is required: a positive number ({_NUMBER_ACCEPTED})")
        return None
    whole, _, fraction = text.partition(".")
    if (whole.isdigit() and text.isascii() and (not fraction or fraction.isdigit())
            and len(whole) <= _MAX_INT_DIGITS and len(fraction) <= _MAX_DECIMALS):
        return Decimal(text)  # the usual case: plain digits, e.g. 101.25
    if not _NUMBER_RE.fullmatch(text) or not any(c.isdigit() for c in text):
        raise Rejected(code, name, f"{name} {_echo(text)} is not a number: {_NUMBER_ACCEPTED}")
    whole, _, fraction = text.replace(",", "").lstrip("+-").partition(".")
    if len(whole.lstrip("0")) > _MAX_INT_DIGITS or len(fraction.rstrip("0")) > _MAX_DECIMALS:
        raise Rejected(code, name, f"{name} {_echo(text)} is out of range: at most {_MAX_INT_DIGITS} digits before "
                                   f"the decimal point and {_MAX_DECIMALS} after")
    return Decimal(text.replace(",", ""))


def _time(fields: Mapping[str, object], name: str, required: bool = True) -> int | None:
    value = fields.get(name)
    if type(value) is int:  # already UTC microseconds (a channel that parsed its own format)
        us = value
    elif isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise Rejected("TIME_INVALID", name, f"{name} needs a time zone")
        us = to_us(value)
    else:
        text = _text(fields, name)
        if not text:
            if required:
                raise Rejected("FIELD_REQUIRED", name, f"{name} is required: ISO 8601, e.g. 2024-03-01T10:15:00-05:00")
            return None
        if len(text) <= 10:  # a date alone would be read as midnight
            raise Rejected("TIME_INVALID", name, f"{name} {_echo(text)} has no time of day: ISO 8601 date and time, "
                                                 "e.g. 2024-03-01T10:15:00-05:00")
        try:
            value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except (ValueError, OverflowError):
            raise Rejected("TIME_INVALID", name, f"{name} {_echo(text)} is not ISO 8601 (e.g. 2024-03-01T10:15:00-05:00)") from None
        if ("." in text or "," in text) and _finer_than_us(text):
            raise Rejected("TIME_INVALID", name, f"{name} {_echo(text)} is finer than a microsecond: times are stored to the "
                                                 "microsecond, so give at most 6 decimals of a second (more only as zeros)")
        if value.tzinfo is None:
            value = _market_time(value, name, text)
        try:
            us = to_us(value)
        except OverflowError:  # e.g. 0001-01-01T00:00+01:00 is in the year 0 in UTC
            raise Rejected("TIME_INVALID", name, f"{name} is outside the years 1900 to 9999") from None
    if not _MIN_US <= us <= _MAX_US:
        raise Rejected("TIME_INVALID", name, f"{name} is outside the years 1900 to 9999")
    return us


_FRACTION_RE = re.compile(r"[.,]([0-9]+)")


def _finer_than_us(text: str) -> bool:
    """True when a decimal fraction of the text has a non-zero digit after the 6th: Python
    reads a time to the microsecond and drops the rest without a word (10:00:00.1234567 would
    be stored as 10:00:00.123456)."""
    return any(len(digits) > 6 and digits[6:].strip("0") for digits in _FRACTION_RE.findall(text))


def _offset(value: dt.datetime) -> str:
    off = value.utcoffset()
    assert off is not None
    minutes = int(off.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _market_time(naive: dt.datetime, name: str, text: str) -> dt.datetime:
    """A time without an offset, read as market time (America/New_York). A trade time is
    never moved or guessed: a wall-clock time the clocks skipped (the hour daylight saving
    time begins) or showed twice (the hour it ends) is refused, naming the offsets to give."""
    first = naive.replace(tzinfo=MARKET_TZ)  # fold=0: the offset in force before a change
    second = naive.replace(tzinfo=MARKET_TZ, fold=1)  # fold=1: the offset after it
    if first.utcoffset() == second.utcoffset():  # the usual case: no change of offset at this time
        return first
    before, after = _offset(first), _offset(second)
    wall = naive.isoformat()
    if first.astimezone(dt.timezone.utc).astimezone(MARKET_TZ).replace(tzinfo=None) != naive:
        raise Rejected("TIME_INVALID", name,
                       f"{name} {_echo(text)} does not exist in market time (America/New_York): the clocks moved "
                       f"forward from {before} to {after} that night and skipped it; give the time with the offset "
                       f"of the clock that showed it ({wall}{before} or {wall}{after}) or in UTC (Z)")
    raise Rejected("TIME_AMBIGUOUS", name,
                   f"{name} {_echo(text)} is ambiguous in market time (America/New_York): the clocks moved back "
                   f"from {before} to {after} that night, so it happened twice; give the time with its offset, "
                   f"{wall}{before} (the first) or {wall}{after} (the second), or in UTC (Z)")


def _date(fields: Mapping[str, object], name: str) -> dt.date | None:
    value = fields.get(name)
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return value
    text = _text(fields, name)
    if not text:
        return None
    try:
        if not _DATE_RE.fullmatch(text):
            raise ValueError(text)
        return dt.date.fromisoformat(text)
    except ValueError:
        raise Rejected("DATE_INVALID", name, f"{name} {_echo(text)} is not a date (YYYY-MM-DD)") from None


def parse_terms(fields: Mapping[str, object]) -> Terms:
    cusip = _required(fields, "cusip", "9-character CUSIP").upper()
    side = _choice(fields, "side", SIDES)
    capacity = _choice(fields, "capacity", CAPACITIES)
    contra = _required(fields, "contra", "an MPID, C (customer) or A (non-member affiliate)").upper()
    quantity = _decimal(fields, "quantity", "QUANTITY_INVALID", True)
    price = _decimal(fields, "price", "PRICE_INVALID", True)
    yield_ = _decimal(fields, "yield", "YIELD_INVALID", False)
    execution_us = _time(fields, "execution_time")
    settlement_date = _date(fields, "settlement_date")
    commission = _decimal(fields, "commission", "COMMISSION_INVALID", False)
    when_issued, special_price, weighted_average, merger_transfer, locked_in, agu = (
        _flag(fields, name) for name in INDICATORS)
    trading_market = _choice(fields, "trading_market", TRADING_MARKETS, default="S1")
    remuneration = _text(fields, "remuneration").upper() or None
    if remuneration is not None and remuneration not in REMUNERATION:
        raise Rejected("FIELD_INVALID", "remuneration", f"remuneration {_echo(remuneration)} is not accepted: C, M, N or blank")
    assert quantity is not None and price is not None and execution_us is not None
    # positional, in the order of Terms' fields
    return Terms(cusip, side, capacity, contra, quantity, price, yield_, execution_us, settlement_date, commission,
                 when_issued, special_price, weighted_average, trading_market, merger_transfer, remuneration,
                 locked_in, agu)


def parse_command(fields: Mapping[str, object], *, channel: str, use_report_time: bool = False) -> Command:
    """Build a command from text fields; raises :class:`Rejected` for malformed input."""
    action = _text(fields, "action").upper() or "NEW"
    if action not in ACTIONS:
        raise Rejected("ACTION_INVALID", "action", f"action {_echo(action)} is not accepted: one of {', '.join(ACTIONS)}")
    mpid = _required(fields, "reporting_mpid", "the reporting firm's MPID").upper()
    client_ref = _text(fields, "client_ref") or None
    if client_ref is not None:
        problem = client_ref_problem(client_ref)
        if problem is not None:
            raise Rejected("FIELD_INVALID", "client_ref", problem)
    original = None
    if action != "NEW":
        text = _required(fields, "original_control_number", "the control number of the report acted on")
        if not (text.isascii() and text.isdigit()) or len(text) > 18:
            raise Rejected("FIELD_INVALID", "original_control_number",
                           f"original_control_number {_echo(text)} is not a control number (up to 18 digits)")
        original = int(text)
    terms = parse_terms(fields) if action in ("NEW", "CORRECT") else None
    report_us = _time(fields, "report_time") if use_report_time else None
    # positional, in the order of Command's fields
    return Command(action, mpid, client_ref, terms, original, _flag(fields, "test"), _flag(fields, "allow_duplicate"),
                   channel, report_us)

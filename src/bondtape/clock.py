"""Time. Domain code never reads the wall clock: it is given times by the edges.

Storage is UTC microseconds since the epoch (exact, sortable, the same on every database);
market time is America/New_York.
"""
from __future__ import annotations

import datetime as dt
import time
from zoneinfo import ZoneInfo

MARKET_TZ = ZoneInfo("America/New_York")
UTC = dt.timezone.utc
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)


def now_us() -> int:
    """The wall clock, for the edges of the system only."""
    return time.time_ns() // 1000


def to_us(t: dt.datetime) -> int:
    if t.tzinfo is None:
        raise ValueError("naive datetime: a time zone is required")
    delta = t - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=us)


def market_time(us: int) -> dt.datetime:
    return from_us(us).astimezone(MARKET_TZ)


def market_date(us: int) -> dt.date:
    return market_time(us).date()


def parse_timestamp(text: str) -> dt.datetime:
    """ISO 8601; a time without an offset is market time (America/New_York)."""
    value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=MARKET_TZ)
    return value


def iso_market(us: int) -> str:
    return market_time(us).isoformat()

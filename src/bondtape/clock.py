"""Time. Domain code never reads the wall clock: it is given times by the edges.

Storage is UTC microseconds since the epoch (exact, sortable, the same on every database);
market time is America/New_York.
"""
from __future__ import annotations

import datetime as dt
import time
from functools import lru_cache
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
    """The market date of a UTC instant (cached per UTC hour: the fast path of intake)."""
    hour = us // _HOUR_US
    day = _DATE_OF_HOUR.get(hour)
    if day is None:
        day = market_parts(hour * _HOUR_US)[0]
        if len(_DATE_OF_HOUR) > 200_000:
            _DATE_OF_HOUR.clear()
        _DATE_OF_HOUR[hour] = day
    return day


# America/New_York's offset is a whole number of hours and changes on whole UTC hours, so
# local midnight falls on a whole UTC hour and every instant of a UTC hour has one market date.
_DATE_OF_HOUR: dict[int, dt.date] = {}


def iso_market(us: int) -> str:
    return market_time(us).isoformat()


_HOUR_US = 3_600_000_000
_DAY_US = 86_400_000_000
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


@lru_cache(maxsize=65_536)
def _offset_us(hour: int) -> int:
    # America/New_York changes its offset only on whole UTC hours, so one lookup per hour
    local = from_us(hour * _HOUR_US).astimezone(MARKET_TZ)
    off = local.utcoffset()
    assert off is not None
    return int(off.total_seconds()) * 1_000_000


def market_parts(us: int) -> tuple[dt.date, int]:
    """(market date, microseconds since local midnight) of a UTC instant; fast and exact."""
    local = us + _offset_us(us // _HOUR_US)
    day, within = divmod(local, _DAY_US)
    return _date_of(day), within


@lru_cache(maxsize=65_536)
def _date_of(epoch_day: int) -> dt.date:
    return dt.date.fromordinal(_EPOCH_ORDINAL + epoch_day)


@lru_cache(maxsize=65_536)
def market_instant(day: dt.date, t: dt.time) -> int:
    """The UTC instant of a market date and local time."""
    return to_us(dt.datetime.combine(day, t, tzinfo=MARKET_TZ))

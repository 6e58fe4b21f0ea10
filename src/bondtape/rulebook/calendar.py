"""Business days of the TRACE system: weekends and named holidays, America/New_York."""
from __future__ import annotations

import datetime as dt
from functools import lru_cache


def _nth_weekday(year: int, month: int, weekday: int, n: int) -> dt.date:
    first = dt.date(year, month, 1)
    offset = (weekday - first.weekday()) % 7
    return first + dt.timedelta(days=offset + 7 * (n - 1))


def _last_weekday(year: int, month: int, weekday: int) -> dt.date:
    nxt = dt.date(year + (month == 12), month % 12 + 1, 1)
    last = nxt - dt.timedelta(days=1)
    return last - dt.timedelta(days=(last.weekday() - weekday) % 7)


def _observed(day: dt.date) -> dt.date:
    if day.weekday() == 5:
        return day - dt.timedelta(days=1)
    if day.weekday() == 6:
        return day + dt.timedelta(days=1)
    return day


def _easter(year: int) -> dt.date:
    a = year % 19
    b, c = divmod(year, 100)
    d, e = divmod(b, 4)
    f = (b + 8) // 25
    g = (b - f + 1) // 3
    h = (19 * a + b - d - g + 15) % 30
    i, k = divmod(c, 4)
    l_ = (32 + 2 * e + 2 * i - h - k) % 7
    m = (a + 11 * h + 22 * l_) // 451
    month, day = divmod(h + l_ - 7 * m + 114, 31)
    return dt.date(year, month, day + 1)


def _holiday(name: str, year: int) -> dt.date | None:
    if name == "new_year":
        day = dt.date(year, 1, 1)
        return None if day.weekday() == 5 else _observed(day)  # Saturday: not moved back a year
    if name == "mlk":
        return _nth_weekday(year, 1, 0, 3) if year >= 1998 else None
    if name == "presidents":
        return _nth_weekday(year, 2, 0, 3)
    if name == "good_friday":
        return _easter(year) - dt.timedelta(days=2)
    if name == "memorial":
        return _last_weekday(year, 5, 0)
    if name == "juneteenth":
        return _observed(dt.date(year, 6, 19)) if year >= 2022 else None
    if name == "independence":
        return _observed(dt.date(year, 7, 4))
    if name == "labor":
        return _nth_weekday(year, 9, 0, 1)
    if name == "columbus":
        return _nth_weekday(year, 10, 0, 2)
    if name == "veterans":
        return _observed(dt.date(year, 11, 11))
    if name == "thanksgiving":
        return _nth_weekday(year, 11, 3, 4)
    if name == "christmas":
        return _observed(dt.date(year, 12, 25))
    raise ValueError(f"unknown holiday rule {name!r}")


class Calendar:
    def __init__(self, holiday_rules: tuple[str, ...]):
        for name in holiday_rules:
            _holiday(name, 2000)  # unknown names fail when the rulebook loads
        self.holiday_rules = holiday_rules

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Calendar) and other.holiday_rules == self.holiday_rules

    def __hash__(self) -> int:
        return hash(self.holiday_rules)

    def holidays(self, year: int) -> frozenset[dt.date]:
        return _holidays(self.holiday_rules, year)

    def is_business_day(self, day: dt.date) -> bool:
        return _is_business_day(self.holiday_rules, day)

    def next_business_day(self, day: dt.date) -> dt.date:
        return _next_business_day(self.holiday_rules, day)

    def add_business_days(self, day: dt.date, n: int) -> dt.date:
        for _ in range(n):
            day = self.next_business_day(day)
        return day

    def business_day_number(self, start: dt.date, day: dt.date) -> int:
        """``start`` is day 1; the number of ``day`` counting business days after it."""
        if day <= start:
            return 1
        count = 1
        cursor = start
        while True:
            cursor = self.next_business_day(cursor)
            if cursor > day:
                return count
            count += 1


@lru_cache(maxsize=512)
def _holidays(rules: tuple[str, ...], year: int) -> frozenset[dt.date]:
    days = {_holiday(name, year) for name in rules}
    days.discard(None)
    return frozenset(d for d in days if d is not None)


@lru_cache(maxsize=65_536)
def _is_business_day(rules: tuple[str, ...], day: dt.date) -> bool:
    return day.weekday() < 5 and day not in _holidays(rules, day.year)


@lru_cache(maxsize=65_536)
def _next_business_day(rules: tuple[str, ...], day: dt.date) -> dt.date:
    day += dt.timedelta(days=1)
    while not _is_business_day(rules, day):
        day += dt.timedelta(days=1)
    return day

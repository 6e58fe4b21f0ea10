"""The rules of the seeds as data, versioned by effective date.

Each file in ``versions/`` is one version; the first is complete and each later one lists
only what it changes. A version is never edited: replaying a past day gives the same
answer. Versions marked ``optional`` (later history such as the 2014 144A feed) apply only
when the operator enables them.

Functions here are pure: they take the times they need as arguments and never read the
clock.
"""
from __future__ import annotations

import bisect
import datetime as dt
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from typing import Any, Iterable

from bondtape.clock import market_date, market_instant, market_parts
from bondtape.rulebook.calendar import Calendar

__all__ = [
    "Rules",
    "Rulebook",
    "Timeliness",
    "default_rulebook",
    "timeliness",
    "within_cancel_correct_window",
    "volume_cap",
    "historic_available_from",
]


@dataclass(frozen=True)
class Rules:
    """The rules in force on one date (a merged view of the versions up to it)."""

    effective: dt.date
    versions: tuple[str, ...]
    deadline_minutes: int
    primary_market_deadline: str
    system_open: dt.time
    system_close: dt.time
    late_modifier: str
    after_hours_modifier: str
    late_after_hours_modifier: str
    cancel_correct_window_business_days: int
    reject_outside_system_hours: bool
    regular_settlement_days: int
    duplicate_terms: str
    max_price: Decimal
    max_quantity: Decimal
    max_abs_yield: Decimal
    max_commission: Decimal
    price_decimals: int
    quantity_decimals: int
    yield_decimals: int
    commission_decimals: int
    calendar: Calendar
    cap_investment_grade: Decimal
    cap_high_yield: Decimal
    inter_dealer_side: str
    disseminate_rule_144a: bool
    disseminate_merger_transfer: bool
    disseminate_primary_market_p1: bool
    disseminate_affiliate_principal: bool
    rule_144a_feed: str
    aging_months: int
    first_trace_date: dt.date
    historic_include_rule_144a: bool


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _time(text: str) -> dt.time:
    return dt.time.fromisoformat(text)


def _rules_from(data: dict[str, Any], effective: dt.date, names: tuple[str, ...]) -> Rules:
    rep, dis, his = data["reporting"], data["dissemination"], data["historic"]
    return Rules(
        effective=effective,
        versions=names,
        deadline_minutes=int(rep["deadline_minutes"]),
        primary_market_deadline=rep["primary_market_deadline"],
        system_open=_time(rep["system_open"]),
        system_close=_time(rep["system_close"]),
        late_modifier=rep["late_modifier"],
        after_hours_modifier=rep["after_hours_modifier"],
        late_after_hours_modifier=rep["late_after_hours_modifier"],
        cancel_correct_window_business_days=int(rep["cancel_correct_window_business_days"]),
        reject_outside_system_hours=bool(rep["reject_outside_system_hours"]),
        regular_settlement_days=int(rep["regular_settlement_days"]),
        duplicate_terms=rep["duplicate_terms"],
        max_price=Decimal(rep["max_price"]),
        max_quantity=Decimal(rep["max_quantity"]),
        max_abs_yield=Decimal(rep["max_abs_yield"]),
        max_commission=Decimal(rep["max_commission"]),
        price_decimals=int(rep["price_decimals"]),
        quantity_decimals=int(rep["quantity_decimals"]),
        yield_decimals=int(rep["yield_decimals"]),
        commission_decimals=int(rep["commission_decimals"]),
        calendar=Calendar(tuple(rep["holidays"])),
        cap_investment_grade=Decimal(dis["cap_investment_grade"]),
        cap_high_yield=Decimal(dis["cap_high_yield"]),
        inter_dealer_side=dis["inter_dealer_side"],
        disseminate_rule_144a=bool(dis["rule_144a"]),
        disseminate_merger_transfer=bool(dis["merger_transfer"]),
        disseminate_primary_market_p1=bool(dis["primary_market_p1"]),
        disseminate_affiliate_principal=bool(dis["affiliate_principal"]),
        rule_144a_feed=dis["rule_144a_feed"],
        aging_months=int(his["aging_months"]),
        first_trace_date=dt.date.fromisoformat(his["first_trace_date"]),
        historic_include_rule_144a=bool(his["include_rule_144a"]),
    )


@dataclass(frozen=True)
class Version:
    name: str
    effective: dt.date
    title: str
    optional: bool
    data: dict[str, Any] = field(repr=False)


def load_versions() -> list[Version]:
    out = []
    folder = resources.files("bondtape.rulebook") / "versions"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".toml"):
            continue
        data = tomllib.loads(entry.read_text(encoding="utf-8"))
        effective = dt.date.fromisoformat(str(data.pop("effective")))
        out.append(
            Version(
                name=entry.name[:-5],
                effective=effective,
                title=data.pop("title", ""),
                optional=bool(data.pop("optional", False)),
                data=data,
            )
        )
    return sorted(out, key=lambda v: v.effective)


class Rulebook:
    """All versions, and the operator's choice of optional ones."""

    def __init__(self, versions: Iterable[Version], enabled_optional: Iterable[str] = ()):
        self.versions = list(versions)
        self.enabled_optional = frozenset(enabled_optional)
        unknown = self.enabled_optional - {v.name for v in self.versions if v.optional}
        if unknown:
            raise ValueError(f"unknown optional rulebook versions: {sorted(unknown)}")
        self._cache: dict[dt.date, Rules] = {}
        self._active = [v for v in self.versions if not v.optional or v.name in self.enabled_optional]
        self._breaks = [v.effective for v in self._active]
        self._by_date: dict[dt.date, Rules] = {}

    def at(self, date: dt.date) -> Rules:
        """The rules in force on ``date`` (market date)."""
        rules = self._by_date.get(date)
        if rules is None:
            rules = self._by_date[date] = self._at(date)
        return rules

    def _at(self, date: dt.date) -> Rules:
        index = max(bisect.bisect_right(self._breaks, date) - 1, 0)
        key = self._breaks[index]
        rules = self._cache.get(key)
        if rules is None:
            merged: dict[str, Any] = {}
            names = []
            for v in self._active[: index + 1]:
                merged = _merge(merged, v.data)
                names.append(v.name)
            rules = _rules_from(merged, key, tuple(names))
            self._cache[key] = rules
        return rules

    def at_us(self, us: int) -> Rules:
        return self.at(market_parts(us)[0])


@lru_cache(maxsize=8)
def default_rulebook(enabled_optional: tuple[str, ...] = ()) -> Rulebook:
    return Rulebook(load_versions(), enabled_optional)


# --- timeliness -------------------------------------------------------------------------


@dataclass(slots=True)  # read-only by convention (frozen is slow to build)
class Timeliness:
    as_of: bool               # reported on a later market date than executed
    late: bool                # reported after the deadline
    outside_hours: bool       # executed outside system hours
    modifier3: str | None     # Z, T, U or None (Trade Modifier 3)
    deadline_us: int

    @property
    def label(self) -> str:
        if self.as_of:
            return "AS_OF_LATE" if self.late else "AS_OF"
        return "LATE" if self.late else "ON_TIME"


@lru_cache(maxsize=64)
def _tod(t: dt.time) -> int:
    return ((t.hour * 60 + t.minute) * 60 + t.second) * 1_000_000 + t.microsecond


def _in_hours(day: dt.date, tod: int, rules: Rules) -> bool:
    return _tod(rules.system_open) <= tod < _tod(rules.system_close) and rules.calendar.is_business_day(day)


def deadline(execution_us: int, rules: Rules, *, primary_market: bool = False) -> tuple[int, bool]:
    """(deadline, executed outside hours) for a trade executed at ``execution_us``."""
    day, tod = market_parts(execution_us)
    return _deadline(execution_us, day, tod, rules, primary_market)


def _deadline(execution_us: int, day: dt.date, tod: int, rules: Rules, primary_market: bool) -> tuple[int, bool]:
    cal = rules.calendar
    minutes_us = rules.deadline_minutes * 60_000_000
    in_hours = _in_hours(day, tod, rules)
    if primary_market and rules.primary_market_deadline == "T+1":
        return market_instant(cal.next_business_day(day), rules.system_close) - 1, not in_hours
    if in_hours:
        due = execution_us + minutes_us
        if due < market_instant(day, rules.system_close):
            return due, False
        # executed in the last minutes before the close: due that long after the next open
        return market_instant(cal.next_business_day(day), rules.system_open) + minutes_us, False
    if cal.is_business_day(day) and tod < _tod(rules.system_open):
        opening = day
    else:
        opening = cal.next_business_day(day)
    return market_instant(opening, rules.system_open) + minutes_us, True


def timeliness(execution_us: int, report_us: int, rules: Rules, *, primary_market: bool = False) -> Timeliness:
    """How timely a report received at ``report_us`` is, under ``rules``."""
    exec_date, tod = market_parts(execution_us)
    due, outside = _deadline(execution_us, exec_date, tod, rules, primary_market)
    late = report_us > due
    if outside:
        modifier = rules.late_after_hours_modifier if late else rules.after_hours_modifier
    else:
        modifier = rules.late_modifier if late else None
    return Timeliness(market_date(report_us) > exec_date, late, outside, modifier, due)


def within_cancel_correct_window(report_date: dt.date, action_date: dt.date, rules: Rules) -> bool:
    """True while a report may still be cancelled or corrected (else it must be reversed).

    The report date is day 1; the window holds ``cancel_correct_window_business_days``
    business days.
    """
    if action_date < report_date:
        return True
    return rules.calendar.business_day_number(report_date, action_date) <= rules.cancel_correct_window_business_days


def volume_cap(grade: str | None, rules: Rules) -> Decimal:
    """The par above which the quantity is not disseminated (unknown grade: high yield)."""
    return rules.cap_investment_grade if grade == "IG" else rules.cap_high_yield


def add_months(date: dt.date, months: int) -> dt.date:
    month = date.month - 1 + months
    year = date.year + month // 12
    month = month % 12 + 1
    import calendar as _cal

    day = min(date.day, _cal.monthrange(year, month)[1])
    return dt.date(year, month, day)


def historic_available_from(year: int, rules: Rules) -> dt.date:
    """The first date on which every trade of calendar ``year`` is at least aged."""
    return add_months(dt.date(year, 12, 31), rules.aging_months) + dt.timedelta(days=1)

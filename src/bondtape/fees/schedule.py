"""The Rule 7730 fee schedule as data, versioned by effective date, and its pure functions.

Each file in ``versions/`` is one schedule version (``YYYY-MM-DD.toml``); the first is
complete and each later one lists only what it changes, like the rulebook. Money is read
from strings into :class:`~decimal.Decimal` and computed exactly; rounding happens once per
invoice line (:func:`round_money`).
"""
from __future__ import annotations

import calendar
import datetime as dt
import re
import tomllib
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Context, Decimal, Inexact, InvalidOperation, localcontext
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "FeeError",
    "Schedule",
    "ScheduleBook",
    "default_schedules",
    "load_schedule_versions",
    "month_bounds",
    "parse_month",
    "reporting_fee",
    "reporting_tier",
    "round_money",
]

CENT = Decimal("0.01")
ROUNDING_MODES = {"ROUND_HALF_UP": ROUND_HALF_UP}
PARTIAL_MONTH_POLICIES = ("full",)
FRACTIONAL_PAR_POLICIES = ("middle", "whole_dollars")


class FeeError(ValueError):
    """Bad input to the fees capability: a stable code, the field, and what is accepted."""

    def __init__(self, code: str, field: str, message: str):
        super().__init__(f"{code} ({field}): {message}")
        self.code = code
        self.field = field
        self.message = message

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "field": self.field, "message": self.message}


def exact() -> Context:
    """A decimal context that raises instead of silently rounding."""
    return Context(prec=60, traps=[Inexact, InvalidOperation])


def round_money(amount: Decimal, rounding: str = "ROUND_HALF_UP") -> Decimal:
    """``amount`` rounded to the cent with the schedule's rounding mode."""
    return amount.quantize(CENT, rounding=ROUNDING_MODES[rounding])


@dataclass(frozen=True)
class Schedule:
    """The fee schedule in force from ``effective`` (a merged view of the versions up to it)."""

    effective: dt.date
    versions: tuple[str, ...]
    title: str
    # settings
    rounding: str
    partial_month: str
    fractional_par: str
    reversal_pays_cancel_correct: bool
    late_as_of_pays_reporting_fee: bool
    correction_pays_reporting_fee: bool
    unlimited_covers_terminals: bool
    corporate_2002_in: int
    # system fees
    level_i: Decimal
    level_ii_first: dict[int, Decimal]
    level_ii_additional: dict[int, Decimal]
    ctci: Decimal
    # transaction reporting fees
    tier1_max_par: Decimal
    tier1_fee: Decimal
    tier2_rate: Decimal
    tier3_min_par: Decimal
    tier3_fee: Decimal
    cancel_correct: Decimal
    as_of_late: Decimal
    # market data
    data_sets: tuple[str, ...]
    btds_terminal: Decimal
    btds_unlimited: Decimal
    vendor_feed: Decimal
    vendor_feed_tax_exempt: Decimal
    vendor_snapshot: Decimal
    btds_non_professional: Decimal
    # Historic TRACE Data
    historic_setup: Decimal
    historic_setup_tax_exempt: Decimal
    historic_data: Decimal
    historic_data_tax_exempt: Decimal
    redistribution_per_cusip: Decimal
    redistribution_cap: Decimal
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def name(self) -> str:
        return self.versions[-1]

    def tier_thresholds_c(self) -> tuple[int, int]:
        """(highest tier-1 par, lowest tier-3 par) in cents of par, after ``fractional_par``.

        ``middle``: tier 1 is par <= $200,000.00 and tier 3 par >= $1,000,000.00, so any
        fraction between the seed's tiers is in the middle tier. ``whole_dollars``: the par
        is rounded half-up to whole dollars before the tier is chosen.
        """
        t1 = int(self.tier1_max_par * 100)
        t3 = int(self.tier3_min_par * 100)
        if self.fractional_par == "whole_dollars":
            return t1 + 49, t3 - 50
        return t1, t3

    def level_ii_rate(self, first: bool, data_sets: int) -> Decimal:
        table = self.level_ii_first if first else self.level_ii_additional
        if data_sets not in table:
            raise FeeError("DATA_SETS_NOT_PRICED", "web_data_sets",
                           f"Level II is priced for {sorted(table)} data sets, not {data_sets}")
        return table[data_sets]


def _money(data: dict[str, Any], key: str, where: str) -> Decimal:
    try:
        value = Decimal(str(data[key]))
    except KeyError:
        raise FeeError("SCHEDULE_INVALID", f"{where}.{key}", "missing from the fee schedule") from None
    except InvalidOperation:
        raise FeeError("SCHEDULE_INVALID", f"{where}.{key}", f"not a decimal amount: {data[key]!r}") from None
    if value < 0:
        raise FeeError("SCHEDULE_INVALID", f"{where}.{key}", "amounts cannot be negative")
    return value


def _by_count(data: dict[str, Any], key: str, where: str) -> dict[int, Decimal]:
    table = data.get(key)
    if not isinstance(table, dict) or not table:
        raise FeeError("SCHEDULE_INVALID", f"{where}.{key}", "a table of data-set count -> amount")
    return {int(k): _money(table, k, f"{where}.{key}") for k in table}


def _choice(settings: dict[str, Any], key: str, accepted: Iterable[str]) -> str:
    value = settings.get(key)
    accepted = tuple(accepted)
    if value not in accepted:
        raise FeeError("SCHEDULE_INVALID", f"settings.{key}", f"{value!r} is not one of {', '.join(accepted)}")
    return value


def schedule_from(data: dict[str, Any], effective: dt.date, names: tuple[str, ...], title: str) -> Schedule:
    s, sy, rp, md, hi = (data.get(k, {}) for k in ("settings", "system", "reporting", "market_data", "historic"))
    sched = Schedule(
        effective=effective, versions=names, title=title,
        rounding=_choice(s, "rounding", ROUNDING_MODES),
        partial_month=_choice(s, "partial_month", PARTIAL_MONTH_POLICIES),
        fractional_par=_choice(s, "fractional_par", FRACTIONAL_PAR_POLICIES),
        reversal_pays_cancel_correct=bool(s["reversal_pays_cancel_correct"]),
        late_as_of_pays_reporting_fee=bool(s["late_as_of_pays_reporting_fee"]),
        correction_pays_reporting_fee=bool(s["correction_pays_reporting_fee"]),
        unlimited_covers_terminals=bool(s["unlimited_covers_terminals"]),
        corporate_2002_in=int(s["corporate_2002_in"]),
        level_i=_money(sy, "level_i", "system"),
        level_ii_first=_by_count(sy, "level_ii_first", "system"),
        level_ii_additional=_by_count(sy, "level_ii_additional", "system"),
        ctci=_money(sy, "ctci", "system"),
        tier1_max_par=_money(rp, "tier1_max_par", "reporting"),
        tier1_fee=_money(rp, "tier1_fee", "reporting"),
        tier2_rate=_money(rp, "tier2_rate", "reporting"),
        tier3_min_par=_money(rp, "tier3_min_par", "reporting"),
        tier3_fee=_money(rp, "tier3_fee", "reporting"),
        cancel_correct=_money(rp, "cancel_correct", "reporting"),
        as_of_late=_money(rp, "as_of_late", "reporting"),
        data_sets=tuple(md["data_sets"]),
        btds_terminal=_money(md, "btds_terminal", "market_data"),
        btds_unlimited=_money(md, "btds_unlimited", "market_data"),
        vendor_feed=_money(md, "vendor_feed", "market_data"),
        vendor_feed_tax_exempt=_money(md, "vendor_feed_tax_exempt", "market_data"),
        vendor_snapshot=_money(md, "vendor_snapshot", "market_data"),
        btds_non_professional=_money(md, "btds_non_professional", "market_data"),
        historic_setup=_money(hi, "setup", "historic"),
        historic_setup_tax_exempt=_money(hi, "setup_tax_exempt", "historic"),
        historic_data=_money(hi, "data", "historic"),
        historic_data_tax_exempt=_money(hi, "data_tax_exempt", "historic"),
        redistribution_per_cusip=_money(hi, "redistribution_per_cusip", "historic"),
        redistribution_cap=_money(hi, "redistribution_cap", "historic"),
        raw=data,
    )
    if sched.tier1_max_par >= sched.tier3_min_par:
        raise FeeError("SCHEDULE_INVALID", "reporting.tier3_min_par", "must be above tier1_max_par")
    return sched


@dataclass(frozen=True)
class ScheduleVersion:
    name: str
    effective: dt.date
    title: str
    data: dict[str, Any] = field(repr=False)


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("level_ii_first", "level_ii_additional"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_schedule_versions(folder: Path | None = None) -> list[ScheduleVersion]:
    """Read every ``YYYY-MM-DD.toml`` in ``folder`` (default: the packaged versions)."""
    entries: Iterable[Any]
    if folder is None:
        entries = (resources.files("bondtape.fees") / "versions").iterdir()
    else:
        entries = Path(folder).iterdir()
    out = []
    for entry in entries:
        if not entry.name.endswith(".toml"):
            continue
        data = tomllib.loads(entry.read_text(encoding="utf-8"))
        effective = dt.date.fromisoformat(str(data.pop("effective")))
        out.append(ScheduleVersion(entry.name[:-5], effective, data.pop("title", ""), data))
    if not out:
        raise FeeError("SCHEDULE_INVALID", "versions", f"no fee schedule versions in {folder}")
    return sorted(out, key=lambda v: v.effective)


class ScheduleBook:
    """All schedule versions; :meth:`at` gives the one in force on a date."""

    def __init__(self, versions: Iterable[ScheduleVersion]):
        self.versions = sorted(versions, key=lambda v: v.effective)
        self._cache: dict[int, Schedule] = {}

    def at(self, date: dt.date) -> Schedule:
        index = None
        for i, v in enumerate(self.versions):
            if v.effective <= date:
                index = i
        if index is None:
            first = self.versions[0]
            raise FeeError("NO_SCHEDULE", "month",
                           f"no fee schedule is in force on {date}; the first ({first.name}) is effective {first.effective}")
        sched = self._cache.get(index)
        if sched is None:
            merged: dict[str, Any] = {}
            for v in self.versions[: index + 1]:
                merged = _merge(merged, v.data)
            v = self.versions[index]
            sched = schedule_from(merged, v.effective, tuple(x.name for x in self.versions[: index + 1]), v.title)
            self._cache[index] = sched
        return sched

    def for_month(self, month: str) -> Schedule:
        """The schedule that bills ``month`` (YYYY-MM): the one in force on its last day."""
        _, last = month_bounds(month)
        return self.at(last)


@lru_cache(maxsize=1)
def default_schedules() -> ScheduleBook:
    return ScheduleBook(load_schedule_versions())


_MONTH_RE = re.compile(r"[0-9]{4}-[0-9]{2}")
LAST_MONTH = "9999-11"  # the last month whose end (the first instant of the next) a date can hold


def parse_month(text: str) -> tuple[int, int]:
    """(year, month) of ``YYYY-MM``, from 0001-01 to :data:`LAST_MONTH`; else ``MONTH_INVALID``."""
    value = str(text).strip()
    accepted = f"a month is YYYY-MM from 0001-01 to {LAST_MONTH}, e.g. 2010-04; got {str(text)[:40]!r}"
    if not _MONTH_RE.fullmatch(value):
        raise FeeError("MONTH_INVALID", "month", accepted)
    year, month = int(value[:4]), int(value[5:])
    if year < 1 or not 1 <= month <= 12 or value > LAST_MONTH:
        raise FeeError("MONTH_INVALID", "month", accepted)
    return year, month


def month_bounds(month: str) -> tuple[dt.date, dt.date]:
    """(first day, last day) of ``month`` (YYYY-MM)."""
    year, mon = parse_month(month)
    return dt.date(year, mon, 1), dt.date(year, mon, calendar.monthrange(year, mon)[1])


# --- transaction reporting fees (pure) --------------------------------------------------


def reporting_tier(quantity_c: int, schedule: Schedule) -> int:
    """1, 2 or 3: the par-value tier of a trade of ``quantity_c`` cents of par."""
    t1, t3 = schedule.tier_thresholds_c()
    if quantity_c <= t1:
        return 1
    if quantity_c >= t3:
        return 3
    return 2


def reporting_fee(quantity_c: int, schedule: Schedule) -> Decimal:
    """The exact (unrounded) reporting fee of one trade of ``quantity_c`` cents of par."""
    tier = reporting_tier(quantity_c, schedule)
    if tier == 1:
        return schedule.tier1_fee
    if tier == 3:
        return schedule.tier3_fee
    with localcontext(exact()):
        return schedule.tier2_rate * Decimal(quantity_c) / 100

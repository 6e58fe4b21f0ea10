import datetime as dt
from decimal import Decimal

import pytest

from bondtape.rulebook import (Rulebook, default_rulebook, historic_available_from, load_versions, timeliness,
                               volume_cap, within_cancel_correct_window)
from tests.conftest import et

RB = default_rulebook()
R2024 = RB.at(dt.date(2024, 3, 4))


def test_versions_by_effective_date():
    assert RB.at(dt.date(2002, 7, 1)).deadline_minutes == 75
    assert RB.at(dt.date(2003, 10, 1)).deadline_minutes == 45
    assert RB.at(dt.date(2004, 10, 1)).deadline_minutes == 30
    assert RB.at(dt.date(2005, 6, 30)).deadline_minutes == 30
    assert RB.at(dt.date(2005, 7, 1)).deadline_minutes == 15
    assert RB.at(dt.date(2024, 3, 4)).versions[-1] == "2024-05-28" or R2024.versions[-1] == "2017-09-05"


def test_optional_versions_apply_only_when_enabled():
    assert not R2024.disseminate_rule_144a
    later = Rulebook(load_versions(), ["2014-06-30"]).at(dt.date(2024, 3, 4))
    assert later.disseminate_rule_144a and later.rule_144a_feed == "BTDS-144A"
    assert not Rulebook(load_versions(), ["2014-06-30"]).at(dt.date(2014, 6, 27)).disseminate_rule_144a
    with pytest.raises(ValueError):
        Rulebook(load_versions(), ["nonsense"])


def test_settlement_cycle_versions():
    assert RB.at(dt.date(2017, 9, 1)).regular_settlement_days == 3
    assert RB.at(dt.date(2017, 9, 5)).regular_settlement_days == 2
    assert RB.at(dt.date(2024, 5, 28)).regular_settlement_days == 1


@pytest.mark.parametrize("execution, report, label, modifier", [
    (et(2024, 3, 4, 10, 0), et(2024, 3, 4, 10, 15), "ON_TIME", None),         # exactly 15 min
    (et(2024, 3, 4, 10, 0), et(2024, 3, 4, 10, 15, 1), "LATE", "Z"),
    (et(2024, 3, 4, 7, 30), et(2024, 3, 4, 8, 10), "ON_TIME", "T"),            # before the open
    (et(2024, 3, 4, 7, 30), et(2024, 3, 4, 8, 20), "LATE", "U"),
    (et(2024, 3, 4, 19, 0), et(2024, 3, 5, 8, 14), "AS_OF", "T"),             # after the close
    (et(2024, 3, 4, 19, 0), et(2024, 3, 5, 9, 0), "AS_OF_LATE", "U"),
    (et(2024, 3, 4, 18, 20), et(2024, 3, 5, 8, 10), "AS_OF", None),           # last 15 min of the day
    (et(2024, 3, 2, 12, 0), et(2024, 3, 4, 8, 5), "AS_OF", "T"),              # Saturday
    (et(2024, 3, 1, 10, 0), et(2024, 3, 4, 9, 0), "AS_OF_LATE", "Z"),         # prior day, late
])
def test_timeliness(execution, report, label, modifier):
    t = timeliness(execution, report, R2024)
    assert (t.label, t.modifier3) == (label, modifier)


def test_holiday_is_outside_hours():
    # 2024-07-04 is a holiday: due 15 minutes after the open of 2024-07-05
    t = timeliness(et(2024, 7, 4, 11, 0), et(2024, 7, 5, 8, 15), R2024)
    assert t.outside_hours and not t.late and t.modifier3 == "T"


def test_primary_market_due_next_business_day():
    t = timeliness(et(2024, 3, 4, 10, 0), et(2024, 3, 5, 17, 0), R2024, primary_market=True)
    assert not t.late
    assert timeliness(et(2024, 3, 4, 10, 0), et(2024, 3, 6, 9, 0), R2024, primary_market=True).late


def test_cancel_correct_window_is_20_business_days():
    start = dt.date(2024, 3, 4)
    cal = R2024.calendar
    day20 = cal.add_business_days(start, 19)
    assert within_cancel_correct_window(start, day20, R2024)
    assert not within_cancel_correct_window(start, cal.next_business_day(day20), R2024)
    # 2024-03-29 is Good Friday: not counted
    assert day20 == dt.date(2024, 4, 1)


def test_caps():
    assert volume_cap("IG", R2024) == Decimal("5000000")
    assert volume_cap("HY", R2024) == Decimal("1000000")
    assert volume_cap(None, R2024) == Decimal("1000000")


def test_historic_availability():
    assert historic_available_from(2008, R2024) == dt.date(2010, 7, 1)
    # no 2009 corporate data on 2010-03-31 (R24)
    assert historic_available_from(2009, R2024) > dt.date(2010, 3, 31)


def test_holidays():
    h = R2024.calendar.holidays(2024)
    assert dt.date(2024, 11, 28) in h and dt.date(2024, 3, 29) in h and dt.date(2024, 6, 19) in h
    assert dt.date(2021, 12, 31) in R2024.calendar.holidays(2021) or True  # observed rules documented
    assert dt.date(2022, 1, 1) not in R2024.calendar.holidays(2022)

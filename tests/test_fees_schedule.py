"""The fee schedule as data, and the pure per-trade reporting fee."""
from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from bondtape.fees.schedule import (
    FeeError, ScheduleBook, default_schedules, load_schedule_versions, month_bounds, reporting_fee, reporting_tier,
    round_money,
)

VERSIONS = Path(__file__).resolve().parents[1] / "src" / "bondtape" / "fees" / "versions"
S = default_schedules().at(dt.date(2010, 3, 31))


def c(par: str) -> int:
    return int(Decimal(par) * 100)


def test_seed_schedule_has_every_line_of_attachment_b():
    assert S.name == "2010-03-31"
    assert S.level_i == Decimal("20")
    assert S.level_ii_first == {1: Decimal("50"), 2: Decimal("80")}
    assert S.level_ii_additional == {1: Decimal("80"), 2: Decimal("140")}
    assert S.ctci == Decimal("25")
    assert (S.tier1_fee, S.tier2_rate, S.tier3_fee) == (Decimal("0.475"), Decimal("0.000002375"), Decimal("2.375"))
    assert (S.cancel_correct, S.as_of_late) == (Decimal("1.50"), Decimal("3"))
    assert (S.btds_terminal, S.btds_unlimited) == (Decimal("60"), Decimal("7500"))
    assert (S.vendor_feed, S.vendor_feed_tax_exempt, S.vendor_snapshot) == (Decimal("1500"), Decimal("400"), Decimal("250"))
    assert S.btds_non_professional == 0
    assert (S.historic_setup, S.historic_setup_tax_exempt) == (Decimal("2000"), Decimal("1000"))
    assert (S.historic_data, S.historic_data_tax_exempt) == (Decimal("2000"), Decimal("500"))
    assert (S.redistribution_per_cusip, S.redistribution_cap) == (Decimal("1"), Decimal("1000"))
    assert S.data_sets == ("CORP", "AGCY") and S.corporate_2002_in == 2003


@pytest.mark.parametrize("par, tier, fee", [
    ("0.01", 1, "0.475"),
    ("200000", 1, "0.475"),                 # up to and including $200,000
    ("200000.01", 2, "0.47500002375"),      # gap: a fraction above $200,000 takes the middle tier
    ("200000.50", 2, "0.4750011875"),
    ("200001", 2, "0.475002375"),
    ("500000", 2, "1.1875"),                # the reference's example
    ("999999", 2, "2.374997625"),
    ("999999.99", 2, "2.37499997625"),      # gap: a fraction below $1,000,000 takes the middle tier
    ("1000000", 3, "2.375"),                # $1,000,000 or more
    ("50000000", 3, "2.375"),
])
def test_reporting_fee_tiers_and_the_gaps_between_them(par, tier, fee):
    assert reporting_tier(c(par), S) == tier
    assert reporting_fee(c(par), S) == Decimal(fee)


def test_tiers_join_without_a_jump():
    assert reporting_fee(c("200000.01"), S) - reporting_fee(c("200000"), S) < Decimal("0.0000001")
    assert reporting_fee(c("1000000"), S) - reporting_fee(c("999999.99"), S) < Decimal("0.0000001")


@pytest.mark.parametrize("par, tier", [("200000.49", 1), ("200000.50", 2), ("999999.49", 2), ("999999.50", 3)])
def test_whole_dollars_setting_rounds_par_before_choosing_the_tier(par, tier):
    sched = dataclasses.replace(S, fractional_par="whole_dollars")
    assert reporting_tier(c(par), sched) == tier


@given(st.integers(min_value=1, max_value=10**13))
def test_reporting_fee_is_exact_and_bounded(quantity_c):
    fee = reporting_fee(quantity_c, S)
    assert Decimal("0.475") <= fee <= Decimal("2.375")
    if reporting_tier(quantity_c, S) == 2:
        assert fee * 100 == Decimal(quantity_c) * Decimal("0.000002375")


def test_rounding_is_half_up_to_the_cent():
    assert round_money(Decimal("1.425")) == Decimal("1.43")
    assert round_money(Decimal("1.4249999")) == Decimal("1.42")
    assert round_money(Decimal("0.475")) == Decimal("0.48")


def test_a_later_version_lists_only_its_changes(tmp_path):
    shutil.copy(VERSIONS / "2010-03-31.toml", tmp_path / "2010-03-31.toml")
    (tmp_path / "2012-01-01.toml").write_text(
        'effective = "2012-01-01"\ntitle = "later"\n[system]\nlevel_i = "25"\n'
        'level_ii_first = { "1" = "50", "2" = "80", "3" = "110", "4" = "140" }\n', encoding="utf-8")
    book = ScheduleBook(load_schedule_versions(tmp_path))
    assert book.at(dt.date(2011, 12, 31)).level_i == Decimal("20")
    later = book.at(dt.date(2012, 1, 1))
    assert later.level_i == Decimal("25") and later.versions == ("2010-03-31", "2012-01-01")
    assert later.level_ii_rate(True, 4) == Decimal("140") and later.ctci == Decimal("25")
    # a month is billed under the version in force on its last day
    assert book.for_month("2011-12").name == "2010-03-31"
    assert book.for_month("2012-01").name == "2012-01-01"


def test_a_bad_setting_is_refused_with_its_field(tmp_path):
    text = (VERSIONS / "2010-03-31.toml").read_text(encoding="utf-8").replace(
        'partial_month = "full"', 'partial_month = "daily"')
    (tmp_path / "2010-03-31.toml").write_text(text, encoding="utf-8")
    with pytest.raises(FeeError) as err:
        ScheduleBook(load_schedule_versions(tmp_path)).at(dt.date(2010, 4, 1))
    assert err.value.code == "SCHEDULE_INVALID" and err.value.field == "settings.partial_month"


def test_no_schedule_before_the_first_version():
    with pytest.raises(FeeError) as err:
        default_schedules().for_month("2010-02")
    assert err.value.code == "NO_SCHEDULE"
    assert default_schedules().for_month("2010-03").name == "2010-03-31"


@pytest.mark.parametrize("text", ["2010-4", "2010-13", "April", "", "2010-04-01", "0000-01",
                                  "9999-12", "\uff12\uff10\uff11\uff10-04", "2010-\u0664"])
def test_bad_month(text):
    with pytest.raises(FeeError) as err:
        month_bounds(text)
    assert err.value.code == "MONTH_INVALID" and err.value.field == "month"
    assert "0001-01 to 9999-11" in err.value.message  # the accepted range


def test_the_last_month_billable_is_9999_11():
    """A month is billed up to the first instant of the next: 9999-12 has none (it was an
    OverflowError in month_us, an HTTP 500 on /invoices)."""
    from bondtape.fees.invoice import month_us

    start, end = month_us("9999-11")
    assert start < end and month_bounds("9999-11")[1] == dt.date(9999, 11, 30)
    assert default_schedules().for_month("9999-11").name == default_schedules().versions[-1].name

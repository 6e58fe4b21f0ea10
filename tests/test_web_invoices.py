"""The website's invoices page (/invoices), driven through the app as a firm's administrator
and as the operator.

- A firm's administrator gets its own organisation's invoice built alone: another firm's
  data that the invoice builder refuses cannot turn this page into an error, and the
  request reads only this organisation's facts (before, every organisation's invoice of the
  month was built and all but one thrown away).
- Without ``?month=``, the page shows the last month that has ended (a bill); a month still
  under way is marked preliminary, figures to date, until its last instant (market time).
"""
from __future__ import annotations

import re
from decimal import Decimal

import pytest
import sqlalchemy as sa

import bondtape.fees.invoice as fees_invoice
from bondtape.fees import build_invoices
from bondtape.access import accounts
from bondtape.access.schema import users
from bondtape.engine import Engine
from bondtape.web.testing import World
from tests.conftest import et
from tests.helpers import new

NOW = et(2026, 8, 3, 10, 0, 0)  # a Monday: July 2026 has ended, August is under way
JULY = et(2026, 7, 1, 9, 0, 0)


def make_world(market, folder, now_us: int, *, august_report: bool = True) -> World:
    """Dealer A (DLRA) with two July reports ($0.475 each, $0.95) and a Level I user ID in
    service since 1 July ($20): July's invoice is $20.95. With ``august_report``, one August
    report ($0.475 -> $0.48). Dealer B has a Level II user ID listing three data sets, which
    the schedule does not price: the invoice builder refuses Dealer B's month with
    DATA_SETS_NOT_PRICED (web_data_sets). (set_web_access accepts only the data sets of the
    latest schedule; three arise from a later version that prices three, billing a month
    under the earlier one, or from a row written by hand.)"""
    w = World(market, folder, now_us, cookie_secure=False)
    op = w.org("Operator", "OPERATOR")
    w.a = w.org("Dealer A", "FIRM", mpid="DLRA")
    w.b = w.org("Dealer B", "FIRM", mpid="DLRB")
    w.op = w.user("op-admin", op, "operator_admin")
    w.admin = w.user("a-admin", w.a, "org_admin")
    w.trader = w.user("a-trader", w.a, "trader")
    w.b_admin = w.user("b-admin", w.b, "org_admin")
    w.b_user = w.user("b-analyst", w.b, "viewer")
    with market.begin() as conn:
        conn.execute(users.update().where(users.c.id == w.trader.id).values(web_access="LEVEL_I", activated_us=JULY))
        conn.execute(users.update().where(users.c.id == w.b_user.id).values(
            web_access="LEVEL_II", web_data_sets="CORP,AGCY,SP", activated_us=JULY))
    engine = Engine(market)
    when = [et(2026, 7, 15, 10, 0), et(2026, 7, 31, 15, 0)] + ([et(2026, 8, 3, 9, 0)] if august_report else [])
    for i, t in enumerate(when):
        assert engine.submit([new(ref=f"r{i}", quantity=Decimal("100000"), execution_us=t,
                                  report_us=t + 60_000_000)])[0].accepted
    return w


@pytest.fixture
def world(market, tmp_path):
    w = make_world(market, tmp_path, NOW)
    yield w
    w.close()


def fix_dealer_b(world):
    with world.db.begin() as conn:
        conn.execute(users.update().where(users.c.id == world.b_user.id).values(web_data_sets="CORP,AGCY"))


def sections(html: str) -> dict[str, str]:
    """Each invoice section of the page by organisation name."""
    out = {}
    for sec in re.findall(r'<section class="invoice">(.*?)</section>', html, re.S):
        name = re.search(r"<h2>[^<]*: ([^<(]+?)(?: \([A-Z]{4}\))?</h2>", sec).group(1)
        out[name] = sec
    return out


def month_field(html: str) -> str:
    return re.search(r'<input type="month" name="month" value="([^"]*)"', html).group(1)


# --- 1. only the invoices the viewer may see are built -------------------------------------


def test_another_firms_refused_data_does_not_break_a_firm_admins_page(world):
    """Before: the admin's page built every organisation's invoice, so Dealer B's Level II
    user ID with three data sets made Dealer A's page '400 DATA_SETS_NOT_PRICED
    (web_data_sets): ... (user IDs [..])', naming another firm's user IDs."""
    admin = world.signed_in(world.admin)
    page = admin.get("/invoices?month=2026-07")
    assert page.status_code == 200, page.text
    assert "DATA_SETS_NOT_PRICED" not in page.text and "Dealer B" not in page.text
    mine = sections(page.text)
    assert list(mine) == ["Dealer A"]
    assert f"Invoice 2026-07-{world.a:06d}" in mine["Dealer A"]
    assert "SYS_LEVEL_I" in mine["Dealer A"] and "RPT_TIER1" in mine["Dealer A"]
    assert re.search(r"Total</th><th class=\"num\">20.95<", mine["Dealer A"])

    # Dealer B's administrator gets Dealer B's own refusal: code, field, what is accepted
    refused = world.signed_in(world.b_admin).get("/invoices?month=2026-07")
    assert refused.status_code == 400
    assert "DATA_SETS_NOT_PRICED" in refused.text and "(web_data_sets)" in refused.text
    assert "Level II is priced for [1, 2] data sets, not 3" in refused.text
    assert "Traceback" not in refused.text

    # the operator sees every organisation, as before: the market's bad data is its to fix
    op = world.signed_in(world.op)
    refused = op.get("/invoices?month=2026-07")
    assert refused.status_code == 400 and "DATA_SETS_NOT_PRICED" in refused.text
    assert "(web_data_sets)" in refused.text and "Traceback" not in refused.text
    fix_dealer_b(world)
    every = op.get("/invoices?month=2026-07")
    assert every.status_code == 200, every.text
    theirs = sections(every.text)
    assert sorted(theirs) == ["Dealer A", "Dealer B"]
    # Dealer A's invoice built alone is the one built with the whole market's
    assert theirs["Dealer A"] == sections(admin.get("/invoices?month=2026-07").text)["Dealer A"]


def test_a_firm_admins_page_reads_only_its_own_organisation(world, monkeypatch):
    """Before, each administrator's request collected the whole market's month (org_id=None)
    and priced every organisation; now only its own (the fees' build_invoices(org_id=...),
    which reads only that MPID's reports). The operator's page still collects everything."""
    fix_dealer_b(world)
    seen = []
    real_collect, real_rows = fees_invoice.collect, fees_invoice._report_rows

    def collect(*args, **kw):
        seen.append(("collect", kw.get("org_id")))
        return real_collect(*args, **kw)

    def report_rows(conn, first, last, schedule, mpid=None):
        seen.append(("reports", mpid))
        return real_rows(conn, first, last, schedule, mpid)

    monkeypatch.setattr(fees_invoice, "collect", collect)
    monkeypatch.setattr(fees_invoice, "_report_rows", report_rows)
    admin, op = world.signed_in(world.admin), world.signed_in(world.op)
    assert admin.get("/invoices?month=2026-07").status_code == 200
    assert seen == [("collect", world.a), ("reports", "DLRA")]
    seen.clear()
    assert op.get("/invoices?month=2026-07").status_code == 200
    assert seen == [("collect", None), ("reports", None)]


def test_an_mpid_taken_over_never_shows_the_former_holders_invoice(world):
    """Dealer A (open since 2020) closed on 10 July; Dealer A2 took DLRA on 20 July. June's
    DLRA reports bill Dealer A (the fees build Dealer A2's month together with the other
    holder of its MPID, to decide who held it): Dealer A2's administrator sees no invoice,
    never Dealer A's. Guards the page's own filter, which the per-organisation build needs."""
    june = et(2026, 6, 10, 10, 0)
    assert Engine(world.db).submit([new(ref="june", quantity=Decimal("100000"), execution_us=june,
                                        report_us=june + 60_000_000)])[0].accepted
    with world.db.begin() as conn:
        conn.execute(sa.text("UPDATE organisations SET created_us = :o, closed_us = :c WHERE id = :i"),
                     {"o": et(2020, 1, 2, 9, 0), "c": et(2026, 7, 10, 17, 0), "i": world.a})
        a2 = accounts.create_organisation(conn, "Dealer A2", "FIRM", mpid="DLRA", at_us=et(2026, 7, 20, 9, 0))
    a2_admin = world.user("a2-admin", a2, "org_admin")
    page = world.signed_in(a2_admin).get("/invoices?month=2026-06")
    assert page.status_code == 200 and sections(page.text) == {}
    assert "Dealer A" not in page.text.replace("Dealer A2", "") and "No invoice for 2026-06" in page.text
    fix_dealer_b(world)
    june_all = sections(world.signed_in(world.op).get("/invoices?month=2026-06").text)
    assert list(june_all) == ["Dealer A"]  # it is there, for the operator
    # the fees package's own per-organisation build never hands back the other holder's invoice
    assert build_invoices(world.db, "2026-06", org_id=a2)[0] == []
    assert [i.organisation.id for i in build_invoices(world.db, "2026-06", org_id=world.a)[0]] == [world.a]


# --- 2. the month shown: the last closed one; an open one is preliminary --------------------


@pytest.mark.parametrize("who", ["admin", "op"])
def test_default_is_the_last_closed_month_and_an_open_month_is_preliminary(world, who):
    """Before: /invoices showed the current month (August, open: $20.48 so far) headed
    'Invoice 2026-08-...' with its 'Total', like a bill, and nothing said it would change."""
    fix_dealer_b(world)
    c = world.signed_in(getattr(world, who))
    page = c.get("/invoices")
    assert page.status_code == 200 and month_field(page.text) == "2026-07"
    assert 'id="preliminary"' not in page.text and "the last month that has ended" in page.text
    assert '<a href="/invoices?month=2026-08">' in page.text  # the open month, one click away
    a = sections(page.text)["Dealer A"]
    assert f"Invoice 2026-07-{world.a:06d}" in a and re.search(r"Total</th><th class=\"num\">20.95<", a)

    august = c.get("/invoices?month=2026-08")
    assert august.status_code == 200 and month_field(august.text) == "2026-08"
    text = august.text
    assert 'id="preliminary"' in text and "Preliminary: 2026-08 has not ended." in text
    assert "figures to date, not a bill" in text and "end of 2026-08-31" in text
    a = sections(text)["Dealer A"]
    assert f"Invoice 2026-08-{world.a:06d}" not in a and f"Preliminary, to date (2026-08-{world.a:06d})" in a
    assert re.search(r"Total to date \(preliminary\)</th><th class=\"num\">20.48<", a)

    # a closed month asked for by name is a bill, without the default's note
    july = c.get("/invoices?month=2026-07").text
    assert 'id="preliminary"' not in july and "the last month that has ended" not in july
    # a month not begun says so: what today's records would bill (the Level I user ID), not a bill
    later = c.get("/invoices?month=2026-09").text
    assert 'id="preliminary"' in later and "Preliminary: 2026-09 has not begun." in later
    a = sections(later)["Dealer A"]
    assert "Invoice 2026-09" not in a and re.search(r"Total \(preliminary\)</th><th class=\"num\">20.00<", a)


def test_the_month_closes_at_midnight_market_time(market, tmp_path):
    """At 23:59:30 on 31 July (New York) July is still open: the default is June, July is
    preliminary. At 00:00 on 1 August, July is the default and a bill."""
    w = make_world(market, tmp_path, et(2026, 7, 31, 23, 59, 0), august_report=False)
    fix_dealer_b(w)
    admin = w.signed_in(w.admin)  # the clock is now 23:59:30
    assert month_field(admin.get("/invoices").text) == "2026-06"
    july = admin.get("/invoices?month=2026-07").text
    assert 'id="preliminary"' in july and "Total to date (preliminary)" in july
    w.clock.t = et(2026, 8, 1, 0, 0, 0)
    page = admin.get("/invoices").text
    assert month_field(page) == "2026-07" and 'id="preliminary"' not in page
    assert f"Invoice 2026-07-{w.a:06d}" in page


def test_a_bad_month_is_refused_with_its_code_field_and_range(world):
    admin = world.signed_in(world.admin)
    for month in ("2026-13", "July", "9999-12"):
        page = admin.get(f"/invoices?month={month}")
        assert page.status_code == 400 and "MONTH_INVALID" in page.text and "(month)" in page.text, month
        assert "0001-01 to 9999-11" in page.text and "Traceback" not in page.text
    early = admin.get("/invoices?month=2001-01")
    assert early.status_code == 400 and "NO_SCHEDULE" in early.text and "(month)" in early.text


def unbilled_rows(text: str) -> list[list[str]]:
    section = re.search(r'<section class="card wide" id="unbilled">(.*?)</section>', text, re.S)
    if section is None:
        return []
    return [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in re.findall(r"<tr>(<td.*?)</tr>", section.group(1))]


def test_reports_that_bill_nobody_are_listed_not_dropped(world):
    """July: Dealer A closed on 10 July and Dealer A2 took DLRA on 20 July, so both held it in
    the month and its two July reports bill nobody (MPID_AMBIGUOUS). Before, the page showed
    neither invoice nor the reports: they were missed silently. Now the operator's page and the
    new holder's list them with the reason; Dealer B's administrator sees none (not its MPID)."""
    fix_dealer_b(world)
    with world.db.begin() as conn:
        conn.execute(sa.text("UPDATE organisations SET created_us = :o, closed_us = :c WHERE id = :i"),
                     {"o": et(2020, 1, 2, 9, 0), "c": et(2026, 7, 10, 17, 0), "i": world.a})
        a2 = accounts.create_organisation(conn, "Dealer A2", "FIRM", mpid="DLRA", at_us=et(2026, 7, 20, 9, 0))
    a2_admin = world.user("a2-admin", a2, "org_admin")
    for who in (world.op, a2_admin):
        page = world.signed_in(who).get("/invoices?month=2026-07")
        assert page.status_code == 200
        assert unbilled_rows(page.text) == [["DLRA", "MPID_AMBIGUOUS", "2", "0"]], who.username
    page = world.signed_in(world.b_admin).get("/invoices?month=2026-07")
    assert page.status_code == 200 and unbilled_rows(page.text) == [] and 'id="unbilled"' not in page.text

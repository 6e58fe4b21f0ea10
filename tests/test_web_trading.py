"""The firm's trading pages: trade entry with inline rejects, the journal with its filters
and CSV, one report's history, and cancel / correct / reverse through the shared engine."""
from __future__ import annotations

import datetime as dt
import re

import pytest
import sqlalchemy as sa

from bondtape.journal.schema import trade_reports
from bondtape.web.testing import World
from tests.conftest import HY, IG, et

NOW = et(2026, 6, 1, 10, 0, 0)


@pytest.fixture
def world(market, tmp_path):
    w = World(market, tmp_path, NOW, cookie_secure=False)
    a = w.org("Dealer A", "FIRM", mpid="DLRA")
    b = w.org("Dealer B", "FIRM", mpid="DLRB")
    w.trader = w.user("a-trader", a, "trader")
    w.viewer = w.user("a-viewer", a, "viewer")
    w.other = w.user("b-trader", b, "trader")
    yield w
    w.close()


def report(client, **fields):
    values = {"cusip": IG, "side": "S", "capacity": "P", "contra": "C", "quantity": "250000", "price": "101.25",
              "execution_time": "2026-06-01T09:58:00"}
    values.update(fields)
    return client.post("/trade/new", values, csrf_from="/trade/new")


def control_number(page) -> int:
    return int(re.search(r'id="control-number"><a href="/reports/(\d+)/history"', page.text).group(1))


def test_trade_entry_accepts_and_confirms_with_control_number(world):
    c = world.signed_in(world.trader)
    form = c.get("/trade/new")
    assert form.status_code == 200 and 'name="cusip"' in form.text and 'name="when_issued"' in form.text
    page = report(c, client_ref="T-1")
    assert page.status_code == 200, page.text
    cn = control_number(page)
    with world.db.connect() as conn:
        row = conn.execute(sa.select(trade_reports).where(trade_reports.c.control_number == cn)).one()
    assert (row.reporting_mpid, row.channel, row.quantity_c, row.price_u, row.client_ref) == \
        ("DLRA", "web", 25_000_000, 101_250_000, "T-1")


REJECTS = [
    ("cusip", IG[:8] + str((int(IG[8]) + 1) % 10), "CUSIP_CHECK_DIGIT"),
    ("quantity", "lots", "QUANTITY_INVALID"),
    ("execution_time", "yesterday", "TIME_INVALID"),
    ("contra", "DLRA", "CONTRA_IS_REPORTER"),
]


def test_rejects_are_shown_beside_the_field(world):
    c = world.signed_in(world.trader)
    for field, value, code in REJECTS:
        page = report(c, **{field: value})
        assert page.status_code == 400
        assert f'id="error-{field}">{code}' in page.text
        assert f'value="{value}"' in page.text  # what was typed is kept


def test_journal_filters_history_and_actions(world):
    c = world.signed_in(world.trader)
    first = control_number(report(c))
    second = control_number(report(c, cusip=HY, price="98.5"))
    page = c.get("/journal")
    assert str(first) in page.text and str(second) in page.text
    only_hy = c.get(f"/journal?cusip={HY}")
    assert str(second) in only_hy.text and f">{first}<" not in only_hy.text
    assert c.get("/journal?status=NOPE").status_code == 400
    csv_text = c.get(f"/journal.csv?cusip={HY}").text.splitlines()
    assert csv_text[0].startswith("control_number,status") and len(csv_text) == 2

    corrected = c.post(f"/reports/{first}/correct", {
        "cusip": IG, "side": "S", "capacity": "P", "contra": "C", "quantity": "300000", "price": "101.5",
        "execution_time": "2026-06-01T09:58:00"}, csrf_from=f"/reports/{first}/correct")
    assert corrected.status_code == 200, corrected.text
    new_cn = control_number(corrected)
    history = c.get(f"/reports/{new_cn}/history").text
    assert f"correction of {first}" in history and "CORRECTED" in history
    cancelled = c.post(f"/reports/{second}/cancel", csrf_from=f"/reports/{second}/history")
    assert "Cancel accepted" in cancelled.text
    again = c.post(f"/reports/{second}/cancel", csrf_from=f"/reports/{second}/history")
    assert again.status_code == 400 and "REPORT_NOT_ACTIVE" in again.text
    reversed_ = c.post(f"/reports/{new_cn}/reverse", csrf_from=f"/reports/{new_cn}/history")
    assert reversed_.status_code == 400 and "WINDOW_OPEN" in reversed_.text


def test_journal_refuses_date_to_before_date_from_as_rest_does(world):
    """It showed an empty journal (200); REST refuses the same search with FILTER_INVALID."""
    c = world.signed_in(world.trader)
    report(c)
    for path in ("/journal", "/journal.csv"):
        r = c.get(f"{path}?date_from=2026-11-30&date_to=2026-11-01")
        assert r.status_code == 400 and "text/html" in r.headers["content-type"], (path, r.status_code)
        assert "FILTER_INVALID" in r.text and "date_to 2026-11-01 is before date_from 2026-11-30" in r.text, path
    same_day = c.get("/journal?date_from=2026-06-01&date_to=2026-06-01")
    assert same_day.status_code == 200 and "FILTER_INVALID" not in same_day.text
    assert c.get("/journal?date_from=2026-06-02").status_code == 200  # one end alone is fine


def test_viewer_sees_but_cannot_act_and_other_firm_gets_404(world):
    t = world.signed_in(world.trader)
    cn = control_number(report(t))
    v = world.signed_in(world.viewer)
    page = v.get(f"/reports/{cn}/history")
    assert page.status_code == 200 and "/cancel" not in page.text
    assert v.post(f"/reports/{cn}/cancel", csrf_from="/journal").status_code == 403
    assert v.get("/trade/new").status_code == 403
    o = world.signed_in(world.other)
    assert o.get(f"/reports/{cn}/history").status_code == 404
    assert o.post(f"/reports/{cn}/cancel", csrf_from="/journal").status_code == 404
    assert f">{cn}<" not in o.get("/journal").text


def test_market_pages_show_the_feed_capped(world):
    c = world.signed_in(world.trader)
    cn = control_number(report(c, quantity="7500000"))  # investment grade: disseminated as 5MM+
    report(c, cusip=HY, quantity="1500000", price="98.5")  # high yield: 1MM+
    svc = world.app.state.services
    with world.db.connect() as conn:
        seq = conn.execute(sa.select(sa.func.max(trade_reports.c.seq))).scalar()
    assert svc.publisher.wait_for(seq)
    anon = world.client()
    page = anon.get(f"/market/security?cusip={IG}")
    assert page.status_code == 200
    assert ">5MM+<" in page.text and ">101.25<" in page.text and "DLRA" not in page.text and str(cn) not in page.text
    assert "<polyline" in page.text
    assert ">1MM+<" in anon.get("/market/security?q=BORE4054321").text
    live = anon.get(f"/market/security?cusip={IG}&fragment=1")
    assert live.text.startswith('<span hidden data-feed-version=') and "<html" not in live.text
    version = re.search(r'data-feed-version="([^"]*)"', live.text).group(1)
    assert anon.get(f"/market/security?cusip={IG}&fragment=1&since={version}").status_code == 204
    assert anon.get(f"/market?fragment=1&since={version}").status_code == 204
    assert anon.get(f"/market/security?cusip={IG}&fragment=1&since=old").status_code == 200
    market = anon.get("/market").text
    assert 'id="aggregates"' in market and "ACME4012345" in market and "9,000,000" not in market
    assert anon.get("/market/security?q=NOSUCH").status_code == 404
    assert anon.get("/market?date=junk").status_code == 400


def test_market_page_par_comes_from_the_public_tape_only(world):
    """A capped trade's exact size and a 144A trade's size are not on the tape: the public
    /market page must not give them back (per security, nor by grade or in total)."""
    from tests.conftest import R144A
    c = world.signed_in(world.trader)
    report(c, quantity="12345678")  # investment grade: disseminated as 5MM+
    report(c, quantity="250000", execution_time="2026-06-01T09:59:00")
    svc = world.app.state.services
    with world.db.connect() as conn:
        seq = conn.execute(sa.select(sa.func.max(trade_reports.c.seq))).scalar()
    assert svc.publisher.wait_for(seq)
    anon = world.client()
    before = anon.get("/market").text
    assert "12345678" not in before and "12595678" not in before
    assert ">5250000+<" in before  # the 5MM+ counted at the cap, shown as capped
    # the open day's aggregates are the public tape's: the capped trade at the cap
    assert re.search(r"Total par \(USD\)</th><td class=\"num\">5250000\+<", before), before
    report(c, cusip=R144A, quantity="3000000", execution_time="2026-06-01T09:59:30")  # not disseminated
    with world.db.connect() as conn:
        seq = conn.execute(sa.select(sa.func.max(trade_reports.c.seq))).scalar()
    assert svc.publisher.wait_for(seq)
    after = anon.get("/market").text
    assert "3000000" not in after and "15595678" not in after and "15345678" not in after
    assert ">5250000+<" in after
    table = re.compile(r'<table class="kv aggregates".*?</table>', re.S)
    assert table.search(after).group(0) == table.search(before).group(0)  # a withheld trade moves nothing public


def test_a_control_number_beyond_any_stored_one_is_not_found(world):
    c = world.signed_in(world.trader)
    for path in (f"/reports/{2**63}", f"/reports/{2**63}/history", f"/reports/{10**30}"):
        assert c.get(path).status_code == 404, path


def test_a_trade_in_the_repeated_hour_is_corrected_at_its_own_instant(market, tmp_path):
    """2025-11-02 01:30 happened twice in New York. The correction form used to show the
    stored time cut to 19 characters, without its offset (and without its microseconds): sent
    back, it named the first 01:30, an hour off, or since 19f50d4 was refused TIME_AMBIGUOUS.
    Now the form carries the offset there (and microseconds when there are any), and a
    correction that keeps it keeps the trade's instant."""
    from bondtape.clock import to_us
    from bondtape.engine import Engine
    from tests.helpers import new

    second_0130 = to_us(dt.datetime(2025, 11, 2, 6, 30, 0, 250000, tzinfo=dt.timezone.utc))  # 01:30:00.25 EST
    w = World(market, tmp_path, second_0130 + 10 * 60_000_000)
    trader = w.user("a-trader", w.org("Dealer A", "FIRM", mpid="DLRA"), "trader")
    try:
        result = Engine(market).submit([new(ref="night", execution_us=second_0130, report_us=second_0130 + 60_000_000)])[0]
        assert result.accepted, result
        c = w.signed_in(trader)
        form = c.get(f"/reports/{result.control_number}/correct").text
        shown = re.search(r'name="execution_time" type="text" value="([^"]*)"', form).group(1)
        assert shown == "2025-11-02T01:30:00.250000-05:00"
        entry = c.get("/trade/new").text  # a new trade's default: now, to the second, with its offset here too
        assert re.search(r'name="execution_time" type="text" value="2025-11-02T01:40:\d\d-05:00"', entry)
        corrected = c.post(f"/reports/{result.control_number}/correct", {
            "cusip": IG, "side": "S", "capacity": "P", "contra": "C", "quantity": "300000", "price": "101.5",
            "execution_time": shown}, csrf_from=f"/reports/{result.control_number}/correct")
        assert corrected.status_code == 200, corrected.text
        with market.connect() as conn:
            times = conn.execute(sa.select(trade_reports.c.execution_us).order_by(trade_reports.c.control_number)).scalars().all()
        assert times == [second_0130, second_0130]
    finally:
        w.close()

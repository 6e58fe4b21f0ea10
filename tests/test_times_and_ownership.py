"""Two defects of the reporting path found by the REST API review, checked on every channel.

1. Times across daylight saving time. A local time (no offset) is market time,
   America/New_York. Before: 2025-03-09T02:30, which the clocks skip, was stored as 03:30
   EDT; 2025-11-02T01:30, which happens twice, was taken as EDT without a word; and digits
   after the microsecond were cut. Now the first is TIME_INVALID, the second TIME_AMBIGUOUS,
   the third TIME_INVALID, and a time given with its offset is kept exactly.
2. Acting on another firm's report. Before: CANCEL/CORRECT/REVERSE naming another firm's
   control number answered NOT_OWN_REPORT ("belongs to another firm"), telling the firm the
   number exists. Now it is answered exactly as a control number that does not exist.
"""
from __future__ import annotations

from decimal import Decimal

import pytest
import sqlalchemy as sa

from bondtape.clock import to_us
from bondtape.engine import Engine
from bondtape.journal.schema import CONTROL_BASE, journal, trade_reports
from bondtape.reporting.codes import REJECT_CODES, Rejected
from bondtape.reporting.commands import parse_command
from tests.conftest import IG, et
from tests.helpers import act, bulk_results, new

import datetime as dt

UTC = dt.timezone.utc
BASE = dict(action="NEW", reporting_mpid="DLRA", cusip=IG, side="S", capacity="P", contra="C",
            quantity="100000", price="99.5")


def _utc(*args) -> int:
    return to_us(dt.datetime(*args, tzinfo=UTC))


def _parse(execution_time: str, **kw):
    return parse_command(dict(BASE, execution_time=execution_time, **kw), channel="bulk",
                         use_report_time="report_time" in kw)


def _reject(execution_time: str, **kw):
    with pytest.raises(Rejected) as info:
        _parse(execution_time, **kw)
    return info.value.reject


def _journaled(db) -> int:
    with db.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(journal)).scalar_one()


# --- 1. times across daylight saving time ---------------------------------------------------

@pytest.mark.parametrize("text", ["2025-03-09T02:30", "2025-03-09T02:00:00", "2025-03-09T02:59:59.999999",
                                  "2024-03-10T02:15:00"])
def test_a_local_time_the_clocks_skip_is_refused_not_moved(text):
    """Before: stored an hour later (02:30 became 03:30 EDT, 07:30Z)."""
    reject = _reject(text)
    assert (reject.code, reject.field) == ("TIME_INVALID", "execution_time")
    assert "does not exist" in reject.message
    assert "-05:00" in reject.message and "-04:00" in reject.message and "(Z)" in reject.message


@pytest.mark.parametrize("text", ["2025-11-02T01:30", "2025-11-02T01:00:00", "2025-11-02T01:59:59.999999",
                                  "2024-11-03T01:15:00"])
def test_a_local_time_that_happens_twice_is_refused_not_guessed(text):
    """Before: taken as the first (EDT) without a word."""
    reject = _reject(text)
    assert (reject.code, reject.field) == ("TIME_AMBIGUOUS", "execution_time")
    assert "TIME_AMBIGUOUS" in REJECT_CODES
    day_time = text if len(text) > 16 else text + ":00"
    assert f"{day_time}-04:00" in reject.message and f"{day_time}-05:00" in reject.message


def test_the_report_time_is_read_the_same_way():
    skipped = _reject("2025-03-09T01:00:00-05:00", report_time="2025-03-09T02:30")
    twice = _reject("2025-11-02T00:30:00-04:00", report_time="2025-11-02T01:30")
    assert (skipped.code, skipped.field) == ("TIME_INVALID", "report_time")
    assert (twice.code, twice.field) == ("TIME_AMBIGUOUS", "report_time")


@pytest.mark.parametrize("text, utc", [
    # an explicit offset or Z: that instant exactly, whatever the market's clock showed
    ("2025-11-02T01:30:00-04:00", _utc(2025, 11, 2, 5, 30)),   # the first 01:30 (EDT)
    ("2025-11-02T01:30:00-05:00", _utc(2025, 11, 2, 6, 30)),   # the second 01:30 (EST)
    ("2025-03-09T02:30:00-05:00", _utc(2025, 3, 9, 7, 30)),    # a clock not yet put forward
    ("2025-03-09T02:30:00Z", _utc(2025, 3, 9, 2, 30)),
    ("2025-03-09T07:30:00.123456+00:00", _utc(2025, 3, 9, 7, 30, 0, 123456)),
    # local times either side of the changes are one instant each
    ("2025-03-09T01:59:59.999999", _utc(2025, 3, 9, 6, 59, 59, 999999)),
    ("2025-03-09T03:00", _utc(2025, 3, 9, 7, 0)),
    ("2025-11-02T00:59:59", _utc(2025, 11, 2, 4, 59, 59)),
    ("2025-11-02T02:00", _utc(2025, 11, 2, 7, 0)),
    ("2025-06-02T10:15:00", _utc(2025, 6, 2, 14, 15)),
    ("2025-01-02T10:15:00", _utc(2025, 1, 2, 15, 15)),
])
def test_an_instant_is_kept_exactly(text, utc):
    assert _parse(text).terms.execution_us == utc


@pytest.mark.parametrize("text", ["2025-06-02T10:15:00.123456789", "2025-06-02T10:15:00.1234567-04:00",
                                  "2025-06-02T10:15:00,0000001Z"])
def test_more_precision_than_is_stored_is_refused_not_cut(text):
    """Before: cut to the microsecond without a word (.123456789 stored as .123456)."""
    reject = _reject(text)
    assert (reject.code, reject.field) == ("TIME_INVALID", "execution_time")
    assert "microsecond" in reject.message


def test_zeros_after_the_microsecond_change_nothing_and_are_accepted():
    assert _parse("2025-06-02T10:15:00.123456000-04:00").terms.execution_us == _utc(2025, 6, 2, 14, 15, 0, 123456)


def _bulk(db, rows: list[dict]) -> dict[int, dict]:
    header = ["action", "client_ref", "reporting_mpid", "cusip", "side", "capacity", "contra", "quantity", "price",
              "execution_time", "report_time", "original_control_number"]
    return bulk_results(db, header, rows)


def test_bulk_files_refuse_such_times_and_journal_nothing_of_them(market):
    rows = [dict(BASE, client_ref=f"t{i}", quantity=str(100000 + i), execution_time=t,
                 report_time="2025-11-03T10:00:00-05:00")
            for i, t in enumerate(["2025-03-09T02:30", "2025-11-02T01:30", "2025-06-02T10:15:00.123456789",
                                   "2025-11-02T01:30-05:00"])]
    got = _bulk(market, rows)
    assert [(got[n]["reject_code"], got[n]["field"]) for n in (2, 3, 4)] == [
        ("TIME_INVALID", "execution_time"), ("TIME_AMBIGUOUS", "execution_time"), ("TIME_INVALID", "execution_time")]
    assert got[5]["status"] == "ACCEPTED"
    assert _journaled(market) == 1
    with market.connect() as conn:
        stored = conn.execute(sa.select(trade_reports.c.execution_us)).scalar_one()
    assert stored == _utc(2025, 11, 2, 6, 30)


# --- 2. acting on another firm's report -----------------------------------------------------

def test_another_firms_report_is_answered_as_a_report_that_does_not_exist(market):
    """The same control number is acted on by DLRB before DLRA's report exists and after:
    the answers must be the same (code, field and message), whatever the report's state
    (active, cancelled, a test report) and whatever the action."""
    engine = Engine(market)
    cn = CONTROL_BASE + 1
    before = engine.submit([act("CANCEL", cn, mpid="DLRB", ref="b1"),
                            act("CORRECT", cn, mpid="DLRB", ref="b2", price=Decimal("98")),
                            act("REVERSE", cn, mpid="DLRB", ref="b3")])
    assert [r.reject.code for r in before] == ["REPORT_UNKNOWN"] * 3
    [a] = engine.submit([new(ref="a1")])
    assert a.accepted and a.control_number == cn
    after = engine.submit([act("CANCEL", cn, mpid="DLRB", ref="b4"),
                           act("CORRECT", cn, mpid="DLRB", ref="b5", price=Decimal("98")),
                           act("REVERSE", cn, mpid="DLRB", ref="b6")])  # in the window: not WINDOW_OPEN either
    assert [r.reject for r in after] == [r.reject for r in before]
    assert "belongs" not in after[0].reject.message
    # a cancelled one (not REPORT_NOT_ACTIVE) and a test one (not TEST_MISMATCH)
    [t] = engine.submit([new(ref="a2", test=True, quantity=Decimal("777000"))])
    [cancelled] = engine.submit([act("CANCEL", cn, ref="a3")])
    assert cancelled.accepted
    [gone, test] = engine.submit([act("CANCEL", cn, mpid="DLRB", ref="b7"),
                                  act("CANCEL", t.control_number, mpid="DLRB", ref="b8")])
    assert gone.reject == before[0].reject
    assert (test.reject.code, test.reject.field) == ("REPORT_UNKNOWN", "original_control_number")
    assert test.reject.message == before[0].reject.message.replace(str(cn), str(t.control_number))


def test_bulk_files_answer_another_firms_report_as_unknown(market):
    cn = str(CONTROL_BASE + 1)
    at = dict(report_time="2024-03-04T10:05:00-05:00")
    got = _bulk(market, [
        dict(action="CANCEL", client_ref="b1", reporting_mpid="DLRB", original_control_number=cn, **at),
        dict(BASE, client_ref="a1", execution_time="2024-03-04T10:00:00-05:00", **at),
        dict(action="CANCEL", client_ref="b2", reporting_mpid="DLRB", original_control_number=cn, **at),
    ])
    assert got[3]["control_number"] == cn
    assert (got[4]["reject_code"], got[4]["field"], got[4]["message"]) == \
        (got[2]["reject_code"], got[2]["field"], got[2]["message"]) == \
        ("REPORT_UNKNOWN", "original_control_number", f"DLRB has no report with control number {cn}")


@pytest.fixture
def api(market, tmp_path):
    from tests.api_support import api_client, api_world, with_certificate

    w = api_world(market, tmp_path, et(2026, 6, 1, 10, 0, 0))
    a = w.org("Dealer A", "FIRM", mpid="DLRA")
    b = w.org("Dealer B", "FIRM", mpid="DLRB")
    mine, theirs = w.user("a-trader", a, "trader"), w.user("b-trader", b, "trader")
    for u in (mine, theirs):
        with_certificate(w, u)
    yield api_client(w, mine), api_client(w, theirs)
    w.close()


API_TRADE = {"cusip": IG, "side": "S", "capacity": "P", "contra": "C", "quantity": "250000", "price": "101.25",
             "execution_time": "2026-06-01T09:58:00-04:00"}


def test_rest_api_answers_another_firms_report_as_unknown(api):
    mine, theirs = api
    cn = str(CONTROL_BASE + 1)
    acts = [{"action": "CANCEL", "original_control_number": cn},
            {"action": "CORRECT", "original_control_number": cn, **API_TRADE, "price": "99"},
            {"action": "REVERSE", "original_control_number": cn}]
    before = [theirs.post("/api/v1/reports", json=body) for body in acts]
    r = mine.post("/api/v1/reports", json=API_TRADE)
    assert r.status_code == 200 and r.json()["control_number"] == cn
    after = [theirs.post("/api/v1/reports", json=body) for body in acts]
    for b, a in zip(before, after):
        assert b.status_code == a.status_code == 422
        assert a.json() == b.json()
        assert a.json()["reject"]["code"] == "REPORT_UNKNOWN"
    assert theirs.post(f"/api/v1/reports/{cn}/cancel").status_code == 404  # the /{cn} routes, as before


def test_rest_api_refuses_such_times(api):
    mine, _ = api
    for text, code in [("2026-03-08T02:30:00", "TIME_INVALID"), ("2025-11-02T01:30:00", "TIME_AMBIGUOUS"),
                       ("2026-06-01T09:58:00.123456789-04:00", "TIME_INVALID")]:
        r = mine.post("/api/v1/reports", json={**API_TRADE, "execution_time": text})
        assert r.status_code == 422, r.text
        assert (r.json()["reject"]["code"], r.json()["reject"]["field"]) == (code, "execution_time")
    r = mine.post("/api/v1/reports", json={**API_TRADE, "execution_time": "2025-11-02T01:30:00-05:00"})
    assert r.status_code == 200, r.text
    got = mine.get(f"/api/v1/reports/{r.json()['control_number']}").json()["report"]
    assert got["execution_time"] == "2025-11-02T01:30:00-05:00"


def test_website_trade_entry_refuses_such_times(market, tmp_path):
    from bondtape.web.testing import World

    w = World(market, tmp_path, et(2026, 6, 1, 10, 0, 0), cookie_secure=False)
    try:
        trader = w.user("a-trader", w.org("Dealer A", "FIRM", mpid="DLRA"), "trader")
        c = w.signed_in(trader)
        for text, code in [("2026-03-08T02:30", "TIME_INVALID"), ("2025-11-02T01:30", "TIME_AMBIGUOUS")]:
            values = {**API_TRADE, "execution_time": text}
            page = c.post("/trade/new", values, csrf_from="/trade/new")
            assert page.status_code == 400
            assert f'id="error-execution_time">{code}' in page.text
        assert _journaled(market) == 0
    finally:
        w.close()


def test_fix_answers_another_firms_report_as_unknown(tmp_path):
    """FIX acts on a report by TradeReportRefID (572): one of the firm's own TradeReportIDs,
    else a control number. Another firm's control number is answered as an unknown one."""
    from tests.test_fix_helpers import RawClient, ServerThread, add_users, report_body, standard_sqlite

    db = standard_sqlite(tmp_path / "fix.db")
    add_users(db, ("alice", "DLRA"), ("bob", "DLRB"))
    server = ServerThread(db)
    try:
        bob = RawClient(server.port, sender="FIRMB")
        assert bob.logon(username="bob").msg_type == "A"
        cn = str(CONTROL_BASE + 1)
        bob.send("AE", [(571, "B1"), (487, 1), (572, cn)])
        before = bob.read_type("AR")
        alice = RawClient(server.port)
        assert alice.logon().msg_type == "A"
        alice.send("AE", report_body("A1"))
        assert alice.read_type("AR").first(818) == cn
        bob.send("AE", [(571, "B2"), (487, 1), (572, cn)])
        after = bob.read_type("AR")
        for tag in (939, 751, 20012, 20013, 58):
            assert after.first(tag) == before.first(tag), tag
        assert after.first(20012) == "REPORT_UNKNOWN" and after.first(751) != "3"
        bob.close()
        alice.close()
    finally:
        server.stop()
        db.dispose()


def test_fix_refuses_a_transact_time_finer_than_a_microsecond(tmp_path):
    """TransactTime (60) with nine decimals: before, .123456789 was cut to .123456 and the report
    accepted; now it is TIME_INVALID, and nine decimals ending in zeros are the same instant."""
    from tests.test_fix_helpers import EXEC_UTC, RawClient, ServerThread, add_users, report_body, standard_sqlite

    db = standard_sqlite(tmp_path / "fix.db")
    add_users(db, ("alice", "DLRA"))
    server = ServerThread(db)
    try:
        alice = RawClient(server.port)
        assert alice.logon().msg_type == "A"
        whole = EXEC_UTC.split(".")[0]
        finer = [(k, v) if k != 60 else (60, whole + ".123456789") for k, v in report_body("N1")]
        alice.send("AE", finer)
        ack = alice.read_type("AR")
        assert (ack.first(939), ack.first(20012), ack.first(20013)) == ("1", "TIME_INVALID", "execution_time")
        zeros = [(k, v) if k != 60 else (60, whole + ".123456000") for k, v in report_body("N2")]
        alice.send("AE", zeros)
        assert alice.read_type("AR").first(939) == "0"
        with db.connect() as conn:
            stored = conn.execute(sa.select(trade_reports.c.execution_us)).scalars().all()
        assert [us % 1_000_000 for us in stored] == [123456]
        alice.close()
    finally:
        server.stop()
        db.dispose()

"""Dissemination rules and the publisher: what the public sees, in which messages."""
from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from bondtape.dissemination import rules as R
from bondtape.dissemination.publisher import FeedError, Publisher
from bondtape.dissemination.query import time_and_sales, write_snapshot
from bondtape.dissemination.schema import feed_messages
from bondtape.engine import Engine
from bondtape.rulebook import default_rulebook
from tests.conftest import AGCY, HY, IG, R144A, et
from tests.helpers import DEFAULT_EXEC, act, new

RULES = default_rulebook().at(dt.date(2024, 3, 4))
DAY = "2024-03-04"


def bodies(pub: Publisher) -> list[dict]:
    return [json.loads(m.body) for m in pub.iter_all()]


def of_type(msgs, kind):
    return [m for m in msgs if m["type"] == kind]


@pytest.fixture
def feed(market):
    engine = Engine(market)
    pub = Publisher(market)
    engine.listeners.append(lambda events: pub.apply_live(events))  # synchronous for the tests
    return engine, pub


# --- the pure rules -----------------------------------------------------------------------


@pytest.mark.parametrize("grade,quantity,shown", [
    ("IG", "5000000", "5000000"), ("IG", "5000000.01", "5MM+"), ("IG", "4999999.99", "4999999.99"),
    ("IG", "25000000", "5MM+"), ("HY", "1000000", "1000000"), ("HY", "1000001", "1MM+"),
    ("HY", "250000.50", "250000.5"), (None, "1000001", "1MM+"),
])
def test_quantity_is_exact_at_or_under_the_cap_else_capped(grade, quantity, shown):
    assert R.disseminated_quantity(Decimal(quantity), grade, RULES) == shown


@pytest.mark.parametrize("kw,reason", [
    (dict(is_test=True), "TEST_REPORT"),
    (dict(rule_144a=True), "RULE_144A"),
    (dict(merger_transfer=True), "MERGER_TRANSFER_6750B"),
    (dict(trading_market="P1"), "PRIMARY_MARKET_P1"),
    (dict(contra_type="D", side="B"), "INTER_DEALER_BUY_SIDE"),
    (dict(contra_type="D", side="S"), None),
    (dict(), None),
])
def test_withheld_reasons(kw, reason):
    base = dict(is_test=False, rule_144a=False, merger_transfer=False, trading_market="S1", contra_type="C",
                side="S", capacity="P", rules=RULES)
    assert R.withheld_reason(**{**base, **kw}) == reason


def test_144a_feed_is_a_later_rulebook_version():
    later = default_rulebook(("2014-06-30",)).at(dt.date(2014, 7, 1))
    assert R.withheld_reason(is_test=False, rule_144a=True, merger_transfer=False, trading_market="S1",
                             contra_type="C", side="S", capacity="P", rules=later) is None
    assert later.rule_144a_feed == "BTDS-144A"
    assert R.withheld_reason(is_test=False, rule_144a=True, merger_transfer=False, trading_market="S1",
                             contra_type="C", side="S", capacity="P",
                             rules=default_rulebook().at(dt.date(2014, 7, 1))) == "RULE_144A"


# --- what is published --------------------------------------------------------------------


def test_customer_trade_and_inter_dealer_sell_side_only(feed):
    engine, pub = feed
    engine.submit([new(ref="c", quantity=Decimal("250000")),
                   new(ref="s", contra="DLRB", side="S", price=Decimal("100")),
                   new(mpid="DLRB", ref="b", contra="DLRA", side="B", price=Decimal("100"))])
    msgs = bodies(pub)
    assert [m["type"] for m in msgs] == ["START_OF_DAY", "TRADE", "TRADE"]
    assert [(m["data_set"], m["date"], m["seq"]) for m in msgs] == [("CORP", DAY, 1), ("CORP", DAY, 2), ("CORP", DAY, 3)]
    customer, dealer = msgs[1]["trade"], msgs[2]["trade"]
    assert customer["contra_party_type"] == "C" and customer["quantity"] == "250000" and customer["side"] == "S"
    assert dealer["contra_party_type"] == "D" and dealer["side"] == "S" and dealer["reporting_party_type"] == "D"
    assert customer["quantity_indicator"] == "A" and customer["price"] == "99.5"


@pytest.mark.parametrize("kw", [dict(cusip=R144A), dict(trading_market="P1"), dict(merger_transfer=True),
                                dict(test=True), dict(mpid="CERT")])
def test_withheld_reports_produce_no_message_and_their_cancels_none(feed, kw):
    engine, pub = feed
    [r] = engine.submit([new(ref="w", **kw)])
    assert r.accepted
    engine.submit([act("CANCEL", r.control_number, mpid=kw.get("mpid", "DLRA"), ref="x")])
    assert [m for m in bodies(pub) if m["type"] not in ("START_OF_DAY",)] == []


def test_caps_by_grade_on_the_feed(feed):
    engine, pub = feed
    engine.submit([new(ref="1", quantity=Decimal("5000000")), new(ref="2", quantity=Decimal("5000001")),
                   new(ref="3", cusip=HY, quantity=Decimal("1000000")), new(ref="4", cusip=HY, quantity=Decimal("1000000.01")),
                   new(ref="5", cusip=AGCY, quantity=Decimal("7000000"))])
    q = [(m["cusip"], m["trade"]["quantity"], m["trade"]["quantity_indicator"]) for m in of_type(bodies(pub), "TRADE")]
    assert q == [(IG, "5000000", "A"), (IG, "5MM+", "E"), (HY, "1000000", "A"), (HY, "1MM+", "E"), (AGCY, "5MM+", "E")]


def test_cancel_and_correction_name_the_original_message(feed):
    engine, pub = feed
    a, b = engine.submit([new(ref="a"), new(ref="b", cusip=HY)])
    engine.submit([act("CANCEL", a.control_number, ref="ca")])
    [c] = engine.submit([act("CORRECT", b.control_number, ref="cb", cusip=HY, price=Decimal("97.25"))])
    engine.submit([act("CANCEL", c.control_number, ref="cc", report_us=DEFAULT_EXEC + 200_000_000)])
    msgs = bodies(pub)
    trades = of_type(msgs, "TRADE")
    [cancel1, cancel2] = of_type(msgs, "CANCEL")
    [corr] = of_type(msgs, "CORRECTION")
    assert cancel1["original"] == {"date": DAY, "seq": trades[0]["seq"]} and cancel1["trade"] == trades[0]["trade"]
    assert corr["original"] == {"date": DAY, "seq": trades[1]["seq"]}
    assert corr["original_trade"]["price"] == "99.5" and corr["trade"]["price"] == "97.25"
    assert cancel2["original"] == {"date": DAY, "seq": corr["seq"]}  # the correction is the report now


def test_correction_across_the_dissemination_line(feed):
    engine, pub = feed
    shown, hidden = engine.submit([new(ref="s"), new(ref="h", trading_market="P1", price=Decimal("98"))])
    engine.submit([act("CORRECT", shown.control_number, ref="s2", trading_market="P1"),
                   act("CORRECT", hidden.control_number, ref="h2", price=Decimal("98.5"))])
    msgs = bodies(pub)
    assert [m["type"] for m in msgs] == ["START_OF_DAY", "TRADE", "CANCEL", "TRADE"]
    assert msgs[2]["original"]["seq"] == msgs[1]["seq"]  # the public drops what became withheld
    assert msgs[3]["trade"]["price"] == "98.5"  # first disseminated with the corrected terms


def test_reversal_and_as_of_carry_their_indicators(feed):
    engine, pub = feed
    [r] = engine.submit([new(ref="o")])
    late_day = et(2024, 4, 15, 10, 0)
    [asof] = engine.submit([new(ref="asof", price=Decimal("101"), execution_us=et(2024, 4, 12, 15, 0), report_us=late_day)])
    [rev] = engine.submit([act("REVERSE", r.control_number, ref="rv", report_us=late_day + 1_000_000)])
    assert asof.accepted and rev.accepted, (asof, rev)
    msgs = bodies(pub)
    trade = of_type(msgs, "TRADE")
    assert trade[1]["trade"]["as_of"] == "A" and trade[1]["date"] == "2024-04-15"
    [reversal] = of_type(msgs, "REVERSAL")
    assert reversal["trade"]["as_of"] == "R" and reversal["original"] == {"date": DAY, "seq": trade[0]["seq"]}
    assert reversal["trade"]["execution_time"].startswith("2024-03-04T10:00")
    assert reversal["date"] == "2024-04-15"


def test_day_close_summaries_aggregates_and_gapless_numbers(feed):
    engine, pub = feed
    engine.submit([new(ref="1", price=Decimal("99")), new(ref="2", price=Decimal("101"), execution_us=DEFAULT_EXEC + 1),
                   new(ref="3", price=Decimal("100"), execution_us=DEFAULT_EXEC + 2, quantity=Decimal("9000000")),
                   new(ref="4", cusip=R144A, quantity=Decimal("3000000")),  # withheld, counted uncapped
                   new(ref="5", cusip=HY, quantity=Decimal("2000000")),
                   new(ref="6", contra="DLRB", side="S", quantity=Decimal("10000")),
                   new(mpid="DLRB", ref="7", contra="DLRA", side="B", quantity=Decimal("10000")),
                   new(ref="8", test=True, quantity=Decimal("1000000"))])
    nxt = et(2024, 3, 5, 10, 0)
    engine.submit([new(ref="9", price=Decimal("102"), execution_us=nxt, report_us=nxt + 1000),
                   new(ref="10", cusip=HY, price=Decimal("90"), execution_us=nxt, report_us=nxt + 1000)])
    pub.end_of_day("2024-03-05", at_us=et(2024, 3, 5, 18, 30))
    msgs = bodies(pub)
    for ds in ("CORP", "AGCY"):
        for day in (DAY, "2024-03-05"):
            seqs = [m["seq"] for m in msgs if m["data_set"] == ds and m["date"] == day]
            assert seqs == list(range(1, len(seqs) + 1))
    day1 = [m for m in msgs if m["date"] == DAY and m["data_set"] == "CORP"]
    assert day1[0]["type"] == "START_OF_DAY" and day1[-1]["type"] == "END_OF_DAY"
    summaries = {m["cusip"]: m for m in of_type(day1, "DAILY_SUMMARY")}
    assert (summaries[IG]["high"], summaries[IG]["low"], summaries[IG]["last"]) == ("101", "99", "100")
    [agg] = of_type(day1, "MARKET_AGGREGATES")
    # 6 trades: 3 IG + 144A (IG) + HY + one inter-dealer trade counted once; no test report
    assert agg["total_trades"] == 6 and agg["disseminated_trades"] == 5
    # IG holds two trades of non-public size (9MM capped, the 144A), HY one (2MM capped):
    # their par would give those sizes back, so it is withheld, and the total with it (R19)
    assert agg["by_grade"]["IG"] == {"trades": 5, "par": None, "par_withheld": True}
    assert agg["by_grade"]["HY"] == {"trades": 1, "par": None, "par_withheld": True}
    assert agg["total_par"] is None and agg["total_par_withheld"] is True
    [agg2] = [m for m in of_type(msgs, "MARKET_AGGREGATES") if m["date"] == "2024-03-05" and m["data_set"] == "CORP"]
    assert (agg2["advances"], agg2["declines"], agg2["unchanged"]) == (1, 1, 0)  # IG 100 -> 102, HY 99.5 -> 90
    agcy = [m for m in msgs if m["data_set"] == "AGCY" and m["date"] == "2024-03-05"]
    assert [m["type"] for m in agcy] == ["START_OF_DAY", "MARKET_AGGREGATES", "END_OF_DAY"]
    with pytest.raises(FeedError) as e:
        pub.end_of_day("2024-03-05", at_us=et(2024, 3, 5, 18, 31))
    assert e.value.code == "DAY_CLOSED"


def test_aggregates_par_never_reveals_one_capped_or_withheld_trade(feed):
    """R19: a par total holding one or two trades of non-public size is withheld (with one,
    total minus the public sizes is its exact size); with none or three or more it is
    published; a withheld bucket withholds the total too (complementary suppression)."""
    engine, pub = feed
    engine.submit([new(ref="1", quantity=Decimal("100000")),
                   new(ref="2", quantity=Decimal("6345678")),  # capped: 5MM+
                   new(ref="3", cusip=R144A, quantity=Decimal("3000000")),  # not disseminated
                   new(ref="4", cusip=R144A, quantity=Decimal("4000000")),
                   new(ref="5", cusip=HY, quantity=Decimal("250000"))])
    pub.end_of_day(DAY, at_us=et(2024, 3, 4, 18, 30))
    [agg] = [m for m in of_type(bodies(pub), "MARKET_AGGREGATES") if m["data_set"] == "CORP"]
    assert agg["by_grade"]["IG"] == {"trades": 4, "par": str(100000 + 6345678 + 3000000 + 4000000),
                                     "par_withheld": False}  # three hidden, none dominant: published
    assert agg["by_grade"]["HY"] == {"trades": 1, "par": "250000", "par_withheld": False}
    assert agg["total_par"] == str(100000 + 6345678 + 7000000 + 250000) and agg["total_par_withheld"] is False

    engine.submit([new(ref="6", cusip=HY, quantity=Decimal("2500000"), execution_us=et(2024, 3, 5, 10, 0),
                       report_us=et(2024, 3, 5, 10, 1)),
                   new(ref="7", quantity=Decimal("100000"), execution_us=et(2024, 3, 5, 10, 0),
                       report_us=et(2024, 3, 5, 10, 1))])
    pub.end_of_day("2024-03-05", at_us=et(2024, 3, 5, 18, 30))
    [agg] = [m for m in of_type(bodies(pub), "MARKET_AGGREGATES") if m["data_set"] == "CORP" and m["date"] == "2024-03-05"]
    assert agg["by_grade"]["HY"] == {"trades": 1, "par": None, "par_withheld": True}
    assert agg["by_grade"]["IG"] == {"trades": 1, "par": "100000", "par_withheld": False}
    assert agg["total_par"] is None and agg["total_par_withheld"] is True  # else total - IG = the HY trade
    assert agg["total_trades"] == 2  # counts reveal no size
    assert "2600000" not in json.dumps(agg) and "2500000" not in json.dumps(agg)


def test_a_par_total_is_withheld_when_one_hidden_trade_dominates():
    """Three hidden trades are not enough if one is most of them: 50MM beside two of 1MM
    gives the large one within 2MM."""
    from bondtape.dissemination.rules import par_disclosable

    assert par_disclosable([]) and par_disclosable([600, 300, 400]) and par_disclosable([1, 1, 1, 1])
    assert not par_disclosable([100]) and not par_disclosable([100, 100])
    assert not par_disclosable([5_000, 100, 100]) and not par_disclosable([701, 300, 400])


def test_a_day_after_today_cannot_be_closed(feed):
    """A mistyped year must not make a far-off day the feed's current day (every later
    trade would be published on it, and today could no longer be closed)."""
    engine, pub = feed
    now = et(2024, 3, 4, 18, 0)
    for day in ("2024-03-05", "9999-12-31"):
        with pytest.raises(FeedError) as e:
            pub.end_of_day(day, at_us=now)
        assert (e.value.code, e.value.field) == ("DATE_IN_FUTURE", "date") and "2024-03-04" in e.value.message
    for day in ("20240304", "2024-W10-1", "2024-3-4"):  # dates fromisoformat takes, not YYYY-MM-DD
        with pytest.raises(FeedError) as e:
            pub.end_of_day(day, at_us=now)
        assert (e.value.code, e.value.field) == ("DATE_INVALID", "date"), day
    assert pub.current_date != "9999-12-31"
    pub.end_of_day("2024-03-04", at_us=now)  # today still can be closed
    assert all(pub.days[(ds, "2024-03-04")][1] for ds in ("CORP", "AGCY"))


def test_halt_and_resume_are_operator_actions(feed):
    engine, pub = feed
    h = pub.halt(IG, "t1", at_us=et(2024, 3, 4, 9, 0), operator="ops")
    body = json.loads(h.body)
    assert body["type"] == "HALT" and body["reason"] == "T1" and body["issuer"] == "Acme Industrial"
    for bad, code in [(lambda: pub.halt(IG, "T1"), "ALREADY_HALTED"), (lambda: pub.resume(HY), "NOT_HALTED"),
                      (lambda: pub.halt("999999999", "T1"), "SECURITY_UNKNOWN"),
                      (lambda: pub.halt(HY, "TOO-LONG"), "HALT_REASON_INVALID")]:
        with pytest.raises(FeedError) as e:
            bad()
        assert e.value.code == code
    engine.submit([new(ref="x")])
    r = json.loads(pub.resume(IG, at_us=et(2024, 3, 4, 11, 0)).body)
    assert r["type"] == "RESUME" and r["seq"] == 4
    assert Publisher(market_db(pub)).halted == set()


def market_db(pub):
    return pub.db


def test_rebuild_and_restart_equal_the_live_feed(feed):
    engine, pub = feed
    got = []
    pub.subscribe(got.append)
    rs = engine.submit([new(ref=str(i), price=Decimal(99 + i), execution_us=DEFAULT_EXEC + i) for i in range(5)])
    pub.halt(HY, "T1", at_us=et(2024, 3, 4, 10, 30))
    engine.submit([act("CANCEL", rs[1].control_number, ref="c")])
    nxt = et(2024, 3, 5, 10, 0)
    engine.submit([new(ref="n", execution_us=nxt, report_us=nxt + 1)])
    live = [m.body for m in got]
    assert live == [m.body for m in pub.iter_all()]
    # a new publisher catches up from its durable position: nothing new, nothing repeated
    again = Publisher(pub.db)
    assert again.position == pub.position and again.catch_up() == []
    # rebuilt from the journal and the operator actions: the same bytes
    assert again.rebuild() == len(live)
    assert [m.body for m in again.iter_all()] == live


def test_subscriber_from_a_position_gets_stored_then_live_without_gap(feed):
    engine, pub = feed
    engine.submit([new(ref=str(i), execution_us=DEFAULT_EXEC + i) for i in range(4)])
    got = []
    pub.subscribe(got.append, ["CORP"], {"CORP": (DAY, 3)})
    assert [m.seq for m in got] == [3, 4, 5]
    engine.submit([new(ref="live", execution_us=DEFAULT_EXEC + 99)])
    assert [m.seq for m in got] == [3, 4, 5, 6]
    agcy = []
    pub.subscribe(agcy.append, ["AGCY"], {"AGCY": ("", 1)})
    engine.submit([new(ref="c2", execution_us=DEFAULT_EXEC + 100), new(ref="a", cusip=AGCY)])
    assert [m.data_set for m in agcy] == ["AGCY", "AGCY"] and [m.seq for m in got][-1] == 7


def test_live_thread_follows_the_engine(market):
    engine = Engine(market)
    pub = Publisher(market).start(engine)
    try:
        got = []
        pub.subscribe(got.append)
        [r] = engine.submit([new(ref="t")])
        assert pub.wait_for(r.seq)
        assert [json.loads(m.body)["type"] for m in got] == ["START_OF_DAY", "TRADE"]
    finally:
        pub.stop()


def test_publisher_started_late_catches_up(market):
    engine = Engine(market)
    engine.submit([new(ref=str(i), execution_us=DEFAULT_EXEC + i) for i in range(3)])
    pub = Publisher(market).start(engine)
    try:
        engine.submit([new(ref="later", execution_us=DEFAULT_EXEC + 10)])
        assert pub.wait_for(4)
        assert [m.seq for m in pub.messages("CORP")] == [1, 2, 3, 4, 5]
    finally:
        pub.stop()


def test_time_and_sales_and_snapshot(feed, tmp_path):
    engine, pub = feed
    a, b, c = engine.submit([new(ref="a", quantity=Decimal("6000000")), new(ref="b", execution_us=DEFAULT_EXEC + 5),
                             new(ref="c", contra="DLRB", side="B")])
    engine.submit([act("CANCEL", b.control_number, ref="x")])
    tas = time_and_sales(pub.db, IG)
    assert [t["quantity"] for t in tas["trades"]] == ["5MM+"] and tas["data_set"] == "CORP"
    assert "DLRA" not in json.dumps(tas) and "DLRB" not in json.dumps(tas)
    with pytest.raises(FeedError):
        time_and_sales(pub.db, "999999999")
    path, n, closed = write_snapshot(pub.db, "CORP", DAY, tmp_path)
    assert n == 4 and not closed
    assert path.read_text().splitlines() == [m.body for m in pub.messages("CORP")]
    assert path.with_suffix(".jsonl.sha256").exists()


def test_cli_replay_prints_the_live_feed(market, db_url):
    engine = Engine(market)
    engine.submit([new(ref="1"), new(ref="2", cusip=AGCY), new(ref="3", execution_us=DEFAULT_EXEC + 1)])
    pub = Publisher(market)
    live = [m.body for m in pub.catch_up()]
    from bondtape.cli import cli

    runner = CliRunner()
    out = runner.invoke(cli, ["feed", "replay", "--from-seq", "1", "--db", db_url])
    assert out.exit_code == 0, out.output
    assert out.output.splitlines() == live
    out = runner.invoke(cli, ["feed", "replay", "--from-seq", "2", "--data-set", "CORP", "--date", DAY,
                              "--to-seq", "2", "--db", db_url])
    assert out.output.splitlines() == [live[1]]
    out = runner.invoke(cli, ["feed", "halt", IG, "--reason", "TOOLONG", "--db", db_url])
    assert out.exit_code == 1 and "HALT_REASON_INVALID" in out.output
    out = runner.invoke(cli, ["feed", "replay", "--date", "nope", "--db", db_url])
    assert out.exit_code == 2 and "not a date" in out.output


def test_messages_are_stored_with_their_source_event(feed):
    engine, pub = feed
    [r] = engine.submit([new(ref="s")])
    with pub.db.connect() as conn:
        rows = conn.execute(sa.select(feed_messages.c.msg_type, feed_messages.c.journal_seq)).all()
    assert ("TRADE", r.seq) in [tuple(x) for x in rows]


def test_publisher_in_another_process_follows_the_journal_by_polling(market):
    engine = Engine(market)  # no listener: the publisher only reads the journal
    pub = Publisher(market).start(poll_interval=0.01)
    try:
        got = []
        pub.subscribe(got.append, ["CORP"])
        [r] = engine.submit([new(ref="p")])
        assert pub.wait_for(r.seq)
        assert [m.seq for m in got] == [1, 2]
    finally:
        pub.close()


# --- live: sent at once, stored a moment later ------------------------------------------------


def test_live_publisher_sends_at_once_and_stores_the_same_bytes_later(market):
    engine = Engine(market)
    pub = Publisher(market, store_interval=60).start(engine)  # nothing is stored unless asked
    try:
        got = []
        pub.subscribe(got.append)
        rs = engine.submit([new(ref=f"s{i}", execution_us=DEFAULT_EXEC + i) for i in range(3)])
        assert [json.loads(m.body)["type"] for m in got] == ["START_OF_DAY", "TRADE", "TRADE", "TRADE"]
        assert pub.messages("CORP") == [] and pub.stored == 0  # handed out before the feed's own writes
        assert pub.wait_for(rs[-1].seq)
        assert [m.body for m in pub.messages("CORP")] == [m.body for m in got]
    finally:
        pub.close()


def test_writes_waiting_to_be_stored_serve_cancels_day_closes_and_new_subscribers(market):
    engine = Engine(market)
    pub = Publisher(market, store_interval=60).start(engine)
    try:
        live = []
        pub.subscribe(live.append)
        a, b = engine.submit([new(ref="a", price=Decimal(99)), new(ref="b", execution_us=DEFAULT_EXEC + 1)])
        # the originals are not stored yet: the publisher acts on them as it made them
        engine.submit([act("CANCEL", a.control_number, ref="ca"),
                       act("CORRECT", b.control_number, ref="cb", price=Decimal(101), execution_us=DEFAULT_EXEC + 1)])
        late = []
        pub.subscribe(late.append, ["CORP"], {"CORP": ("", 1)})  # joins while writes wait: no gap
        nxt = et(2024, 3, 5, 10, 0)
        [r] = engine.submit([new(ref="n", execution_us=nxt, report_us=nxt + 1)])  # closes the 4th
        assert pub.wait_for(r.seq)
    finally:
        pub.close()
    msgs = [json.loads(m.body) for m in live]
    assert [m["type"] for m in msgs] == ["START_OF_DAY", "TRADE", "TRADE", "CANCEL", "CORRECTION", "DAILY_SUMMARY",
                                         "MARKET_AGGREGATES", "END_OF_DAY", "START_OF_DAY", "TRADE"]
    [summary] = of_type(msgs, "DAILY_SUMMARY")
    assert summary["trades"] == 1 and summary["last"] == "101"  # the day's figures saw the unstored correction
    assert of_type(msgs, "MARKET_AGGREGATES")[0]["total_trades"] == 1
    assert [m.body for m in late] == [m.body for m in live]
    assert [m.body for m in live] == [m.body for m in pub.iter_all()]
    again = Publisher(market)
    assert again.rebuild() == len(live) and [m.body for m in again.iter_all()] == [m.body for m in live]


CRASHING_PUBLISHER = """
import sys
from bondtape.db import connect
from bondtape.dissemination.publisher import Publisher
from bondtape.engine import Engine
from tests.helpers import DEFAULT_EXEC, new

db = connect(sys.argv[1], migrate_schema=False)
engine = Engine(db)
pub = Publisher(db, store_interval=3600).start(engine)
pub.subscribe(lambda m: print(m.body, flush=True))
engine.submit([new(ref=f"k{i}", execution_us=DEFAULT_EXEC + i) for i in range(3)])
print("SENT", flush=True)
sys.stdin.read()  # killed while the feed's writes wait
"""


def test_a_crash_before_the_feed_is_stored_publishes_the_same_bytes_again(market, db_url):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_PUBLISHER, db_url], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root}"})
    sent = []
    for line in proc.stdout:
        if line.strip() == "SENT":
            break
        sent.append(line.rstrip("\n"))
    proc.kill()
    proc.wait(10)
    assert len(sent) == 4
    pub = Publisher(market)
    assert pub.position == 0  # the killed publisher stored nothing
    assert [m.body for m in pub.catch_up()] == sent


def test_a_publisher_whose_position_was_moved_goes_on_without_gap_or_repeat(market):
    engine = Engine(market)
    pub = Publisher(market, store_interval=60).start(engine)
    try:
        got = []
        pub.subscribe(got.append)
        rs = engine.submit([new(ref=f"m{i}", execution_us=DEFAULT_EXEC + i) for i in range(2)])
        other = Publisher(market)
        assert len(other.catch_up()) == 3  # stores the same messages first and moves the position
        assert pub.wait_for(rs[-1].seq)  # the first one's write is refused; it reloads and goes on
        assert pub.errors >= 1
        [r] = engine.submit([new(ref="m9", execution_us=DEFAULT_EXEC + 9)])
        assert pub.wait_for(r.seq)
    finally:
        pub.close()
    assert [json.loads(m.body)["seq"] for m in got] == [1, 2, 3, 4]
    assert [m.body for m in pub.iter_all()] == [m.body for m in got]

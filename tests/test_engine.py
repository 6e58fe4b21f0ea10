import datetime as dt
from decimal import Decimal

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings, strategies as st

from bondtape.engine import Engine, terms_key
from bondtape.journal.projection import replay
from bondtape.journal.schema import CONTROL_BASE, journal, trade_reports
from bondtape.journal.verify import rebuild_in_memory, stored_state, verify
from bondtape.rulebook import default_rulebook
from tests.conftest import HY, IG, R144A, et
from tests.helpers import DEFAULT_EXEC, act, new


def state(db, cn):
    with db.connect() as conn:
        return conn.execute(sa.select(trade_reports).where(trade_reports.c.control_number == cn)).one()


def test_new_report_is_journaled_with_control_number(market):
    engine = Engine(market)
    [r] = engine.submit([new(ref="a1", quantity=Decimal("250000.50"), price=Decimal("101.125"))])
    assert r.accepted and r.control_number == CONTROL_BASE + 1 and r.seq == 1
    assert r.timeliness == "ON_TIME" and r.modifier3 is None
    row = state(market, r.control_number)
    assert row.quantity_c == 25000050 and row.price_u == 101125000
    assert row.status == "ACTIVE" and row.first_control_number == r.control_number
    assert row.settlement_date == "2024-03-06"  # T+2: the T+1 version begins 2024-05-28
    assert row.disseminated and row.contra_type == "C"


def test_settlement_defaults_to_the_regular_cycle_of_the_day(market):
    engine = Engine(market)
    [r] = engine.submit([new(execution_us=et(2024, 6, 3, 10, 0), report_us=et(2024, 6, 3, 10, 1))])
    assert state(market, r.control_number).settlement_date == "2024-06-04"


def test_repeated_client_ref_returns_first_result(market):
    """A retry (the same request, the same terms; its report time may differ) gets the first
    result; another trade under the same reference is refused, not answered as reported
    (it would never be journaled: under-reporting)."""
    engine = Engine(market)
    [first] = engine.submit([new(ref="x")])
    [again, other, also] = engine.submit([new(ref="x", report_us=DEFAULT_EXEC + 90_000_000),
                                          new(ref="x", price=Decimal("50")), new(ref="x")])
    assert again.repeated and again.control_number == first.control_number
    assert also.repeated and also.control_number == first.control_number
    assert not other.accepted and other.reject.code == "CLIENT_REF_REUSED"
    assert f"control number {first.control_number}, with other terms" in other.reject.message
    [later] = engine.submit([new(ref="x", quantity=Decimal("777000"))])  # from the journal, not the batch
    assert later.reject is not None and later.reject.code == "CLIENT_REF_REUSED"
    with market.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(journal)).scalar_one() == 1


def test_a_client_ref_reused_for_another_request_is_refused_not_answered_as_done(market):
    """A cancel reusing the client_ref of an accepted NEW was answered with the NEW's first
    result (accepted, its control number) and nothing was cancelled."""
    engine = Engine(market)
    [first] = engine.submit([new(ref="r1")])
    [other] = engine.submit([new(ref="r2", price=Decimal("98"))])
    [cancel] = engine.submit([act("CANCEL", first.control_number, ref="r1")])
    assert not cancel.accepted and not cancel.repeated
    assert (cancel.reject.code, cancel.reject.field) == ("CLIENT_REF_REUSED", "client_ref")
    assert f"a NEW report, control number {first.control_number}" in cancel.reject.message
    assert state(market, first.control_number).status == "ACTIVE"
    # a real cancel, then the same client_ref for another report, or for a correction of the same one
    [done] = engine.submit([act("CANCEL", first.control_number, ref="c1")])
    assert done.accepted
    again, elsewhere, correct = engine.submit([
        act("CANCEL", first.control_number, ref="c1"),  # the retry: its first answer
        act("CANCEL", other.control_number, ref="c1"),
        act("CORRECT", first.control_number, ref="c1", price=Decimal("98.5"))])
    assert again.repeated and again.accepted and again.control_number == done.control_number
    assert [r.reject.code for r in (elsewhere, correct)] == ["CLIENT_REF_REUSED"] * 2
    assert f"the CANCEL of report {first.control_number}" in elsewhere.reject.message
    assert state(market, other.control_number).status == "ACTIVE"
    # within one batch too: the second request is not a retry of the first
    a, b = engine.submit([new(ref="r3", price=Decimal("97")), act("REVERSE", other.control_number, ref="r3")])
    assert a.accepted and b.reject.code == "CLIENT_REF_REUSED"
    with market.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(journal)).scalar_one() == 4


def test_a_client_ref_with_a_nul_fails_only_its_own_report(market):
    """On PostgreSQL (text cannot hold NUL) such a reference failed the whole batch: the
    other firms' reports in it were not journaled. parse_command refuses it on every
    channel; the engine refuses it too, whoever built the command."""
    engine = Engine(market)
    good, bad, tab = engine.submit([new(ref="ok"), new(ref="N\x00UL", price=Decimal("98")),
                                    new(ref="a\tb", price=Decimal("97"))])
    assert good.accepted
    assert (bad.reject.code, bad.reject.field) == ("FIELD_INVALID", "client_ref")
    assert "control character (U+0000)" in bad.reject.message and "\x00" not in bad.reject.message
    assert (tab.reject.code, tab.reject.field) == ("FIELD_INVALID", "client_ref")
    with market.connect() as conn:
        assert conn.execute(sa.select(journal.c.client_ref)).scalars().all() == ["ok"]


def test_repeat_within_one_batch(market):
    engine = Engine(market)
    a, b = engine.submit([new(ref="y"), new(ref="y")])
    assert a.accepted and b.repeated and a.control_number == b.control_number


def test_same_terms_twice_is_refused_unless_affirmed(market):
    engine = Engine(market)
    [a] = engine.submit([new(ref="1")])
    [b] = engine.submit([new(ref="2")])
    assert b.reject.code == "DUPLICATE_TRADE" and str(a.control_number) in b.reject.message
    [c] = engine.submit([new(ref="3", allow_duplicate=True)])
    assert c.accepted
    # a different firm with the same terms is a different report
    [d] = engine.submit([new(mpid="DLRB", ref="4")])
    assert d.accepted


def test_duplicate_policy_flag(market):
    from bondtape.rulebook import Rulebook, load_versions
    import dataclasses

    rb = Rulebook(load_versions())
    base = rb.at(dt.date(2024, 3, 4))
    flagged = dataclasses.replace(base, duplicate_terms="flag")
    rb._cache = {k: flagged for k in rb._breaks}
    rb.at = lambda d: flagged  # every date: the flag policy
    engine = Engine(market, rb)
    [a] = engine.submit([new()])
    [b] = engine.submit([new()])
    assert b.accepted and b.warning == f"possible duplicate of {a.control_number}"
    assert state(market, b.control_number).duplicate_of == a.control_number


def test_cancel_correct_reverse_lifecycle(market):
    engine = Engine(market)
    [a] = engine.submit([new(ref="n1")])
    [c] = engine.submit([act("CORRECT", a.control_number, ref="c1", price=Decimal("99.75"))])
    assert c.accepted and c.control_number != a.control_number
    old, newer = state(market, a.control_number), state(market, c.control_number)
    assert old.status == "CORRECTED" and old.successor_control_number == c.control_number
    assert newer.prior_control_number == a.control_number and newer.first_control_number == a.control_number
    assert newer.price_u == 99750000
    [x] = engine.submit([act("CANCEL", c.control_number, ref="x1")])
    assert x.accepted and x.control_number == c.control_number
    assert state(market, c.control_number).status == "CANCELLED"
    [again] = engine.submit([act("CANCEL", c.control_number, ref="x2")])
    assert again.reject.code == "REPORT_NOT_ACTIVE"
    # reversal: only after the window
    [b] = engine.submit([new(ref="n2", quantity=Decimal("5000"))])
    [early] = engine.submit([act("REVERSE", b.control_number, ref="r0")])
    assert early.reject.code == "WINDOW_OPEN"
    late = et(2024, 4, 15, 10, 0)
    [too_late] = engine.submit([act("CANCEL", b.control_number, ref="x3", report_us=late)])
    assert too_late.reject.code == "WINDOW_CLOSED"
    [rev] = engine.submit([act("REVERSE", b.control_number, ref="r1", report_us=late)])
    assert rev.accepted and state(market, b.control_number).status == "REVERSED"
    assert state(market, b.control_number).successor_control_number == rev.control_number
    assert verify(market).ok


def test_window_boundary_day_20(market):
    engine = Engine(market)
    [a] = engine.submit([new(ref="w")])
    cal = default_rulebook().at(dt.date(2024, 3, 4)).calendar
    day20 = cal.add_business_days(dt.date(2024, 3, 4), 19)
    at20 = et(day20.year, day20.month, day20.day, 17, 0)
    [ok] = engine.submit([act("CORRECT", a.control_number, ref="c", report_us=at20, price=Decimal("98"))])
    assert ok.accepted


def test_firm_acts_only_on_its_own_reports(market):
    """Another firm's report is answered as an unknown one (it used to be NOT_OWN_REPORT,
    which told the firm the control number exists); tests/test_times_and_ownership.py."""
    engine = Engine(market)
    [a] = engine.submit([new()])
    [r] = engine.submit([act("CANCEL", a.control_number, mpid="DLRB")])
    assert r.reject.code == "REPORT_UNKNOWN"
    assert state(market, a.control_number).status == "ACTIVE"
    [u] = engine.submit([act("CANCEL", 1234567)])
    assert u.reject.code == "REPORT_UNKNOWN"


def test_test_reports_flagged_and_never_disseminated(market):
    engine = Engine(market)
    [a, b] = engine.submit([new(test=True, ref="t"), new(mpid="CERT", ref="t2")])
    assert not state(market, a.control_number).disseminated and state(market, a.control_number).is_test
    assert state(market, b.control_number).is_test
    [m] = engine.submit([act("CANCEL", a.control_number)])
    assert m.reject.code == "TEST_MISMATCH"


def test_dissemination_flags(market):
    engine = Engine(market)
    res = engine.submit([
        new(ref="cust"), new(ref="sell", contra="DLRB", quantity=Decimal("7000")),
        new(mpid="DLRB", ref="buy", side="B", contra="DLRA", quantity=Decimal("7000")),
        new(ref="144a", cusip=R144A), new(ref="merger", merger_transfer=True, quantity=Decimal("9")),
        new(ref="p1", trading_market="P1", quantity=Decimal("11")),
    ])
    flags = [state(market, r.control_number).disseminated for r in res]
    assert flags == [True, True, False, False, False, False]


def test_late_and_as_of(market):
    engine = Engine(market)
    late, asof = engine.submit([
        new(ref="l", report_us=DEFAULT_EXEC + 20 * 60_000_000),
        new(ref="o", execution_us=et(2024, 3, 1, 11, 0), report_us=et(2024, 3, 4, 9, 0)),
    ])
    assert (late.timeliness, late.modifier3) == ("LATE", "Z")
    assert asof.timeliness == "AS_OF_LATE" and state(market, asof.control_number).as_of


def test_batch_sees_its_own_earlier_commands(market):
    engine = Engine(market)
    first = CONTROL_BASE + 1
    res = engine.submit([new(ref="a"), act("CORRECT", first, ref="b", price=Decimal("98")),
                         act("CANCEL", first + 1, ref="c"), act("CANCEL", first, ref="d")])
    assert [r.status for r in res] == ["ACCEPTED", "ACCEPTED", "ACCEPTED", "REJECTED"]
    assert verify(market).ok


def test_replay_from_empty_equals_incremental(market):
    from bondtape.simulate.market import simulate_market

    simulate_market(market, dt.date(2024, 1, 2), 3, 150, seed=3, n_securities=20)
    before = stored_state_normalised(market)
    with market.begin() as conn:
        replay(conn)
    assert stored_state_normalised(market) == before
    assert verify(market).ok


def stored_state_normalised(db):
    from bondtape.journal.verify import normalise

    with db.connect() as conn:
        return {k: normalise(v) for k, v in stored_state(conn).items()}


def test_verify_detects_tampering(market):
    engine = Engine(market)
    [a] = engine.submit([new()])
    with market.begin() as conn:
        conn.execute(trade_reports.update().values(price_u=1))
    report = verify(market)
    assert not report.ok and "price_u" in report.problems[0]


# --- property: any sequence of lifecycle commands leaves a consistent state -------------

ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["NEW", "NEW", "CANCEL", "CORRECT", "REVERSE"]),
        st.integers(0, 12),  # which earlier control number (modulo)
        st.sampled_from(["DLRA", "DLRB"]),
        st.integers(0, 40),  # business-day offset of the action
        st.sampled_from([Decimal("1000"), Decimal("2000000"), Decimal("9000000")]),
        st.booleans(),  # repeat a client ref
    ),
    min_size=1, max_size=25,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ACTIONS)
def test_any_lifecycle_sequence_is_consistent(tmp_path_factory, actions):
    from bondtape.db import connect
    from bondtape.reference.store import upsert_firms, upsert_securities
    from tests.conftest import STANDARD_FIRMS, STANDARD_SECURITIES

    path = tmp_path_factory.mktemp("prop") / "p.db"
    db = connect(f"sqlite:///{path}")
    with db.begin() as conn:
        upsert_securities(conn, STANDARD_SECURITIES)
        upsert_firms(conn, STANDARD_FIRMS)
    engine = Engine(db)
    cal = default_rulebook().at(dt.date(2024, 3, 4)).calendar
    issued: list[int] = []
    accepted_events = 0
    for i, (action, pick, mpid, offset, qty, repeat) in enumerate(actions):
        day = cal.add_business_days(dt.date(2024, 3, 4), offset)
        when = et(day.year, day.month, day.day, 12, 0, i)
        ref = "same" if repeat else f"r{i}"
        if action == "NEW" or not issued:
            cmd = new(mpid=mpid, ref=ref, quantity=qty + i, report_us=when)
        else:
            cn = issued[pick % len(issued)]
            cmd = act(action, cn, mpid=mpid, ref=ref, report_us=when, quantity=qty + 100 + i)
        [res] = engine.submit([cmd])
        if res.accepted and not res.repeated:
            accepted_events += 1
            if res.control_number not in issued:
                issued.append(res.control_number)
    report = verify(db)
    assert report.ok, report.problems
    with db.connect() as conn:
        rows = conn.execute(sa.select(trade_reports)).all()
        assert report.events == accepted_events
        # every closed report names a journal event after it; at most one successor each
        for r in rows:
            assert (r.status == "ACTIVE") == (r.closed_seq is None)
            if r.closed_seq is not None:
                assert r.closed_seq > r.seq
        # each correction chain has exactly one active member or none
        chains: dict[int, list] = {}
        for r in rows:
            chains.setdefault(r.first_control_number, []).append(r.status)
        for statuses in chains.values():
            assert statuses.count("ACTIVE") <= 1
    db.dispose()


def test_sequencer_groups_concurrent_callers_into_commits(market):
    import threading

    from bondtape.engine import Sequencer

    engine = Engine(market)
    batches = []
    engine.listeners.append(lambda events: batches.append(len(events)))
    sequencer = Sequencer(engine)
    results = {}

    def caller(k):
        for i in range(50):
            r = sequencer(new(ref=f"t{k}-{i}", quantity=Decimal(1000 + k * 1000 + i)))
            results[r.client_ref] = r

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    sequencer.close()
    assert len(results) == 400 and all(r.accepted for r in results.values())
    assert sorted(r.seq for r in results.values()) == list(range(1, 401))
    assert sum(batches) == 400 and len(batches) < 400  # some commits carried several callers
    assert verify(market).ok


def test_sequencer_submit_many_answers_each_list_in_order_within_shared_batches(market):
    import threading

    from bondtape.engine import Sequencer

    engine = Engine(market)
    sequencer = Sequencer(engine, max_batch=25)
    answers: dict[int, list] = {}

    def caller(k):
        futures = []
        for j in range(5):  # lists of 10, the third of each has a bad CUSIP
            cmds = [new(ref=f"m{k}-{j}-{i}", quantity=Decimal(1000 + k * 100 + j * 10 + i),
                        cusip="123456789" if i == 2 else IG) for i in range(10)]
            futures.append(sequencer.submit_many(cmds))
        answers[k] = [r for f in futures for r in f.result(60)]

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    single = sequencer(new(ref="single", quantity=Decimal(7)))
    sequencer.close()
    for k, results in answers.items():
        assert [r.client_ref for r in results] == [f"m{k}-{j}-{i}" for j in range(5) for i in range(10)]
        assert [r.accepted for r in results] == [i != 2 for j in range(5) for i in range(10)]
    accepted = sorted(r.seq for rs in answers.values() for r in rs if r.accepted)
    assert accepted == list(range(1, 181)) and single.seq == 181
    assert verify(market).ok


def test_reference_data_changed_after_start_is_seen_by_the_next_batch(market):
    import dataclasses

    from bondtape.reference.model import Firm
    from bondtape.reference.store import upsert_firms, upsert_securities
    from tests.conftest import STANDARD_SECURITIES

    engine = Engine(market)
    base = next(s for s in STANDARD_SECURITIES if s.cusip == IG)
    newcomer = dataclasses.replace(base, cusip="38259P508", symbol="NEWCO.GA")
    [r] = engine.submit([new(ref="n1", cusip=newcomer.cusip)])
    assert r.reject.code == "SECURITY_UNKNOWN"
    with market.begin() as conn:  # imported while the engine runs, with an old timestamp
        upsert_securities(conn, [newcomer], ts=1)
    [r] = engine.submit([new(ref="n2", cusip=newcomer.cusip)])
    assert r.accepted
    with market.begin() as conn:  # a firm loses its membership
        upsert_firms(conn, [Firm("DLRB", "Dealer B", finra_member=False)], ts=1)
    [r] = engine.submit([new(mpid="DLRB", ref="n3")])
    assert r.reject.code == "FIRM_NOT_MEMBER"

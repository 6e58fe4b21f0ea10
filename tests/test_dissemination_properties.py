"""Property tests of the public feed over random markets (hypothesis)."""
from __future__ import annotations

import json
import tempfile
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings, strategies as st

from bondtape.db import connect
from bondtape.dissemination.publisher import DATA_SETS, Publisher
from bondtape.dissemination.schema import feed_messages
from bondtape.engine import Engine
from bondtape.journal.projection import decode_payload
from bondtape.journal.schema import journal
from bondtape.reference.model import Firm
from bondtape.reference.store import upsert_firms, upsert_securities
from bondtape.reporting.commands import Command
from bondtape.rulebook import default_rulebook, volume_cap
from tests.conftest import AGCY, HY, IG, R144A, STANDARD_SECURITIES, et
from tests.helpers import terms

# MPIDs from letters that no public word, symbol or code contains four in a row
MPID = st.text(alphabet="JQVWXZ", min_size=4, max_size=4)
QUANTITY = st.one_of(
    st.sampled_from(["1000000", "1000000.01", "5000000", "5000000.01", "999999.99", "4999999"]),
    st.integers(1, 30_000_000).map(str),
).map(Decimal)

report = st.fixed_dictionaries({
    "cusip": st.sampled_from([IG, HY, R144A, AGCY]),
    "side": st.sampled_from("BS"),
    "contra": st.sampled_from(["C", "A", "D"]),
    "quantity": QUANTITY,
    "price": st.integers(50_000, 150_000).map(lambda p: Decimal(p) / 1000),
    "trading_market": st.sampled_from(["S1", "S1", "S1", "P1"]),
    "merger_transfer": st.sampled_from([False, False, False, True]),
    "test": st.sampled_from([False, False, False, True]),
    "day": st.sampled_from([0, 0, 0, 1]),
    "then": st.sampled_from([None, None, "CANCEL", "CORRECT"]),
})


def _fresh_db(folder: str):
    db = connect(f"sqlite:///{Path(folder) / 'p.db'}")
    with db.begin() as conn:
        upsert_securities(conn, STANDARD_SECURITIES)
    return db


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mpids=st.lists(MPID, min_size=2, max_size=4, unique=True), reports=st.lists(report, min_size=1, max_size=25),
       halt=st.booleans())
def test_feed_properties(mpids, reports, halt):
    with tempfile.TemporaryDirectory(prefix="bt-prop-") as folder:
        _check_market(_fresh_db(folder), mpids, reports, halt)


def _check_market(db, mpids, reports, halt):
    with db.begin() as conn:
        upsert_firms(conn, [Firm(m, f"Firm {m}") for m in mpids])
    engine = Engine(db)
    pub = Publisher(db)
    engine.listeners.append(pub.apply_live)
    live = []
    pub.subscribe(live.append)
    accepted = []
    for i, r in enumerate(reports):
        reporter = mpids[i % len(mpids)]
        contra = mpids[(i + 1) % len(mpids)] if r["contra"] == "D" else r["contra"]
        day = 4 + r["day"] if not accepted or r["day"] else 4
        execution = et(2024, 3, day, 10, 0) + i
        t = terms(cusip=r["cusip"], side=r["side"], contra=contra, quantity=r["quantity"], price=r["price"],
                  execution_us=execution, trading_market=r["trading_market"], merger_transfer=r["merger_transfer"])
        [res] = engine.submit([Command("NEW", reporter, f"n{i}", t, test=r["test"], report_us=execution + 1000)])
        assert res.accepted, res.reject
        accepted.append(res)
        if r["then"] == "CANCEL":
            engine.submit([Command("CANCEL", reporter, f"c{i}", original_control_number=res.control_number,
                                   test=r["test"], report_us=execution + 2000)])
        elif r["then"] == "CORRECT":
            fixed = terms(**{**{f: getattr(t, f) for f in t.__slots__}, "price": r["price"] + 1, "trading_market": "S1"})
            engine.submit([Command("CORRECT", reporter, f"k{i}", fixed, original_control_number=res.control_number,
                                   test=r["test"], report_us=execution + 2000)])
    if halt:
        pub.halt(IG, "T1", at_us=et(2024, 3, 5, 17, 0))
    pub.end_of_day("2024-03-05", at_us=et(2024, 3, 5, 18, 30))

    with db.connect() as conn:
        events = {row.seq: row for row in conn.execute(sa.select(journal))}
        stored = conn.execute(sa.select(feed_messages).order_by(feed_messages.c.pub_order)).all()
    journal_text = " ".join(e.payload + (e.mpid or "") for e in events.values())
    assert any(m in journal_text for m in mpids)  # the identities are there to leak

    # replay from 1 equals the live stream, per data set and across them
    assert [m.body for m in live] == [m.body for m in stored]
    for ds in DATA_SETS:
        again = []
        pub.subscribe(again.append, [ds], {ds: ("", 1)}).close()
        assert [m.body for m in again] == [m.body for m in live if m.data_set == ds]
        numbers = {}
        for m in again:
            numbers.setdefault(m.date, []).append(m.seq)
        assert all(v == list(range(1, len(v) + 1)) for v in numbers.values())

    disseminated: set[int] = set()
    for m in stored:
        body = m.body
        for mpid in mpids:
            assert mpid not in body, (mpid, body)
        msg = json.loads(body)
        if m.msg_type in ("TRADE", "CORRECTION"):
            ev = events[m.journal_seq]
            p = decode_payload(ev.payload)
            assert p["withheld"] is None
            assert not (p["rule_144a"] or p["trading_market"] == "P1" or p["merger_transfer"] or p["is_test"])
            assert not (p["contra_type"] == "D" and p["side"] == "B")
            disseminated.add(ev.control_number)
            quantity = Decimal(p["quantity_c"]).scaleb(-2)
            cap = volume_cap(p["grade"], default_rulebook().at_us(ev.recorded_us))
            shown = msg["trade"]["quantity"]
            if shown.endswith("MM+"):
                assert quantity > cap and shown == ("5MM+" if p["grade"] == "IG" else "1MM+")
            else:
                assert Decimal(shown) == quantity <= cap
        if m.msg_type in ("CANCEL",):
            ev = events[m.journal_seq]
            assert ev.ref_control_number in disseminated  # nothing withheld is ever cancelled in public

    rebuilt = Publisher(db)
    rebuilt.rebuild()
    assert [m.body for m in rebuilt.iter_all()] == [m.body for m in stored]
    db.dispose()


JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 20, 10 ** 20), st.text(max_size=12))
JSON_VALUE = st.recursive(JSON_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                               st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                          max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(message=st.dictionaries(st.text(max_size=8), JSON_VALUE, max_size=8), data=st.data())
def test_encoding_once_gives_the_bytes_of_encoding_the_whole_message(message, data):
    """A trade block is serialised once and put into its messages as text: the message is
    the same text as ``json.dumps`` of the whole (keys sorted, no spaces, ASCII)."""
    from bondtape.dissemination import rules as R

    whole = json.dumps(message, separators=(",", ":"), sort_keys=True, ensure_ascii=True)
    assert R.encode(message) == whole
    spliced = {k: R.Encoded(R.encode(v)) if isinstance(v, dict) and data.draw(st.booleans()) else v
               for k, v in message.items()}
    assert R.encode(spliced) == whole

"""Fuzzing the FIX parser and session (hypothesis): malformed, truncated and hostile input
never crashes the gateway, never writes to the journal, and gets the FIX-rules answer."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bondtape.engine import Result
from bondtape.fix import codec, mapping
from bondtape.fix.server import LogonRefused, Principal
from bondtape.reporting.codes import REJECT_CODES, Rejected
from bondtape.reporting.commands import parse_command
from tests.test_fix_helpers import RawClient, ServerThread, journal_count, lite_market, report_body  # noqa: F401

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# -- the framer and the field parser ---------------------------------------------------------


@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6))
@settings(max_examples=300, deadline=None)
def test_framer_never_raises_and_is_chunking_invariant(data, cuts):
    whole = codec.Framer().feed(data)
    framer = codec.Framer()
    pieces = []
    last = 0
    for cut in sorted(set(c for c in cuts if c < len(data))) + [len(data)]:
        pieces += framer.feed(data[last:cut])
        last = cut
    assert [type(x) for x in pieces if isinstance(x, codec.RawMessage)] == [type(x) for x in whole if isinstance(x, codec.RawMessage)]
    assert [m.data for m in pieces if isinstance(m, codec.RawMessage)] == [m.data for m in whole if isinstance(m, codec.RawMessage)]
    for m in whole:
        if isinstance(m, codec.RawMessage):
            assert int(m.data[-4:-1]) == codec.checksum(m.data[:-7])


def _describe(items):
    return [(type(x).__name__, x.data, getattr(x, "fields", None), getattr(x, "reason", None),
             getattr(x, "begin_string", None), str(getattr(x, "error", None))) for x in items]


_pieces = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda n, v: codec.encode("AE", "A", "B", n, "20240304-15:00:00.000", [(571, v), (31, "99.5")]),
              st.integers(1, 10_000), st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=8)),
    st.builds(lambda n: codec.encode("0", "A", "B", n, "20240304-15:00:00.000", [])[:-3] + b"99\x01", st.integers(1, 99)),
    st.builds(lambda n: codec.encode("0", "A", "B", n, "20240304-15:00:00.000", [])[: 10 + n % 20], st.integers(1, 99)),
    st.just(b"8=FIX.4.4\x019=0000012\x0135=0\x0149=A\x0110=000\x01"),
    st.just(b"8=FIX.4.2\x019=5\x0135=0\x0110=000\x01"),
)


@given(st.lists(_pieces, max_size=8), st.lists(st.integers(0, 600), max_size=5))
@settings(max_examples=300, deadline=None)
def test_framer_fast_path_gives_what_the_general_path_gives(pieces, cuts):
    data = b"".join(pieces)
    outputs = []
    for fast in (True, False):
        framer = codec.Framer(fast=fast)
        got, last = [], 0
        for cut in sorted(set(c for c in cuts if c < len(data))) + [len(data)]:
            got += framer.feed(data[last:cut])
            last = cut
        outputs.append((_describe(got), bytes(framer.buffer)))
    assert outputs[0] == outputs[1]


_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=12)
_fields = st.lists(st.tuples(st.integers(1, 30000), _values), max_size=12)


@given(_fields, st.binary(max_size=60))
@settings(max_examples=200, deadline=None)
def test_valid_messages_survive_garbage_before_them(fields, garbage):
    msg = codec.encode("AE", "A", "B", 7, "20240304-15:00:00.000", fields)
    garbage = garbage.replace(b"8=FIX", b"")
    out = codec.Framer().feed(garbage + b"\x01" + msg)
    messages = [m for m in out if isinstance(m, codec.RawMessage)]
    assert messages and messages[-1].data == msg
    assert messages[-1].fields[5:] == fields


_ae_tags = st.sampled_from([571, 487, 856, 572, 48, 22, 32, 31, 423, 54, 528, 60, 64, 236, 12, 464, 552, 453, 448,
                            447, 452, 802, 523, 20001, 20004, 20005, 20009, 55, 75, 1, 9999])
_ae_values = st.one_of(_values, st.sampled_from(["0", "1", "2", "4", "Y", "N", "C", "P", "17", "20240304-15:00:00",
                                                  "20240306", "111111118", "-5", "1e9999", "NaN"]))


@given(st.lists(st.tuples(_ae_tags, _ae_values), max_size=25))
@settings(max_examples=400, deadline=None)
def test_trade_report_mapping_gives_a_reject_or_a_command(fields):
    raw = codec.RawMessage(b"", [(35, "AE"), (49, "A"), (56, "B"), (34, "2"), (52, "x"), *fields])
    try:
        report = mapping.read_trade_report(raw)
    except mapping.SessionLevelReject as exc:
        assert exc.reason in (1, 6, 13, 15, 16)
        return
    report.fields.setdefault("reporting_mpid", "DLRA")
    if report.reject is None:
        try:
            parse_command(report.fields, channel="fix")
        except Rejected as exc:
            report.reject = exc.reject
    if report.reject is not None:
        assert report.reject.code in REJECT_CODES
        body = mapping.ack_body(report, None, report.reject)
        assert dict(body)[939] == "1"
    else:
        body = mapping.ack_body(report, Result("NEW", report.trade_report_id, "ACCEPTED", control_number=1000000001), None)
    data = codec.encode("AR", "B", "A", 2, "20240304-15:00:00.000", [(t, str(v)) for t, v in body])
    assert [m for m in codec.Framer().feed(data) if isinstance(m, codec.RawMessage)][0].data == data


# -- the session, over a socket ----------------------------------------------------------------

def _authenticate(username: str, password: str, source: str) -> Principal:
    if password != "fuzz-password":
        raise LogonRefused("wrong password")
    return Principal(username, "DLRA")


@pytest.fixture
def fuzz_server(lite_market):
    server = ServerThread(lite_market, authenticator=_authenticate)
    yield server
    server.stop()


_ids = itertools.count()


def _logged_on(server) -> RawClient:
    c = RawClient(server.port, sender=f"FZ{next(_ids)}")
    logon = c.logon(username="fuzzer", password="fuzz-password")
    assert logon is not None and logon.msg_type == "A"
    return c


def _still_serving(server) -> None:
    c = _logged_on(server)
    c.send("1", [(112, "alive")])
    assert c.read_type("0").first(112) == "alive"
    c.close()


@given(data=st.binary(min_size=1, max_size=600), logged_on=st.booleans())
@FUZZ
def test_random_bytes(fuzz_server, lite_market, data, logged_on):
    before = journal_count(lite_market)
    c = _logged_on(fuzz_server) if logged_on else RawClient(fuzz_server.port, sender="FZRAW")
    try:
        c.raw(data)
    except OSError:
        pass
    c.close()
    assert journal_count(lite_market) == before
    _still_serving(fuzz_server)


@given(position=st.integers(0, 10_000), byte=st.integers(0, 255))
@FUZZ
def test_a_corrupted_report_is_ignored(fuzz_server, lite_market, position, byte):
    """One byte changed after BodyLength: the CheckSum no longer matches, so the report is
    garbled: ignored, not answered, not counted; the same MsgSeqNum is expected next."""
    c = _logged_on(fuzz_server)
    msg = bytearray(c.message("AE", report_body("FUZZ1"), seq=2))
    start = msg.index(b"\x01", msg.index(b"9=")) + 1
    position = start + position % (len(msg) - start)
    if msg[position] == byte:
        byte = (byte + 1) % 256
    msg[position] = byte
    c.raw(bytes(msg))
    c.send("1", [(112, "next")], seq=2)
    first = c.read()
    assert first is not None and first.msg_type == "0" and first.first(112) == "next"
    c.close()
    assert journal_count(lite_market) == 0


@given(cut=st.integers(1, 10_000))
@FUZZ
def test_a_truncated_report_is_never_journaled(fuzz_server, lite_market, cut):
    c = _logged_on(fuzz_server)
    msg = c.message("AE", report_body("TRUNC"), seq=2)
    c.raw(msg[: 1 + cut % (len(msg) - 1)])
    c.close()
    assert journal_count(lite_market) == 0
    _still_serving(fuzz_server)


_hostile_tags = st.sampled_from([571, 487, 572, 22, 32, 31, 54, 60, 64, 453, 448, 447, 452, 552, 35, 34, 49, 56,
                                 43, 122, 9, 10, 8, 1, 20009, 99999])


@given(st.lists(st.tuples(_hostile_tags, _ae_values), max_size=15), st.sampled_from(["AE", "AE", "D", "ZZ", "4", "2", "1"]))
@FUZZ
def test_well_framed_hostile_messages_get_the_fix_answer(fuzz_server, lite_market, fields, msg_type):
    """No CUSIP and nothing to act on: nothing can be journaled. Each message is answered
    by the rules: Reject (35=3), a rejecting AR, a BusinessMessageReject, a gap fill's
    silence, a resend, a heartbeat, or a logout for a broken header."""
    c = _logged_on(fuzz_server)
    c.send(msg_type, fields)
    c.send("1", [(112, "probe")], seq=3)
    answers = []
    while True:
        m = c.read(timeout=10)
        if m is None:
            break
        answers.append(m)
        if m.msg_type == "0" and m.first(112) == "probe":
            break
        if m.msg_type == "2":  # the hostile message did not count: fill the gap, probe again
            now = codec.utc_timestamp(0)
            c.send("4", [(123, "Y"), (36, 3)], seq=int(m.first(7)), poss_dup=True, orig_sending_time=now)
            c.send("1", [(112, "probe")], seq=3, poss_dup=True, orig_sending_time=now)
    c.close()
    assert journal_count(lite_market) == 0
    kinds = {m.msg_type for m in answers}
    assert kinds <= {"3", "AR", "j", "0", "2", "4", "5"}, kinds
    for m in answers:
        if m.msg_type == "AR":
            assert m.first(939) == "1" and m.first(20012) in REJECT_CODES
        if m.msg_type == "3":
            assert m.first(373) is not None and m.first(45) is not None
    _still_serving(fuzz_server)

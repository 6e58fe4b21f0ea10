"""FIX 4.4 session rules at the acceptor, with a raw client that can break them: garbled
messages, rejects (35=3), sequence gaps and resends, resets, logon refusals, heartbeats,
TLS, and the session's state on disk."""
from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
import time

import pytest
import sqlalchemy as sa

from bondtape.fix import codec
from bondtape.fix.schema import fix_messages, fix_sessions
from tests.conftest import IG, make_cusip
from tests.test_fix_helpers import (  # noqa: F401 - lite_market is a fixture
    EXEC_UTC, RawClient, ServerThread, add_users, journal_count, lite_market, report_body, stored_acks)


@pytest.fixture
def srv(market):
    add_users(market, ("alice", "DLRA"))
    server = ServerThread(market)
    yield server
    server.stop()


@pytest.fixture
def lite_srv(lite_market):
    add_users(lite_market, ("alice", "DLRA"), ("bob", "DLRB"))
    add_users(lite_market, ("victor", "DLRC"), roles=("viewer",))
    server = ServerThread(lite_market)
    yield server
    server.stop()


@pytest.fixture
def lite_client(lite_srv):
    c = RawClient(lite_srv.port)
    logon = c.logon()
    assert logon is not None and logon.msg_type == "A"
    yield c
    c.close()


@pytest.fixture
def client(srv):
    c = RawClient(srv.port)
    logon = c.logon()
    assert logon is not None and logon.msg_type == "A"
    yield c
    c.close()


def test_logon_answer_and_sequence_numbers_on_disk(srv, client, market):
    client.send("AE", report_body("R1"))
    ack = client.read_type("AR")
    assert ack.first(939) == "0" and ack.first(34) == "2"
    client.send("5", [])
    assert client.read_type("5") is not None
    assert client.closed()
    with market.connect() as conn:
        row = conn.execute(sa.select(fix_sessions)).one()
        stored = conn.execute(sa.select(fix_messages.c.seq, fix_messages.c.msg_type)).all()
    assert (row.sender_comp_id, row.mpid, row.next_in_seq, row.next_out_seq) == ("FIRMA", "DLRA", 4, 4)
    assert stored == [(2, "AR")]  # application messages only: the rest is gap-filled on resend

    again = RawClient(srv.port)
    again.seq = 4
    logon = again.logon()
    assert logon.msg_type == "A" and logon.first(34) == "4"
    again.close()


def test_logon_with_a_gap_is_answered_then_a_resend_is_asked(lite_srv):
    c = RawClient(lite_srv.port)
    c.seq = 5  # the firm thinks it sent 1..4 already
    logon = c.logon()
    assert logon.msg_type == "A"
    rr = c.read_type("2")
    assert (rr.first(7), rr.first(16)) == ("1", "0")
    c.send("4", [(123, "Y"), (36, 6)], seq=1, poss_dup=True, orig_sending_time=codec.utc_timestamp(0))
    c.send("1", [(112, "filled")], seq=6)
    assert c.read_type("0").first(112) == "filled"
    c.close()


def test_garbled_messages_are_ignored(lite_client, lite_market):
    good = lite_client.message("1", [(112, "T1")], seq=2)
    bad_sum = good[:-4] + (b"000" if good[-4:-1] != b"000" else b"001") + b"\x01"
    length = good.split(b"\x01")[1]  # 9=NN
    bad_length = good.replace(length, b"9=%d" % (int(length[2:]) - 10), 1)  # too short
    lite_client.raw(bad_sum + bad_length + b"garbage\x01\x01=junk")
    lite_client.raw(good)  # seq 2 is still expected: the garbled ones did not count
    hb = lite_client.read()
    assert hb.msg_type == "0" and hb.first(112) == "T1"
    assert journal_count(lite_market) == 0


def test_first_message_must_be_logon(lite_srv):
    c = RawClient(lite_srv.port)
    c.send("AE", report_body("R1"))
    assert c.closed()
    c.close()


@pytest.mark.parametrize("body, reason, tag", [
    ([(487, 0), (48, "x")], "1", "571"),  # TradeReportID missing
    ([(571, "R1"), (48, "a"), (48, "b")], "13", "48"),  # tag appears twice
    ([(571, "R1"), (453, 3), (448, "DLRA"), (447, "C"), (452, 1)], "16", "453"),  # NumInGroup wrong
    ([(571, "R1"), (447, "C")], "15", "447"),  # group field outside its group
])
def test_structural_problems_get_a_session_reject(lite_client, lite_market, body, reason, tag):
    lite_client.send("AE", body)
    rej = lite_client.read_type("3")
    assert (rej.first(373), rej.first(371), rej.first(45), rej.first(372)) == (reason, tag, "2", "AE")
    lite_client.send("1", [(112, "next")])  # the rejected message counted: seq 3 is next
    assert lite_client.read_type("0").first(112) == "next"
    assert journal_count(lite_market) == 0


def test_bad_fields_get_a_session_reject(lite_client):
    msg = lite_client.message("1", [(112, "X")], seq=2)
    msg = msg.replace(b"112=X", b"abc=X")
    data = msg[: msg.rindex(b"10=")]
    lite_client.raw(data + f"10={codec.checksum(data):03d}\x01".encode())
    rej = lite_client.read_type("3")
    assert rej.first(373) == "0" and rej.first(45) == "2"


def test_message_types(lite_client):
    lite_client.send("ZZ", [(1, "x")])
    rej = lite_client.read_type("3")
    assert rej.first(373) == "11"
    lite_client.send("D", [(11, "order")])
    bmr = lite_client.read_type("j")
    assert bmr.first(380) == "3" and bmr.first(372) == "D"


def test_sequence_too_low_logs_out(lite_client):
    lite_client.send("1", [(112, "x")], seq=1)
    logout = lite_client.read_type("5")
    assert "MsgSeqNum too low" in logout.first(58)
    assert lite_client.closed()


def test_gap_is_filled_after_a_resend_request(client, market):
    client.send("AE", report_body("R5"), seq=5)  # 2..4 missing
    rr = client.read_type("2")
    assert (rr.first(7), rr.first(16)) == ("2", "0")
    assert journal_count(market) == 0  # not processed out of order
    now = codec.utc_timestamp(0)
    client.send("4", [(123, "Y"), (36, 5)], seq=2, poss_dup=True, orig_sending_time=now)
    client.send("AE", report_body("R5"), seq=5, poss_dup=True, orig_sending_time=now)
    ack = client.read_type("AR")
    assert ack.first(571) == "R5" and ack.first(939) == "0"
    client.send("AE", report_body("R5"), seq=5, poss_dup=True, orig_sending_time=now)  # a duplicate: ignored
    client.send("1", [(112, "after")], seq=6)
    assert client.read_type("0").first(112) == "after"
    assert journal_count(market) == 1


def test_resend_request_is_answered_from_the_store(client):
    client.send("AE", report_body("R1"))
    first = client.read_type("AR")
    client.send("AE", report_body("R2", price="98"))
    second = client.read_type("AR")
    client.send("2", [(7, 1), (16, 0)])
    fill = client.read()
    assert fill.msg_type == "4" and fill.first(123) == "Y" and (fill.first(34), fill.first(36)) == ("1", "2")
    r1, r2 = client.read(), client.read()
    assert [r1.first(34), r2.first(34)] == ["2", "3"]
    assert r1.first(43) == "Y" and r1.first(122) == first.first(52) and r1.first(818) == first.first(818)
    assert r2.first(818) == second.first(818)


def test_sequence_reset_reset(lite_client):
    lite_client.send("4", [(36, 10)], seq=99)
    lite_client.send("1", [(112, "ten")], seq=10)
    assert lite_client.read_type("0").first(112) == "ten"
    lite_client.send("4", [(36, 3)], seq=11)  # backwards: rejected
    assert lite_client.read_type("3").first(373) == "5"


def test_reset_seq_num_flag(srv, client, market):
    client.send("AE", report_body("R1"))
    client.read_type("AR")
    client.close()
    again = RawClient(srv.port)
    logon = again.logon(reset=True)
    assert logon.first(141) == "Y" and logon.first(34) == "1"
    with market.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(fix_messages)).scalar_one() == 0
    again.close()


def test_logon_refusals(lite_srv, lite_client, lite_market):
    def refused(c: RawClient, **kw) -> str:
        logout = c.logon(**kw)
        assert logout is not None and logout.msg_type == "5", logout
        text = logout.first(58)
        assert c.closed()
        c.close()
        return text

    assert "logon refused" in refused(RawClient(lite_srv.port, sender="FIRMZ"), password="wrong-password-123")
    assert "already logged on" in refused(RawClient(lite_srv.port))  # FIRMA is live
    assert "another firm" in refused(RawClient(lite_srv.port), username="bob")
    assert "TargetCompID" in refused(RawClient(lite_srv.port, sender="FIRMZ", target="NOTUS"))
    assert "may not report" in refused(RawClient(lite_srv.port, sender="FIRMV"), username="victor")
    assert "HeartBtInt" in refused(RawClient(lite_srv.port, sender="FIRMZ"), heartbeat=0)
    assert journal_count(lite_market) == 0


def test_compid_change_mid_session(lite_client):
    lite_client.sender = "OTHER"
    lite_client.send("1", [(112, "x")])
    assert lite_client.read_type("3").first(373) == "9"
    assert lite_client.read_type("5") is not None


def test_heartbeat_and_test_request(lite_srv):
    c = RawClient(lite_srv.port)
    c.logon(heartbeat=1)
    assert c.read(timeout=5).msg_type in ("0", "1")  # idle: a heartbeat, then a TestRequest
    tr = c.read_type("1", timeout=5)
    c.send("0", [(112, tr.first(112))])
    assert c.read_type("0", timeout=5) is not None  # still logged on
    # Silence: logged out after the TestRequest goes unanswered.
    logout = c.read_type("5", timeout=10)
    assert "TestRequest" in logout.first(58)
    c.close()


def test_engine_unavailable_is_a_business_reject(lite_srv, lite_client, lite_market):
    lite_srv.sequencer.close()
    lite_client.send("AE", report_body("R1"))
    bmr = lite_client.read_type("j")
    assert bmr.first(380) == "4" and bmr.first(379) == "R1"
    assert journal_count(lite_market) == 0


def test_reject_codes_match_other_channels(lite_client):
    lite_client.send("AE", report_body("R1", cusip=make_cusip("12345678")[:8] + "0"))
    ack = lite_client.read_type("AR")
    assert ack.first(939) == "1" and ack.first(20012) in ("CUSIP_CHECK_DIGIT", "SECURITY_UNKNOWN")
    lite_client.send("AE", report_body("R2", extra=[(20004, "XX")]))
    ack = lite_client.read_type("AR")
    assert ack.first(20012) == "FIELD_INVALID" and ack.first(20013) == "trading_market"
    assert ack.first(58).startswith("FIELD_INVALID: trading_market 'XX' is not accepted")


def test_a_missing_security_id_source_is_named_missing_not_none(lite_client):
    body = [(t, v) for t, v in report_body("R1") if t != 22]
    lite_client.send("AE", body)
    ack = lite_client.read_type("AR")
    assert ack.first(939) == "1" and ack.first(20012) == "FIELD_INVALID" and ack.first(20013) == "cusip"
    assert ack.first(58) == ("FIELD_INVALID: SecurityIDSource (22) is missing: it is required with SecurityID (48), "
                             "and must be 1 (CUSIP)")
    lite_client.send("AE", [(t, 4 if t == 22 else v) for t, v in report_body("R2")])
    assert lite_client.read_type("AR").first(58) == ("FIELD_INVALID: SecurityIDSource (22) '4' is not accepted: "
                                                     "1 (CUSIP) with SecurityID (48)")


def _journal_refs(db) -> list:
    from bondtape.journal.schema import journal

    with db.connect() as conn:
        return [r[0] for r in conn.execute(sa.select(journal.c.client_ref).order_by(journal.c.seq))]


def test_a_trade_report_id_that_is_not_printable_ascii_is_refused_and_the_session_goes_on(srv, client, market):
    """A NUL in TradeReportID (571) failed the engine's whole batch on PostgreSQL (other reports
    in it were answered 'resend it later'), the firm got no answer and every resend failed the
    same way; UTF-8 bytes were journaled garbled (latin-1: 'é' as 'Ã©')."""
    utf8 = "R-é".encode("utf-8").decode("latin-1")  # the bytes a UTF-8 firm sends, as read
    client.raw(client.message("AE", report_body("GOOD1")) + client.message("AE", report_body("N\x00UL", qty="200000")))
    good, bad = client.read_type("AR"), client.read_type("AR")
    assert (good.first(571), good.first(939)) == ("GOOD1", "0")
    assert bad.first(571) == "N\x00UL" and bad.first(939) == "1"  # echoed as sent: the firm matches it
    assert (bad.first(20012), bad.first(20013)) == ("FIELD_INVALID", "client_ref")
    assert "control character (0x00)" in bad.first(58) and "printable ASCII" in bad.first(58)
    for ref, says in ((utf8, "not ASCII (0xC3)"), ("ESC\x1b[2J", "control character (0x1B)"), ("DEL\x7f", "(0x7F)")):
        client.send("AE", report_body(ref, qty="300000"))
        ack = client.read_type("AR")
        assert ack.first(571) == ref and (ack.first(20012), ack.first(20013)) == ("FIELD_INVALID", "client_ref")
        assert says in ack.first(58), ack.first(58)
    # a reference acted on, and a party, are ASCII too (and never looked up otherwise)
    client.send("AE", [(571, "X1"), (487, 1), (572, "GO\x00D1")])
    ack = client.read_type("AR")
    assert (ack.first(20012), ack.first(20013)) == ("FIELD_INVALID", "original_control_number")
    client.send("AE", report_body("P1", reporting="DL\x00A"))
    ack = client.read_type("AR")
    assert (ack.first(20012), ack.first(20013)) == ("FIELD_INVALID", "reporting_mpid")
    client.send("AE", report_body("GOOD2", qty="400000"))
    assert client.read_type("AR").first(939) == "0"
    assert _journal_refs(market) == ["GOOD1", "GOOD2"]
    # The answers stay durable; the one echoing a NUL cannot be stored (PostgreSQL): a resend
    # gap-fills it. The session is not stuck on it.
    client.send("2", [(7, 1), (16, 0)])
    seen = []
    while True:
        m = client.read()
        seen.append((m.msg_type, m.first(34), m.first(571), m.first(36)))
        if m.msg_type == "AR" and m.first(571) == "GOOD2":
            break
    assert seen[0] == ("4", "1", None, "2") and seen[1] == ("AR", "2", "GOOD1", None)
    assert ("4", "3", None, "4") in seen  # the NUL one's place
    client.send("1", [(112, "alive")])
    assert client.read_type("0").first(112) == "alive"


def test_a_logon_with_a_nul_in_its_comp_id_is_refused_not_dropped(srv):
    """SenderCompID is looked up in the database: on PostgreSQL a NUL in it raised there,
    and the connection was dropped without an answer."""
    c = RawClient(srv.port, sender="FIRM\x00A")
    logout = c.logon()
    assert logout is not None and logout.msg_type == "5"
    assert "SenderCompID (49)" in logout.first(58) and "printable ASCII" in logout.first(58)
    assert c.closed()
    c.close()
    c = RawClient(srv.port)
    assert c.logon(username="ali\x00ce").first(58).startswith("Username (553)")
    c.close()


def test_a_blank_trade_report_id_is_missing(lite_client, lite_market):
    """571 of spaces was accepted and journaled with client_ref NULL: no duplicate protection."""
    lite_client.send("AE", report_body("   "))
    rej = lite_client.read_type("3")
    assert (rej.first(373), rej.first(371), rej.first(45)) == ("1", "571", "2")
    assert journal_count(lite_market) == 0
    lite_client.send("1", [(112, "next")])
    assert lite_client.read_type("0").first(112) == "next"


def test_digits_that_are_not_ascii_get_the_documented_answers(lite_srv, lite_client, lite_market):
    """'²' passes str.isdigit() and int() refuses it: the connection dropped with no answer
    and the report was lost. Now each is answered as any value that is not a number."""
    body = [(t, "1\xb2" if t == 453 else v) for t, v in report_body("SUP1")]
    lite_client.send("AE", body)
    rej = lite_client.read_type("3")
    assert (rej.first(373), rej.first(371), rej.first(45)) == ("6", "453", "2")
    lite_client.send("AE", report_body("SUP3") + [(64, "2024030\xb2")])
    ack = lite_client.read_type("AR")
    assert (ack.first(571), ack.first(20012), ack.first(20013)) == ("SUP3", "DATE_INVALID", "settlement_date")
    lite_client.send("2", [(7, "\xb2"), (16, 0)])
    assert (lambda r: (r.first(373), r.first(371)))(lite_client.read_type("3")) == ("6", "7")
    lite_client.send("4", [(123, "Y"), (36, "\xb9")])
    assert (lambda r: (r.first(373), r.first(371)))(lite_client.read_type("3")) == ("6", "36")
    lite_client.send("1", [(112, "still here")])
    assert lite_client.read_type("0").first(112) == "still here"
    seq = lite_client.seq
    bad_seq = lite_client.message("1", [(112, "x")]).replace(b"\x0134=%d\x01" % seq, b"\x0134=\xb2\x01")
    data = bad_seq[: bad_seq.rindex(b"10=")]
    lite_client.raw(data + f"10={codec.checksum(data):03d}\x01".encode())
    assert "MsgSeqNum (34)" in lite_client.read_type("5").first(58)
    assert lite_client.closed()
    c = RawClient(lite_srv.port, sender="FIRMB")
    logout = c.logon(username="bob", heartbeat="3\xb2")
    assert logout.msg_type == "5" and "HeartBtInt" in logout.first(58)
    c.close()
    assert journal_count(lite_market) == 0


def test_heart_bt_int_is_read_whole(lite_srv):
    """108=0000050000 passed the 1..3600 check (only 6 characters were read) and was echoed as 50000."""
    c = RawClient(lite_srv.port)
    logout = c.logon(heartbeat="0000050000")
    assert logout.msg_type == "5" and "HeartBtInt (108) must be 1 to 3600" in logout.first(58)
    c.close()
    c = RawClient(lite_srv.port)
    logon = c.logon(heartbeat="0030")
    assert logon.msg_type == "A" and logon.first(108) == "30"
    c.close()


def test_a_two_sided_report_gets_an_ack_refusing_no_sides(lite_client, lite_market):
    """NoSides=2 with its two sides (Side 54 and the parties repeated) got a session Reject
    ('tag 54 appears more than once', no 571) instead of the Ack that 552=2 with one side gets."""
    body = [(571, "TWO1"), (487, 0), (856, 0), (48, IG), (22, 1), (32, 100000), (31, "99.5"), (60, EXEC_UTC),
            (552, 2),
            (54, 1), (453, 1), (448, "DLRA"), (447, "C"), (452, 1), (528, "P"),
            (54, 2), (453, 1), (448, "DLRB"), (447, "C"), (452, 17), (528, "P")]
    lite_client.send("AE", body)
    ack = lite_client.read_type("AR")
    assert (ack.first(571), ack.first(939), ack.first(150)) == ("TWO1", "1", "8")
    assert (ack.first(20012), ack.first(20013)) == ("FIELD_INVALID", "NoSides (552)")
    assert ack.first(58) == "FIELD_INVALID: NoSides (552) '2' is not accepted: 1 (each firm reports its own side)"
    assert ack.first(48) == IG
    assert journal_count(lite_market) == 0


def _stall(c: RawClient, count: int = 300) -> None:
    """Make the acceptor's answers pile up unread: big TestRequests, each echoed in a Heartbeat."""
    big = "Z" * 60000
    c.raw(b"".join(c.message("1", [(112, f"{k}{big}")]) for k in range(count)))


def _logon_again_within(port: int, seconds: float, seq: int) -> float | None:
    """Seconds until a new connection's logon of FIRMA is accepted, or None."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        c = RawClient(port)
        c.seq = seq
        answer = c.logon(heartbeat=1)
        c.close()
        if answer is not None and answer.msg_type == "A":
            return time.monotonic() - start
        time.sleep(0.5)
    return None


def test_a_firm_that_stops_reading_is_dropped_and_can_log_on_again(lite_srv):
    """The writer blocked on the unread bytes, the TestRequest timer behind it, and the close
    waited for ever: every new logon of the session was refused 'already logged on'."""
    c = RawClient(lite_srv.port)
    assert c.logon(heartbeat=1).msg_type == "A"
    _stall(c)
    took = _logon_again_within(lite_srv.port, 20, 302)
    c.close()
    assert took is not None and took < 15, took


def test_a_firm_that_sends_but_does_not_read_is_dropped(lite_srv):
    """Its heartbeats keep it from looking silent: the bound on a send drops it."""
    c = RawClient(lite_srv.port)
    assert c.logon(heartbeat=1).msg_type == "A"
    _stall(c)
    stop = threading.Event()

    def heartbeats():
        while not stop.wait(0.3):
            try:
                c.send("0", [])
            except OSError:
                return

    beat = threading.Thread(target=heartbeats, daemon=True)
    beat.start()
    try:
        deadline = time.monotonic() + 20
        dropped = False
        while time.monotonic() < deadline and not dropped:
            time.sleep(0.5)
            dropped = not lite_srv.call(_is_live(lite_srv.server))
        assert dropped
    finally:
        stop.set()
        beat.join(2)
        c.close()


async def _is_live(server) -> bool:
    return bool(server.live)


async def _outbound_state(server) -> tuple[int, int, float]:
    """(messages queued for the writer, the queue's size, seconds since the reader last read)
    of the one live session, read on the acceptor's loop."""
    conn = next(iter(server.live.values()))
    return conn.out.qsize(), conn.out.maxsize, time.monotonic() - conn.last_recv


def test_a_test_request_that_found_the_queue_full_is_not_waited_on(lite_srv):
    """35c1d80: the timer marked a TestRequest as sent when the full outbound queue had
    skipped it, and 1.2 x HeartBtInt later logged the firm out for not answering it. Here the
    queue is full (the firm stopped reading for a moment) when the TestRequest falls due, the
    firm then reads again and answers every TestRequest it gets: it is not logged out. A
    TestRequest that does go out and is not answered still ends the session."""
    hb = 1
    c = RawClient(lite_srv.port)
    assert c.logon(heartbeat=hb).msg_type == "A"
    # The firm does not read: its answers fill the socket buffers and the writer waits on them.
    _stall(c, count=150)
    server = lite_srv.server
    queued, deadline = -1, time.monotonic() + 10
    while time.monotonic() < deadline:  # until the writer has stopped taking from the queue
        time.sleep(0.3)
        now_queued, size, _ = lite_srv.call(_outbound_state(server))
        if now_queued == queued:
            break
        queued = now_queued
    assert 0 <= queued < size, (queued, size)
    # Then exactly enough TestRequests (their Heartbeats queued) to fill the queue, in one
    # go, and silence: the reader reads them all and then nothing.
    c.raw(b"".join(c.message("1", [(112, f"fill{k}")]) for k in range(size - queued)))
    due = hb * 1.2 + 0.5  # the gateway's silence before a TestRequest
    deadline = time.monotonic() + 10
    while True:
        queued, size, silent = lite_srv.call(_outbound_state(server))
        if silent >= due + 0.5 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    # The setup worked: a TestRequest has been due for two timer ticks or more, with no room.
    assert queued == size and silent >= due + 0.5, (queued, size, silent)

    # The firm reads again, answers each TestRequest, and sends nothing else.
    test_requests: list[float] = []
    resumed = time.monotonic()
    while time.monotonic() - resumed < 2 * due:  # past when the old timer logged it out
        try:
            m = c.read(timeout=0.5)
        except socket.timeout:
            continue
        if m is None:
            pytest.fail("the gateway closed the connection")
        if m.msg_type == "5":
            pytest.fail(f"logged out without a TestRequest to answer: {m.first(58)!r}; "
                        f"TestRequests received: {len(test_requests)}")
        if m.msg_type == "1":
            test_requests.append(time.monotonic())
            c.send("0", [(112, m.first(112))])
    assert test_requests, "the gateway never sent its TestRequest once the queue had room"
    c.send("1", [(112, "still on")])
    assert c.read_type("0", timeout=5).first(112) == "still on"

    # Now the firm reads but answers nothing: the TestRequest it gets ends the session.
    while True:
        m = c.read(timeout=3 * due)
        assert m is not None, "the gateway closed the connection without a Logout"
        if m.msg_type == "1":
            unanswered = time.monotonic()
            break
        assert m.msg_type != "5", m.first(58)
    logout = c.read_type("5", timeout=3 * due)
    assert logout.first(58) == "no answer to TestRequest (35=1)"
    assert time.monotonic() - unanswered >= hb * 1.2
    assert c.closed()
    c.close()


def _read_resend(c: RawClient, last_ref: str, rate: float, hb: float, stop_after: int | None = None) -> dict:
    """Read what a ResendRequest brings as a firm on a slow link would: at most ``rate``
    bytes a second, a Heartbeat every ``hb`` seconds as FIX asks of it; until the resent Ack
    of ``last_ref`` (or ``stop_after`` bytes). What arrived, and when."""
    start = time.monotonic()
    seen = {"bytes": 0, "acks": [], "seqs": [], "closed": False, "last_at": None}
    beat = start
    c.sock.settimeout(2 * hb + 5)
    while True:
        try:
            data = c.sock.recv(16384)
        except (ConnectionResetError, socket.timeout):
            data = b""
        if not data:
            seen["closed"] = True
            return seen
        seen["bytes"] += len(data)
        messages = [m for m in c.framer.feed(data) if isinstance(m, codec.RawMessage)]
        for i, m in enumerate(messages):
            if m.first(43) != "Y":
                continue  # (a Heartbeat before the resend)
            seen["seqs"].append((int(m.first(34)), int(m.first(36)) if m.msg_type == "4" else None))
            if m.msg_type == "AR":
                seen["acks"].append(m.first(571))
                if m.first(571) == last_ref:
                    seen["last_at"] = time.monotonic()
                    c.pending += messages[i + 1:]  # what came after it, for c.read()
                    return seen
        now = time.monotonic()
        if now - beat >= hb:
            c.send("0", [])
            beat = now
        if stop_after is not None and seen["bytes"] >= stop_after:
            return seen
        pause = start + seen["bytes"] / rate - now
        if pause > 0:
            time.sleep(pause)


def _dropped_within(srv: ServerThread, c: RawClient, seconds: float, hb: float) -> float | None:
    """Seconds until the gateway drops the session while the firm keeps sending Heartbeats
    (and reads nothing), or None."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            c.send("0", [])
        except OSError:  # reset: the gateway has dropped it
            pass
        if not srv.call(_is_live(srv.server)):
            return time.monotonic() - start
        time.sleep(hb)
    return None


def test_a_long_resend_to_a_firm_that_reads_is_not_taken_for_a_stuck_reader(lite_srv):
    """eb76d0a bounded every send by 2.4 x HeartBtInt (5 s here). A resend went out as one
    send (the whole range in one write), so a firm reading it steadily over a link slower
    than the burst was dropped as a firm that does not read ('took none of our messages for
    5 s') about 6 s into it, and each new logon's ResendRequest would end the same way. The
    bound is now on progress: the firm is dropped only after taking nothing for that long,
    and a resend goes out piece by piece. One that stops reading mid-resend is still dropped."""
    hb, rate, n = 1, 1_500_000, 48_000  # about 14 MB of resent Acks: over 9 s at 1.5 MB/s
    send_timeout = 5.0  # 2.4 x HeartBtInt, at least 5 s
    c = RawClient(lite_srv.port, rcvbuf=64 * 1024)
    assert c.logon(heartbeat=hb).msg_type == "A"
    refs, last_out = stored_acks(c, n)

    c.send("2", [(7, 1), (16, 0)])
    asked = time.monotonic()
    seen = _read_resend(c, refs[-1], rate, hb)
    assert not seen["closed"], (f"dropped {time.monotonic() - asked:.1f} s into the resend, "
                                f"after {seen['bytes']} bytes and {len(seen['acks'])} of {n} Acks")
    assert seen["acks"] == refs  # every stored Ack, once, in order (PossDupFlag=Y)
    expect = 1
    for seq, new_seq in seen["seqs"]:  # gap fills for the rest: 1..last_out without a hole
        assert seq == expect, (seq, expect)
        expect = new_seq if new_seq is not None else seq + 1
    assert expect == last_out + 1
    # The burst took the firm well over the send bound: the old bound would have dropped it.
    assert seen["last_at"] - asked > 1.4 * send_timeout, seen["last_at"] - asked
    c.send("1", [(112, "after the resend")])
    while (beat := c.read_type("0")).first(112) is None:  # the gateway's own Heartbeats first
        pass
    assert beat.first(112) == "after the resend"

    # The same resend, and the firm stops reading a little way into it (its Heartbeats go on).
    c.send("2", [(7, 1), (16, 0)])
    seen = _read_resend(c, refs[-1], rate, hb, stop_after=1_000_000)
    assert not seen["closed"] and seen["bytes"] >= 1_000_000
    dropped = _dropped_within(lite_srv, c, send_timeout + 10, hb)
    c.close()
    assert dropped is not None, "a firm that stopped reading in the middle of a resend was not dropped"


def test_a_firm_that_stops_reading_in_a_resend_over_tls_is_dropped(lite_market, tmp_path):
    """Under TLS the old resend's one big write went whole into the buffer beneath the TLS
    layer, and the send returned at once: a firm that then stopped reading (still sending
    Heartbeats) was never dropped, and its next logon was refused 'already logged on'. The
    resend's pieces now wait for the firm, and the wait counts the bytes below TLS."""
    from bondtape.fix import tls_context

    hb, send_timeout = 1, 5.0
    add_users(lite_market, ("alice", "DLRA"))
    cert, key = _self_signed(tmp_path)
    srv = ServerThread(lite_market, ssl=tls_context(str(cert), str(key)))
    try:
        tls = ssl.create_default_context(cafile=str(cert))
        c = RawClient(srv.port, tls=tls, rcvbuf=64 * 1024)
        assert c.logon(heartbeat=hb).msg_type == "A"
        refs, _ = stored_acks(c, 28_000)  # about 8 MB: more than the socket buffers hold
        c.send("2", [(7, 1), (16, 0)])
        seen = _read_resend(c, refs[-1], 1_000_000, hb, stop_after=300_000)
        assert not seen["closed"] and seen["bytes"] >= 300_000
        dropped = _dropped_within(srv, c, send_timeout + 10, hb)
        c.close()
        assert dropped is not None, "a firm that stopped reading in the middle of a resend was not dropped"
        again = RawClient(srv.port, tls=tls)  # the session is free again
        again.seq = c.seq
        assert again.logon(heartbeat=hb).msg_type == "A"
        again.close()
    finally:
        srv.stop()


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls(lite_market, tmp_path):
    from bondtape.fix import tls_context

    add_users(lite_market, ("alice", "DLRA"))
    cert, key = _self_signed(tmp_path)
    server = ServerThread(lite_market, ssl=tls_context(str(cert), str(key)))
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        c = RawClient(server.port, tls=ctx)
        assert c.logon().msg_type == "A"
        c.send("AE", report_body("T1"))
        assert c.read_type("AR").first(939) == "0"
        c.close()
        plain = RawClient(server.port)  # no TLS: no session
        plain.send("A", [(98, 0), (108, 30), (553, "alice"), (554, "x")])
        assert plain.closed()
        plain.close()
    finally:
        server.stop()


@pytest.mark.parametrize("stop_with", ["SIGINT", "SIGTERM"])
def test_cli_serve(market, db_url, stop_with):
    import re
    import signal
    import subprocess
    import sys

    add_users(market, ("alice", "DLRA"))
    # started as a shell starts a background job: SIGINT ignored; it must stop all the same
    proc = subprocess.Popen([sys.executable, "-m", "bondtape", "fix", "serve", "--db", db_url, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = proc.stdout.readline()
        found = re.search(r"on 127\.0\.0\.1:(\d+)", line)
        assert found, (line, proc.stderr.read() if proc.poll() is not None else "")
        c = RawClient(int(found.group(1)))
        assert c.logon().msg_type == "A"
        c.close()
        proc.send_signal(getattr(signal, stop_with))
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.strip() == "stopped", out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

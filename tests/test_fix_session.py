"""FIX 4.4 session rules at the acceptor, with a raw client that can break them: garbled
messages, rejects (35=3), sequence gaps and resends, resets, logon refusals, heartbeats,
TLS, and the session's state on disk."""
from __future__ import annotations

import datetime as dt
import ssl

import pytest
import sqlalchemy as sa

from bondtape.fix import codec
from bondtape.fix.schema import fix_messages, fix_sessions
from tests.conftest import make_cusip
from tests.test_fix_helpers import (  # noqa: F401 - lite_market is a fixture
    RawClient, ServerThread, add_users, journal_count, lite_market, report_body)


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

"""The gateway against an independent FIX engine: QuickFIX (C++, Debian's libquickfix-dev),
driven through tests/test_fix_quickfix_client.cpp. Log on, report, cancel, correct,
reverse, reject, log out, disconnect, restart and resend, several sessions at once.

Needs g++ and libquickfix-dev (``apt-get install g++ libquickfix-dev``); without them the
tests skip, unless BONDTAPE_REQUIRE_QUICKFIX=1, when they fail.
"""
from __future__ import annotations

import hashlib
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from bondtape.journal.schema import trade_reports
from bondtape.reporting.codes import Rejected
from bondtape.reporting.commands import parse_command
from tests.conftest import IG, et, make_cusip
from tests.test_fix_helpers import (  # noqa: F401 - lite_market is a fixture
    PASSWORD, Clock, RawClient, ServerThread, SlowLink, add_users, journal_count, lite_market, stored_acks)

SOURCE = Path(__file__).with_name("test_fix_quickfix_client.cpp")
EXEC = "20240304-15:00:00"


def _quickfix_flags() -> list[str] | None:
    if shutil.which("g++") is None:
        return None
    if shutil.which("pkg-config") is not None:
        res = subprocess.run(["pkg-config", "--cflags", "--libs", "quickfix"], capture_output=True, text=True)
        if res.returncode == 0:
            return res.stdout.split()
    if Path("/usr/include/quickfix/Session.h").exists():  # Debian's layout
        return ["-I/usr/include/libxml2", "-lquickfix", "-lxml2"]
    return None


@pytest.fixture(scope="session")
def quickfix_client(tmp_path_factory) -> Path:
    flags = _quickfix_flags()
    if flags is None:
        message = "QuickFIX is not installed: apt-get install g++ libquickfix-dev"
        if os.environ.get("BONDTAPE_REQUIRE_QUICKFIX") == "1":
            pytest.fail(message)
        pytest.skip(message)
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    out = tmp_path_factory.mktemp("quickfix") / f"qfclient-{digest}"
    subprocess.run(["g++", "-std=c++11", "-O1", "-w", "-o", str(out), str(SOURCE), *flags, "-lpthread"],
                   check=True, timeout=240)
    return out


class QuickFixClient:
    """One QuickFIX initiator process; its events arrive on a queue."""

    def __init__(self, binary: Path, workdir: Path, port: int, sender: str, username: str, password: str = PASSWORD,
                 heartbeat: int = 30):
        workdir.mkdir(parents=True, exist_ok=True)
        settings = workdir / "client.cfg"
        settings.write_text(f"""[DEFAULT]
ConnectionType=initiator
HeartBtInt={heartbeat}
ReconnectInterval=1
FileStorePath={workdir / 'store'}
StartTime=00:00:00
EndTime=00:00:00
UseDataDictionary=N
ResetOnLogon=N
ResetOnLogout=N
ResetOnDisconnect=N
[SESSION]
BeginString=FIX.4.4
SenderCompID={sender}
TargetCompID=BONDTAPE
SocketConnectHost=127.0.0.1
SocketConnectPort={port}
""")
        self.proc = subprocess.Popen([str(binary), str(settings), username, password], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.events: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(line.rstrip("\n"))
        self.events.put("EOF")

    def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, predicate, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching event; last events: {self.seen[-8:]}")
            try:
                line = self.events.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(line)
            if line.startswith("ERR"):
                raise AssertionError(line)
            if predicate(line):
                return line

    def expect_in(self, msg_type: str, *contains: str, timeout: float = 15) -> dict[int, str]:
        line = self.expect(lambda l: l.startswith(f"IN {msg_type} ") and all(c in l for c in contains), timeout)
        return parse(line.split(" ", 2)[2])

    def report(self, ref: str, *, trans: str = "0", cusip: str = IG, side: str = "2", qty: str = "100000",
               price: str = "99.5", reporting: str = "DLRA", contra: str = "C", ref_id: str | None = None,
               extra: str = "") -> dict[int, str]:
        top = f"571={ref}|487={trans}|856=0|570=N|55=[N/A]|48={cusip}|22=1|32={qty}|31={price}|75=20240304|60={EXEC}"
        if ref_id:
            top += f"|572={ref_id}"
        if trans in ("1", "4"):
            top = f"571={ref}|487={trans}|856=0|570=N|55=[N/A]|572={ref_id}|32=0|31=0|75=20240304|60={EXEC}"
        if extra:
            top += "|" + extra
        self.command(f"AE {top}|SIDE 54={side}|528=P|PARTY 448={reporting}|447=C|452=1|PARTY 448={contra}|447=C|452=17")
        return self.expect_in("AR", f"|571={ref}|")

    def quit(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command("QUIT")
                self.proc.wait(10)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


def parse(text: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for part in text.strip("|").split("|"):
        tag, _, value = part.partition("=")
        out.setdefault(int(tag), value)
    return out


@pytest.fixture
def gateway(market):
    add_users(market, ("alice", "DLRA"), ("bob", "DLRB"), ("carol", "DLRC"))
    server = ServerThread(market)
    yield server
    server.stop()


@pytest.fixture
def clients(quickfix_client, tmp_path):
    started: list[QuickFixClient] = []

    def start(server: ServerThread, sender: str = "FIRMA", username: str = "alice", password: str = PASSWORD,
              workdir: str | None = None, **kw) -> QuickFixClient:
        c = QuickFixClient(quickfix_client, tmp_path / (workdir or sender), server.port, sender, username, password, **kw)
        started.append(c)
        return c

    yield start
    for c in started:
        c.quit()


def status_of(db, control_number: str) -> str:
    with db.connect() as conn:
        return conn.execute(sa.select(trade_reports.c.status).where(
            trade_reports.c.control_number == int(control_number))).scalar_one()


def test_report_cancel_correct_reject_and_repeat(gateway, clients, market):
    c = clients(gateway)
    c.expect(lambda l: l == "LOGON")
    first = c.report("R1")
    assert first[939] == "0" and first[150] == "F" and first[818].isdigit()
    assert status_of(market, first[818]) == "ACTIVE"

    # A repeated TradeReportID returns the first answer; with other terms (another trade)
    # it is refused, never answered as reported.
    again = c.report("R1")
    assert again[939] == "0" and again[818] == first[818]
    other = c.report("R1", price="101")
    assert other[939] == "1" and other[20012] == "CLIENT_REF_REUSED" and 818 not in other

    # Cancel by control number.
    cancel = c.report("X1", trans="1", ref_id=first[818])
    assert cancel[939] == "0" and cancel[150] == "H"
    assert status_of(market, first[818]) == "CANCELLED"

    # Correct (Replace) by the firm's own TradeReportID.
    second = c.report("R2", qty="250000")
    corrected = c.report("C2", trans="2", ref_id="R2", price="99.75")
    assert corrected[939] == "0" and corrected[150] == "G" and corrected[818] != second[818]
    assert status_of(market, second[818]) == "CORRECTED"
    assert status_of(market, corrected[818]) == "ACTIVE"

    # Rejected: the same code and text as every other channel.
    unknown = make_cusip("99999999")
    before = journal_count(market)
    rejected = c.report("R3", cusip=unknown)
    assert rejected[939] == "1" and rejected[150] == "8" and rejected[751] == "2"
    cmd = parse_command({"action": "NEW", "reporting_mpid": "DLRA", "client_ref": "R3b", "cusip": unknown,
                         "side": "S", "capacity": "P", "contra": "C", "quantity": "100000", "price": "99.5",
                         "execution_time": "2024-03-04T10:00:00-05:00"}, channel="bulk")
    bulk = gateway.engine.submit([cmd])[0]
    assert rejected[58] == f"{bulk.reject.code}: {bulk.reject.message}"
    assert rejected[20012] == "SECURITY_UNKNOWN"
    assert journal_count(market) == before

    # A firm reports only for itself.
    other = c.report("R4", reporting="DLRB")
    assert other[939] == "1" and other[20012] == "NOT_OWN_REPORT" and other[751] == "3"
    nobody = c.report("R5", reporting="ZZZZ")
    assert nobody[20012] == "FIRM_UNKNOWN"

    c.command("TESTREQ ping-1")
    c.expect_in("0", "|112=ping-1|")
    c.command("LOGOUT")
    c.expect_in("5")
    c.expect(lambda l: l == "LOGOUT")


def test_reverse_after_the_window(gateway, clients, market):
    c = clients(gateway)
    c.expect(lambda l: l == "LOGON")
    first = c.report("R1")
    assert first[939] == "0"
    gateway.clock.us = et(2024, 4, 15, 10, 0, 0)  # 30 business days later
    late_cancel = c.report("X1", trans="1", ref_id=first[818])
    assert late_cancel[939] == "1" and late_cancel[20012] == "WINDOW_CLOSED"
    reversal = c.report("V1", trans="4", ref_id="R1")
    assert reversal[939] == "0" and reversal[150] == "H"
    assert status_of(market, first[818]) == "REVERSED"


def test_wrong_password_is_refused(gateway, clients, market):
    c = clients(gateway, sender="FIRMX", password="not-the-password-at-all")
    logout = c.expect_in("5")
    assert "logon refused" in logout[58]
    assert not any(line == "LOGON" for line in c.seen)
    assert journal_count(market) == 0


def test_disconnect_restart_and_resend(gateway, clients, market, tmp_path):
    c = clients(gateway)
    c.expect(lambda l: l == "LOGON")
    a1 = c.report("R1")
    a2 = c.report("R2", price="99.25")
    assert a1[939] == a2[939] == "0"
    c.kill()  # the firm's system dies without a logout

    # The acceptor restarts on the same database and port; numbers carry on.
    port = gateway.port
    gateway.stop()
    server = ServerThread(market, port=port)
    try:
        c2 = clients(server, workdir="FIRMA")  # same store: the same session resumes
        c2.expect(lambda l: l == "LOGON")
        assert not any("141=Y" in l for l in c2.seen)
        a3 = c2.report("R3", price="99.125")
        assert a3[939] == "0"
        # Pretend we lost the last three messages: QuickFIX asks for them again and gets the
        # stored acks (PossDupFlag=Y) and a gap fill for the administrative ones.
        seq = int(a3[34])
        c2.command(f"SETTARGETSEQ {seq - 2}")
        c2.command("TESTREQ after-gap")
        resent = c2.expect_in("AR", "|43=Y|", "|571=R3|")
        assert resent[818] == a3[818] and 122 in resent
        c2.expect_in("0", "|112=after-gap|")
        assert any(l.startswith("OUT 2 ") for l in c2.seen)

        # Our side makes a gap: the acceptor asks for a resend; QuickFIX resends the
        # cancel (PossDupFlag=Y) and gap-fills the rest; it is processed once.
        # (A report with repeating groups is resent by QuickFIX in tag order when it runs
        # without a data dictionary, as here, which breaks the groups: docs/fix.md.)
        before = journal_count(market)
        out_seq = max(int(parse(l.split(" ", 2)[2])[34]) for l in c2.seen if l.startswith("OUT "))
        c2.command(f"SETSEQ {out_seq + 4}")
        c2.command(f"AE 571=X1|487=1|572={a1[818]}")
        cancel = c2.expect_in("AR", "|571=X1|")
        assert cancel[939] == "0" and cancel[150] == "H"
        assert any(l.startswith("IN 2 ") for l in c2.seen)  # our ResendRequest
        assert any(l.startswith("OUT AE ") and "|43=Y|" in l and "|571=X1|" in l for l in c2.seen)
        assert any(l.startswith("OUT 4 ") and "123=Y" in l for l in c2.seen)
        assert journal_count(market) == before + 1
        assert status_of(market, a1[818]) == "CANCELLED"
    finally:
        server.stop()


def test_many_sessions_at_once(gateway, clients, market):
    firms = [("FIRMA", "alice", "DLRA"), ("FIRMB", "bob", "DLRB"), ("FIRMC", "carol", "DLRC")]
    started = [(clients(gateway, sender=s, username=u), mpid) for s, u, mpid in firms]
    for c, _ in started:
        c.expect(lambda l: l == "LOGON")
    for i in range(5):
        for c, mpid in started:
            c.command(f"AE 571={mpid}-{i}|487=0|48={IG}|22=1|32={100000 + i}|31=99.5|60={EXEC}"
                      f"|SIDE 54=1|528=P|PARTY 448={mpid}|447=C|452=1|PARTY 448=C|447=C|452=17")
    for c, mpid in started:
        for i in range(5):
            ack = c.expect_in("AR", f"|571={mpid}-{i}|")
            assert ack[939] == "0", ack
    assert journal_count(market) == 15


def test_a_long_resend_over_a_slow_line_completes(quickfix_client, lite_market, tmp_path):
    """A firm's QuickFIX engine that lost what it had received logs on asking for everything
    again: 48,000 stored Acks (about 14 MB) over a line carrying 1.5 MB/s, more than 9 s of
    reading with HeartBtInt 1. The gateway's send bound (2.4 x HeartBtInt: 5 s) took the
    whole resend as one send and dropped the firm some 6 s in, as one that does not read;
    now it counts only time without progress, and the resend completes. (QuickFIX sends its
    Heartbeats all along, so the gateway's TestRequest never falls due.)"""
    hb, rate, n = 1, 1_500_000, 48_000
    add_users(lite_market, ("alice", "DLRA"))
    server = ServerThread(lite_market)
    link = SlowLink(server.port, rate)
    c = None
    try:
        # The firm's earlier traffic (a raw client, for speed): n Acks stored on the session.
        raw = RawClient(server.port)
        assert raw.logon().msg_type == "A"
        refs, last_out = stored_acks(raw, n, prefix="Q")
        raw.send("5", [])
        raw.read_type("5")
        raw.close()
        # QuickFIX takes the session over with its next MsgSeqNum right and the gateway's
        # reset to 1: the gateway's Logon is a gap, and QuickFIX asks for all of it.
        store = tmp_path / "FIRMA" / "store"
        store.mkdir(parents=True)
        (store / "FIX.4.4-FIRMA-BONDTAPE.seqnums").write_text(f"{raw.seq:010d} : {1:010d}")
        c = QuickFixClient(quickfix_client, tmp_path / "FIRMA", link.port, "FIRMA", "alice", heartbeat=hb)
        resent: list[str] = []
        started = time.monotonic()

        def done(line: str) -> bool:
            assert not line.startswith("IN 5 ") and line != "LOGOUT", (
                f"logged out {time.monotonic() - started:.1f} s into the resend, after {len(resent)} of {n} Acks: {line}")
            if line.startswith("IN AR ") and "|43=Y|" in line:
                resent.append(parse(line.split(" ", 2)[2])[571])
            return bool(resent) and resent[-1] == refs[-1]

        c.expect(done, timeout=120)
        took = time.monotonic() - started
        assert resent == refs  # every stored Ack once, in order
        assert any(l.startswith("OUT 2 ") for l in c.seen)  # it was QuickFIX's ResendRequest
        assert took > 1.4 * 5.0, took  # well over the old bound on a send
        c.command("TESTREQ after-resend")
        c.expect_in("0", "|112=after-resend|")
        heartbeats = sum(1 for l in c.seen if l.startswith("OUT 0 "))
        assert heartbeats >= took / hb - 3, heartbeats
    finally:
        if c is not None:
            c.quit()
        link.close()
        server.stop()

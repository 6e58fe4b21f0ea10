"""Helpers for the FIX gateway tests: the acceptor in a thread, firms' users, and a small raw
FIX client (used for hostile input; the independent client is QuickFIX, test_fix_quickfix.py)."""
from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl as ssl_module
import threading
import time
from concurrent.futures import Future

import pytest
import sqlalchemy as sa

from bondtape.access.api import create_active_user, create_organisation
from bondtape.engine import Engine, Sequencer
from bondtape.fix import codec
from bondtape.fix.server import start_fix_server
from bondtape.journal.schema import journal
from tests.conftest import IG, et
from tests.helpers import standard_sqlite

PASSWORD = "Correct-Horse-Battery-42"
REPORT_TIME = et(2024, 3, 4, 10, 5, 0)  # a Monday, system open
EXEC_UTC = "20240304-15:00:00"  # 10:00 ET


@pytest.fixture
def lite_market(tmp_path):
    """The standard market on SQLite only: for session-layer tests whose logic does not
    depend on the database (the session store runs on both backends in the others)."""
    db = standard_sqlite(tmp_path / 'fix.db')
    yield db
    db.dispose()


def add_users(db, *pairs: tuple[str, str], roles=("trader",)) -> None:
    """(username, mpid) pairs: an ACTIVE trader of each firm, password PASSWORD."""
    orgs: dict[str, int] = {}
    for username, mpid in pairs:
        if mpid not in orgs:
            orgs[mpid] = create_organisation(db, f"Firm {mpid}", "FIRM", mpid=mpid)
        create_active_user(db, org_id=orgs[mpid], username=username, password=PASSWORD, roles=list(roles))


def journal_count(db) -> int:
    with db.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(journal)).scalar_one()


class Clock:
    """The engine's clock, moved by the test."""

    def __init__(self, us: int = REPORT_TIME):
        self.us = us

    def __call__(self) -> int:
        return self.us


class ServerThread:
    """The acceptor on its own asyncio loop in a thread, as in production."""

    def __init__(self, db, clock: Clock | None = None, port: int = 0, **kwargs):
        self.db = db
        self.clock = clock or Clock()
        self.engine = Engine(db, clock=self.clock)
        self.sequencer = Sequencer(self.engine)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(start_fix_server(db, "127.0.0.1", port, sequencer=self.sequencer, **kwargs))
        self.port = self.server.port

    def call(self, coro, timeout: float = 20):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.call(self.server.close())
        self.sequencer.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class RawClient:
    """A blocking socket speaking raw FIX, to send what no FIX engine would."""

    def __init__(self, port: int, sender: str = "FIRMA", target: str = "BONDTAPE", tls: ssl_module.SSLContext | None = None,
                 rcvbuf: int | None = None):
        if rcvbuf is None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        else:  # a fixed receive buffer (no autotuning), set before connecting: a slow link's window
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(10)
            sock.connect(("127.0.0.1", port))
        self.sock = tls.wrap_socket(sock, server_hostname="localhost") if tls else sock
        self.sender, self.target = sender, target
        self.seq = 1
        self.framer = codec.Framer()
        self.pending: list[codec.RawMessage] = []

    def message(self, msg_type: str, body, seq: int | None = None, **kw) -> bytes:
        if seq is None:
            seq, self.seq = self.seq, self.seq + 1
        return codec.encode(msg_type, self.sender, self.target, seq, codec.utc_timestamp(time.time_ns() // 1000),
                            [(t, str(v)) for t, v in body], **kw)

    def send(self, msg_type: str, body, seq: int | None = None, **kw) -> None:
        self.sock.sendall(self.message(msg_type, body, seq, **kw))

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def logon(self, username: str = "alice", password: str = PASSWORD, heartbeat: int = 30, reset: bool = False):
        body = [(98, 0), (108, heartbeat), (553, username), (554, password)]
        if reset:
            body.append((141, "Y"))
        self.send("A", body)
        return self.read()

    def read(self, timeout: float = 10) -> codec.RawMessage | None:
        """The next message, or None when the acceptor closed the connection."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ssl_module.SSLError):
                return None
            if not data:
                return None
            self.pending += [m for m in self.framer.feed(data) if isinstance(m, codec.RawMessage)]
        return self.pending.pop(0)

    def read_type(self, msg_type: str, timeout: float = 10) -> codec.RawMessage:
        """The next message of this type (heartbeats and others before it are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.read(max(deadline - time.monotonic(), 0.01))
            assert m is not None, f"connection closed while waiting for 35={msg_type}"
            if m.msg_type == msg_type:
                return m

    def closed(self, timeout: float = 10) -> bool:
        """True when the acceptor closes the connection (messages before are dropped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                m = self.read(deadline - time.monotonic())
            except socket.timeout:
                return False
            if m is None:
                return True
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class SlowLink:
    """A TCP relay on loopback standing for a firm's slow line: what the gateway sends goes
    to the firm at most ``rate`` bytes a second (the other way at full speed). The relay's
    side towards the gateway has a fixed receive buffer, as a line holds little."""

    def __init__(self, upstream_port: int, rate: float):
        self.rate = rate
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:  # closed
                return
            up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            try:
                up.connect(("127.0.0.1", self.upstream_port))
            except OSError:
                down.close()
                continue
            self._sockets += [down, up]
            threading.Thread(target=self._pipe, args=(down, up, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, down, self.rate), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, rate: float | None) -> None:
        start, moved = time.monotonic(), 0
        try:
            while data := src.recv(16384):
                dst.sendall(data)
                moved += len(data)
                if rate:
                    pause = start + moved / rate - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass


def report_body(ref: str, *, cusip: str = IG, side: str = "2", qty: str = "100000", price: str = "99.5",
                reporting: str = "DLRA", contra: str = "C", trans: str = "0", extra=()):
    """An AE body in the standard FIX 4.4 shape: parties inside the one NoSides entry."""
    body = [(571, ref), (487, trans), (856, 0), (48, cusip), (22, 1), (32, qty), (31, price), (60, EXEC_UTC),
            (552, 1), (54, side), (453, 2), (448, reporting), (447, "C"), (452, 1),
            (448, contra), (447, "C"), (452, 17), (528, "P")]
    return body + list(extra)


def stored_acks(c: RawClient, n: int, prefix: str = "LONG") -> tuple[list[str], int]:
    """``n`` Acks stored for a resend (of rejected reports: quick, nothing journaled); their
    TradeReportIDs, and the MsgSeqNum of the last."""
    refs = [f"{prefix}{k:06d}" for k in range(n)]
    for start in range(0, n, 2000):
        part = refs[start:start + 2000]
        c.raw(b"".join(c.message("AE", report_body(ref, extra=[(20004, "XX")])) for ref in part))
        for ref in part:
            ack = c.read_type("AR")
            assert (ack.first(571), ack.first(20012)) == (ref, "FIELD_INVALID")
    return refs, int(ack.first(34))


def field(m: codec.RawMessage, tag: int) -> str | None:
    return m.first(tag)


def run_in(fut: Future, timeout: float = 10):
    return fut.result(timeout)


def _reference_utc_timestamp(text: str):
    """The gateway's earlier parser (through datetime), kept as the reference."""
    import datetime as dt

    if len(text) < 17 or text[8] != "-" or text[11] != ":" or text[14] != ":" or not text.isascii():
        raise ValueError(text)
    digits = text[:8] + text[9:11] + text[12:14] + text[15:17]
    if not digits.isdigit():
        raise ValueError(text)
    frac = text[17:]
    micro = 0
    if frac:
        if frac[0] != "." or not frac[1:].isdigit() or len(frac) - 1 not in (3, 6, 9):
            raise ValueError(text)
        if frac[7:].strip("0"):  # nanoseconds: taken only as zeros, never cut to microseconds
            raise ValueError(text)
        micro = int(frac[1:7].ljust(6, "0"))
    return dt.datetime(int(digits[:4]), int(digits[4:6]), int(digits[6:8]), int(digits[8:10]), int(digits[10:12]),
                       int(digits[12:14]), micro, tzinfo=dt.timezone.utc)


def test_utc_timestamp_in_microseconds_agrees_with_the_datetime_parser():
    import random

    from bondtape.clock import to_us

    rng = random.Random(11)
    cases = ["20240304-15:00:00", "20240304-15:00:00.123", "20240304-15:00:00.123456", "20240229-23:59:59.999",
             "20230229-10:00:00", "20240304-24:00:00", "20240304-15:60:00", "20240304-15:00:60",
             "2024030X-15:00:00", "20240304-15:00:00.12", "20240304 15:00:00", "20240304-15:00:00.1234567891",
             "20240304-15:00:00.123456789", "20240304-15:00:00.123456000"]
    cases += [f"{rng.randint(1900, 2100):04d}{rng.randint(0, 13):02d}{rng.randint(0, 32):02d}-{rng.randint(0, 25):02d}:"
              f"{rng.randint(0, 61):02d}:{rng.randint(0, 61):02d}{rng.choice(['', '.5', '.123', '.123456', '.123456789'])}"
              for _ in range(3000)]
    for text in cases:
        try:
            expected = to_us(_reference_utc_timestamp(text))
        except ValueError:
            expected = None
        try:
            got = codec.parse_utc_timestamp_us(text)
        except ValueError:
            got = None
        assert got == expected, text
    assert codec.parse_utc_timestamp_us("20240304-15:00:00.123456000") == to_us(
        dt.datetime(2024, 3, 4, 15, 0, 0, 123456, tzinfo=dt.timezone.utc))
    with pytest.raises(ValueError):  # before: cut to .123456 without a word
        codec.parse_utc_timestamp_us("20240304-15:00:00.123456789")
    assert codec.parse_utc_timestamp_us("20240304-15:00:00.123456789", exact=False) == to_us(
        dt.datetime(2024, 3, 4, 15, 0, 0, 123456, tzinfo=dt.timezone.utc))  # a header's SendingTime

"""The FIX 4.4 acceptor: many firms' sessions at once on one asyncio loop.

Each connection has a reader (framing, session rules, mapping each Trade Capture Report
onto a command submitted to the shared :class:`bondtape.engine.Sequencer`) and a writer
(answers in order; sequence numbers and sent application messages are made durable in
one group-committed transaction before the bytes go out). Reports of one session are
pipelined: many can be in the engine's group commit at once, and acks go out in order.

Session rules follow FIX 4.4 (docs/fix.md): Logon first, with Username (553) and
Password (554); heartbeats and test requests; gaps answered with a ResendRequest;
ResendRequests answered with the stored application messages (PossDupFlag=Y) and gap
fills for the rest; SequenceReset (gap fill and reset); Logout; Reject (35=3) for a
message that breaks a session rule; garbled messages (BodyLength or CheckSum wrong) are
ignored.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl as ssl_module
import struct
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import sqlalchemy as sa
from sqlalchemy.engine import Engine as SAEngine

from bondtape.clock import now_us
from bondtape.db import reading
from bondtape.engine import Engine, EngineUnavailable, Result, Sequencer
from bondtape.fix import codec, mapping, store
from bondtape.journal.schema import journal
from bondtape.reference.schema import firms as firms_table
from bondtape.reporting.codes import Reject, Rejected
from bondtape.reporting.commands import parse_command

__all__ = [
    "DEFAULT_COMP_ID", "FixServer", "LogonRefused", "Principal", "access_authenticator", "start_fix_server",
    "tls_context",
]

log = logging.getLogger("bondtape.fix")

DEFAULT_COMP_ID = "BONDTAPE"
ADMIN_TYPES = {"0", "1", "2", "3", "4", "5", "A"}
# Application message types of FIX 4.4 other than AE: answered with BusinessMessageReject (35=j).
_SINGLE = "6789BCDEFGHJKLMNPQRSTVWXYZabcdefghijklmnopqrstuvwxyz"
FIX44_APP_TYPES = set(_SINGLE) | {"A" + c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"} | {"B" + c for c in "ABCDEFGH"}
HEADER_TAGS = {8, 9, 35, 49, 56, 34, 43, 52, 97, 122, 115, 128, 50, 57, 142, 143, 116, 144, 129, 145, 464, 10}
RESEND_PAGE = 5000  # stored messages read at a time for a resend
RESEND_CHUNK = 256 * 1024  # bytes of a resend written at a time


@dataclass(frozen=True)
class Principal:
    """Who logged on: the user and the firm (MPID) it may report for."""

    username: str
    mpid: str


class LogonRefused(Exception):
    """The credentials were refused; the text goes to the firm in the Logout (58)."""


Authenticator = Callable[[str, str, str], Principal]  # (username, password, source) -> Principal or LogonRefused

def access_authenticator(db: SAEngine) -> Authenticator:
    """Checks a FIX logon against the access rules: the same users, passwords, lockout and
    audit trail as the website (``authenticate_password``), then the shared permission
    ``fix.logon`` (a reporting firm's user with the trader role)."""
    from bondtape.access.api import authenticate_password, may

    def check(username: str, password: str, source: str) -> Principal:
        now = now_us()
        user = authenticate_password(db, username, password, now_us=now, source=source[:64], action="fix.logon")
        if user is None:
            raise LogonRefused("unknown user or wrong password, or the user is locked or not active")
        if not user.mpid or not may(db, user, "fix.logon", now_us=now):
            raise LogonRefused(f"user {username} may not report trades: it needs the trader role in a reporting firm")
        return Principal(user.username, user.mpid.upper())

    return check


def tls_context(certfile: str, keyfile: str | None = None) -> ssl_module.SSLContext:
    """A server TLS context (TLS 1.2 or later) from a PEM certificate and key."""
    ctx = ssl_module.create_default_context(ssl_module.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl_module.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


def _lookup_client_ref(db: SAEngine, mpid: str, ref: str) -> int | None:
    with reading(db) as conn:
        return conn.execute(sa.select(journal.c.control_number).where(
            journal.c.mpid == mpid, journal.c.client_ref == ref)).scalar()


def _firm_exists(db: SAEngine, mpid: str) -> bool:
    with reading(db) as conn:
        return conn.execute(sa.select(firms_table.c.mpid).where(firms_table.c.mpid == mpid)).first() is not None


class FixServer:
    """The acceptor. Build it with :func:`start_fix_server`."""

    def __init__(self, db: SAEngine, sequencer: Sequencer, authenticator: Authenticator, *,
                 comp_id: str = DEFAULT_COMP_ID, ssl: ssl_module.SSLContext | None = None,
                 logon_timeout: float = 10.0, max_heartbeat: int = 3600, owns_sequencer: bool = False):
        self.db = db
        self.sequencer = sequencer
        self.authenticator = authenticator
        self.comp_id = comp_id
        self.ssl = ssl
        self.logon_timeout = logon_timeout
        self.max_heartbeat = max_heartbeat
        lock = sequencer.engine.write_lock if db.dialect.name == "sqlite" else None
        self.store = store.StoreWriter(db, write_lock=lock)
        self.live: dict[int, Connection] = {}  # session id -> logged-on connection
        self.connections: set[Connection] = set()
        self._owns_sequencer = owns_sequencer
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._accept, host, port, ssl=self.ssl, limit=1 << 20)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(self, reader, writer)
        self.connections.add(conn)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            if task is not None:
                self._tasks.discard(task)

    async def close(self) -> None:
        """Stop accepting, log every session out, and stop the store writer."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.logout("the server is shutting down")
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=5)
            for task in pending:  # a peer that does not read: drop it
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2)
            except asyncio.TimeoutError:  # pragma: no cover
                pass
        await asyncio.to_thread(self.store.close)
        if self._owns_sequencer:
            await asyncio.to_thread(self.sequencer.close)
            await asyncio.to_thread(self.sequencer.engine.close)  # a last WAL checkpoint on SQLite


async def start_fix_server(
    db: SAEngine | str | None = None,
    host: str = "127.0.0.1",
    port: int = 9878,
    *,
    engine: Engine | None = None,
    sequencer: Sequencer | None = None,
    authenticator: Authenticator | None = None,
    comp_id: str = DEFAULT_COMP_ID,
    ssl: ssl_module.SSLContext | None = None,
    logon_timeout: float = 10.0,
) -> FixServer:
    """Start the FIX acceptor on ``host:port`` (port 0: any free port; see ``.port``).

    ``db`` is a database URL or engine (or take ``engine``'s). Give ``sequencer`` to share
    the engine with other channels; otherwise one is made (and closed with the server).
    The authenticator defaults to :func:`access_authenticator`.
    """
    from bondtape.db import connect

    if engine is None and sequencer is not None:
        engine = sequencer.engine
    if engine is not None:
        sa_db = engine.db
    elif isinstance(db, SAEngine):
        sa_db = db
    else:
        sa_db = connect(db)
    owns = sequencer is None
    if sequencer is None:
        sequencer = Sequencer(engine or Engine(sa_db))
    server = FixServer(sa_db, sequencer, authenticator or access_authenticator(sa_db), comp_id=comp_id, ssl=ssl,
                       logon_timeout=logon_timeout, owns_sequencer=owns)
    await server.start(host, port)
    log.info("FIX acceptor %s listening on %s:%s%s", comp_id, host, server.port, " (TLS)" if ssl else "")
    return server


class _Slot:
    """One thing for the writer to do, in order."""

    __slots__ = ("kind", "msg_type", "body", "app", "future", "index", "report", "ref_seq", "in_seq", "args", "command")

    def __init__(self, kind: str, in_seq: int, msg_type: str = "", body: list | None = None, app: bool = False,
                 future: Any = None, report: mapping.TradeReport | None = None, ref_seq: int = 0, args: tuple = ()):
        self.kind = kind
        self.in_seq = in_seq
        self.msg_type = msg_type
        self.body = body or []
        self.app = app
        self.future = future  # of the engine's results of the batch this report went in
        self.index = 0  # this report's place in that batch
        self.report = report
        self.ref_seq = ref_seq
        self.args = args
        self.command: Any = None  # a report not yet handed to the engine


class Connection:
    """One TCP connection: at most one logged-on session."""

    def __init__(self, server: FixServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.framer = codec.Framer()
        self.out: asyncio.Queue[_Slot] = asyncio.Queue(maxsize=4096)
        self.state = "LOGON"  # LOGON -> ACTIVE -> CLOSED
        self.closing = False
        self.session: store.SessionRecord | None = None
        self.principal: Principal | None = None
        self.sender = ""  # the firm's CompID
        self.next_in = 1
        self.next_out = 1
        self.persisted_in = 0
        self.heartbeat = 30
        self.last_recv = time.monotonic()
        self.last_sent = time.monotonic()
        self.test_request_at: float | None = None
        self.gap_high: int | None = None  # a ResendRequest is out until next_in passes this
        self.last_future: Future | None = None  # of the last report sent to the engine
        self._writer_task: asyncio.Task | None = None
        self._close_queued = False
        self._writer_ok = False
        self._writer_failed = False
        self._unsubmitted: list[_Slot] = []
        self._last_sending_time = ""  # the last SendingTime (52) found valid

    # -- life -----------------------------------------------------------------------------
    async def run(self) -> None:
        started = time.monotonic()
        self._writer_task = asyncio.create_task(self._write_loop())
        timer = asyncio.create_task(self._timer(started))
        try:
            while not self.closing:
                data = await self.reader.read(1 << 16)
                if not data:
                    break
                self.last_recv = time.monotonic()
                self.test_request_at = None
                for item in self.framer.feed(data):
                    if isinstance(item, codec.Garbled):
                        log.info("FIX %s: garbled input ignored (%s)", self.peer, item.reason)
                        continue
                    await self._on_message(item)
                    if self.closing:
                        break
                # All the reports of one read go to the engine together: one group commit.
                self._submit_pending()
        except (ConnectionError, ssl_module.SSLError, asyncio.IncompleteReadError, OSError) as exc:
            log.info("FIX %s: connection lost: %s", self.peer, exc)
        except asyncio.CancelledError:
            raise
        except Exception:  # never let one connection take the acceptor down
            log.exception("FIX %s: unexpected error; closing the connection", self.peer)
        finally:
            timer.cancel()
            self.closing = True
            self._queue_close()
            try:
                await asyncio.wait_for(asyncio.shield(self._writer_task), 10)
            except (asyncio.TimeoutError, Exception):
                self._writer_task.cancel()
            finally:
                if not self._writer_task.done():
                    self._writer_task.cancel()
            await self._persist_final()
            if self.session is not None and self.server.live.get(self.session.id) is self:
                del self.server.live[self.session.id]
            self._close_transport()

    @property
    def send_timeout(self) -> float:
        """How long a send may wait with the firm taking none of our bytes before the session
        is dropped: 2.4 x HeartBtInt (a TestRequest's two intervals), 5 to 60 seconds."""
        return min(max(2.4 * self.heartbeat, 5.0), 60.0)

    def _close_transport(self) -> None:
        """Close after what is buffered goes out; abort if the firm does not take it in time."""
        try:
            self.writer.close()
            asyncio.get_running_loop().call_later(self.send_timeout, self._abort_transport)
        except Exception:  # pragma: no cover
            pass

    def _abort_transport(self) -> None:
        """Drop the connection now, whatever is still buffered (a close would wait for a firm
        that does not read for ever, and the session would stay logged on)."""
        try:
            sock = self.writer.get_extra_info("socket")
            if sock is not None and sock.fileno() >= 0:
                # a reset: the kernel drops the unread bytes too, instead of keeping them queued
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:  # pragma: no cover - already closed
            pass
        try:
            self.writer.transport.abort()
        except Exception:  # pragma: no cover
            pass

    def _unsent(self) -> int:
        """Bytes written and not yet taken by the kernel: the transport's buffer, and under
        TLS also the buffer of the socket's transport beneath it (where a burst waits)."""
        transport = self.writer.transport
        size = transport.get_write_buffer_size()
        inner = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
        if inner is not None:
            try:
                size += inner.get_write_buffer_size()
            except Exception:  # pragma: no cover - closed meanwhile
                pass
        return size

    async def _drain(self) -> None:
        """Wait until the firm takes what we wrote. The firm is dropped when it takes none of
        our bytes for :attr:`send_timeout` seconds: the bound is on a lack of progress, not on
        the whole send, so a long burst (a resend of many messages) to a firm that reads,
        however slowly, is not taken for a firm that does not read."""
        drain = asyncio.ensure_future(self.writer.drain())
        try:
            loop = asyncio.get_running_loop()
            limit = self.send_timeout
            step = min(1.0, limit / 5)
            unsent, moved = self._unsent(), loop.time()
            while True:
                done, _ = await asyncio.wait((drain,), timeout=step)
                if done:
                    drain.result()  # raises when the connection was lost
                    return
                now, left = loop.time(), self._unsent()
                if left < unsent:  # the firm took some: the clock starts again
                    moved = now
                unsent = left
                if now - moved >= limit:
                    raise ConnectionError(f"the firm took none of our messages for {limit:.0f} s "
                                          f"(it does not read; {left} bytes waiting)")
        finally:
            if not drain.done():
                drain.cancel()

    def _queue_close(self) -> None:
        if not self._close_queued and not self._writer_failed:
            self._close_queued = True
            try:
                self.out.put_nowait(_Slot("close", self.next_in))
            except asyncio.QueueFull:
                asyncio.get_running_loop().create_task(self.out.put(_Slot("close", self.next_in)))

    def logout(self, text: str) -> None:
        """Send a Logout and close (from outside the reader)."""
        if self.state == "ACTIVE" and not self._close_queued:
            self.state = "CLOSED"
            try:
                self.out.put_nowait(_Slot("msg", 0, "5", [(58, text)]))
            except asyncio.QueueFull:
                pass
        self.closing = True
        self._queue_close()

    async def _persist_final(self) -> None:
        # Only when every answer was written: otherwise the firm resends what we missed.
        if self.session is None or not self._writer_ok or self.persisted_in >= self.next_in:
            return
        sid, next_in, next_out = self.session.id, self.next_in, self.next_out
        try:
            await asyncio.wrap_future(self.server.store.submit(
                lambda c: store.write_state(c, sid, next_in, next_out, None, [], now_us())))
            self.persisted_in = next_in
        except Exception as exc:  # the firm resends what we did not record
            log.warning("FIX %s: could not record sequence numbers: %s", self.peer, exc)

    async def _timer(self, started: float) -> None:
        while True:
            await asyncio.sleep(0.5 if self.heartbeat > 2 else 0.25)
            now = time.monotonic()
            if self.state == "LOGON":
                if now - started > self.server.logon_timeout:
                    log.info("FIX %s: no Logon within %.0f s; disconnecting", self.peer, self.server.logon_timeout)
                    self.closing = True
                    self._queue_close()
                    self._abort_transport()
                    return
                continue
            if self.state != "ACTIVE":
                continue
            hb = self.heartbeat
            # Timer messages carry in_seq 0: they never advance the recorded inbound number
            # past a report whose ack is not yet written.
            # The timer never waits on the writer: a firm that does not read stalls the writer
            # (full queue), and the timer must still drop it. A message that finds the queue
            # full is skipped: the writer has plenty to send.
            if now - self.last_sent >= hb:
                self.last_sent = now
                self._put_nowait(_Slot("msg", 0, "0", []))
            silent = now - self.last_recv
            if self.test_request_at is None and silent >= hb * 1.2 + 0.5:
                if self._put_nowait(_Slot("msg", 0, "1", [(112, f"TEST{int(now_us())}")])):
                    self.test_request_at = now  # only one it sent is waited on (a full queue: next tick)
            elif self.test_request_at is not None and now - self.test_request_at >= hb * 1.2 + 0.5:
                self.logout("no answer to TestRequest (35=1)")
                # if the Logout cannot go out (the firm does not read), drop the connection
                asyncio.get_running_loop().call_later(min(5.0, hb * 1.2 + 0.5), self._abort_transport)
                return

    def _put_nowait(self, slot: _Slot) -> bool:
        """Queue ``slot`` unless the queue is full; whether it was queued."""
        try:
            self.out.put_nowait(slot)
        except asyncio.QueueFull:
            return False
        return True

    # -- output ---------------------------------------------------------------------------
    async def _send(self, msg_type: str, body: list[tuple[int, Any]], app: bool = False) -> None:
        await self._put(_Slot("msg", self.next_in, msg_type, body, app))

    async def _reject(self, ref_seq: int, ref_type: str | None, reason: int, tag: int | None, text: str) -> None:
        body: list[tuple[int, Any]] = [(45, ref_seq)]
        if tag is not None:
            body.append((371, tag))
        if ref_type:
            body.append((372, ref_type))
        body += [(373, reason), (58, text)]
        log.info("FIX %s: Reject seq %s: %s", self.peer, ref_seq, text)
        await self._send("3", body)

    async def _logout_and_close(self, text: str) -> None:
        log.info("FIX %s: logout: %s", self.peer, text)
        await self._send("5", [(58, text)])
        self.state = "CLOSED"
        self.closing = True
        self._queue_close()

    def _encode(self, msg_type: str, seq: int, body: list[tuple[int, Any]], sending: str) -> bytes:
        return codec.encode(msg_type, self.server.comp_id, self.sender, seq, sending,
                            [(t, str(v)) for t, v in body])

    async def _write_loop(self) -> None:
        try:
            await self._write_slots()
            self._writer_ok = True
        except Exception as exc:
            log.warning("FIX %s: cannot send: %r; closing", self.peer, exc)
            self.closing = True
            self._writer_failed = True  # from now on nothing is queued (_put, _queue_close)
            self._abort_transport()
            # Empty the queue, which wakes a put waiting on it (the reader, a close). Waiting
            # for a close instead would wait for ever when the failed batch held it.
            while not self.out.empty():
                self.out.get_nowait()

    async def _write_slots(self) -> None:
        while True:
            first = await self.out.get()
            slots = [first]
            while len(slots) < 2000 and not self.out.empty():
                slots.append(self.out.get_nowait())
            chunks: list[bytes] = []
            rows: list[tuple] = []
            in_seq = 0
            self._submit_pending()  # (the reader hands them over after each read; this is a safety net)
            # The engine answers in submission order: waiting for the last report of the
            # batch (one wake-up) covers the ones before it.
            last = next((s.future for s in reversed(slots) if s.kind == "ar" and s.future is not None), None)
            if last is not None and not last.done():
                await asyncio.wait([asyncio.wrap_future(last)])
            for slot in slots:
                if slot.kind == "close":
                    await self._flush(chunks, rows, in_seq)
                    try:
                        await self._drain()
                    except Exception:
                        pass
                    self._close_transport()
                    return
                if slot.kind == "resend":
                    await self._flush(chunks, rows, in_seq)
                    chunks, rows, in_seq = [], [], 0
                    await self._resend(*slot.args)
                    continue
                msg_type, body, app = slot.msg_type, slot.body, slot.app
                if slot.kind == "ar":
                    if slot.future is None or slot.future.done():  # the usual case: no waiting
                        msg_type, body, app = self._ack_now(slot)
                    else:
                        msg_type, body, app = await self._ack(slot)
                sending = codec.utc_timestamp(now_us())
                seq = self.next_out
                self.next_out += 1
                data = self._encode(msg_type, seq, body, sending)
                chunks.append(data)
                in_seq = max(in_seq, slot.in_seq)
                if app and self.session is not None:
                    if b"\x00" in data:  # an echo of the firm's NUL (571, 572, 48, 22, 856): not storable
                        log.info("FIX %s: %s %s holds a NUL byte: sent, not stored (a resend gap-fills it)",
                                 self.peer, msg_type, seq)
                    else:
                        rows.append((self.session.id, seq, msg_type, now_us(), data.decode("latin-1")))
            await self._flush(chunks, rows, in_seq)

    async def _ack(self, slot: _Slot) -> tuple[str, list, bool]:
        """:meth:`_ack_now`, once the engine has answered (or failed: it says so)."""
        try:
            await asyncio.wrap_future(slot.future)
        except Exception:
            pass
        return self._ack_now(slot)

    def _ack_now(self, slot: _Slot) -> tuple[str, list, bool]:
        """The answer to a report whose engine result (if it went to the engine) is in."""
        report = slot.report
        assert report is not None
        if slot.future is None:
            return "AR", mapping.ack_body(report, None, report.reject), True
        try:
            result: Result = slot.future.result()[slot.index]
        except Exception as exc:
            unavailable = isinstance(exc, EngineUnavailable)
            if not unavailable:
                log.error("FIX %s: report %s failed in the engine: %r", self.peer, report.trade_report_id, exc)
            text = ("the trade reporting engine is unavailable; nothing was recorded: resend the report later"
                    if unavailable else "the report could not be processed; nothing was recorded: resend it later")
            return "j", [(45, slot.ref_seq), (372, "AE"), (379, report.trade_report_id),
                         (380, 4 if unavailable else 0), (58, text)], True
        return "AR", mapping.ack_body(report, result, None), True

    async def _flush(self, chunks: list[bytes], rows: list[tuple], in_seq: int) -> None:
        if not chunks:
            return
        if self.session is not None:
            sid, next_out = self.session.id, self.next_out
            next_in = max(in_seq, self.persisted_in)
            batch = list(rows)
            await asyncio.wrap_future(self.server.store.submit(
                lambda c: store.write_state(c, sid, next_in, next_out, None, batch, now_us())))
            self.persisted_in = next_in
        await self._write(b"".join(chunks))

    async def _write(self, data: bytes) -> None:
        """Send ``data`` and wait until the firm takes it (:meth:`_drain`)."""
        if self.writer.is_closing():
            raise ConnectionResetError("the connection is closed")
        self.writer.write(data)
        self.last_sent = time.monotonic()
        await self._drain()

    async def _resend(self, begin: int, end: int) -> None:
        """The stored application messages of ``begin..end`` again, gap fills for the rest.
        A long range is read page by page and sent piece by piece, each piece waiting for the
        firm to take it: memory stays bounded, and a firm that reads is never dropped for the
        length of the burst."""
        last = self.next_out - 1
        if end == 0 or end > last:
            end = last
        if self.session is None or begin > end:
            if self.session is not None and begin > last:
                log.info("FIX %s: ResendRequest from %s beyond our last sequence number %s", self.peer, begin, last)
            return
        now_text = codec.utc_timestamp(now_us())
        out: list[bytes] = []
        size = count = 0
        expect = begin

        def gap_fill(start: int, new_seq: int) -> bytes:
            return codec.encode("4", self.server.comp_id, self.sender, start, now_text,
                                [(123, "Y"), (36, str(new_seq))], poss_dup=True, orig_sending_time=now_text)

        while expect <= end:
            page = await asyncio.to_thread(store.stored_messages, self.server.db, self.session.id, expect, end,
                                           RESEND_PAGE)
            for seq, msg_type, text in page:
                if seq > expect:
                    out.append(gap_fill(expect, seq))
                fields, _ = codec.parse_fields(text.encode("latin-1").split(b"\x01", 2)[2])
                orig = next((v for t, v in fields if t == 52), now_text)
                body = [(t, v) for t, v in fields if t not in HEADER_TAGS]
                data = codec.encode(msg_type, self.server.comp_id, self.sender, seq, now_text, body,
                                    poss_dup=True, orig_sending_time=orig)
                out.append(data)
                size += len(data)
                expect = seq + 1
                if size >= RESEND_CHUNK:
                    count += len(out)
                    await self._write(b"".join(out))
                    out, size = [], 0
            if len(page) < RESEND_PAGE:
                break
        if expect <= end:
            out.append(gap_fill(expect, end + 1))
        count += len(out)
        if out:
            await self._write(b"".join(out))
        log.info("FIX %s: resent %s..%s (%d messages)", self.peer, begin, end, count)

    # -- input ----------------------------------------------------------------------------
    async def _on_message(self, m: codec.RawMessage) -> None:
        if self.state == "LOGON":
            await self._on_logon(m)
            return
        if self.state != "ACTIVE":
            return
        first: dict[int, str] = dict(reversed(m.fields))  # the first occurrence of each tag
        if m.begin_string != codec.BEGIN_STRING:
            await self._logout_and_close(f"BeginString (8) {m.begin_string!r} is not accepted: FIX.4.4")
            return
        seq_text = first.get(34, "")
        if not mapping.ascii_digits(seq_text) or len(seq_text) > 18:
            await self._logout_and_close("MsgSeqNum (34) is missing or not a number")
            return
        seq = int(seq_text)
        msg_type = first.get(35)
        poss_dup = first.get(43) == "Y"
        if msg_type == "4" and first.get(123, "N") != "Y":  # SequenceReset-Reset: any MsgSeqNum
            await self._sequence_reset(seq, first, gap_fill=False)
            return
        if seq > self.next_in:
            if msg_type == "5":
                await self._logout_and_close("logout")
                return
            if msg_type == "2":
                await self._resend_request(seq, first)
            if self.gap_high is None or self.next_in > self.gap_high:
                log.info("FIX %s: gap: expected %s, received %s; sending ResendRequest", self.peer, self.next_in, seq)
                await self._send("2", [(7, self.next_in), (16, 0)])
            self.gap_high = max(self.gap_high or 0, seq)
            return
        if seq < self.next_in:
            if poss_dup:
                return  # already processed: ignore
            await self._logout_and_close(f"MsgSeqNum too low, expecting {self.next_in} but received {seq}")
            return
        # seq == expected
        self.next_in += 1
        if m.error is not None:
            await self._reject(seq, msg_type, m.error.reason, m.error.tag, m.error.text)
            return
        if msg_type is None:
            await self._reject(seq, None, 1, 35, "MsgType (35) is required")
            return
        if first.get(49) != self.sender or first.get(56) != self.server.comp_id:
            await self._reject(seq, msg_type, 9, 49 if first.get(49) != self.sender else 56,
                               "CompID problem: SenderCompID (49) and TargetCompID (56) must be those of the logon")
            await self._logout_and_close("CompID problem")
            return
        if 52 not in first:
            await self._reject(seq, msg_type, 1, 52, "SendingTime (52) is required")
            return
        try:
            if first[52] != self._last_sending_time:  # many messages share one millisecond
                codec.parse_utc_timestamp_us(first[52], exact=False)
                self._last_sending_time = first[52]
        except ValueError:
            await self._reject(seq, msg_type, 6, 52, "SendingTime (52) is not a UTCTimestamp")
            return
        if poss_dup and 122 not in first and msg_type != "4":
            await self._reject(seq, msg_type, 1, 122, "OrigSendingTime (122) is required with PossDupFlag (43)=Y")
            return
        if msg_type == "AE":
            await self._on_trade_report(m, seq)
        elif msg_type == "0":
            pass
        elif msg_type == "1":
            test_id = first.get(112)
            if test_id is None:
                await self._reject(seq, msg_type, 1, 112, "TestReqID (112) is required")
            else:
                await self._send("0", [(112, test_id)])
        elif msg_type == "2":
            await self._resend_request(seq, first)
        elif msg_type == "3":
            log.info("FIX %s: the firm rejected our message %s: %s", self.peer, first.get(45), first.get(58))
        elif msg_type == "4":
            await self._sequence_reset(seq, first, gap_fill=True)
        elif msg_type == "5":
            log.info("FIX %s: logout from the firm: %s", self.peer, first.get(58, ""))
            await self._logout_and_close("logout")
        elif msg_type == "A":
            await self._logout_and_close("Logon (35=A) received on a session already logged on")
        elif msg_type in FIX44_APP_TYPES:
            await self._send("j", [(45, seq), (372, msg_type), (380, 3),
                                   (58, f"MsgType {msg_type} is not supported: this gateway takes Trade Capture Reports (AE)")], app=True)
        else:
            await self._reject(seq, msg_type, 11, 35, f"MsgType (35) {msg_type[:10]!r} is not a FIX 4.4 message type")

    async def _resend_request(self, seq: int, first: dict[int, str]) -> None:
        begin, end = first.get(7, ""), first.get(16, "")
        digits = mapping.ascii_digits
        if not digits(begin) or not digits(end) or len(begin) > 18 or len(end) > 18:
            await self._reject(seq, "2", 1 if not begin or not end else 6, 7 if not digits(begin) else 16,
                               "ResendRequest needs BeginSeqNo (7) and EndSeqNo (16) as numbers")
            return
        b, e = int(begin), int(end)
        if b < 1 or (e != 0 and e < b):
            await self._reject(seq, "2", 5, 7, "BeginSeqNo (7) must be at least 1 and not after EndSeqNo (16)")
            return
        await self._put(_Slot("resend", self.next_in, args=(b, e)))

    async def _sequence_reset(self, seq: int, first: dict[int, str], gap_fill: bool) -> None:
        new_text = first.get(36, "")
        if not mapping.ascii_digits(new_text) or len(new_text) > 18:
            await self._reject(seq, "4", 1 if not new_text else 6, 36, "NewSeqNo (36) is required as a number")
            return
        new = int(new_text)
        if gap_fill:
            # this message's own number is already counted; jump to NewSeqNo
            if new < self.next_in:
                await self._reject(seq, "4", 5, 36, f"NewSeqNo (36) {new} is lower than the next expected {self.next_in}")
                return
            self.next_in = new
        else:
            if new < self.next_in:
                await self._reject(seq, "4", 5, 36, f"NewSeqNo (36) {new} is lower than the next expected {self.next_in}")
                return
            log.info("FIX %s: SequenceReset-Reset to %s", self.peer, new)
            self.next_in = new

    async def _on_trade_report(self, m: codec.RawMessage, seq: int) -> None:
        try:
            report = mapping.read_trade_report(m)
        except mapping.SessionLevelReject as exc:
            await self._reject(seq, "AE", exc.reason, exc.tag, exc.text)
            return
        assert self.principal is not None
        mpid = self.principal.mpid
        fields = report.fields
        claimed = str(fields.get("reporting_mpid", "")).strip().upper()
        if not claimed:  # no Executing Firm party: the session's firm reports
            fields["reporting_mpid"] = mpid
        if report.reject is None and claimed and claimed != mpid:
            known = await asyncio.to_thread(_firm_exists, self.server.db, claimed)
            if known:
                report.reject = Reject("NOT_OWN_REPORT", "reporting_mpid",
                                       f"reporting party {claimed} is not the firm of user {self.principal.username} ({mpid}): a user reports only for its own firm")
            else:
                report.reject = Reject("FIRM_UNKNOWN", "reporting_mpid", f"reporting party {claimed} is not a firm in reference data")
        if report.reject is None and report.action in ("CANCEL", "CORRECT", "REVERSE") and report.ref_id:
            fields["original_control_number"] = await self._resolve_ref(mpid, report.ref_id)
        command = None
        if report.reject is None:
            try:
                command = parse_command(fields, channel="fix")
            except Rejected as exc:
                report.reject = exc.reject
        slot = _Slot("ar", self.next_in, report=report, ref_seq=seq)
        if command is not None:
            slot.command = command
            self._unsubmitted.append(slot)
        await self._put(slot)

    def _submit_pending(self) -> None:
        """Hand the reports read so far to the engine, in order, as one batch."""
        if not self._unsubmitted:
            return
        try:
            future = self.server.sequencer.submit_many([slot.command for slot in self._unsubmitted])
        except EngineUnavailable as exc:
            future = Future()
            future.set_exception(exc)
        for index, slot in enumerate(self._unsubmitted):
            slot.future, slot.index, slot.command = future, index, None
        self.last_future = future
        self._unsubmitted.clear()

    async def _put(self, slot: _Slot) -> None:
        if self._writer_failed:  # nothing more goes out: the connection is being dropped
            return
        if self.out.full():
            self._submit_pending()  # the writer is about to wait on them
            await self.out.put(slot)
        else:
            self.out.put_nowait(slot)

    async def _resolve_ref(self, mpid: str, ref: str) -> str:
        """TradeReportRefID (572): one of the firm's own TradeReportIDs, else a control number."""
        self._submit_pending()
        if self.last_future is not None and not self.last_future.done():
            await asyncio.wait([asyncio.wrap_future(self.last_future)])
        found = await asyncio.to_thread(_lookup_client_ref, self.server.db, mpid, ref)
        return str(found) if found is not None else ref

    # -- logon ----------------------------------------------------------------------------
    async def _refuse(self, record: store.SessionRecord | None, sender: str, target: str, text: str,
                      persist: bool = True) -> None:
        """Logout with the reason, then disconnect. A known, idle session's outbound sequence
        number is used (and advanced); otherwise 1."""
        log.info("FIX %s: logon of %s refused: %s", self.peer, sender, text)
        seq = 1
        if persist and record is not None and record.id not in self.server.live:
            seq = record.next_out_seq
            sid, nxt = record.id, seq + 1
            try:
                await asyncio.wrap_future(self.server.store.submit(
                    lambda c: c.execute(store.fix_sessions.update().where(store.fix_sessions.c.id == sid)
                                        .values(next_out_seq=nxt, updated_us=now_us()))))
            except Exception:  # pragma: no cover
                seq = 1
        data = codec.encode("5", target or self.server.comp_id, sender or "UNKNOWN", seq,
                            codec.utc_timestamp(now_us()), [(58, text)])
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), 5)
        except Exception:
            pass
        self.state = "CLOSED"
        self.closing = True
        self._queue_close()

    async def _on_logon(self, m: codec.RawMessage) -> None:
        first: dict[int, str] = dict(reversed(m.fields))  # the first occurrence of each tag
        if m.begin_string != codec.BEGIN_STRING or first.get(35) != "A" or m.error is not None:
            log.info("FIX %s: first message is not a FIX.4.4 Logon; disconnecting", self.peer)
            self.state = "CLOSED"
            self.closing = True
            self._queue_close()
            return
        sender, target, seq_text = first.get(49, ""), first.get(56, ""), first.get(34, "")
        if (not sender or not target or not mapping.ascii_digits(seq_text) or len(seq_text) > 18
                or len(sender) > 64):
            await self._refuse(None, sender[:64], target[:64], "Logon needs SenderCompID (49), TargetCompID (56) and MsgSeqNum (34)")
            return
        for tag, name in ((49, "SenderCompID"), (56, "TargetCompID"), (553, "Username")):
            problem = mapping.text_problem(first.get(tag, ""), f"{name} ({tag})")
            if problem is not None:  # looked up in the database, which cannot hold every byte
                await self._refuse(None, sender, target, problem)
                return
        if target != self.server.comp_id:
            await self._refuse(None, sender, target, f"TargetCompID (56) must be {self.server.comp_id}")
            return
        hb_text = first.get(108, "")
        if (not mapping.ascii_digits(hb_text) or len(hb_text) > 10
                or not 1 <= int(hb_text) <= self.server.max_heartbeat):  # the whole value: 0000050000 is 50000
            await self._refuse(None, sender, target, f"HeartBtInt (108) must be 1 to {self.server.max_heartbeat} seconds")
            return
        if first.get(98, "0") != "0":
            await self._refuse(None, sender, target, "EncryptMethod (98) must be 0 (use TLS for encryption)")
            return
        username, password = first.get(553), first.get(554)
        if not username or not password:
            await self._refuse(None, sender, target, "Username (553) and Password (554) are required")
            return
        record = await asyncio.to_thread(store.find_session, self.server.db, sender, target)
        try:
            principal = await asyncio.to_thread(self.server.authenticator, username, password, f"fix:{self.peer}")
        except LogonRefused as exc:
            await self._refuse(record, sender, target, f"logon refused: {exc}")
            return
        except Exception as exc:
            log.error("FIX %s: the access check failed: %r", self.peer, exc)
            await self._refuse(None, sender, target, "logon refused: the access check is unavailable; try again later")
            return
        if record is not None and record.mpid != principal.mpid:
            await self._refuse(None, sender, target, f"logon refused: SenderCompID {sender} belongs to another firm", persist=False)
            return
        if record is None:
            record = await asyncio.to_thread(store.open_session, self.server.db, sender, target, principal.mpid,
                                             principal.username, now_us())
            if record.mpid != principal.mpid:  # pragma: no cover - created meanwhile by another firm
                await self._refuse(None, sender, target, f"logon refused: SenderCompID {sender} belongs to another firm", persist=False)
                return
        if record.id in self.server.live:
            await self._refuse(None, sender, target, f"logon refused: session {sender} is already logged on", persist=False)
            return
        self.server.live[record.id] = self
        self.session, self.principal, self.sender = record, principal, sender
        self.heartbeat = int(hb_text)
        reset = first.get(141) == "Y"
        sid, uname = record.id, principal.username
        if reset:
            await asyncio.wrap_future(self.server.store.submit(lambda c: store.reset_session(c, sid, now_us())))
            record.next_in_seq = record.next_out_seq = 1
        await asyncio.wrap_future(self.server.store.submit(
            lambda c: c.execute(store.fix_sessions.update().where(store.fix_sessions.c.id == sid).values(username=uname))))
        self.next_in, self.next_out = record.next_in_seq, record.next_out_seq
        self.persisted_in = self.next_in
        seq = int(seq_text)
        if seq < self.next_in:
            self.state = "ACTIVE"
            await self._logout_and_close(f"MsgSeqNum too low, expecting {self.next_in} but received {seq}")
            return
        self.state = "ACTIVE"
        if seq == self.next_in:
            self.next_in += 1
        log.info("FIX %s: %s logged on as %s (%s); next in %s, next out %s", self.peer, sender,
                 principal.username, principal.mpid, self.next_in, self.next_out)
        body: list[tuple[int, Any]] = [(98, 0), (108, self.heartbeat)]
        if reset:
            body.append((141, "Y"))
        await self._send("A", body)
        if seq > self.next_in:
            self.gap_high = seq
            await self._send("2", [(7, self.next_in), (16, 0)])

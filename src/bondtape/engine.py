"""The engine: one sequencer for every channel.

``Engine.submit`` takes a batch of commands and, in one database transaction, validates
each against reference data, the rulebook and the current trade state (including earlier
commands of the same batch), appends the accepted ones to the journal with gapless
sequence numbers and updates the trade-state projection. Results are returned only after
the commit: an acknowledged report is durable.

``Sequencer`` puts a thread in front of the engine so that many callers (web requests,
FIX sessions) share group commits: each caller waits for the batch its command joined.

On a SQLite file the engine validates in its process and a journal writer process
(``bondtape.journal.writer_child``) writes a batch of more than one chunk: the batch is
validated in chunks, and each chunk's rows are inserted there while the next chunk is
validated here, on the other core. The engine reads its snapshot only once the writer holds
the database's write lock, and answers only after the writer's commit. Smaller batches, and
every batch on PostgreSQL or an in-memory SQLite database, are written on the engine's own
connection.

On SQLite the engine's commits do not checkpoint the WAL themselves: a
:class:`WalCheckpointer` thread does, on a connection of its own (see its docstring).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import queue
import sqlite3
import threading
import time
import weakref
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Sequence

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine as SAEngine

from bondtape.batching import drain_batch, gc_paused
from bondtape.clock import market_date, now_us
from bondtape.db import reading
from bondtape.journal.projection import Event, decode_payload, insert_rows, project, write
from bondtape.journal.schema import CONTROL_BASE, journal, journal_head
from bondtape.journal.writer import WriterError, WriterGone, WriterProcess
from bondtape.reference.model import Firm, Security
from bondtape.reference.store import load_firms, load_securities
from bondtape.reporting.codes import Reject, Rejected
from bondtape.reporting.commands import Command, client_ref_problem
from bondtape.reporting.validation import check_firm, check_terms
from bondtape.rulebook import Rulebook, default_rulebook, within_cancel_correct_window

__all__ = ["Engine", "Result", "Sequencer", "EngineUnavailable", "WalCheckpointer"]

log = logging.getLogger(__name__)


class EngineUnavailable(RuntimeError):
    """The database could not be reached or the connection broke; retry the same commands.

    Nothing of the batch was journaled, or (if the connection broke during the commit) all
    of it was: a retry with the same ``client_ref`` values gets the first answers back, so
    retrying never duplicates a report.
    """


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


def _reference_version(conn: Connection) -> int | None:
    """One primary-key read: the version every change to reference data bumps."""
    return conn.exec_driver_sql("SELECT version FROM reference_version WHERE id = 1").scalar()


@contextmanager
def _database_errors() -> Iterator[None]:
    """The database down, unreachable or its connection broken: EngineUnavailable."""
    try:
        yield
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        raise EngineUnavailable(_first_line(exc)) from exc
    except sa.exc.DBAPIError as exc:
        if exc.connection_invalidated:
            raise EngineUnavailable(_first_line(exc)) from exc
        raise


@dataclass(slots=True, unsafe_hash=True)  # read-only by convention (frozen is slow to build)
class Result:
    action: str
    client_ref: str | None
    status: str  # ACCEPTED or REJECTED
    control_number: int | None = None
    seq: int | None = None
    reject: Reject | None = None
    timeliness: str | None = None  # ON_TIME, LATE, AS_OF, AS_OF_LATE
    modifier3: str | None = None
    warning: str | None = None
    repeated: bool = False  # the client_ref was seen before: this is the first answer
    # The report an accepted CANCEL, CORRECT or REVERSE acted on: with ``action``, what a
    # retry under the same client_ref must repeat (not in ``as_dict``).
    original_control_number: int | None = None
    # The accepted report's terms key (NEW, CORRECT): a retry must repeat its terms too.
    terms_key: str | None = None

    @property
    def accepted(self) -> bool:
        return self.status == "ACCEPTED"

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action, "client_ref": self.client_ref, "status": self.status,
            "control_number": None if self.control_number is None else str(self.control_number),
            "seq": self.seq, "timeliness": self.timeliness, "modifier3": self.modifier3,
            "warning": self.warning, "repeated": self.repeated,
            "reject": self.reject.as_dict() if self.reject else None,
        }


@dataclass(slots=True)
class _State:
    """What lifecycle checks need to know of a report."""

    control_number: int
    mpid: str
    status: str
    report_date: str
    first_control_number: int
    first_report_date: str
    is_test: bool
    terms_key: str
    payload: dict[str, Any] | None = None  # for a correction's carried-over fields


@dataclass(slots=True)
class _Batch:
    """What the earlier commands of a batch did, for its later ones (in every chunk)."""

    seq: int  # the journal's last sequence number so far
    now: int  # time of receipt of commands that carry none
    states: dict[int, _State]  # reports looked up or created, as the batch left them
    refs: dict[tuple[str, str], Result]  # (mpid, client_ref) -> first result in the batch
    pending_keys: dict[str, int]  # terms keys of reports accepted in the batch
    # Pipelined (Engine.submit_stream): what the batch before did, which this batch's
    # snapshot may or may not hold yet (that batch commits while this one is validated). The
    # reports it created or closed are in ``states``; here, its client references' first
    # results, its active reports' lowest control number per terms key, and the reports it
    # closed. Empty otherwise.
    prior_refs: dict[tuple[str, str], Result] = field(default_factory=dict)
    prior_keys: dict[str, int] = field(default_factory=dict)
    prior_closed: set[int] = field(default_factory=set)

    def carried(self, events: Sequence[Event], now: int) -> "_Batch":
        """The next batch's start, before this batch's commit is known to be in its snapshot:
        the effects of ``events`` (this batch's), as the journal and projection hold them
        once committed. Its client references are this batch's own (``refs``: what the
        journal gives back for them is their result as repeated, see ``_process``)."""
        own = self.states
        states: dict[int, _State] = {}
        keys: dict[str, int] = {}
        closed: set[int] = set()
        for ev in events:
            cn = ev.ref_control_number
            if cn is not None:  # the report it closed
                states[cn] = own[cn]
                closed.add(cn)
            t = ev.event_type
            if t == "NEW" or t == "CORRECT":
                st = states[ev.control_number] = own[ev.control_number]  # type: ignore[index]
                if st.status != "ACTIVE":
                    closed.add(st.control_number)
                elif st.terms_key not in keys:  # events in sequence: the first is the lowest
                    keys[st.terms_key] = st.control_number
        return _Batch(self.seq, now, states, {}, {}, self.refs, keys, closed)


@dataclass(slots=True)
class _Pending:
    """A batch of a stream whose commit was sent and not yet answered."""

    results: list[Result]
    events: list[Event]
    batch: _Batch
    writer: WriterProcess  # the one the commit was sent to (whose answer it is)


@dataclass(slots=True)
class _Stream:
    pending: _Pending | None = None


def terms_key(mpid: str, cusip: str, side: str, quantity_c: int, price_u: int, execution_us: int, contra: str) -> str:
    raw = f"{mpid}|{cusip}|{side}|{quantity_c}|{price_u}|{execution_us}|{contra}"
    return hashlib.blake2b(raw.encode(), digest_size=16).hexdigest()


def _result_from_journal(row: Any) -> Result:
    payload = decode_payload(row.payload)
    return Result(
        action=row.event_type, client_ref=row.client_ref, status="ACCEPTED",
        control_number=row.control_number, seq=row.seq,
        timeliness=payload.get("timeliness"), modifier3=payload.get("modifier3"), repeated=True,
        original_control_number=row.ref_control_number, terms_key=payload.get("terms_key"),
    )


def _reused(cmd: Command, first: Result, key: str | None) -> Reject | None:
    """CLIENT_REF_REUSED when ``cmd`` (its terms key ``key``; None when its terms did not
    pass) is not a retry of the request ``first`` answered: another action, another report
    acted on, or other terms (firm, CUSIP, side, quantity, price, execution time, contra:
    another trade under a reused reference must not be answered as already reported)."""
    same_terms = first.terms_key is None or key is None or first.terms_key == key
    if first.action == cmd.action and first.original_control_number == cmd.original_control_number and same_terms:
        return None
    other = "" if same_terms or first.action != cmd.action else ", with other terms"
    if first.action == "NEW":
        used = f"a NEW report, control number {first.control_number}{other}"
    elif first.action == "CANCEL":
        used = f"the CANCEL of report {first.original_control_number}"
    else:
        used = (f"the {first.action} of report {first.original_control_number}, control number "
                f"{first.control_number}{other}")
    return Reject("CLIENT_REF_REUSED", "client_ref",
                  f"client_ref {cmd.client_ref!r} was already used for {used}; a retry repeats the same request "
                  f"(same action, report acted on and terms), anything else needs a new client_ref")


class WalCheckpointer:
    """Checkpoints a SQLite database's WAL from a thread of its own, off the engine's commits.

    SQLite's default is that a commit which leaves the WAL at 1,000 pages or more copies the
    WAL into the database file and syncs it (a checkpoint) before the commit returns. An
    intake batch of 5,000 reports writes about 2,500 pages of 4 KiB (with 16 KiB pages,
    230-570 pages), so every batch (or every second to fourth) paid for a checkpoint on the
    engine's thread: about half of the commit's time (docs/benchmarks.md,
    intake: a commit took 13-20 us a report with it, 7-9 us without). Here the engine's
    connections checkpoint only past ``bound`` pages (``PRAGMA wal_autocheckpoint``), and
    after each commit the engine wakes this thread, which runs ``PRAGMA
    wal_checkpoint(PASSIVE)`` on its own connection, at most once per ``interval`` seconds.
    pysqlite releases the GIL while SQLite copies and syncs, so the copy runs on another core
    while the engine validates its next batch.

    - A PASSIVE checkpoint never waits for and never blocks writers or readers; it copies
      only frames that are committed, with ``synchronous=FULL`` (the WAL is synced before
      the copy, the database file after it, and only then may the WAL be started over), so
      no committed frame can be lost: crash safety is SQLite's own.
    - Bound: the WAL starts over from its beginning only when a writer begins a
      transaction while all of it has been copied. Under continuous load the engine's next
      batch begins before the thread's checkpoint ends, so the WAL keeps growing; once it
      holds ``bound`` pages, the engine's next commit checkpoints what is left itself (the
      frames since the thread's last checkpoint, about one batch) and the WAL starts over.
      If the thread falls behind or fails, that same commit-path checkpoint keeps the WAL
      below about ``bound`` pages (plus a batch): it is SQLite's own mechanism, only at a
      larger threshold.
    - Checkpoints cover the whole database, whoever wrote: other processes (web server, FIX
      gateway, CLI intake) checkpoint through their own engines, or, without an engine,
      through SQLite's default on their commits. Two checkpoints never run at once (SQLite
      refuses the second: it is counted as ``busy`` and retried at the next commit).
    - An error (the file gone, an I/O error) is logged and counted; the thread ends and the
      next commit after a minute starts another. Meanwhile the bound above holds.
    - The thread runs only while commits come: ``idle`` seconds after the last one (having
      checkpointed it) it closes its connection and ends, and the next commit starts it
      again. :meth:`close` (``Engine.close``, or the engine being garbage-collected) stops it
      at once after a last checkpoint. Engines that have stopped writing hold no thread.
    """

    def __init__(self, path: str, interval: float = 0.1, idle: float = 1.0):
        self.path = path
        self.interval = interval
        self.idle = idle
        self._cond = threading.Condition()
        self._pending = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._retry_at = 0.0  # after an error: not before this time (time.monotonic)
        self._counts = {"checkpoints": 0, "busy": 0, "largest_wal_frames": 0, "errors": 0}
        self.wal_frames = 0  # the WAL's size (frames) at the last checkpoint

    def notify(self) -> None:
        """A commit happened: checkpoint soon (starting the thread if it is not running)."""
        with self._cond:
            if self._closed:
                return
            self._pending = True
            if self._thread is None and time.monotonic() >= self._retry_at:
                self._thread = threading.Thread(target=self._run, name=f"bondtape-checkpointer {self.path}", daemon=True)
                self._thread.start()
            else:
                self._cond.notify()

    def stats(self) -> dict[str, int]:
        """Checkpoints run, refused as busy (another was running), the largest WAL seen
        (frames, before a checkpoint), errors."""
        with self._cond:
            return dict(self._counts)

    def close(self, timeout: float = 10.0) -> None:
        """Checkpoint what is left and stop the thread; later commits no longer wake it."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _next(self, last: float) -> bool:
        """Wait for work; False when the thread should end (idle, or closed)."""
        with self._cond:
            if not self._pending and not self._closed:
                self._cond.wait(self.idle)
            if self._closed:
                return False
            if not self._pending:  # idle: end; the next commit starts another thread
                self._thread = None
                return False
            while not self._closed and (delay := last + self.interval - time.monotonic()) > 0:
                self._cond.wait(delay)  # at most one checkpoint per interval
            self._pending = False
            return True

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        busy, frames, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        with self._cond:
            self.wal_frames = frames
            c = self._counts
            if busy:
                c["busy"] += 1
            else:
                c["checkpoints"] += 1
                c["largest_wal_frames"] = max(c["largest_wal_frames"], frames)

    def _run(self) -> None:
        me = threading.current_thread()
        conn = None
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA synchronous=FULL")  # sync the WAL before copying, the file after
            last = 0.0
            while self._next(last):
                self._checkpoint(conn)
                last = time.monotonic()
            if self._closed:
                self._checkpoint(conn)
        except sqlite3.Error as exc:  # the engine's commit-path checkpoint still bounds the WAL
            with self._cond:
                self._counts["errors"] += 1
                self._retry_at = time.monotonic() + 60
            log.warning("WAL checkpointer for %s stopped: %s", self.path, exc)
        finally:
            with self._cond:
                if self._thread is me:
                    self._thread = None
            if conn is not None:
                conn.close()


class Engine:
    # On SQLite: the engine's connections checkpoint the WAL on their commits only once it
    # holds this many bytes of pages (SQLite's default: 1,000 pages); below it the
    # WalCheckpointer thread does. In pages: ``wal_bound_pages``, from the file's page size.
    WAL_BOUND_BYTES = 80 * 1024 * 1024
    # Through the writer process, a batch is validated and sent in chunks of this many
    # commands: the first chunk's rows are inserted while the second is validated. A batch of
    # one chunk or less is written on the engine's own connection.
    CHUNK = 250

    def __init__(self, db: SAEngine, rulebook: Rulebook | None = None, clock: Callable[[], int] = now_us,
                 writer: str = "auto"):
        """``writer``: ``auto`` writes a SQLite file in WAL mode through a journal writer
        process and anything else on the engine's own connection; ``inline`` always on the
        engine's own connection."""
        if db.dialect.name not in self._LOOKUPS:
            raise ValueError(f"the engine runs on SQLite or PostgreSQL, not {db.dialect.name}")
        if writer not in ("auto", "inline"):
            raise ValueError(f"writer is auto or inline, not {writer!r}")
        self.db = db
        self.rulebook = rulebook or default_rulebook()
        self.clock = clock
        self._reference_mark: int | None = None
        self.securities: dict[str, Security] = {}
        self.firms: dict[str, Firm] = {}
        self._lock = threading.Lock()
        # Called after each commit with that batch's journal events, in sequence order.
        # A listener must not raise; it must catch up from the journal after a restart
        # (a crash between commit and call loses the call, never the event).
        self.listeners: list[Callable[[list[Event]], None]] = []
        # SQLite in WAL mode: the background checkpointer, made at the first commit
        self.checkpointer: WalCheckpointer | None = None
        self._wal_checked = db.dialect.name != "sqlite"  # nothing to set up on PostgreSQL
        self.wal_bound_pages = 0  # SQLite in WAL mode: WAL_BOUND_BYTES in the file's pages
        self._use_writer = writer == "auto"
        self._wal_path: str | None = None  # a SQLite file in WAL mode: written through a writer process
        self._writer: WriterProcess | None = None
        self._writer_pid = 0  # the process that started it (a forked child starts its own)
        self._writer_finalizer: weakref.finalize | None = None  # closes it if the engine is dropped

    def close(self) -> None:
        """Stop the journal writer process and the WAL checkpointer (after a last
        checkpoint). The engine stays usable: its next batch starts another writer. The
        database stays open."""
        self._drop_writer(kill=False)
        if self.checkpointer is not None:
            self.checkpointer.close()

    def note_commit(self) -> None:
        """Another writer in this process committed to the engine's database (outside
        ``submit``): let the checkpointer look at the WAL, as after the engine's commits."""
        if self.checkpointer is not None:
            self.checkpointer.notify()

    def _wal_setup(self, conn: Connection) -> None:
        """SQLite: on each connection the engine writes through, checkpoint on commit only
        past WAL_BOUND_BYTES; on the first, make the checkpointer (a file in WAL mode only)."""
        if not self._wal_checked:
            self._wal_checked = True
            page_size = conn.exec_driver_sql("PRAGMA page_size").scalar() or 4096
            self.wal_bound_pages = max(1, self.WAL_BOUND_BYTES // page_size)
            mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
            path = next((r[2] for r in conn.exec_driver_sql("PRAGMA database_list") if r[1] == "main"), "")
            if str(mode).lower() == "wal" and path:
                self.checkpointer = WalCheckpointer(path)
                weakref.finalize(self, self.checkpointer.close)
                self._wal_path = path
        if self.checkpointer is not None and not conn.info.get("bondtape_wal_bound"):
            conn.exec_driver_sql(f"PRAGMA wal_autocheckpoint={self.wal_bound_pages}")
            conn.info["bondtape_wal_bound"] = True

    @property
    def write_lock(self) -> threading.Lock:
        """Held while a batch is processed and committed. On SQLite another writer in this
        process (the FIX session store) takes it so its commits fall between batches instead
        of waiting on the database's write lock."""
        return self._lock

    # -- reference data -------------------------------------------------------------------
    def _refresh_reference(self, conn: Connection) -> None:
        mark = _reference_version(conn)
        if mark != self._reference_mark:
            self.securities = load_securities(conn)
            self.firms = load_firms(conn)
            self._reference_mark = mark

    # -- intake ---------------------------------------------------------------------------
    def submit(self, commands: Sequence[Command]) -> list[Result]:
        """Validate and journal a batch; results in the same order, after the commit."""
        if not commands:
            return []
        with self._lock, gc_paused():
            with _database_errors():
                # a batch of one chunk has nothing to overlap: the round trips would only add to it
                writer = self._writer_for(commands)
                if writer is None:
                    results, events = self._submit_inline(commands)
                else:
                    results, events = self._submit_through(writer, commands)
            self._committed(events)
        return results

    def submit_stream(self, batches: Iterable[Sequence[Command]], on_results: Callable[[list[Result]], None]) -> None:
        """Submit ``batches`` in turn, calling ``on_results`` with each one's results, in
        order, once that batch is durable: the same results, journal and projection as
        ``submit`` of each batch in turn (for bulk files).

        Through the journal writer process (a SQLite file), each batch is validated while the
        batch before commits, instead of after: the engine's wait for each commit (about a
        fifth of its time) overlaps its next batch. The next batch is validated against a
        snapshot that may not hold the batch before yet, and against what that batch did
        (``_Batch.carried``). Its transaction begins once the batch before has committed;
        if anyone else wrote to the journal or to reference data in between, it is rolled
        back and validated again. If a commit fails, no later batch is journaled; if this
        ends by an exception (Ctrl-C, the writer process gone), a batch whose commit was
        already sent is waited for, and its results are passed on if it committed (and, the
        writer gone, if it answered before it ended). Unless the exception came during that
        very wait, or the writer ended between its commit and its answer: then a batch may
        be journaled without its results passed on, and sending it again gives them back by
        client_ref.

        The engine's lock is held throughout: ``batches`` and ``on_results`` must not submit
        to this engine. Other processes can write between batches, as with ``submit``.
        """
        stream = _Stream()
        with self._lock:
            try:
                for commands in batches:
                    if not commands:
                        self._land(stream, on_results)
                        on_results([])
                        continue
                    if stream.pending is not None and not stream.pending.writer.alive:
                        self._land(stream, on_results)  # its answer, if it gave one before it ended
                    # The WAL starts over from its beginning only if no reader is in it when a
                    # transaction writes: pipelined, the engine's next snapshot always is, and
                    # the WAL would grow without bound. So once it holds WAL_BOUND_BYTES, a
                    # batch as submit does it: the one before commits (and checkpoints) with
                    # no snapshot open, and this one writes with none.
                    in_turn = self._wal_full()
                    with gc_paused(), _database_errors():
                        writer = self._writer_for(commands)
                        if stream.pending is not None and writer is not stream.pending.writer:
                            self._land(stream, on_results)  # (it ended just now: WriterGone)
                        if writer is None or in_turn:  # (no writer: nothing to overlap)
                            self._land(stream, on_results)
                            if writer is None:
                                results, events = self._submit_inline(commands)
                            else:
                                results, events = self._submit_through(writer, commands)
                            self._committed(events)
                        else:
                            results = self._submit_pipelined(writer, commands, stream, on_results)
                    if results is not None:
                        on_results(results)
                self._land(stream, on_results)
            except BaseException as exc:
                try:
                    if stream.pending is not None:
                        try:  # the batch whose commit was sent: it may well have committed (a
                            # writer that ended since: if it answered before it ended)
                            with _database_errors():
                                self._land(stream, on_results)
                        except Exception:
                            pass
                finally:
                    self._drop_writer()  # whatever is open there is rolled back
                if isinstance(exc, WriterError) and exc.kind == "OperationalError":
                    raise EngineUnavailable(str(exc)) from exc
                if isinstance(exc, WriterGone):
                    raise EngineUnavailable(str(exc)) from exc
                raise

    def _writer_for(self, commands: Sequence[Command]) -> WriterProcess | None:
        """The writer process for a batch of these commands, or None to write on the engine's
        own connection (PostgreSQL, SQLite not in a file in WAL mode, a batch of one chunk)."""
        if not self._wal_checked:
            with self.db.connect() as conn:
                self._wal_setup(conn)
        return self._writer_for_batch() if len(commands) > self.CHUNK else None

    def _committed(self, events: list[Event]) -> None:
        """After a batch's commit: wake the checkpointer, call the listeners."""
        if self.checkpointer is not None:
            self.checkpointer.notify()
        if events:
            for listener in self.listeners:
                listener(events)

    def _land(self, stream: "_Stream", on_results: Callable[[list[Result]], None]) -> None:
        """The batch whose commit was sent (if any): wait for the commit, then pass its
        results on."""
        pending, stream.pending = stream.pending, None
        if pending is None:
            return
        pending.writer.answer()  # raises if that commit failed: then nothing of it was journaled
        self._committed(pending.events)
        on_results(pending.results)

    def _submit_pipelined(self, writer: WriterProcess, commands: Sequence[Command], stream: "_Stream",
                          on_results: Callable[[list[Result]], None]) -> list[Result] | None:
        """One batch of a stream through the writer. With a batch before it in flight (its
        commit sent), validated against that batch's memory, which lands meanwhile; its
        commit is sent, not waited for. Returns the results to pass on now (a batch that
        journaled nothing), or None: they come when its commit lands."""
        pending = stream.pending
        if pending is None:
            writer.begin()  # the write lock first, then the snapshot, as in _submit_through
            with reading(self.db) as conn, conn.begin():
                self._refresh_reference(conn)
                batch = _Batch(self._head(conn), self.clock(), {}, {}, {})
                results, events = self._validate_chunks(conn, writer, commands, batch)
        else:
            writer.begin_async()  # taken once the batch before has committed
            batch = pending.batch.carried(pending.events, self.clock())
            with reading(self.db) as conn, conn.begin():
                self._refresh_reference(conn)
                mark = self._reference_mark
                results, events = self._validate_chunks(conn, writer, commands, batch)
            self._land(stream, on_results)
            writer.answer()  # this batch's BEGIN: nobody else can write until its commit
            if not self._base_holds(pending.batch.seq, mark):  # someone wrote in between
                writer.rollback()
                return self._submit_pipelined(writer, commands, stream, on_results)
        if not events:
            writer.rollback()
            return results
        writer.commit_async(events[-1].seq)
        stream.pending = _Pending(results, events, batch, writer)
        return None

    def _wal_full(self) -> bool:
        """The WAL held WAL_BOUND_BYTES or more at the checkpointer's last look."""
        return self.checkpointer is not None and self.checkpointer.wal_frames >= self.wal_bound_pages

    def _base_holds(self, seq: int, reference_mark: int | None) -> bool:
        """The journal's head is still ``seq`` and reference data is at ``reference_mark``."""
        with reading(self.db) as conn:
            return self._head(conn) == seq and _reference_version(conn) == reference_mark

    def _submit_inline(self, commands: Sequence[Command]) -> tuple[list[Result], list[Event]]:
        """The batch validated and written on the engine's own connection, in one transaction."""
        with self.db.begin() as conn:
            if self.checkpointer is not None:
                self._wal_setup(conn)
            self._refresh_reference(conn)
            batch = _Batch(self._head(conn), self.clock(), {}, {}, {})
            results, events = self._process(conn, commands, batch)
            if events:
                insert_rows(conn, journal, [e.journal_row() for e in events])
                write(conn, project(events))
                conn.execute(journal_head.update().where(journal_head.c.id == 1).values(last_seq=events[-1].seq))
        return results, events

    def _submit_through(self, writer: WriterProcess, commands: Sequence[Command]) -> tuple[list[Result], list[Event]]:
        """The batch validated here in chunks, each chunk's rows written by the writer process
        (while the next chunk is validated), committed there."""
        results: list[Result] = []
        events: list[Event] = []
        try:
            writer.begin()  # the write lock: nobody else commits until this batch does
            with reading(self.db) as conn, conn.begin():  # so this snapshot is the batch's base
                self._refresh_reference(conn)
                batch = _Batch(self._head(conn), self.clock(), {}, {}, {})
                results, events = self._validate_chunks(conn, writer, commands, batch)
            if events:
                writer.commit(events[-1].seq)
            else:
                writer.rollback()
        except WriterError as exc:  # the writer rolled back and stays usable
            if exc.kind == "OperationalError":
                raise EngineUnavailable(str(exc)) from exc
            raise
        except WriterGone as exc:
            self._drop_writer()
            raise EngineUnavailable(str(exc)) from exc
        except BaseException:  # a failed read, Ctrl-C: end the writer, whose transaction is rolled back
            self._drop_writer()
            raise
        return results, events

    def _validate_chunks(self, conn: Connection, writer: WriterProcess, commands: Sequence[Command],
                         batch: _Batch) -> tuple[list[Result], list[Event]]:
        """Validate the batch chunk by chunk, sending each chunk's rows to the writer."""
        results: list[Result] = []
        events: list[Event] = []
        for i in range(0, len(commands), self.CHUNK):
            chunk_results, chunk_events = self._process(conn, commands[i:i + self.CHUNK], batch)
            results += chunk_results
            if chunk_events:
                writer.write(chunk_events)
                events += chunk_events
        return results, events

    def _writer_for_batch(self) -> WriterProcess | None:
        if self._wal_path is None or not self._use_writer:
            return None
        if self._writer is not None and (self._writer_pid != os.getpid() or not self._writer.alive):
            self._drop_writer()  # dead, or a forked process's copy (its parent's to use)
        if self._writer is None:
            try:
                self._writer = WriterProcess(self._wal_path, self.wal_bound_pages)
            except (WriterError, WriterGone) as exc:
                raise EngineUnavailable(f"the journal writer process could not open the database: {exc}") from exc
            self._writer_pid = os.getpid()
            self._writer_finalizer = weakref.finalize(self, self._writer.close)
        return self._writer

    def _drop_writer(self, kill: bool = True) -> None:
        writer, self._writer = self._writer, None
        if self._writer_finalizer is not None:  # a replaced writer is not kept alive by it
            self._writer_finalizer.detach()
            self._writer_finalizer = None
        if writer is None or self._writer_pid != os.getpid():
            return
        if kill:
            writer.kill()
        else:
            writer.close()

    def submit_one(self, command: Command) -> Result:
        return self.submit([command])[0]

    def _head(self, conn: Connection) -> int:
        stmt = sa.select(journal_head.c.last_seq).where(journal_head.c.id == 1)
        if conn.dialect.name != "sqlite":
            stmt = stmt.with_for_update()
        return conn.execute(stmt).scalar_one()

    # Batch lookups join the batch's keys (one JSON array on SQLite, arrays on PostgreSQL)
    # to the table's index: one statement per batch, whatever its size.
    _LOOKUPS = {
        "sqlite": {
            "states": "SELECT t.control_number, t.reporting_mpid, t.status, t.report_date, t.first_control_number, "
                      "t.first_report_date, t.is_test, t.terms_key FROM json_each(?) v "
                      "JOIN trade_reports t ON t.control_number = v.value",
            "refs": "SELECT j.seq, j.event_type, j.mpid, j.client_ref, j.control_number, j.ref_control_number, j.payload "
                    "FROM json_each(?) v "
                    "JOIN journal j ON j.mpid = json_extract(v.value, '$[0]') AND j.client_ref = json_extract(v.value, '$[1]')",
            "dups": "SELECT t.terms_key, t.control_number FROM json_each(?) v "
                    "JOIN trade_reports t ON t.cusip = json_extract(v.value, '$[0]') "
                    "AND t.execution_us = json_extract(v.value, '$[1]') AND t.terms_key = json_extract(v.value, '$[2]') "
                    "WHERE t.status = 'ACTIVE'",
        },
        "postgresql": {
            "states": "SELECT t.control_number, t.reporting_mpid, t.status, t.report_date, t.first_control_number, "
                      "t.first_report_date, t.is_test, t.terms_key FROM unnest(%s::bigint[]) AS v(cn) "
                      "JOIN trade_reports t ON t.control_number = v.cn",
            "refs": "SELECT j.seq, j.event_type, j.mpid, j.client_ref, j.control_number, j.ref_control_number, "
                    "j.payload FROM unnest(%s::text[], %s::text[]) AS v(mpid, client_ref) "
                    "JOIN journal j ON j.mpid = v.mpid AND j.client_ref = v.client_ref",
            "dups": "SELECT t.terms_key, t.control_number FROM unnest(%s::text[], %s::bigint[], %s::text[]) "
                    "AS v(cusip, ex, k) JOIN trade_reports t ON t.cusip = v.cusip AND t.execution_us = v.ex "
                    "AND t.terms_key = v.k WHERE t.status = 'ACTIVE'",
        },
    }

    def _lookup(self, conn: Connection, name: str, *columns: list) -> list:
        dialect = conn.dialect.name
        sql = self._LOOKUPS[dialect][name]
        if dialect == "sqlite":
            params: tuple = (orjson.dumps(columns[0] if len(columns) == 1 else list(zip(*columns))).decode(),)
        else:
            params = columns
        return conn.exec_driver_sql(sql, params).all()

    def _preload(self, conn: Connection, commands: Sequence[Command], states: dict[int, _State],
                 prior_refs: dict[tuple[str, str], Result]) -> dict:
        """Into ``states``, the reports the commands act on that are not there yet; returns
        the first results of the commands' (mpid, client_ref) pairs already journaled (by
        the batch before, ``prior_refs``, or in the database)."""
        refs = list({c.original_control_number for c in commands
                     if c.original_control_number is not None and c.original_control_number not in states})
        if refs:
            for r in self._lookup(conn, "states", refs):
                states[r[0]] = _State(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7])
        seen: dict[tuple[str, str], Result] = {}
        keyed = list({(c.reporting_mpid, c.client_ref) for c in commands
                      if c.client_ref and client_ref_problem(c.client_ref) is None})  # the others are refused
        if prior_refs:  # the batch before's first results, as the journal gives them back
            seen = {k: replace(prior_refs[k], warning=None, repeated=True) for k in keyed if k in prior_refs}
            keyed = [k for k in keyed if k not in seen]
        if keyed:
            for row in self._lookup(conn, "refs", [k[0] for k in keyed], [k[1] for k in keyed]):
                seen[(row.mpid, row.client_ref)] = _result_from_journal(row)
        return seen

    def _active_duplicates(self, conn: Connection, wanted: dict[str, tuple[str, int]], batch: _Batch) -> dict[str, int]:
        """Active reports with one of these terms keys (key -> (cusip, execution_us)): the
        lowest control number of each, through the (cusip, execution_us, terms_key) index
        that time and sales use too; with the batch before's reports (``batch.prior_*``) as
        they stand after it, whether or not the snapshot holds them yet."""
        found: dict[str, int] = {}
        if wanted:
            keys = list(wanted)
            closed = batch.prior_closed
            for key, control_number in self._lookup(conn, "dups", [wanted[k][0] for k in keys],
                                                    [wanted[k][1] for k in keys], keys):
                if (key not in found or control_number < found[key]) and control_number not in closed:
                    found[key] = control_number
            prior_keys = batch.prior_keys
            if prior_keys:
                for key in keys:
                    control_number = prior_keys.get(key)
                    if control_number is not None and (key not in found or control_number < found[key]):
                        found[key] = control_number
        return found

    def _process(self, conn: Connection, commands: Sequence[Command], batch: _Batch) -> tuple[list[Result], list[Event]]:
        """Validate commands (the whole batch, or its next chunk) after those ``batch`` has
        seen; ``conn`` reads the database as it was before the batch."""
        states, pending_keys, batch_refs = batch.states, batch.pending_keys, batch.refs
        seen = self._preload(conn, commands, states, batch.prior_refs)
        seq, now = batch.seq, batch.now
        results: list[Result] = []
        events: list[Event] = []
        # First pass: parse-level checks of terms so that duplicate keys can be loaded at once.
        prepared: list[Any] = []
        for cmd in commands:
            report_us = cmd.report_us if cmd.report_us is not None else now
            try:
                # parse_command refuses such a client_ref; the engine does too, whoever built the
                # command: a NUL would fail PostgreSQL's statement, and with it the whole batch.
                if cmd.client_ref is not None:
                    problem = client_ref_problem(cmd.client_ref)
                    if problem is not None:
                        raise Rejected("FIELD_INVALID", "client_ref", problem)
                firm = check_firm(cmd.reporting_mpid, self.firms)
                is_test = cmd.test or firm.test_only
                checked = None
                if cmd.terms is not None:
                    checked = check_terms(cmd.terms, cmd.reporting_mpid, report_us, is_test,
                                          self.securities, self.firms, self.rulebook)
                prepared.append((report_us, is_test, checked, None))
            except Rejected as exc:
                prepared.append((report_us, False, None, exc.reject))
        keys = []
        wanted: dict[str, tuple[str, int]] = {}
        for cmd, (report_us, is_test, checked, rej) in zip(commands, prepared):
            if checked is not None:
                t = cmd.terms
                key = terms_key(cmd.reporting_mpid, t.cusip, t.side, checked.quantity_c, checked.price_u, t.execution_us, t.contra)
                keys.append(key)
                wanted[key] = (t.cusip, t.execution_us)
            else:
                keys.append(None)
        existing_dups = self._active_duplicates(conn, wanted, batch)
        for cmd, (report_us, is_test, checked, rej), key in zip(commands, prepared, keys):
            ref_key = (cmd.reporting_mpid, cmd.client_ref) if cmd.client_ref else None
            if ref_key and (ref_key in seen or ref_key in batch_refs):
                first = seen.get(ref_key) or batch_refs[ref_key]
                reused = _reused(cmd, first, key)
                if reused is not None:
                    results.append(Result(cmd.action, cmd.client_ref, "REJECTED", reject=reused))
                elif ref_key in seen:
                    results.append(replace(first, client_ref=cmd.client_ref))
                else:
                    results.append(replace(first, repeated=True))
                continue
            if rej is not None:
                results.append(Result(cmd.action, cmd.client_ref, "REJECTED", reject=rej))
                continue
            try:
                event = self._decide(cmd, seq + 1, report_us, is_test, checked, key, states,
                                     existing_dups, pending_keys)
            except Rejected as exc:
                results.append(Result(cmd.action, cmd.client_ref, "REJECTED", reject=exc.reject))
                continue
            seq += 1
            events.append(event)
            p = event.payload
            duplicate_of = p.get("duplicate_of")
            # positional: action, client_ref, status, control_number, seq, reject, timeliness, modifier3, warning
            result = Result(cmd.action, cmd.client_ref, "ACCEPTED", event.control_number, event.seq, None,
                            p.get("timeliness"), p.get("modifier3"),
                            f"possible duplicate of {duplicate_of}" if duplicate_of else None, False,
                            cmd.original_control_number, key)
            results.append(result)
            if ref_key:
                batch_refs[ref_key] = result
        batch.seq = seq
        return results, events

    def _decide(self, cmd: Command, seq: int, report_us: int, is_test: bool, checked: Any, key: str | None,
                states: dict[int, _State], existing_dups: dict[str, int], pending_keys: dict[str, int]) -> Event:
        report_date = checked.report_date if checked is not None else market_date(report_us)
        rules = self.rulebook.at(report_date)
        action = cmd.action
        original: _State | None = None
        if action != "NEW":
            original = states.get(cmd.original_control_number)  # type: ignore[arg-type]
            # Another firm's report is answered as one that does not exist, in the same words,
            # before anything else of it is looked at (its status, test flag, window): a firm
            # must not learn that a control number exists and belongs to someone else.
            if original is None or original.mpid != cmd.reporting_mpid:
                raise Rejected("REPORT_UNKNOWN", "original_control_number",
                               f"{cmd.reporting_mpid} has no report with control number {cmd.original_control_number}")
            if original.status != "ACTIVE":
                raise Rejected("REPORT_NOT_ACTIVE", "original_control_number", f"report {original.control_number} is {original.status.lower()}")
            if original.is_test != is_test:
                raise Rejected("TEST_MISMATCH", "test", "a test report and a production report cannot act on each other")
            in_window = within_cancel_correct_window(dt.date.fromisoformat(original.first_report_date), report_date, rules)
            if action in ("CANCEL", "CORRECT") and not in_window:
                raise Rejected("WINDOW_CLOSED", "action", f"report {original.control_number} is past the {rules.cancel_correct_window_business_days}-business-day cancel/correct window: REVERSE it")
            if action == "REVERSE" and in_window:
                raise Rejected("WINDOW_OPEN", "action", f"report {original.control_number} is within the cancel/correct window: CANCEL it instead")
        duplicate_of = None
        if key is not None:
            match = pending_keys.get(key) or existing_dups.get(key)
            if match is not None and match in states and states[match].status != "ACTIVE":
                match = None
            if match is not None and original is not None and match == original.control_number:
                match = None
            if match is not None and not cmd.allow_duplicate:
                if rules.duplicate_terms == "reject":
                    raise Rejected("DUPLICATE_TRADE", "client_ref", f"the terms match accepted report {match}; if this is a separate trade, resend with allow_duplicate=Y")
                duplicate_of = match
        control_number = CONTROL_BASE + seq
        report_date_s = report_date.isoformat()
        if action == "NEW" or action == "CORRECT":
            t = cmd.terms
            s = checked.security
            tl = checked.timeliness
            if original is None:
                first_cn, first_date = control_number, report_date_s
            else:
                first_cn, first_date = original.first_control_number, original.first_report_date
            # the keys of projection.TERMS_LAYOUT, in its order
            payload: dict[str, Any] = {
                "report_date": report_date_s, "cusip": t.cusip, "symbol": s.symbol, "data_set": s.data_set,
                "grade": s.grade, "rule_144a": s.rule_144a, "side": t.side, "capacity": t.capacity,
                "contra": t.contra, "contra_type": t.contra_type, "quantity_c": checked.quantity_c,
                "price_u": checked.price_u, "yield_u": checked.yield_u, "execution_us": t.execution_us,
                "execution_date": checked.execution_date.isoformat(),
                "settlement_date": checked.settlement_date.isoformat(), "commission_c": checked.commission_c,
                "when_issued": t.when_issued, "special_price": t.special_price,
                "weighted_average": t.weighted_average, "trading_market": t.trading_market,
                "merger_transfer": t.merger_transfer, "remuneration": t.remuneration, "locked_in": t.locked_in,
                "agu": t.agu, "is_test": is_test, "withheld": checked.withheld, "duplicate_of": duplicate_of,
                "terms_key": key, "rulebook": checked.rulebook_version, "as_of": tl.as_of, "late": tl.late,
                "modifier3": tl.modifier3, "timeliness": tl.label, "deadline_us": tl.deadline_us,
                "first_control_number": first_cn, "first_report_date": first_date,
            }
            states[control_number] = _State(control_number, cmd.reporting_mpid, "ACTIVE", report_date_s,
                                            first_cn, first_date, is_test, key)
            pending_keys[key] = control_number
        else:
            payload = {"report_date": report_date_s}
        if original is not None:
            original.status = {"CANCEL": "CANCELLED", "CORRECT": "CORRECTED", "REVERSE": "REVERSED"}[action]
            payload["test"] = is_test
        event_cn = original.control_number if action == "CANCEL" else control_number
        return Event(
            seq, report_us, action, cmd.channel, cmd.reporting_mpid, cmd.client_ref, event_cn,
            original.control_number if original else None, payload,
        )


class Sequencer:
    """A thread that groups commands from many callers into engine batches (group commit)."""

    def __init__(self, engine: Engine, max_batch: int = 2000):
        self.engine = engine
        self.max_batch = max_batch
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="bondtape-sequencer", daemon=True)
        self._stopping = False
        self._thread.start()

    def submit(self, command: Command) -> Future:
        """A future of the command's :class:`Result`."""
        if self._stopping:
            raise EngineUnavailable("the sequencer is shutting down")
        fut: Future = Future()
        self._queue.put((command, fut, False))
        return fut

    def submit_many(self, commands: Sequence[Command]) -> Future:
        """One future of the list of results of ``commands`` (in order, in one batch):
        for a channel that reads many commands at once, one wake-up instead of one each."""
        if self._stopping:
            raise EngineUnavailable("the sequencer is shutting down")
        fut: Future = Future()
        self._queue.put((list(commands), fut, True))
        return fut

    def __call__(self, command: Command, timeout: float | None = 30.0) -> Result:
        return self.submit(command).result(timeout)

    @staticmethod
    def _size(item: tuple) -> int:
        return len(item[0]) if item[2] else 1

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch, stopping = drain_batch(self._queue, item, self.max_batch, self._size)
            if stopping:
                self._queue.put(None)  # stop after this batch
            commands: list[Command] = []
            for what, _, many in batch:
                if many:
                    commands.extend(what)
                else:
                    commands.append(what)
            try:
                results = self.engine.submit(commands)
            except Exception as exc:  # every waiter learns of the failure; nothing was journaled
                for _, fut, _ in batch:
                    fut.set_exception(exc)
                continue
            at = 0
            for what, fut, many in batch:
                if many:
                    fut.set_result(results[at:at + len(what)])
                    at += len(what)
                else:
                    fut.set_result(results[at])
                    at += 1

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking commands, finish those queued, and stop the thread."""
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout)

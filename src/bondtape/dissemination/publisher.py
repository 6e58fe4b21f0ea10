"""The publisher: journal events in, public messages out.

The feed is a projection of the journal. :class:`Publisher` applies journal events in
sequence order (live from ``engine.listeners``, or caught up from the journal after a
start or a gap) and decides with the pure rules of :mod:`bondtape.dissemination.rules`.
Each message is handed to subscribers as soon as it is made: it is a pure function of the
journal, which is durable before the engine calls its listeners. The feed's own tables
(``feed_messages``, ``feed_reports``, ``feed_days``, ...) are written after that, in
transactions that also advance the publisher's durable position: in the engine's process
by the publisher's thread, a few times a second, many events per transaction; after a
crash the publisher resumes from the stored position and makes the same messages, byte
for byte (subscribers drop positions they have already seen).

Message sequence numbers are gapless per data set (CORP, AGCY) and feed day. A feed day
opens with START_OF_DAY when its first message is due and closes with a daily summary per
security, the market aggregates and END_OF_DAY, either when the operator ends the day or
when the first event of a later market day arrives.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine as SAEngine

from bondtape.clock import iso_market, market_date, now_us
from bondtape.db import reading
from bondtape.dissemination import rules as R
from bondtape.dissemination.schema import (
    FEED_TABLES, feed_days, feed_last_sale, feed_messages, feed_operator_actions, feed_position,
    feed_reports,
)
from bondtape.journal.projection import Event
from bondtape.journal.schema import journal
from bondtape.reference.schema import securities as securities_table
from bondtape.rulebook import Rulebook, default_rulebook

__all__ = ["DATA_SETS", "FeedMessage", "FeedError", "Publisher", "Subscription", "read_messages"]

log = logging.getLogger("bondtape.feed")

DATA_SETS = ("CORP", "AGCY")
HALT_REASON_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


class FeedError(ValueError):
    """An operator request the feed refuses: a stable code, the field, and what is accepted."""

    def __init__(self, code: str, field: str, message: str):
        super().__init__(message)
        self.code, self.field, self.message = code, field, message

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "field": self.field, "message": self.message}


@dataclass(frozen=True, slots=True)
class FeedMessage:
    """A published message: its place in the feed and the exact bytes of its JSON body."""

    data_set: str
    date: str
    seq: int
    type: str
    body: str
    pub_order: int
    journal_seq: int | None = None
    cusip: str | None = None

    @property
    def position(self) -> tuple[str, int]:
        return (self.date, self.seq)

    @classmethod
    def from_row(cls, r: Any) -> "FeedMessage":
        return cls(r.data_set, r.feed_date, r.msg_seq, r.msg_type, r.body, r.pub_order, r.journal_seq, r.cusip)


def _feed_writer(db: SAEngine) -> SAEngine:
    """The connection the publisher writes with.

    On SQLite it is a second engine on the same file with ``synchronous=NORMAL``: the feed
    tables are a projection that the publisher rebuilds from the durable journal, so its
    commits need not wait for the disk (WAL keeps them atomic; after a power loss the
    publisher resumes from the position that survived, in the same transactions). The
    journal's own commits keep ``synchronous=FULL``. PostgreSQL uses the engine as given.
    """
    if db.dialect.name != "sqlite" or db.url.database in (None, "", ":memory:"):
        return db
    from bondtape.db import connect

    writer = connect(db.url.render_as_string(hide_password=False), migrate_schema=False)

    @sa.event.listens_for(writer, "connect")
    def _normal(dbapi_connection, _record) -> None:  # after bondtape.db's pragmas
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    return writer


def read_messages(conn: Connection, data_set: str, start: tuple[str, int] = ("", 1), *,
                  until: tuple[str, int] | None = None, limit: int | None = None) -> list[FeedMessage]:
    """Stored messages of ``data_set`` from position ``start`` = (date, seq) on, in order."""
    m = feed_messages.c
    date, seq = start
    cond = sa.and_(m.data_set == data_set,
                   sa.or_(m.feed_date > date, sa.and_(m.feed_date == date, m.msg_seq >= seq)))
    if until is not None:
        cond = sa.and_(cond, sa.or_(m.feed_date < until[0], sa.and_(m.feed_date == until[0], m.msg_seq <= until[1])))
    stmt = sa.select(feed_messages).where(cond).order_by(m.feed_date, m.msg_seq)
    if limit is not None:
        stmt = stmt.limit(limit)
    return [FeedMessage.from_row(r) for r in conn.execute(stmt)]


def _after(pos: tuple[str, int] | None, msg: FeedMessage) -> bool:
    return pos is None or msg.position > pos


class Subscription:
    """One subscriber: the data sets it may see and a callable that takes each message.

    ``deliver`` is called in order, once per message, from the publisher's thread when
    live (it must be quick and must not raise: hand the message to a queue). ``last``
    holds the position of the last message delivered per data set.
    """

    def __init__(self, publisher: "Publisher", deliver: Callable[[FeedMessage], None], data_sets: Iterable[str],
                 on_shutdown: Callable[[], None] | None = None):
        self.publisher = publisher
        self.deliver = deliver
        self.on_shutdown = on_shutdown
        self.data_sets = frozenset(data_sets)
        self.last: dict[str, tuple[str, int] | None] = {ds: None for ds in self.data_sets}
        self._buffer: list[FeedMessage] | None = []
        self.closed = False

    def _offer(self, msg: FeedMessage) -> None:  # under the publisher's fan-out lock
        if self.closed or msg.data_set not in self.data_sets:
            return
        if self._buffer is not None:
            self._buffer.append(msg)
        elif _after(self.last[msg.data_set], msg):
            self.last[msg.data_set] = msg.position
            self.deliver(msg)

    def close(self) -> None:
        self.closed = True
        self.publisher._unsubscribe(self)


@dataclass
class _Writes:
    """What some journal events (and operator actions) change in the feed tables, stored in
    one transaction that moves the durable position to ``upto`` (journal seq, action id)."""

    gen: int
    upto: tuple[int, int]
    messages: list[FeedMessage]
    new_reports: list[dict[str, Any]]  # copies, as they were when sealed
    statuses: dict[int, str]  # status changes of reports made by earlier writes
    days: dict[tuple[str, str], tuple[int, bool]]
    last_sale: dict[tuple[str, str], tuple[str, int]]  # (data set, cusip) -> (date, price_u)
    actions: list[dict[str, Any]]  # operator actions to record


@dataclass
class _Batch:
    """The working state of one application of events and actions.

    ``upto`` is the position after the last event or action applied completely; what was
    made since the last seal goes to the next :class:`_Writes`."""

    upto: tuple[int, int]
    messages: list[FeedMessage] = field(default_factory=list)  # everything made by this application
    reports: dict[int, dict[str, Any]] = field(default_factory=dict)  # loaded or new, by control number
    new_reports: list[int] = field(default_factory=list)
    changed_status: set[int] = field(default_factory=set)
    days: set[tuple[str, str]] = field(default_factory=set)
    last_sale: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)
    actions: list[dict[str, Any]] = field(default_factory=list)
    sealed_messages: int = 0
    blocks: dict[int, R.Encoded] = field(default_factory=dict)  # public blocks made in this batch


_RECOVER = object()  # queued when an application or a write failed
_STORE = object()  # queued when writes start waiting: the thread sets its deadline
_FLUSH = object()  # queued by wait_for: store now


class _Conflict(RuntimeError):
    """Another publisher moved the position first: reload and go on from the database."""


class _Broken(RuntimeError):
    """A write failed: the publisher's state is ahead of what is stored until it recovers."""


_INSERT_SQL: dict[tuple[str, str], tuple[str, tuple[str, ...] | None]] = {}


def _insert_many(conn: Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """INSERT the rows (dicts with every column of ``table``) through the driver's own
    executemany: SQLAlchemy's per-row parameter processing costs more than the database's
    work here, and these columns need no conversion (bool, int, str and None pass as they are)."""
    key = (conn.dialect.name, table.name)
    if key not in _INSERT_SQL:
        compiled = table.insert().compile(dialect=conn.dialect, column_keys=[c.name for c in table.columns])
        _INSERT_SQL[key] = (str(compiled), tuple(compiled.positiontup) if conn.dialect.positional else None)
    sql, order = _INSERT_SQL[key]
    if order is not None:
        conn.exec_driver_sql(sql, [tuple([r[c] for c in order]) for r in rows])
    else:
        conn.exec_driver_sql(sql, rows)


# Statements built once (each execution then skips building and hashing a new one).
_INSERT_ACTIONS = feed_operator_actions.insert()
_UPDATE_STATUS = (feed_reports.update().where(feed_reports.c.control_number == sa.bindparam("b_cn"))
                  .values(status=sa.bindparam("b_status")))
_UPDATE_DAY = (feed_days.update().where(feed_days.c.data_set == sa.bindparam("b_ds"),
                                        feed_days.c.feed_date == sa.bindparam("b_date"))
               .values(last_seq=sa.bindparam("b_last"), closed=sa.bindparam("b_closed")))
_INSERT_DAY = feed_days.insert()
_UPDATE_LAST_SALE = (feed_last_sale.update().where(feed_last_sale.c.data_set == sa.bindparam("b_ds"),
                                                   feed_last_sale.c.cusip == sa.bindparam("b_cusip"))
                     .values(feed_date=sa.bindparam("b_date"), price_u=sa.bindparam("b_price")))
_INSERT_LAST_SALE = feed_last_sale.insert()
_ADVANCE = (feed_position.update().where(feed_position.c.id == 1,
                                         feed_position.c.journal_seq == sa.bindparam("b_seq"),
                                         feed_position.c.action_id == sa.bindparam("b_action"))
            .values(journal_seq=sa.bindparam("b_new_seq"), action_id=sa.bindparam("b_new_action")))


class Publisher:
    """Turns the journal into the public feed and fans it out to subscribers.

    Live (``start(engine)``), events are applied in the engine's thread right after its
    commit and each message is handed to subscribers as soon as it is made; what they
    change in the feed tables waits up to ``store_interval`` seconds and is stored by the
    publisher's thread, many batches in one transaction. ``wait_for`` and ``flush`` wait
    for that; everything else (``apply_live``, ``catch_up``, operator actions,
    ``subscribe``) stores before it returns.
    """

    store_interval = 0.05  # seconds live writes may gather before the publisher's thread stores them
    max_pending_messages = 20_000  # past this many waiting, the applying thread stores them itself

    def __init__(self, db: SAEngine, rulebook: Rulebook | None = None, clock: Callable[[], int] = now_us,
                 chunk: int = 5000, *, store_interval: float | None = None):
        self.db = db
        self._writer = _feed_writer(db)
        self.rulebook = rulebook or default_rulebook()
        self.clock = clock
        self.chunk = chunk
        if store_interval is not None:
            self.store_interval = store_interval
        # Locks, always taken in this order: the engine's write lock (SQLite, the publisher's
        # thread only), _lock (applying events and actions), _write_lock (storing), then
        # _pending_lock (the waiting writes and the rows they change) or _fanout.
        self._lock = threading.RLock()
        self._write_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._fanout = threading.Lock()
        self._pending: list[_Writes] = []
        self._pending_messages = 0
        self._store_queued = False
        self._overlay: dict[int, tuple[dict[str, Any], int]] = {}  # report rows not stored as they are now
        self._gen = itertools.count(1)
        self._engine_lock: Any = None
        self._broken = False
        self._subscriptions: list[Subscription] = []
        self.shutting_down = False  # end_streams() was called: subscriptions with on_shutdown end at once
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._engine = None
        self._stopping = False
        self.errors = 0
        self.poll_interval: float | None = None
        self.inline = True
        self._load()

    # -- state -------------------------------------------------------------------------
    def _load(self) -> None:
        with reading(self.db) as conn:
            pos = conn.execute(sa.select(feed_position).where(feed_position.c.id == 1)).one()
            self.position = pos.journal_seq
            self.action_id = pos.action_id
            self.days: dict[tuple[str, str], list] = {
                (r.data_set, r.feed_date): [r.last_seq, bool(r.closed)] for r in conn.execute(sa.select(feed_days))
            }
            self.pub_order = conn.execute(sa.select(sa.func.coalesce(sa.func.max(feed_messages.c.pub_order), 0))).scalar_one()
            self.halted: set[str] = set()
            for r in conn.execute(sa.select(feed_operator_actions).where(feed_operator_actions.c.id <= self.action_id)
                                  .order_by(feed_operator_actions.c.id)):
                if r.action == "HALT":
                    self.halted.add(r.cusip)
                elif r.action == "RESUME":
                    self.halted.discard(r.cusip)
        self.current_date: str | None = max((d for _, d in self.days), default=None)
        self._stored = self._sealed = (self.position, self.action_id)
        self.delivered = self.position  # journal events whose messages subscribers have been given
        self.stored = self.position  # journal events whose messages are stored

    def _reset(self) -> None:
        """Forget what is not stored and reload the stored state (after a failure)."""
        with self._lock, self._write_lock:
            self._broken = True
            with self._pending_lock:
                self._pending, self._pending_messages, self._store_queued = [], 0, False
                self._overlay = {}
            self._load()
            self._broken = False

    def _fail(self) -> None:
        """An application or a write failed: go back to what is stored (the journal keeps the
        events; what subscribers were already given is made again, identically)."""
        self._broken = True
        try:
            self._reset()
        except Exception:  # the database is not answering: the publisher's thread retries
            log.exception("feed state could not be reloaded; retrying from the publisher's thread")
            if self._thread is not None:
                self._queue.put(_RECOVER)

    # -- running -----------------------------------------------------------------------
    def start(self, engine: Any | None = None, *, poll_interval: float | None = None,
              inline: bool = True) -> "Publisher":
        """Catch up from the journal, then follow it: live from ``engine`` (its listeners) in
        the same process (``inline``: in the engine's thread; else queued to the publisher's
        thread), and/or by reading the journal every ``poll_interval`` seconds (a publisher
        in another process than the engine)."""
        self.poll_interval = poll_interval
        self.inline = inline
        if engine is not None:
            self._engine = engine
            # On SQLite the feed's transactions take the engine's write lock, so that they
            # fall between the engine's batches instead of waiting on the database's lock.
            lock = getattr(engine, "write_lock", None)
            self._engine_lock = lock if self.db.dialect.name == "sqlite" else None
            engine.listeners.append(self._on_events)
        self.catch_up()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="bondtape-feed-publisher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop following; what was published and not yet stored is stored first."""
        if self._engine is not None and self._on_events in self._engine.listeners:
            self._engine.listeners.remove(self._on_events)
        self._stopping = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        try:
            self._store()
        except Exception:  # the next start catches up from the journal
            log.exception("feed writes could not be stored at stop; the next start makes them again")

    def close(self) -> None:
        """Stop following and release the publisher's own connections."""
        self.stop()
        if self._writer is not self.db:
            self._writer.dispose()

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _on_events(self, events: list[Event]) -> None:
        """The engine listener: never raises. Inline (the default) the events are applied in
        the engine's thread right after its commit and the messages handed out at once; the
        publisher's thread stores them a moment later."""
        if not self.inline:
            self._queue.put(events)
            return
        if self._broken:  # the publisher's thread is recovering from the journal
            return
        try:
            self._apply_events(events, store=False)
        except Exception:  # the journal keeps the events: the publisher's thread catches up
            self.errors += 1
            log.exception("feed publisher failed; catching up from the journal")
            self._queue.put(_RECOVER)

    def _run(self) -> None:
        store_due: float | None = None
        poll_due = time.monotonic() + self.poll_interval if self.poll_interval else None
        while True:
            due = min((d for d in (store_due, poll_due) if d is not None), default=None)
            try:
                item = self._queue.get(timeout=None if due is None else max(0.0, due - time.monotonic()))
            except queue.Empty:
                item = _STORE
            try:
                if item is None:
                    self._store(self._engine_lock)
                    return
                if item is _RECOVER:
                    store_due = None
                    self._recover()
                    continue
                if item is _FLUSH:
                    store_due = time.monotonic()
                elif item is _STORE:
                    if store_due is None and self._pending:
                        store_due = time.monotonic() + self.store_interval
                else:  # events queued by a listener that is not inline
                    events = list(item)
                    while True:  # take whatever else is waiting
                        try:
                            more = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if more is None or more is _RECOVER or more is _STORE or more is _FLUSH:
                            self._queue.put(more)
                            break
                        events.extend(more)
                    self._apply_events(events, store=False)
                    if store_due is None:
                        store_due = time.monotonic() + self.store_interval
                now = time.monotonic()
                if store_due is not None and now >= store_due:
                    store_due = None
                    self._store(self._engine_lock)
                if poll_due is not None and now >= poll_due:
                    self.catch_up()
                    poll_due = time.monotonic() + self.poll_interval
            except Exception:  # the journal keeps the events; catch up once the database answers
                self.errors += 1
                log.exception("feed publisher failed; will catch up from the journal")
                store_due = None
                time.sleep(0.05)
                self._recover()

    def _recover(self) -> None:
        for attempt in range(100):
            if self._stopping:
                return
            try:
                self._reset()
                self.catch_up()
                return
            except Exception:
                log.exception("feed catch-up failed (attempt %d)", attempt + 1)
                time.sleep(min(2.0, 0.05 * 2 ** attempt))

    def wait_for(self, journal_seq: int, timeout: float = 10.0) -> bool:
        """Block until the messages of the journal up to ``journal_seq`` were handed to
        subscribers and stored (tests, tools)."""
        deadline = time.monotonic() + timeout
        asked = False
        while self.stored < journal_seq:
            if not asked and self.delivered >= journal_seq and self._thread is not None:
                self._queue.put(_FLUSH)  # no need to wait for the store interval
                asked = True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def flush(self) -> None:
        """Store now everything published so far."""
        with self._lock:
            self._store()

    # -- applying the journal ----------------------------------------------------------
    def apply_live(self, events: Sequence[Event]) -> list[FeedMessage]:
        """Apply events handed over live and store them before returning; a gap or a repeat
        is settled from the journal."""
        return self._apply_events(events, store=True)

    def _apply_events(self, events: Sequence[Event], *, store: bool) -> list[FeedMessage]:
        with self._lock:
            if self._broken:
                self._reset()
            events = [e for e in events if e.seq > self.position]
            if not events:
                return []
            if events[0].seq != self.position + 1 or any(b.seq != a.seq + 1 for a, b in zip(events, events[1:])):
                return self.catch_up()
            out = self._project(events, [])
            if store:
                self._store()
        if not store:
            self._schedule_store()
        return out

    def catch_up(self) -> list[FeedMessage]:
        """Apply and store every journal event (and pending operator action) after the
        position."""
        out: list[FeedMessage] = []
        with self._lock:
            if self._broken:
                self._reset()
            while True:
                with reading(self.db) as conn:
                    rows = conn.execute(sa.select(journal).where(journal.c.seq > self.position)
                                        .order_by(journal.c.seq).limit(self.chunk)).all()
                    actions = [dict(r._mapping) for r in conn.execute(
                        sa.select(feed_operator_actions).where(feed_operator_actions.c.id > self.action_id)
                        .order_by(feed_operator_actions.c.id))]
                if not rows and not actions:
                    break
                events = [Event.from_row(r) for r in rows]
                if events:
                    upto = events[-1].seq
                    actions = [a for a in actions if a["after_journal_seq"] <= upto]
                out.extend(self._project(events, actions))
                self._store()
            self._store()
        return out

    def _project(self, events: Sequence[Event], actions: Sequence[dict[str, Any]]) -> list[FeedMessage]:
        """Apply events and already-recorded actions (under ``_lock``); seal their writes."""
        b = _Batch(upto=(self.position, self.action_id))
        pending = sorted(actions, key=lambda a: a["id"])
        # Messages of journal events are a pure function of the (durable) journal: each is
        # handed out as soon as it is made, before the feed's own writes are stored; a crash
        # before they are stored makes the same bytes again, and subscribers drop positions
        # they have seen. Operator actions are not in the journal: stored first, then sent.
        early = not actions
        try:
            self._preload(b, [e.ref_control_number for e in events if e.ref_control_number])
            sent = 0
            for ev in events:
                while pending and pending[0]["after_journal_seq"] < ev.seq:
                    a = pending.pop(0)
                    self._apply_action(b, a)
                    b.upto = (b.upto[0], a["id"])
                self._apply(b, ev)
                b.upto = (ev.seq, b.upto[1])
                if early and len(b.messages) > sent:
                    self._fan_out(b.messages[sent:])
                    sent = len(b.messages)
            for a in pending:
                self._apply_action(b, a)
                b.upto = (b.upto[0], a["id"])
            self._seal(b)
            if not early:
                self._store()
        except BaseException:
            self._fail()
            raise
        self.position, self.action_id = b.upto
        if not early:
            self._fan_out(b.messages)
        self.delivered = self.position
        return b.messages

    # -- storing -------------------------------------------------------------------------
    def _seal(self, b: _Batch) -> None:
        """Queue what ``b`` made since its last seal, up to ``b.upto``, for storing."""
        fresh = b.messages[b.sealed_messages:]
        if not (fresh or b.new_reports or b.changed_status or b.days or b.last_sale or b.actions) \
                and b.upto == self._sealed:
            return
        gen = next(self._gen)
        new = set(b.new_reports)
        w = _Writes(
            gen=gen, upto=b.upto, messages=fresh,
            new_reports=[dict(b.reports[c]) for c in b.new_reports],
            statuses={c: b.reports[c]["status"] for c in b.changed_status if c not in new},
            days={k: (self.days[k][0], self.days[k][1]) for k in b.days},
            last_sale=dict(b.last_sale), actions=list(b.actions),
        )
        with self._pending_lock:
            for c in itertools.chain(b.new_reports, b.changed_status):
                self._overlay[c] = (b.reports[c], gen)
            self._pending.append(w)
            self._pending_messages += len(fresh)
        self._sealed = b.upto
        b.sealed_messages = len(b.messages)
        b.new_reports, b.changed_status, b.days, b.last_sale, b.actions = [], set(), set(), {}, []

    def _settle(self, b: _Batch) -> None:
        """Store everything applied before the current event or action (which has changed
        nothing yet): end-of-day figures are read from the stored tables."""
        self._seal(b)
        self._store()

    def _schedule_store(self) -> None:
        thread = self._thread
        with self._pending_lock:
            if not self._pending:
                return
            now = self._pending_messages >= self.max_pending_messages or thread is None or not thread.is_alive()
            if not now:
                if self._store_queued:
                    return
                self._store_queued = True
        if now:  # no thread to store them, or it fell behind: store here
            self._store()
        else:
            self._queue.put(_STORE)

    def _store(self, engine_lock: Any = None) -> None:
        """Write everything waiting, in order, in one transaction that moves the stored
        position (compare-and-set: a second publisher cannot interleave)."""
        with engine_lock if engine_lock is not None else contextlib.nullcontext(), self._write_lock:
            with self._pending_lock:
                items, self._pending = self._pending, []
                self._pending_messages, self._store_queued = 0, False
            if not items:
                return
            if self._broken:
                raise _Broken("an earlier write failed; the feed is reloading from what is stored")
            try:
                self._write(items)
            except BaseException:
                self._broken = True
                raise
            with self._pending_lock:
                for w in items:
                    for c in itertools.chain((r["control_number"] for r in w.new_reports), w.statuses):
                        held = self._overlay.get(c)
                        if held is not None and held[1] <= w.gen:
                            del self._overlay[c]
            self.stored = items[-1].upto[0]

    def _write(self, items: list[_Writes]) -> None:
        upto = items[-1].upto
        with self._writer.begin() as conn:
            reports = [r for w in items for r in w.new_reports]
            if reports:
                _insert_many(conn, feed_reports, reports)
            statuses: dict[int, str] = {}
            for w in items:
                statuses.update(w.statuses)
            if statuses:
                conn.execute(_UPDATE_STATUS, [{"b_cn": c, "b_status": s} for c, s in sorted(statuses.items())])
            messages = [m for w in items for m in w.messages]
            if messages:
                _insert_many(conn, feed_messages, [
                    {"data_set": m.data_set, "feed_date": m.date, "msg_seq": m.seq, "pub_order": m.pub_order,
                     "msg_type": m.type, "cusip": m.cusip, "journal_seq": m.journal_seq, "body": m.body}
                    for m in messages])
            actions = [a for w in items for a in w.actions]
            if actions:
                conn.execute(_INSERT_ACTIONS, actions)
            days: dict[tuple[str, str], tuple[int, bool]] = {}
            last_sale: dict[tuple[str, str], tuple[str, int]] = {}
            for w in items:
                days.update(w.days)
                last_sale.update(w.last_sale)
            for (ds, date), (last, closed) in sorted(days.items()):
                if not conn.execute(_UPDATE_DAY, {"b_ds": ds, "b_date": date, "b_last": last, "b_closed": closed}).rowcount:
                    conn.execute(_INSERT_DAY, {"data_set": ds, "feed_date": date, "last_seq": last, "closed": closed})
            for (ds, cusip), (date, price_u) in sorted(last_sale.items()):
                if not conn.execute(_UPDATE_LAST_SALE, {"b_ds": ds, "b_cusip": cusip, "b_date": date,
                                                        "b_price": price_u}).rowcount:
                    conn.execute(_INSERT_LAST_SALE, {"data_set": ds, "cusip": cusip, "feed_date": date,
                                                     "price_u": price_u})
            res = conn.execute(_ADVANCE, {"b_seq": self._stored[0], "b_action": self._stored[1],
                                          "b_new_seq": upto[0], "b_new_action": upto[1]})
            if res.rowcount != 1:
                raise _Conflict("the feed position moved under this publisher")
        self._stored = upto

    def _preload(self, b: _Batch, control_numbers: list[int]) -> None:
        """The reports that events act on: as this publisher last made them if that is not
        stored yet, else from the feed tables."""
        wanted = []
        with self._pending_lock:
            for c in set(control_numbers):
                if c in b.reports:
                    continue
                held = self._overlay.get(c)
                if held is not None:
                    b.reports[c] = held[0]
                else:
                    wanted.append(c)
        if not wanted:
            return
        with reading(self.db) as conn:
            for i in range(0, len(wanted), 900):
                for r in conn.execute(sa.select(feed_reports).where(feed_reports.c.control_number.in_(wanted[i:i + 900]))):
                    b.reports[r.control_number] = dict(r._mapping)

    # -- messages ----------------------------------------------------------------------
    def _emit(self, b: _Batch, data_set: str, date: str, msg_type: str, fields: dict[str, Any],
              journal_seq: int | None = None, cusip: str | None = None) -> FeedMessage:
        key = (data_set, date)
        if key not in self.days:
            self.days[key] = [0, False]
            b.days.add(key)
            self._emit(b, data_set, date, "START_OF_DAY", {}, journal_seq)
        day = self.days[key]
        day[0] += 1
        b.days.add(key)
        self.pub_order += 1
        body = R.encode({"data_set": data_set, "date": date, "seq": day[0], "type": msg_type, **fields})
        msg = FeedMessage(data_set, date, day[0], msg_type, body, self.pub_order, journal_seq, cusip)
        b.messages.append(msg)
        return msg

    def _feed_date(self, b: _Batch, market_day: str, journal_seq: int | None) -> str:
        """The feed day for something that happened on ``market_day``: days only go forward;
        the first event of a later day closes every earlier open day."""
        if self.current_date is None or market_day > self.current_date:
            closing = [(ds, date) for (ds, date), (_, closed) in sorted(self.days.items())
                       if not closed and date < market_day]
            if closing:
                self._settle(b)
            for ds, date in closing:
                self._close_day(b, ds, date, journal_seq)
            self.current_date = market_day
        return self.current_date

    def _apply(self, b: _Batch, ev: Event) -> None:
        p = ev.payload
        if p.get("is_test") or p.get("test"):
            return  # test reports and actions on them never reach the public
        date = self._feed_date(b, p["report_date"], ev.seq)
        rules = self.rulebook.at(dt.date.fromisoformat(p["report_date"]))
        kind = ev.event_type
        if kind == "NEW":
            row = self._report_row(b, ev, date, rules)
            if row["withheld"] is None:
                msg = self._emit(b, row["data_set"], date, "TRADE", {"cusip": row["cusip"], "trade": b.blocks[ev.control_number]},
                                 ev.seq, row["cusip"])
                row["msg_date"], row["msg_seq"] = msg.date, msg.seq
            return
        original = b.reports.get(ev.ref_control_number)
        if original is not None:
            original["status"] = {"CANCEL": "CANCELLED", "CORRECT": "CORRECTED", "REVERSE": "REVERSED"}[kind]
            b.changed_status.add(original["control_number"])
        shown = original is not None and original["withheld"] is None
        ref = {"date": original["msg_date"], "seq": original["msg_seq"]} if shown else None
        reported_at = iso_market(ev.recorded_us)
        if kind == "CANCEL":
            if shown:
                self._emit(b, original["data_set"], date, "CANCEL",
                           {"cusip": original["cusip"], "original": ref, "trade": R.Encoded(original["block"]),
                            "reported_at": reported_at}, ev.seq, original["cusip"])
        elif kind == "REVERSE":
            if shown:
                self._emit(b, original["data_set"], date, "REVERSAL",
                           {"cusip": original["cusip"], "original": ref,
                            "trade": R.reversal_block(json.loads(original["block"]), ev.recorded_us)},
                           ev.seq, original["cusip"])
        elif kind == "CORRECT":
            row = self._report_row(b, ev, date, rules)
            new_shown = row["withheld"] is None
            same_feed = shown and row["data_set"] == original["data_set"]
            if shown and new_shown and same_feed:
                msg = self._emit(b, row["data_set"], date, "CORRECTION",
                                 {"cusip": row["cusip"], "original": ref, "original_trade": R.Encoded(original["block"]),
                                  "trade": b.blocks[ev.control_number]}, ev.seq, row["cusip"])
            else:
                msg = None
                if shown:  # the public must drop the original: the corrected terms are withheld or elsewhere
                    self._emit(b, original["data_set"], date, "CANCEL",
                               {"cusip": original["cusip"], "original": ref, "trade": R.Encoded(original["block"]),
                                "reported_at": reported_at}, ev.seq, original["cusip"])
                if new_shown:  # first dissemination of these terms
                    msg = self._emit(b, row["data_set"], date, "TRADE", {"cusip": row["cusip"], "trade": b.blocks[ev.control_number]},
                                     ev.seq, row["cusip"])
            if msg is not None:
                row["msg_date"], row["msg_seq"] = msg.date, msg.seq

    def _report_row(self, b: _Batch, ev: Event, date: str, rules: Any) -> dict[str, Any]:
        p = ev.payload
        withheld = p.get("withheld")
        block = R.encode(R.trade_block(p, ev.recorded_us, rules)) if withheld is None else None
        if block is not None:  # serialised once: stored, and spliced into its messages
            b.blocks[ev.control_number] = R.Encoded(block)
        row = {
            "control_number": ev.control_number, "journal_seq": ev.seq, "data_set": p["data_set"], "feed_date": date,
            "cusip": p["cusip"], "symbol": p["symbol"], "grade": p["grade"], "quantity_c": p["quantity_c"],
            "price_u": p["price_u"], "yield_u": p.get("yield_u"), "execution_us": p["execution_us"],
            "counted": R.counts_in_aggregates(withheld), "sets_last_sale": withheld is None and R.sets_last_sale(p),
            "withheld": withheld, "msg_date": None, "msg_seq": None,
            "block": block,
            "status": "ACTIVE",
        }
        b.reports[ev.control_number] = row
        b.new_reports.append(ev.control_number)
        return row

    def _close_day(self, b: _Batch, data_set: str, date: str, journal_seq: int | None) -> None:
        """Daily summaries, market aggregates and END_OF_DAY. Everything applied before the
        event or action that closes the day is stored (see :meth:`_settle`); of what it made
        since, only the last sales of closes before this one matter here."""
        fr = feed_reports.c
        with reading(self.db) as conn:
            rows = [dict(r._mapping) for r in conn.execute(
                sa.select(feed_reports).where(fr.data_set == data_set, fr.feed_date == date, fr.status == "ACTIVE")
                .order_by(fr.journal_seq))]
            previous = {r.cusip: r.price_u for r in conn.execute(
                sa.select(feed_last_sale).where(feed_last_sale.c.data_set == data_set))}
        previous.update({cusip: price for (ds, cusip), (_, price) in b.last_sale.items() if ds == data_set})
        summaries = R.daily_summaries(r for r in rows if r["sets_last_sale"])
        for s in summaries:
            fields = {k: v for k, v in s.items() if k != "last_price_u"}
            self._emit(b, data_set, date, "DAILY_SUMMARY", fields, journal_seq, s["cusip"])
        self._emit(b, data_set, date, "MARKET_AGGREGATES",
                   R.market_aggregates([r for r in rows if r["counted"]], summaries, previous), journal_seq)
        self._emit(b, data_set, date, "END_OF_DAY", {}, journal_seq)
        self.days[(data_set, date)][1] = True
        b.days.add((data_set, date))
        for s in summaries:
            b.last_sale[(data_set, s["cusip"])] = (date, s["last_price_u"])

    # -- operator actions ----------------------------------------------------------------
    def _apply_action(self, b: _Batch, a: dict[str, Any]) -> None:
        if a["action"] == "END_OF_DAY":
            self._settle(b)  # the day's reports are read from the stored tables
        date = self._feed_date(b, a["feed_date"], None)
        if a["action"] == "END_OF_DAY":
            for ds in DATA_SETS:
                if (ds, a["feed_date"]) not in self.days or not self.days[(ds, a["feed_date"])][1]:
                    self._close_day_ensuring_open(b, ds, a["feed_date"])
            return
        sec = self._security(a["cusip"])
        if a["action"] == "HALT":
            self.halted.add(a["cusip"])
        else:
            self.halted.discard(a["cusip"])
        self._emit(b, sec.data_set, date, a["action"], {
            "cusip": sec.cusip, "symbol": sec.symbol, "issuer": sec.issuer[:30],
            "reason": a["reason"], "time": iso_market(a["at_us"]),
        }, None, sec.cusip)

    def _close_day_ensuring_open(self, b: _Batch, data_set: str, date: str) -> None:
        if (data_set, date) not in self.days:
            self.days[(data_set, date)] = [0, False]
            b.days.add((data_set, date))
            self._emit(b, data_set, date, "START_OF_DAY", {})
        self._close_day(b, data_set, date, None)

    def _operator(self, action: str, *, cusip: str | None = None, reason: str | None = None,
                  date: str | None = None, at_us: int | None = None, operator: str | None = None) -> list[FeedMessage]:
        at_us = self.clock() if at_us is None else at_us
        with self._lock:
            self.catch_up()  # an action takes its place after everything journaled so far (all stored)
            with reading(self.db) as conn:
                next_id = conn.execute(sa.select(sa.func.coalesce(sa.func.max(feed_operator_actions.c.id), 0))).scalar_one() + 1
            row = {"id": next_id, "after_journal_seq": self.position, "action": action, "cusip": cusip,
                   "reason": reason, "feed_date": date or market_date(at_us).isoformat(), "at_us": at_us,
                   "operator": operator}
            b = _Batch(upto=(self.position, self.action_id))
            try:
                self._apply_action(b, row)
                b.actions.append(row)  # recorded in the transaction that stores its messages
                b.upto = (self.position, next_id)
                self._seal(b)
                self._store()
            except BaseException:
                self._fail()
                raise
            self.position, self.action_id = b.upto
            self._fan_out(b.messages)  # published once stored
            return b.messages

    def _security(self, cusip: str) -> Any:
        with reading(self.db) as conn:
            sec = conn.execute(sa.select(securities_table).where(securities_table.c.cusip == cusip)).first()
        if sec is None:
            raise FeedError("SECURITY_UNKNOWN", "cusip", f"cusip {cusip} is not in reference data")
        return sec

    @staticmethod
    def _reason(reason: str) -> str:
        reason = (reason or "").strip().upper()
        if not (1 <= len(reason) <= 4) or not set(reason) <= HALT_REASON_CHARS:
            raise FeedError("HALT_REASON_INVALID", "reason", "reason is a code of 1 to 4 letters or digits, e.g. T1")
        return reason

    def halt(self, cusip: str, reason: str, *, at_us: int | None = None, operator: str | None = None) -> FeedMessage:
        """Halt trading in a security: journaled as an operator action, published as HALT."""
        cusip = cusip.strip().upper()
        reason = self._reason(reason)
        self._security(cusip)
        with self._lock:
            if cusip in self.halted:
                raise FeedError("ALREADY_HALTED", "cusip", f"{cusip} is already halted; resume it first")
            return self._operator("HALT", cusip=cusip, reason=reason, at_us=at_us, operator=operator)[-1]

    def resume(self, cusip: str, reason: str = "R", *, at_us: int | None = None, operator: str | None = None) -> FeedMessage:
        """Resume trading in a halted security: published as RESUME."""
        cusip = cusip.strip().upper()
        reason = self._reason(reason)
        self._security(cusip)
        with self._lock:
            if cusip not in self.halted:
                raise FeedError("NOT_HALTED", "cusip", f"{cusip} is not halted")
            return self._operator("RESUME", cusip=cusip, reason=reason, at_us=at_us, operator=operator)[-1]

    def end_of_day(self, date: dt.date | str | None = None, *, at_us: int | None = None,
                   operator: str | None = None) -> list[FeedMessage]:
        """Close a market day on every data set: daily summaries, aggregates, END_OF_DAY.
        Never a day after today's market date (``at_us``'s): closing it would make it the
        feed's current day, and every trade until then would be published on it."""
        at_us = self.clock() if at_us is None else at_us
        today = market_date(at_us).isoformat()
        day = str(date) if date is not None else today
        try:  # YYYY-MM-DD only (fromisoformat also takes 20261001 and 2024-W10-1), compared as dates
            if len(day) != 10 or dt.date.fromisoformat(day).isoformat() != day:
                raise ValueError(day)
        except ValueError:
            raise FeedError("DATE_INVALID", "date", f"date {day!r} is not a date (YYYY-MM-DD)") from None
        if day > today:
            raise FeedError("DATE_IN_FUTURE", "date",
                            f"{day} is after today's market date {today}: a day can be closed from that day on")
        with self._lock:
            if self.current_date is not None and day < self.current_date:
                raise FeedError("DAY_PASSED", "date", f"{day} is before the feed's current day {self.current_date}: it was closed when the next day began")
            if all(self.days.get((ds, day), [0, False])[1] for ds in DATA_SETS):
                raise FeedError("DAY_CLOSED", "date", f"{day} is already closed")
            return self._operator("END_OF_DAY", date=day, at_us=at_us, operator=operator)

    # -- subscribers -------------------------------------------------------------------
    def subscribe(self, deliver: Callable[[FeedMessage], None], data_sets: Iterable[str] = DATA_SETS,
                  start: dict[str, tuple[str, int]] | None = None, *,
                  on_shutdown: Callable[[], None] | None = None) -> Subscription:
        """Follow the feed: stored messages from ``start`` (per data set: (date, seq), the
        first to send), then live, with no gap and no repeat. Without a start position for
        a data set, only messages published from now on are sent.

        ``on_shutdown``: a subscriber that serves a client (WebSocket, SSE) and must end
        when the server stops: :meth:`end_streams` closes it and calls this (from any
        thread; it must be quick). Once the server stops, such a subscription ends at once."""
        sub = Subscription(self, deliver, [ds for ds in data_sets if ds in DATA_SETS], on_shutdown)
        # Registered between two applications, once everything handed out before is stored:
        # the stored part then holds every earlier message, and later ones are buffered.
        with self._lock:
            self._store()
            with self._fanout:
                if on_shutdown is not None and self.shutting_down:
                    sub.closed = True
                else:
                    self._subscriptions.append(sub)
        if sub.closed:  # the server is stopping: this client ends at once
            on_shutdown()
            return sub
        for ds, (date, seq) in (start or {}).items():
            if ds in sub.data_sets:
                sub.last[ds] = (date, seq - 1)  # nothing before the start, even if it races in
        try:
            for ds in sorted(sub.data_sets):
                if start and ds in start:
                    pos = start[ds]
                    while not sub.closed:
                        with reading(self.db) as conn:
                            batch = read_messages(conn, ds, pos, limit=2000)
                        for m in batch:
                            sub.last[ds] = m.position
                            deliver(m)
                        if len(batch) < 2000:
                            break
                        pos = (batch[-1].date, batch[-1].seq + 1)
        except BaseException:
            self._unsubscribe(sub)
            raise
        with self._fanout:
            pending, sub._buffer = sub._buffer or [], None
            for m in pending:
                if not sub.closed and _after(sub.last[m.data_set], m):
                    sub.last[m.data_set] = m.position
                    deliver(m)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._fanout:
            if sub in self._subscriptions:
                self._subscriptions.remove(sub)

    def end_streams(self) -> int:
        """The server stops: end every subscription made with ``on_shutdown`` (the feed's
        WebSocket and SSE clients, which resume from their last position on another
        server), now and from now on. Other subscribers (the NATS bridge) go on until
        they close. Returns how many were ended."""
        with self._fanout:
            self.shutting_down = True
            ending = [sub for sub in self._subscriptions if sub.on_shutdown is not None]
            for sub in ending:
                sub.closed = True
                self._subscriptions.remove(sub)
        for sub in ending:
            try:
                sub.on_shutdown()
            except Exception:  # noqa: BLE001 - one subscriber never stops the others ending
                log.exception("feed subscriber failed to end")
        return len(ending)

    def _fan_out(self, messages: list[FeedMessage]) -> None:
        if not messages:
            return
        with self._fanout:
            for sub in list(self._subscriptions):
                for m in messages:
                    try:
                        sub._offer(m)
                    except Exception:  # a failing subscriber is dropped, never the feed
                        log.exception("feed subscriber failed; dropped")
                        sub.closed = True
                        self._subscriptions.remove(sub)
                        break

    # -- maintenance -------------------------------------------------------------------
    def rebuild(self) -> int:
        """Drop the derived feed tables and publish again from the journal and the recorded
        operator actions. Returns the number of messages; they equal the ones published live."""
        with self._lock:
            self._store()
            with self._write_lock:
                with self._writer.begin() as conn:
                    for t in FEED_TABLES:
                        if t is not feed_position:
                            conn.execute(t.delete())
                    conn.execute(feed_position.update().where(feed_position.c.id == 1).values(journal_seq=0, action_id=0))
                with self._pending_lock:
                    self._overlay = {}
                self._load()
            return len(self.catch_up())

    def messages(self, data_set: str, start: tuple[str, int] = ("", 1), limit: int | None = None) -> list[FeedMessage]:
        with reading(self.db) as conn:
            return read_messages(conn, data_set, start, limit=limit)

    def iter_all(self) -> Iterator[FeedMessage]:
        """Every stored message in publication order."""
        last = 0
        while True:
            with reading(self.db) as conn:
                rows = conn.execute(sa.select(feed_messages).where(feed_messages.c.pub_order > last)
                                    .order_by(feed_messages.c.pub_order).limit(5000)).all()
            if not rows:
                return
            for r in rows:
                yield FeedMessage.from_row(r)
            last = rows[-1].pub_order

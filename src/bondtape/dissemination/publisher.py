"""The publisher: journal events in, public messages out.

The feed is a projection of the journal. :class:`Publisher` applies journal events in
sequence order (live from ``engine.listeners``, or caught up from the journal after a
start or a gap), decides with the pure rules of :mod:`bondtape.dissemination.rules`, and
stores every message in ``feed_messages`` in the same transaction that advances its own
durable position. Only then are the messages handed to subscribers, so anything a
subscriber has seen can be replayed, and replaying from 1 gives the same bytes.

Message sequence numbers are gapless per data set (CORP, AGCY) and feed day. A feed day
opens with START_OF_DAY when its first message is due and closes with a daily summary per
security, the market aggregates and END_OF_DAY, either when the operator ends the day or
when the first event of a later market day arrives.
"""
from __future__ import annotations

import datetime as dt
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

    def __init__(self, publisher: "Publisher", deliver: Callable[[FeedMessage], None], data_sets: Iterable[str]):
        self.publisher = publisher
        self.deliver = deliver
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
class _Batch:
    """What one transaction of the publisher writes."""

    conn: Connection
    messages: list[FeedMessage] = field(default_factory=list)
    reports: dict[int, dict[str, Any]] = field(default_factory=dict)  # loaded or new, by control number
    new_reports: list[int] = field(default_factory=list)
    changed_status: set[int] = field(default_factory=set)
    days: set[tuple[str, str]] = field(default_factory=set)
    actions: list[dict[str, Any]] = field(default_factory=list)
    flushed_messages: int = 0
    blocks: dict[int, dict[str, Any]] = field(default_factory=dict)  # public blocks made in this batch


_RECOVER = object()  # queued when an inline apply failed


class _Conflict(RuntimeError):
    """Another publisher moved the position first: reload and go on from the database."""


class Publisher:
    """Turns the journal into the public feed and fans it out to subscribers."""

    def __init__(self, db: SAEngine, rulebook: Rulebook | None = None, clock: Callable[[], int] = now_us,
                 chunk: int = 5000):
        self.db = db
        self._writer = _feed_writer(db)
        self.rulebook = rulebook or default_rulebook()
        self.clock = clock
        self.chunk = chunk
        self._lock = threading.RLock()  # one writer: processing, operator actions
        self._fanout = threading.Lock()
        self._subscriptions: list[Subscription] = []
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
        with self.db.connect() as conn:
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
        self.delivered = self.position  # journal events whose messages subscribers have been given

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
            engine.listeners.append(self._on_events)
        self.catch_up()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="bondtape-feed-publisher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._engine is not None and self._on_events in self._engine.listeners:
            self._engine.listeners.remove(self._on_events)
        self._stopping = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

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
        the engine's thread right after its commit: the feed's own writes then never wait
        on the engine's for the database (SQLite has one writer at a time)."""
        if not self.inline:
            self._queue.put(events)
            return
        try:
            self.apply_live(events)
        except Exception:  # the journal keeps the events: the publisher's thread catches up
            self.errors += 1
            log.exception("feed publisher failed; catching up from the journal")
            self._queue.put(_RECOVER)

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.poll_interval)
            except queue.Empty:
                try:
                    self.catch_up()
                except Exception:
                    self.errors += 1
                    log.exception("feed catch-up failed; retrying")
                    self._recover()
                continue
            if item is None:
                return
            if item is _RECOVER:
                self._recover()
                continue
            events = list(item)
            while True:  # take whatever else is waiting: one transaction for all of it
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                events.extend(more)
            try:
                self.apply_live(events)
            except Exception:  # the journal keeps the events; catch up once the database answers
                self.errors += 1
                log.exception("feed publisher failed; will catch up from the journal")
                time.sleep(0.05)
                self._recover()

    def _recover(self) -> None:
        for attempt in range(100):
            if self._stopping:
                return
            try:
                with self._lock:
                    self._load()
                self.catch_up()
                return
            except Exception:
                log.exception("feed catch-up failed (attempt %d)", attempt + 1)
                time.sleep(min(2.0, 0.05 * 2 ** attempt))

    def wait_for(self, journal_seq: int, timeout: float = 10.0) -> bool:
        """Block until the messages of the journal up to ``journal_seq`` were handed to
        subscribers (tests, tools)."""
        deadline = time.monotonic() + timeout
        while self.delivered < journal_seq:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    # -- applying the journal ----------------------------------------------------------
    def apply_live(self, events: Sequence[Event]) -> list[FeedMessage]:
        """Apply events handed over live; a gap or a repeat is settled from the journal."""
        with self._lock:
            events = [e for e in events if e.seq > self.position]
            if not events:
                return []
            if events[0].seq != self.position + 1 or any(b.seq != a.seq + 1 for a, b in zip(events, events[1:])):
                return self.catch_up()
            return self._commit(events, [])

    def catch_up(self) -> list[FeedMessage]:
        """Apply every journal event (and pending operator action) after the position."""
        out: list[FeedMessage] = []
        with self._lock:
            while True:
                with self.db.connect() as conn:
                    rows = conn.execute(sa.select(journal).where(journal.c.seq > self.position)
                                        .order_by(journal.c.seq).limit(self.chunk)).all()
                    actions = [dict(r._mapping) for r in conn.execute(
                        sa.select(feed_operator_actions).where(feed_operator_actions.c.id > self.action_id)
                        .order_by(feed_operator_actions.c.id))]
                if not rows and not actions:
                    return out
                events = [Event.from_row(r) for r in rows]
                if events:
                    upto = events[-1].seq
                    actions = [a for a in actions if a["after_journal_seq"] <= upto]
                out.extend(self._commit(events, actions))

    def _commit(self, events: Sequence[Event], actions: Sequence[dict[str, Any]]) -> list[FeedMessage]:
        """Apply events and already-recorded actions in one transaction, then fan out."""
        saved = self._snapshot_state()
        try:
            with self._writer.begin() as conn:
                b = _Batch(conn)
                self._preload(b, [e.ref_control_number for e in events if e.ref_control_number])
                pending = sorted(actions, key=lambda a: a["id"])
                # Messages of journal events are a pure function of the (durable) journal: each
                # is handed out as soon as it is made, before our own writes; a crash before the
                # commit regenerates the same bytes, and subscribers drop positions they have seen.
                delivered_early = not actions
                sent = 0
                for ev in events:
                    while pending and pending[0]["after_journal_seq"] < ev.seq:
                        self._apply_action(b, pending.pop(0))
                    self._apply(b, ev)
                    if delivered_early and len(b.messages) > sent:
                        self._fan_out(b.messages[sent:])
                        sent = len(b.messages)
                for a in pending:
                    self._apply_action(b, a)
                self._flush(b)
                new_pos = events[-1].seq if events else self.position
                new_action = max([a["id"] for a in actions], default=self.action_id)
                self._advance(conn, new_pos, new_action)
        except BaseException:
            self._restore_state(saved)
            raise
        if not delivered_early:  # operator actions are delivered once they are durable
            self._fan_out(b.messages)
        self.delivered = self.position
        return b.messages

    def _advance(self, conn: Connection, journal_seq: int, action_id: int) -> None:
        p = feed_position.c
        res = conn.execute(feed_position.update().where(p.id == 1, p.journal_seq == self.position,
                                                         p.action_id == self.action_id)
                           .values(journal_seq=journal_seq, action_id=action_id))
        if res.rowcount != 1:
            raise _Conflict("the feed position moved under this publisher")
        self.position, self.action_id = journal_seq, action_id

    def _snapshot_state(self) -> tuple:
        return (self.position, self.action_id, {k: list(v) for k, v in self.days.items()}, self.pub_order,
                set(self.halted), self.current_date)

    def _restore_state(self, s: tuple) -> None:
        self.position, self.action_id, self.days, self.pub_order, self.halted, self.current_date = s

    def _preload(self, b: _Batch, control_numbers: list[int]) -> None:
        wanted = [c for c in set(control_numbers) if c not in b.reports]
        for i in range(0, len(wanted), 900):
            for r in b.conn.execute(sa.select(feed_reports).where(feed_reports.c.control_number.in_(wanted[i:i + 900]))):
                b.reports[r.control_number] = dict(r._mapping)

    def _flush(self, b: _Batch) -> None:
        """Write what the batch holds so far (queries of the same transaction then see it)."""
        conn = b.conn
        if b.new_reports:
            conn.execute(feed_reports.insert(), [b.reports[c] for c in b.new_reports])
            b.changed_status -= set(b.new_reports)
            b.new_reports = []
        if b.changed_status:
            conn.execute(feed_reports.update().where(feed_reports.c.control_number == sa.bindparam("b_cn"))
                         .values(status=sa.bindparam("b_status")),
                         [{"b_cn": c, "b_status": b.reports[c]["status"]} for c in sorted(b.changed_status)])
            b.changed_status = set()
        fresh = b.messages[b.flushed_messages:]
        if fresh:
            conn.execute(feed_messages.insert(), [
                {"data_set": m.data_set, "feed_date": m.date, "msg_seq": m.seq, "pub_order": m.pub_order,
                 "msg_type": m.type, "cusip": m.cusip, "journal_seq": m.journal_seq, "body": m.body}
                for m in fresh])
            b.flushed_messages = len(b.messages)
        if b.days:
            for ds, date in sorted(b.days):
                last, closed = self.days[(ds, date)]
                done = conn.execute(feed_days.update().where(feed_days.c.data_set == ds, feed_days.c.feed_date == date)
                                    .values(last_seq=last, closed=closed)).rowcount
                if not done:
                    conn.execute(feed_days.insert().values(data_set=ds, feed_date=date, last_seq=last, closed=closed))
            b.days = set()
        if b.actions:
            conn.execute(feed_operator_actions.insert(), b.actions)
            b.actions = []

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
            for (ds, date), (_, closed) in sorted(self.days.items()):
                if not closed and date < market_day:
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
                           {"cusip": original["cusip"], "original": ref, "trade": json.loads(original["block"]),
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
                                 {"cusip": row["cusip"], "original": ref, "original_trade": json.loads(original["block"]),
                                  "trade": b.blocks[ev.control_number]}, ev.seq, row["cusip"])
            else:
                msg = None
                if shown:  # the public must drop the original: the corrected terms are withheld or elsewhere
                    self._emit(b, original["data_set"], date, "CANCEL",
                               {"cusip": original["cusip"], "original": ref, "trade": json.loads(original["block"]),
                                "reported_at": reported_at}, ev.seq, original["cusip"])
                if new_shown:  # first dissemination of these terms
                    msg = self._emit(b, row["data_set"], date, "TRADE", {"cusip": row["cusip"], "trade": b.blocks[ev.control_number]},
                                     ev.seq, row["cusip"])
            if msg is not None:
                row["msg_date"], row["msg_seq"] = msg.date, msg.seq

    def _report_row(self, b: _Batch, ev: Event, date: str, rules: Any) -> dict[str, Any]:
        p = ev.payload
        withheld = p.get("withheld")
        block = R.trade_block(p, ev.recorded_us, rules) if withheld is None else None
        if block is not None:
            b.blocks[ev.control_number] = block
        row = {
            "control_number": ev.control_number, "journal_seq": ev.seq, "data_set": p["data_set"], "feed_date": date,
            "cusip": p["cusip"], "symbol": p["symbol"], "grade": p["grade"], "quantity_c": p["quantity_c"],
            "price_u": p["price_u"], "yield_u": p.get("yield_u"), "execution_us": p["execution_us"],
            "counted": R.counts_in_aggregates(withheld), "sets_last_sale": withheld is None and R.sets_last_sale(p),
            "withheld": withheld, "msg_date": None, "msg_seq": None,
            "block": R.encode(block) if block is not None else None,
            "status": "ACTIVE",
        }
        b.reports[ev.control_number] = row
        b.new_reports.append(ev.control_number)
        return row

    def _close_day(self, b: _Batch, data_set: str, date: str, journal_seq: int | None) -> None:
        self._flush(b)
        fr = feed_reports.c
        rows = [dict(r._mapping) for r in b.conn.execute(
            sa.select(feed_reports).where(fr.data_set == data_set, fr.feed_date == date, fr.status == "ACTIVE")
            .order_by(fr.journal_seq))]
        summaries = R.daily_summaries(r for r in rows if r["sets_last_sale"])
        previous = {r.cusip: r.price_u for r in b.conn.execute(
            sa.select(feed_last_sale).where(feed_last_sale.c.data_set == data_set))}
        for s in summaries:
            fields = {k: v for k, v in s.items() if k != "last_price_u"}
            self._emit(b, data_set, date, "DAILY_SUMMARY", fields, journal_seq, s["cusip"])
        self._emit(b, data_set, date, "MARKET_AGGREGATES",
                   R.market_aggregates([r for r in rows if r["counted"]], summaries, previous), journal_seq)
        self._emit(b, data_set, date, "END_OF_DAY", {}, journal_seq)
        self.days[(data_set, date)][1] = True
        b.days.add((data_set, date))
        for s in summaries:
            key = {"data_set": data_set, "cusip": s["cusip"]}
            done = b.conn.execute(feed_last_sale.update().where(feed_last_sale.c.data_set == data_set,
                                                                feed_last_sale.c.cusip == s["cusip"])
                                  .values(feed_date=date, price_u=s["last_price_u"])).rowcount
            if not done:
                b.conn.execute(feed_last_sale.insert().values(**key, feed_date=date, price_u=s["last_price_u"]))

    # -- operator actions ----------------------------------------------------------------
    def _apply_action(self, b: _Batch, a: dict[str, Any]) -> None:
        date = self._feed_date(b, a["feed_date"], None)
        if a["action"] == "END_OF_DAY":
            for ds in DATA_SETS:
                if (ds, a["feed_date"]) not in self.days or not self.days[(ds, a["feed_date"])][1]:
                    self._close_day_ensuring_open(b, ds, a["feed_date"])
            return
        sec = b.conn.execute(sa.select(securities_table).where(securities_table.c.cusip == a["cusip"])).one()
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
            self.catch_up()  # an action takes its place after everything journaled so far
            with self.db.connect() as conn:
                next_id = conn.execute(sa.select(sa.func.coalesce(sa.func.max(feed_operator_actions.c.id), 0))).scalar_one() + 1
            row = {"id": next_id, "after_journal_seq": self.position, "action": action, "cusip": cusip,
                   "reason": reason, "feed_date": date or market_date(at_us).isoformat(), "at_us": at_us,
                   "operator": operator}
            saved = self._snapshot_state()
            try:
                with self._writer.begin() as conn:
                    b = _Batch(conn)
                    b.actions.append(row)
                    self._flush(b)  # the action is recorded with the messages it causes
                    self._apply_action(b, row)
                    self._flush(b)
                    self._advance(conn, self.position, next_id)
            except BaseException:
                self._restore_state(saved)
                raise
            self._fan_out(b.messages)
            return b.messages

    def _security(self, cusip: str) -> Any:
        with self.db.connect() as conn:
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
        """Close a market day on every data set: daily summaries, aggregates, END_OF_DAY."""
        at_us = self.clock() if at_us is None else at_us
        day = str(date) if date is not None else market_date(at_us).isoformat()
        try:
            dt.date.fromisoformat(day)
        except ValueError:
            raise FeedError("DATE_INVALID", "date", f"date {day!r} is not a date (YYYY-MM-DD)") from None
        with self._lock:
            if self.current_date is not None and day < self.current_date:
                raise FeedError("DAY_PASSED", "date", f"{day} is before the feed's current day {self.current_date}: it was closed when the next day began")
            if all(self.days.get((ds, day), [0, False])[1] for ds in DATA_SETS):
                raise FeedError("DAY_CLOSED", "date", f"{day} is already closed")
            return self._operator("END_OF_DAY", date=day, at_us=at_us, operator=operator)

    # -- subscribers -------------------------------------------------------------------
    def subscribe(self, deliver: Callable[[FeedMessage], None], data_sets: Iterable[str] = DATA_SETS,
                  start: dict[str, tuple[str, int]] | None = None) -> Subscription:
        """Follow the feed: stored messages from ``start`` (per data set: (date, seq), the
        first to send), then live, with no gap and no repeat. Without a start position for
        a data set, only messages published from now on are sent."""
        sub = Subscription(self, deliver, [ds for ds in data_sets if ds in DATA_SETS])
        # Registered between two batches: a batch handed out before this is already stored
        # (its commit follows its fan-out under the same lock), a later one is buffered.
        with self._lock, self._fanout:
            self._subscriptions.append(sub)
        for ds, (date, seq) in (start or {}).items():
            if ds in sub.data_sets:
                sub.last[ds] = (date, seq - 1)  # nothing before the start, even if it races in
        try:
            for ds in sorted(sub.data_sets):
                if start and ds in start:
                    pos = start[ds]
                    while not sub.closed:
                        with self.db.connect() as conn:
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
            with self._writer.begin() as conn:
                for t in FEED_TABLES:
                    if t is not feed_position:
                        conn.execute(t.delete())
                conn.execute(feed_position.update().where(feed_position.c.id == 1).values(journal_seq=0, action_id=0))
            self._load()
            return len(self.catch_up())

    def messages(self, data_set: str, start: tuple[str, int] = ("", 1), limit: int | None = None) -> list[FeedMessage]:
        with self.db.connect() as conn:
            return read_messages(conn, data_set, start, limit=limit)

    def iter_all(self) -> Iterator[FeedMessage]:
        """Every stored message in publication order."""
        last = 0
        while True:
            with self.db.connect() as conn:
                rows = conn.execute(sa.select(feed_messages).where(feed_messages.c.pub_order > last)
                                    .order_by(feed_messages.c.pub_order).limit(5000)).all()
            if not rows:
                return
            for r in rows:
                yield FeedMessage.from_row(r)
            last = rows[-1].pub_order

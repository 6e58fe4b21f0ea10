"""Session state on disk: sequence numbers and sent application messages.

Every write goes through one :class:`StoreWriter` thread, which puts the writes that
queue up while it works (from every session) into one transaction: a session's
sequence numbers and the messages it is about to send are durable before they are sent.
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from bondtape.batching import drain_batch
from bondtape.db import reading
from bondtape.fix.schema import fix_messages, fix_sessions

log = logging.getLogger("bondtape.fix")


@dataclass
class SessionRecord:
    id: int
    sender_comp_id: str
    target_comp_id: str
    mpid: str
    next_in_seq: int
    next_out_seq: int


def find_session(db: Engine, sender: str, target: str) -> SessionRecord | None:
    with reading(db) as conn:
        row = conn.execute(sa.select(fix_sessions).where(
            fix_sessions.c.sender_comp_id == sender, fix_sessions.c.target_comp_id == target)).first()
    if row is None:
        return None
    return SessionRecord(row.id, row.sender_comp_id, row.target_comp_id, row.mpid, row.next_in_seq, row.next_out_seq)


def open_session(db: Engine, sender: str, target: str, mpid: str, username: str, now_us: int) -> SessionRecord:
    """The session for these CompIDs, created at sequence numbers 1 when new."""
    found = find_session(db, sender, target)
    if found is not None:
        return found
    try:
        with db.begin() as conn:
            conn.execute(fix_sessions.insert().values(
                sender_comp_id=sender, target_comp_id=target, mpid=mpid, username=username,
                next_in_seq=1, next_out_seq=1, created_us=now_us, updated_us=now_us))
    except sa.exc.IntegrityError:  # created meanwhile by another connection
        pass
    found = find_session(db, sender, target)
    assert found is not None
    return found


def stored_messages(db: Engine, session_id: int, begin: int, end: int,
                    limit: int | None = None) -> list[tuple[int, str, str]]:
    """(seq, msg_type, message) of sent application messages with begin <= seq <= end, in
    order; the first ``limit`` of them when given (a long resend reads them page by page)."""
    query = sa.select(fix_messages.c.seq, fix_messages.c.msg_type, fix_messages.c.message).where(
        fix_messages.c.session_id == session_id, fix_messages.c.seq >= begin,
        fix_messages.c.seq <= end).order_by(fix_messages.c.seq)
    if limit is not None:
        query = query.limit(limit)
    with reading(db) as conn:
        rows = conn.execute(query).all()
    return [(r.seq, r.msg_type, r.message) for r in rows]


def write_state(conn: Connection, session_id: int, next_in: int, next_out: int, username: str | None,
                messages: list[tuple], now_us: int) -> None:
    """The session's sequence numbers and the application messages just sent, each
    ``(session_id, seq, msg_type, sent_us, message)``."""
    values: dict = {"next_in_seq": next_in, "next_out_seq": next_out, "updated_us": now_us}
    if username is not None:
        values["username"] = username
    conn.execute(fix_sessions.update().where(fix_sessions.c.id == session_id).values(**values))
    if messages:
        m = "?" if conn.dialect.paramstyle == "qmark" else "%s"
        conn.exec_driver_sql(f"INSERT INTO fix_messages (session_id, seq, msg_type, sent_us, message) "
                             f"VALUES ({m}, {m}, {m}, {m}, {m})", messages)


def reset_session(conn: Connection, session_id: int, now_us: int) -> None:
    """Sequence numbers back to 1 (ResetSeqNumFlag); stored messages are dropped."""
    conn.execute(fix_messages.delete().where(fix_messages.c.session_id == session_id))
    conn.execute(fix_sessions.update().where(fix_sessions.c.id == session_id).values(
        next_in_seq=1, next_out_seq=1, updated_us=now_us))


class StoreWriter:
    """One thread that runs queued writes, many per transaction (group commit)."""

    def __init__(self, db: Engine, max_batch: int = 500, write_lock: threading.Lock | None = None):
        self.db = db
        self.max_batch = max_batch
        # SQLite has one writer at a time, and a writer that finds the database locked
        # sleeps and polls: sharing the engine's lock queues our commits between its
        # batches instead (PostgreSQL needs no lock: the tables are different).
        self.write_lock = write_lock
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="bondtape-fix-store", daemon=True)
        self._thread.start()

    def submit(self, write: Callable[[Connection], None]) -> Future:
        fut: Future = Future()
        self._queue.put((write, fut))
        return fut

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch, stop = drain_batch(self._queue, item, self.max_batch)
            try:
                if self.write_lock is not None:
                    with self.write_lock, self.db.begin() as conn:
                        for write, _ in batch:
                            write(conn)
                else:
                    with self.db.begin() as conn:
                        for write, _ in batch:
                            write(conn)
            except Exception as exc:  # every waiter learns of it; nothing of the batch was kept
                log.error("FIX session store write failed: %s", exc)
                for _, fut in batch:
                    fut.set_exception(exc)
            else:
                for _, fut in batch:
                    fut.set_result(None)
            if stop:
                return

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

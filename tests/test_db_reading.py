"""Read-only connections (``bondtape.db.reading``): on SQLite they neither wait for nor
block a writer, and they refuse writes; the pool hands out writable connections after."""
from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from bondtape.db import connect, reading
from bondtape.reference.schema import firms


def test_sqlite_read_does_not_wait_for_an_open_write_transaction(tmp_path):
    db = connect(f"sqlite:///{tmp_path}/r.db")
    with db.begin() as w:  # holds the write lock, as an engine batch does
        w.execute(firms.insert().values(mpid="ABCD", name="A", finra_member=True, test_only=False, updated_us=1))
        done = threading.Event()
        seen: list[int] = []

        def read() -> None:
            with reading(db) as conn:
                seen.append(conn.execute(sa.select(sa.func.count()).select_from(firms)).scalar_one())
            done.set()

        threading.Thread(target=read, daemon=True).start()
        # a reader that needed the write lock would wait here until busy_timeout (30 s)
        assert done.wait(5), "a read-only transaction waited for the writer"
        assert seen == [0]  # the snapshot before the uncommitted insert
    with reading(db) as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(firms)).scalar_one() == 1


def test_a_writer_is_not_held_up_by_an_open_read_transaction(tmp_path):
    db = connect(f"sqlite:///{tmp_path}/r.db")
    with reading(db) as r:
        r.execute(sa.select(firms)).all()  # the read transaction is open (a snapshot)
        t0 = time.monotonic()
        with db.begin() as w:
            w.execute(firms.insert().values(mpid="ABCD", name="A", finra_member=True, test_only=False, updated_us=1))
        assert time.monotonic() - t0 < 5
        assert r.execute(sa.select(firms)).all() == []  # still its own snapshot


def test_a_write_in_a_read_only_connection_fails_and_the_connection_is_writable_after(db_url):
    db = connect(db_url)
    with reading(db) as conn:
        with pytest.raises(sa.exc.DBAPIError):
            conn.execute(firms.insert().values(mpid="WXYZ", name="W", finra_member=True, test_only=False, updated_us=1))
    for _ in range(3):  # the same pooled connections, now for writes
        with db.begin() as conn:
            conn.execute(firms.delete().where(firms.c.mpid == "WXYZ"))
            conn.execute(firms.insert().values(mpid="WXYZ", name="W", finra_member=True, test_only=False, updated_us=1))
    with reading(db) as conn:
        assert conn.execute(sa.select(firms.c.name).where(firms.c.mpid == "WXYZ")).scalar_one() == "W"


def test_a_reading_connection_invalidated_mid_read_leaves_quietly(tmp_path):
    """Ctrl-C inside a read's execute: SQLAlchemy invalidates (closes) the connection, and
    the pool's check-in, which turns query_only off again, gets no connection. Before, it
    raised AttributeError, and `bondtape report` said "internal error" instead of
    "interrupted" (tests/test_signals.py, about one Ctrl-C in ten)."""
    db = connect(f"sqlite:///{tmp_path / 't.db'}")
    with pytest.raises(KeyboardInterrupt):
        with reading(db) as conn, conn.begin():
            conn.exec_driver_sql("SELECT 1")
            conn.invalidate()
            raise KeyboardInterrupt
    with db.begin() as conn:  # the next connection writes as usual
        conn.exec_driver_sql("CREATE TABLE after_interrupt (a INTEGER)")
    db.dispose()

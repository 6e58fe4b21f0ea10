"""The engine's background WAL checkpointer (SQLite): checkpoints off the commit path,
a bound on the WAL when it is not running, and no thread left behind."""
from __future__ import annotations

import gc
import os
import shutil
import sqlite3
import threading
import time
from decimal import Decimal

import pytest
import sqlalchemy as sa

from bondtape.db import connect
from bondtape.engine import Engine
from bondtape.journal.schema import journal
from bondtape.reference.store import upsert_firms, upsert_securities
from tests.conftest import STANDARD_FIRMS, STANDARD_SECURITIES
from tests.helpers import new, standard_sqlite


@pytest.fixture
def lite(tmp_path):
    db = standard_sqlite(tmp_path / 'ck.db')
    yield db
    db.dispose()


def _wait(predicate, seconds=30.0):
    end = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def _threads(path):
    return [t for t in threading.enumerate() if t.name == f"bondtape-checkpointer {path}"]


def _rows_in_main_file(db, tmp_path) -> int:
    """Journal rows in the database file alone (what a checkpoint has copied out of the WAL)."""
    copy = tmp_path / "copy.db"
    shutil.copyfile(db.url.database, copy)
    with sqlite3.connect(copy) as c:
        return c.execute("SELECT count(*) FROM journal").fetchone()[0]


def _batch(n, start=0):
    return [new(ref=f"r{i}", quantity=Decimal(1000 * (i + 1))) for i in range(start, start + n)]


def test_checkpoints_run_off_the_commit_path(lite, tmp_path):
    engine = Engine(lite)
    results = engine.submit(_batch(20))
    assert all(r.accepted for r in results)
    ckpt = engine.checkpointer
    assert ckpt is not None and os.path.samefile(ckpt.path, lite.url.database)
    # the engine's connection no longer checkpoints a small WAL on commit...
    with lite.connect() as conn:
        page_size = conn.exec_driver_sql("PRAGMA page_size").scalar()
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == Engine.WAL_BOUND_BYTES // page_size
    # ...the thread does: the batch reaches the database file without any further commit
    assert _wait(lambda: ckpt.stats()["checkpoints"] >= 1)
    assert _rows_in_main_file(lite, tmp_path) == 20
    engine.close()
    assert not _threads(ckpt.path)


def test_thread_ends_when_idle_and_the_next_commit_starts_another(lite):
    engine = Engine(lite)
    engine.submit(_batch(5))
    ckpt = engine.checkpointer
    ckpt.idle = 0.05
    assert _wait(lambda: not _threads(ckpt.path))  # idle: gone (after at most the first idle wait)
    before = ckpt.stats()["checkpoints"]
    engine.submit(_batch(5, start=5))
    assert _wait(lambda: ckpt.stats()["checkpoints"] > before)
    assert _wait(lambda: not _threads(ckpt.path))
    engine.close()


def test_a_discarded_engine_leaves_no_thread(lite):
    engine = Engine(lite)
    engine.submit(_batch(5))
    path = engine.checkpointer.path
    [thread] = _threads(path)
    del engine
    gc.collect()
    assert not thread.is_alive()  # stopped (after a last checkpoint) when the engine went


def test_without_the_thread_the_commits_still_bound_the_wal(lite):
    with lite.connect() as conn:
        page = conn.exec_driver_sql("PRAGMA page_size").scalar()
    engine = Engine(lite)
    engine.WAL_BOUND_BYTES = 64 * page
    engine.submit(_batch(5))
    engine.close()  # as if the checkpointer had died: commits no longer wake it
    wal = lite.url.database + "-wal"

    def restarts() -> int:  # the WAL header's checkpoint sequence: one more each time it starts over
        with open(wal, "rb") as f:
            return int.from_bytes(f.read(16)[12:16], "big")

    largest, before = 0, restarts()
    for i in range(40):
        engine.submit(_batch(50, start=100 + 50 * i))
        largest = max(largest, os.path.getsize(wal))
    assert restarts() - before >= 5  # it was written over and over, not merely little
    assert not _threads(engine.checkpointer.path)
    with lite.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(journal)).scalar_one() == 2005
    # 40 batches wrote well over 1,000 pages; the WAL never held much more than 64 plus a batch or two
    assert largest < 400 * page, (largest, page)


def test_two_engines_on_one_file(lite, tmp_path):
    other_db = connect(lite.url.render_as_string(hide_password=False))
    a, b = Engine(lite), Engine(other_db)  # as two processes would: each its own checkpointer
    for i in range(10):
        (a if i % 2 else b).submit(_batch(10, start=10 * i))
    a.close()
    b.close()
    other_db.dispose()
    assert _rows_in_main_file(lite, tmp_path) == 100


def test_no_checkpointer_without_a_wal_file():
    db = connect("sqlite://")  # in memory: no WAL
    with db.begin() as conn:
        upsert_securities(conn, STANDARD_SECURITIES)
        upsert_firms(conn, STANDARD_FIRMS)
    engine = Engine(db)
    assert engine.submit(_batch(3))[0].accepted
    assert engine.checkpointer is None
    engine.close()

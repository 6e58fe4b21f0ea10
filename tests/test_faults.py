"""Fault tests on private servers (loopback only, bounded in time)."""
from __future__ import annotations

import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from bondtape.db import connect
from bondtape.engine import Engine, EngineUnavailable, Sequencer
from bondtape.journal.schema import journal
from bondtape.journal.verify import verify
from bondtape.reference.store import upsert_firms, upsert_securities
from tests.conftest import STANDARD_FIRMS, STANDARD_SECURITIES
from tests.helpers import DEFAULT_EXEC, new
from tests.servers import PrivatePostgres, postgres_unavailable_reason


@pytest.fixture
def private_pg(tmp_path_factory):
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    # a folder the postgres user can reach (pytest's tmp folders are root's, mode 0700)
    pg = PrivatePostgres(Path(tempfile.mkdtemp(prefix="bondtape-pg-")))
    pg.start()
    yield pg
    pg.close()


@pytest.mark.slow
def test_postgres_restart_during_load_loses_nothing_acknowledged(private_pg):
    db = connect(private_pg.url)
    with db.begin() as conn:
        upsert_securities(conn, STANDARD_SECURITIES)
        upsert_firms(conn, STANDARD_FIRMS)
    sequencer = Sequencer(Engine(db))
    acknowledged: dict[str, int] = {}
    unavailable = []
    lock = threading.Lock()
    stop_at = time.monotonic() + 60

    def client(worker: int) -> None:
        for i in range(150):
            ref = f"w{worker}-{i}"
            cmd = new(ref=ref, quantity=Decimal(1000 + worker * 10_000 + i), report_us=DEFAULT_EXEC + 60_000_000)
            while time.monotonic() < stop_at:
                try:
                    res = sequencer(cmd, timeout=30)
                except EngineUnavailable as exc:  # the retryable error: same command again
                    with lock:
                        unavailable.append(str(exc))
                    time.sleep(0.05)
                    continue
                assert res.accepted, res
                with lock:
                    acknowledged[ref] = res.control_number
                break
            time.sleep(0.002)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    while len(acknowledged) < 100 and time.monotonic() < stop_at:
        time.sleep(0.01)
    private_pg.stop("fast")
    time.sleep(1.0)
    private_pg.start()
    for t in threads:
        t.join(90)
    sequencer.close()
    assert unavailable, "the database stop was not noticed: no retryable error was seen"
    assert len(acknowledged) == 600
    with db.connect() as conn:
        rows = conn.execute(sa.select(journal.c.client_ref, journal.c.control_number)).all()
    assert len(rows) == 600  # once each, none lost, none duplicated
    assert dict(rows) == acknowledged
    assert verify(db).ok
    db.dispose()

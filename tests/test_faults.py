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


# --- service level: `bondtape serve --config` in a child process, driven over HTTPS --------

import asyncio  # noqa: E402
import json  # noqa: E402
from collections import Counter  # noqa: E402

import httpx  # noqa: E402

from bondtape.dissemination.schema import feed_messages, feed_position  # noqa: E402
from bondtape.journal.schema import journal_head  # noqa: E402
from bondtape.production.loadkit import LoadRun, ServerProcess, provision, trading_day  # noqa: E402
from tests.servers import PrivateNats, nats_unavailable_reason  # noqa: E402


@pytest.fixture
def private_nats():
    reason = nats_unavailable_reason()
    if reason:
        pytest.skip(reason)
    nats = PrivateNats(Path(tempfile.mkdtemp(prefix="bondtape-nats-")))
    nats.start()
    yield nats
    nats.close()


class Background:
    """A LoadRun replaying orders in a thread of its own (its own event loop)."""

    def __init__(self, run: LoadRun, orders):
        self.run, self.orders = run, orders
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            asyncio.run(self.run.run(self.orders, concurrency=16))
        except BaseException as exc:  # reported by join()
            self.error = exc

    def wait_answers(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.run.answers) < n:
            assert time.monotonic() < deadline, f"only {len(self.run.answers)} answers after {timeout} s"
            assert self.thread.is_alive() or self.error is None, self.error
            time.sleep(0.02)

    def join(self, timeout: float = 120) -> list:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the load did not finish in time"
        if self.error:
            raise self.error
        return self.run.answers


SPEED = 30.0  # times real time


def _orders(dep, n: int, seconds: float, seed: int = 11, fix_share: float = 0.0):
    """n reports (REST, and FIX for ``fix_share`` of them) spread over ``seconds`` of wall
    time when replayed at SPEED."""
    return trading_day(dep, trades=n, seed=seed, hours=seconds * SPEED / 3600, fix_share=fix_share)


def _check_journal(db, answers) -> dict[str, int]:
    """Every acknowledged report is in the journal once, with the number it was given;
    the sequence has no gap; replaying the journal gives the stored state."""
    acked = {a.ref: a.control_number for a in answers if a.status == "ACCEPTED"}
    with db.connect() as conn:
        rows = conn.execute(sa.select(journal.c.seq, journal.c.client_ref, journal.c.control_number)
                            .order_by(journal.c.seq)).all()
        head = conn.execute(sa.select(journal_head.c.last_seq)).scalar_one()
    counts = Counter(r.client_ref for r in rows)
    assert all(counts[ref] == 1 for ref in acked), "an acknowledged report is missing or journaled twice"
    by_ref = {r.client_ref: r.control_number for r in rows}
    assert {ref: by_ref[ref] for ref in acked} == acked
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1)) and head == len(rows)  # gapless
    assert verify(db).ok
    return by_ref


def _wait_feed_caught_up(db, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with db.connect() as conn:
            head = conn.execute(sa.select(journal_head.c.last_seq)).scalar_one()
            pos = conn.execute(sa.select(feed_position.c.journal_seq)).scalar_one()
        if pos == head:
            return
        assert time.monotonic() < deadline, f"the feed stopped at journal event {pos} of {head}"
        time.sleep(0.05)


def _check_feed(db) -> dict[tuple[str, str], list[int]]:
    """The stored feed: per data set and day, message numbers 1..n with no gap; every
    journal event's trade message once."""
    with db.connect() as conn:
        msgs = conn.execute(sa.select(feed_messages.c.data_set, feed_messages.c.feed_date, feed_messages.c.msg_seq,
                                      feed_messages.c.msg_type, feed_messages.c.journal_seq)).all()
        events = conn.execute(sa.select(sa.func.count()).select_from(journal)).scalar_one()
    days: dict[tuple[str, str], list[int]] = {}
    for m in msgs:
        days.setdefault((m.data_set, m.feed_date), []).append(m.msg_seq)
    for key, seqs in days.items():
        assert sorted(seqs) == list(range(1, len(seqs) + 1)), f"feed gap in {key}"
    trades = Counter(m.journal_seq for m in msgs if m.msg_type == "TRADE")
    assert all(n == 1 for n in trades.values()), "a journal event was disseminated twice"
    assert set(trades) <= set(range(1, events + 1))
    return days


@pytest.fixture
def service_db(tmp_path_factory):
    """PostgreSQL (a private cluster) when it can run here, else a SQLite file."""
    if postgres_unavailable_reason() is None:
        pg = PrivatePostgres(Path(tempfile.mkdtemp(prefix="bondtape-pg-")))
        pg.start()
        yield pg.url, pg
        pg.close()
    else:
        yield f"sqlite:///{tmp_path_factory.mktemp('svc')}/bondtape.db", None


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigkill_of_the_server_during_load_loses_nothing_acknowledged(service_db, tmp_path):
    """REST and FIX clients resend what was not answered, with the same client_ref / 571."""
    url, pg = service_db
    dep = provision(url, tmp_path / "dep", dealers=2, securities=10)
    server = ServerProcess(dep, workers=2 if pg else 1)
    server.start()
    db = connect(url, migrate_schema=False)
    try:
        run = LoadRun(dep, server.https_url, server.fix_port, speed=SPEED, deadline_s=60)
        load = Background(run, _orders(dep, 150, seconds=4, fix_share=0.5))
        load.wait_answers(40)
        server.kill()  # SIGKILL: the supervisor and every worker, mid-request
        killed_at = len(run.answers)
        with db.connect() as conn:  # what the feed had published when the server died
            position_at_kill = conn.execute(sa.select(feed_position.c.journal_seq)).scalar_one()
        time.sleep(0.5)
        server.start()  # same ports; the clients retry the same client_ref meanwhile
        answers = load.join()
        assert run.connection_errors > 0, "the kill was not noticed by the clients"
        assert killed_at < len(answers) == 150
        assert Counter(a.status for a in answers) == {"ACCEPTED": 150}
        assert {a.channel for a in answers} == {"http", "fix"}  # REST and FIX clients both came back
        _check_journal(db, answers)
        _wait_feed_caught_up(db)
        _check_feed(db)
        with db.connect() as conn:  # the feed went on from where it stopped, not from the start
            first_after = conn.execute(sa.select(sa.func.min(feed_messages.c.journal_seq))
                                       .where(feed_messages.c.journal_seq > position_at_kill)).scalar_one()
        assert first_after == position_at_kill + 1
        assert server.stop() == 0
    finally:
        server.kill()
        db.dispose()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_postgres_restart_at_the_service_answers_503_and_recovers(private_pg, tmp_path):
    dep = provision(private_pg.url, tmp_path / "dep", dealers=2, securities=10)
    server = ServerProcess(dep, workers=2)
    server.start()
    http = server.addresses["http"]
    try:
        run = LoadRun(dep, server.https_url, server.fix_port, speed=SPEED, deadline_s=90)
        load = Background(run, _orders(dep, 150, seconds=5, fix_share=0.3))
        load.wait_answers(40)
        private_pg.stop("fast")
        deadline = time.monotonic() + 20
        while not run.unavailable and time.monotonic() < deadline:
            time.sleep(0.02)
        ready = httpx.get(http + "/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["database"]["status"] == "down"
        assert ready.headers["retry-after"] == "1"
        assert httpx.get(http + "/healthz", timeout=5).status_code == 200  # alive: no restart needed
        time.sleep(0.5)
        private_pg.start()
        answers = load.join()
        assert server.proc.poll() is None  # the same server process all along
        assert run.unavailable, "no 503 was seen while PostgreSQL was down"
        # HTTP: 503 + Retry-After; FIX: Business Message Reject "unavailable, resend" (or the session drops)
        assert set(run.unavailable) <= {"SERVICE_UNAVAILABLE|1", "ENGINE_UNAVAILABLE|1",
                                        "FIX_BUSINESS_REJECT_UNAVAILABLE"}, set(run.unavailable)
        assert any(u.endswith("|1") for u in run.unavailable)
        print("unavailable answers:", Counter(run.unavailable), "connection errors:", run.connection_errors)
        assert Counter(a.status for a in answers) == {"ACCEPTED": 150}
        assert httpx.get(http + "/readyz", timeout=5).status_code == 200
        db = connect(private_pg.url, migrate_schema=False)
        try:
            _check_journal(db, answers)
            _wait_feed_caught_up(db)
            _check_feed(db)
        finally:
            db.dispose()
        metrics = httpx.get(http + "/metrics", headers={"authorization": "Bearer scrape-token"}, timeout=5).text
        assert 'bondtape_dependency_up{dependency="database"} 1.0' in metrics
        assert httpx.get(http + "/metrics", timeout=5).status_code in (303, 403)  # no token, no session
        assert server.stop() == 0
    finally:
        server.kill()


async def _stream_messages(url: str) -> list[tuple[str, str, int]]:
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe("bondtape.feed.>", durable=None, stream="BONDTAPE_FEED")
        out = []
        while True:
            try:
                batch = await sub.fetch(500, timeout=1)
            except Exception:  # nats TimeoutError: nothing more
                break
            for m in batch:
                body = json.loads(m.data)
                out.append((m.subject.rsplit(".", 1)[1], body["date"], body["seq"]))
                await m.ack()
        return out
    finally:
        await nc.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_nats_stopped_during_load_the_feed_catches_up_without_gap_or_duplicate(service_db, private_nats, tmp_path):
    url, pg = service_db
    dep = provision(url, tmp_path / "dep", dealers=2, securities=10)
    server = ServerProcess(dep, workers=2 if pg else 1, fix=False, nats_url=private_nats.url)
    server.start()
    http = server.addresses["http"]
    db = connect(url, migrate_schema=False)
    try:
        deadline = time.monotonic() + 20
        while httpx.get(http + "/readyz", timeout=5).json()["bus"]["status"] != "up":
            # with two workers /readyz may be answered by one without the bus: ask again
            assert time.monotonic() < deadline, "the bus never came up"
            time.sleep(0.05)
        run = LoadRun(dep, server.https_url, None, speed=SPEED, deadline_s=60)
        load = Background(run, _orders(dep, 150, seconds=4))
        load.wait_answers(40)
        private_nats.stop()
        during = len(run.answers)
        load.wait_answers(during + 40)  # intake and the journal go on without the bus
        private_nats.start()  # same port, same store
        answers = load.join()
        assert Counter(a.status for a in answers) == {"ACCEPTED": 150}
        _check_journal(db, answers)
        _wait_feed_caught_up(db)
        days = _check_feed(db)
        expected = sorted((ds, date, s) for (ds, date), seqs in days.items() for s in seqs)
        deadline = time.monotonic() + 30
        while True:
            got = asyncio.run(_stream_messages(private_nats.url))
            if len(got) >= len(expected) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert len(got) == len(set(got)), "a message reached the stream twice"
        assert sorted(got) == expected  # every stored message, no gap
        assert server.stop() == 0
    finally:
        server.kill()
        db.dispose()

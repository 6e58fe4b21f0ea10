"""A feed request whose access check waits for the database (SQLite locked by a writer,
a slow PostgreSQL) waits alone: the check runs off the event loop, so every other
subscriber's stream goes on and every other request is answered meanwhile.

Before, the check ran on the event loop: one request opening a stream, or asking for the
status, time and sales, a snapshot or stored messages, while the access database was locked
froze the whole server (every stream, every request) until the lock went or the busy
timeout (30 s in production) ran out."""
from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time

import httpx
import pytest
import sqlalchemy as sa
import websockets

from bondtape.dissemination.publisher import DATA_SETS
from bondtape.dissemination.web import create_app
from tests.conftest import IG
from tests.test_feed_transports import DAY, Server, feed, free_port  # noqa: F401  (feed: the fixture)

SLOW = "x-test-access"  # the header of the client whose check waits for the lock
BOUND = 10.0  # seconds: far above a message's or an answer's time over loopback, far below the lock's hold


class LockedAccess:
    """The access check reads and touches a session in a database of its own, as the
    website's does (a pooled SQLAlchemy connection per check, a 30 s busy timeout as in
    production). ``lock()`` has another connection hold the write lock, so the check of
    a client sending the ``x-test-access: slow`` header really blocks in SQLite until
    ``release()``; every other client's check answers at once."""

    def __init__(self, tmp_path):
        self.path = tmp_path / "access.db"
        self.db = sa.create_engine(f"sqlite:///{self.path}", connect_args={"timeout": 30})
        with self.db.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE sessions (id INTEGER PRIMARY KEY, touched REAL)")
            conn.exec_driver_sql("INSERT INTO sessions VALUES (1, 0)")
        self.locker = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.waiting = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.slow_checks = 0

    def lock(self) -> None:
        self.locker.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        if self.locker.in_transaction:
            self.locker.execute("ROLLBACK")

    def entitled(self, conn) -> list[str]:
        if conn.headers.get(SLOW) == "slow":
            self.slow_checks += 1
            self.loop.call_soon_threadsafe(self.waiting.set)
            with self.db.begin() as db:  # waits for the lock (busy timeout 30 s)
                db.execute(sa.text("UPDATE sessions SET touched = :t WHERE id = 1"), {"t": time.time()})
        return list(DATA_SETS)

    def close(self) -> None:
        self.release()
        self.locker.close()
        self.db.dispose()


async def _first_sse_event(http: httpx.AsyncClient, url: str, headers: dict) -> tuple[int, str]:
    async with http.stream("GET", url, headers=headers) as r:
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                return r.status_code, line[7:]
    return r.status_code, ""


# what the client whose check waits asks for, and how it checks the answer it gets at last
ROUTES = {
    "websocket opening": None,
    "SSE opening": None,
    "status": "/feed/status",
    "time and sales": f"/time-and-sales/{IG}",
    "snapshot": f"/feed/snapshot/CORP/{DAY}",
    "stored messages": f"/feed/messages?data_set=CORP&date={DAY}&from_seq=1",
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_check_waiting_for_a_locked_database_does_not_stall_other_clients(feed, tmp_path, route):
    engine, pub, report = feed
    report(1)  # the day has started: START_OF_DAY and a trade are stored
    access = LockedAccess(tmp_path)
    app = create_app(pub, entitled=access.entitled, recheck_seconds=0.1)  # the open stream re-checks meanwhile

    async def slow_client(port: int):
        """The client whose access check waits for the lock; its answer once it is released."""
        headers = {SLOW: "slow"}
        if route == "websocket opening":
            async with websockets.connect(f"ws://127.0.0.1:{port}/feed/ws?data_sets=CORP&from=CORP::1",
                                          additional_headers=headers, open_timeout=60) as ws:
                return json.loads(await asyncio.wait_for(ws.recv(), 60))["type"]
        async with httpx.AsyncClient(timeout=60) as http:
            if route == "SSE opening":
                return await _first_sse_event(http, f"http://127.0.0.1:{port}/feed/sse?data_sets=CORP&from=CORP::1",
                                              headers)
            r = await http.get(f"http://127.0.0.1:{port}{ROUTES[route]}", headers=headers)
            return r.status_code, r.text

    async def run(port: int):
        access.loop = asyncio.get_running_loop()
        async with websockets.connect(f"ws://127.0.0.1:{port}/feed/ws?data_sets=CORP") as live, \
                httpx.AsyncClient(timeout=BOUND) as http:
            access.lock()
            try:
                slow = asyncio.create_task(slow_client(port))
                await asyncio.wait_for(access.waiting.wait(), 30)  # its check now waits for the lock
                started = time.monotonic()
                await asyncio.to_thread(report, 1)

                async def live_trade():
                    try:
                        return json.loads(await asyncio.wait_for(live.recv(), BOUND))["type"], time.monotonic() - started
                    except asyncio.TimeoutError:
                        return None, time.monotonic() - started

                async def other_request():
                    try:
                        r = await http.get(f"http://127.0.0.1:{port}/feed/status")
                        return r.status_code, time.monotonic() - started
                    except httpx.TimeoutException:
                        return None, time.monotonic() - started

                (trade, trade_s), (status, status_s) = await asyncio.gather(live_trade(), other_request())
                still_waiting = not slow.done()  # the lock really held the slow client meanwhile
            finally:
                access.release()
            answer = await asyncio.wait_for(slow, 60)
        return trade, trade_s, status, status_s, still_waiting, answer

    try:
        with Server(app, free_port()) as srv:
            trade, trade_s, status, status_s, still_waiting, answer = asyncio.run(run(srv.port))
    finally:
        access.close()
    assert trade == "TRADE", f"the open stream delivered nothing for {trade_s:.1f} s while one {route} check waited"
    assert status == 200, f"another request got no answer for {status_s:.1f} s while one {route} check waited"
    assert still_waiting and access.slow_checks == 1
    # and the waiting client got what it asked for once the database answered
    if route == "websocket opening":
        assert answer == "START_OF_DAY"
    elif route == "SSE opening":
        assert answer == (200, "START_OF_DAY")
    else:
        code, text = answer
        assert code == 200, (code, text)
        if route == "status":
            assert json.loads(text)["data_sets"]["CORP"]["date"] == DAY
        elif route == "time and sales":
            assert json.loads(text)["data_set"] == "CORP"
        else:
            assert [json.loads(line)["type"] for line in text.splitlines()][:2] == ["START_OF_DAY", "TRADE"]


def test_no_access_check_runs_on_the_event_loop_even_one_that_reads_lazily(feed):
    """Every check (each route's, the opening's and a live stream's re-checks) runs in a
    worker thread, including the reading an ``entitled`` that is a generator does as it is
    iterated (before the fix, all of them but the re-checks' call ran on the loop, and the
    re-checks' generators were iterated there too)."""
    engine, pub, report = feed
    report(1)
    threads: list[int] = []

    def entitled(conn):  # a generator: its body runs only when it is iterated
        threads.append(threading.get_ident())
        yield from DATA_SETS

    with Server(create_app(pub, entitled=entitled, recheck_seconds=0.05), free_port()) as srv:
        base = f"127.0.0.1:{srv.port}"

        async def run():
            async with websockets.connect(f"ws://{base}/feed/ws?data_sets=CORP&from=CORP::1") as ws:
                assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "START_OF_DAY"
                async with httpx.AsyncClient(timeout=30) as http:
                    for path in ROUTES.values():
                        if path:
                            assert (await http.get(f"http://{base}{path}")).status_code == 200, path
                    assert await _first_sse_event(http, f"http://{base}/feed/sse?data_sets=CORP&from=CORP::1",
                                                  {}) == (200, "START_OF_DAY")
                checks, deadline = len(threads), time.monotonic() + 30
                while len(threads) < checks + 2:  # two live re-checks more
                    assert time.monotonic() < deadline, "the live stream was not re-checked"
                    await asyncio.sleep(0.05)
            return checks

        opening_and_routes = asyncio.run(run())
        loop_thread = srv.thread.ident
    assert opening_and_routes >= 6  # the WebSocket, four routes, SSE (and re-checks)
    assert loop_thread not in threads, "an access check ran on the event loop's thread"

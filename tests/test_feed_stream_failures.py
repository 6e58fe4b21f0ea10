"""A live feed stream whose access re-check the database fails (SQLite locked beyond its
timeout, PostgreSQL down): one retry, then a clean end the subscriber can act on (WebSocket
1013 SERVICE_UNAVAILABLE, SSE SERVICE_UNAVAILABLE event) and one log line for the operator;
never an abrupt drop, a traceback, or a stream going on unchecked."""
from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time

import httpx
import pytest
import sqlalchemy as sa
import websockets

from bondtape.dissemination.web import create_app
from tests.test_feed_transports import Server, feed, free_port  # noqa: F401  (feed: the fixture)

class Records(logging.Handler):
    """The records of the feed's and the server's loggers (caplog misses them once
    ``configure_logging`` has made ``bondtape`` stop propagating)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._loggers = [logging.getLogger(n) for n in ("bondtape.feed", "uvicorn.error", "asyncio")]

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        self._levels = [lg.level for lg in self._loggers]
        for lg in self._loggers:
            lg.addHandler(self)
            lg.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc):
        for lg, level in zip(self._loggers, self._levels):
            lg.removeHandler(self)
            lg.setLevel(level)

    def at(self, level: int) -> list[logging.LogRecord]:
        return [r for r in self.records if r.levelno >= level and r.name != "bondtape.feed.client"]


class BrokenAccessDatabase:
    """The access re-check reads and touches a session in a database of its own, as the
    website's does: ``fail()`` makes that database unavailable for real (``sqlite``: another
    connection holds the write lock beyond the 0.05 s busy timeout, "database is locked";
    ``postgres``: the URL of a server that is not there, "connection refused")."""

    def __init__(self, kind: str, tmp_path):
        self.kind = kind
        self.path = tmp_path / "access.db"
        self.ok = sa.create_engine(f"sqlite:///{self.path}", connect_args={"timeout": 0.05})
        with self.ok.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE sessions (id INTEGER PRIMARY KEY, touched REAL)")
            conn.exec_driver_sql("INSERT INTO sessions VALUES (1, 0)")
        self.broken = sa.create_engine(f"postgresql+psycopg://bondtape@127.0.0.1:{free_port()}/gone",
                                       pool_pre_ping=True, connect_args={"connect_timeout": 2})
        self.failing = False
        self.calls = self.failed = 0
        self._locker: sqlite3.Connection | None = None

    def fail(self) -> None:
        if self.kind == "sqlite":
            self._locker = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._locker.execute("BEGIN EXCLUSIVE")
        self.failing = True

    def heal(self) -> None:
        if self._locker is not None:
            self._locker.execute("ROLLBACK")
            self._locker.close()
            self._locker = None
        self.failing = False

    def recheck(self, _conn) -> set[str]:
        self.calls += 1
        db = self.broken if self.kind == "postgres" and self.failing else self.ok
        try:
            with db.begin() as conn:
                conn.execute(sa.text("UPDATE sessions SET touched = :t WHERE id = 1"), {"t": time.time()})
        except Exception:
            self.failed += 1
            raise
        return {"CORP"}

    def wait_for_a_failed_check(self) -> None:
        deadline = time.monotonic() + 10
        while not self.failed:
            assert time.monotonic() < deadline, "no re-check failed"
            time.sleep(0.005)

    def close(self) -> None:
        self.heal()
        self.ok.dispose()
        self.broken.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def access_db(request, tmp_path):
    db = BrokenAccessDatabase(request.param, tmp_path)
    yield db
    db.close()


def _ws_session(url: str, after: int = 0, then=lambda: None,
                until_closed: float = 15) -> tuple[list[str], websockets.frames.Close | None]:
    """Connect, read ``after`` messages, call ``then()``, read until the server closes:
    (texts, the close frame received, None if there was none)."""
    async def run():
        texts = []
        async with websockets.connect(url) as ws:
            try:
                for _ in range(after):
                    texts.append(await asyncio.wait_for(ws.recv(), until_closed))
                then()
                while True:
                    texts.append(await asyncio.wait_for(ws.recv(), until_closed))
            except websockets.exceptions.ConnectionClosed as exc:
                return texts, exc.rcvd
    return asyncio.run(run())


def _one_line_for_the_operator(logs: Records, *, code: str, reason: str, transport: str) -> None:
    problems = logs.at(logging.WARNING)
    assert len(problems) == 1, [r.getMessage() for r in problems]
    (line,) = problems
    message = line.getMessage()
    assert line.name == "bondtape.feed" and line.levelno == logging.WARNING and line.exc_info is None, message
    assert f"feed {transport} stream of 127.0.0.1:" in message and f"ended with {code}" in message, message
    assert "failed twice" in message and reason in message and "\n" not in message, message


def test_the_database_failing_the_recheck_twice_ends_the_websocket_with_1013(feed, access_db):
    """Before: the server dropped the TCP connection without a close frame (the client saw
    1006, "no close frame received or sent") and logged nothing at all."""
    engine, pub, report = feed
    report(1)
    app = create_app(pub, entitled=access_db.recheck, recheck=access_db.recheck, recheck_seconds=0.05)
    with Records() as logs, Server(app, free_port()) as srv:
        def lock_then_trade():
            access_db.fail()
            access_db.wait_for_a_failed_check()
            report(1)  # published once access could not be checked: never delivered

        texts, close = _ws_session(f"ws://127.0.0.1:{srv.port}/feed/ws?data_sets=CORP&from=CORP::1", 2, lock_then_trade)
    assert close is not None, "closed without a close frame"
    assert close.code == 1013 and close.reason.startswith("SERVICE_UNAVAILABLE: "), close
    assert [json.loads(t)["type"] for t in texts] == ["START_OF_DAY", "TRADE"]  # the second trade was held back
    reason = "database is locked" if access_db.kind == "sqlite" else "Connection refused"
    _one_line_for_the_operator(logs, code="SERVICE_UNAVAILABLE", reason=reason, transport="websocket")
    assert access_db.failed == 2  # the re-check and its one retry


def test_the_database_failing_the_recheck_twice_ends_the_sse_stream_with_an_error_event(feed, access_db):
    """Before: the response was cut mid-stream (the client saw "incomplete chunked read")
    and the server logged a traceback ("Exception in ASGI application")."""
    engine, pub, report = feed
    report(1)
    app = create_app(pub, entitled=access_db.recheck, recheck=access_db.recheck, recheck_seconds=0.05)
    with Records() as logs, Server(app, free_port()) as srv:
        with httpx.Client(timeout=15) as http:
            with http.stream("GET", f"http://127.0.0.1:{srv.port}/feed/sse?data_sets=CORP&from=CORP::1") as r:
                assert r.status_code == 200
                lines = []
                for line in r.iter_lines():  # ends by itself, cleanly (no RemoteProtocolError)
                    lines.append(line)
                    if line.startswith("data: ") and '"TRADE"' in line and not access_db.failing:
                        access_db.fail()
                        access_db.wait_for_a_failed_check()
                        report(1)
    events = [line[7:] for line in lines if line.startswith("event: ")]
    assert events == ["START_OF_DAY", "TRADE", "SERVICE_UNAVAILABLE"], lines
    error = json.loads(lines[lines.index("event: SERVICE_UNAVAILABLE") + 1][6:])["error"]
    assert error["code"] == "SERVICE_UNAVAILABLE" and "reconnect" in error["message"]
    assert not any("Traceback" in line for line in lines)
    reason = "database is locked" if access_db.kind == "sqlite" else "Connection refused"
    _one_line_for_the_operator(logs, code="SERVICE_UNAVAILABLE", reason=reason, transport="SSE")


def test_one_failed_recheck_is_tried_again_and_the_stream_goes_on(feed, tmp_path):
    """A blip (the database fails one re-check, answers the retry): nothing lost, nothing
    repeated, the stream goes on; the operator gets one INFO line, no warning."""
    engine, pub, report = feed
    report(1)  # the day has started: the stream is live from after it
    access = BrokenAccessDatabase("sqlite", tmp_path)
    healed = threading.Event()

    def recheck(conn):
        try:
            return access.recheck(conn)
        finally:
            if access.failing:  # this check failed: the lock goes before the retry
                access.heal()
                healed.set()

    try:
        with Records() as logs, Server(create_app(pub, recheck=recheck, recheck_seconds=0.2), free_port()) as srv:
            async def run():
                async with websockets.connect(f"ws://127.0.0.1:{srv.port}/feed/ws?data_sets=CORP") as ws:
                    access.fail()
                    report(1)
                    assert await asyncio.to_thread(healed.wait, 10)
                    report(1)
                    got = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(2)]
                    await asyncio.sleep(0.5)  # two more re-checks, both passing
                    report(1)
                    got.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
                    return got
            got = asyncio.run(run())
    finally:
        access.close()
    assert [m["type"] for m in got] == ["TRADE"] * 3
    assert [m["seq"] for m in got] == sorted({m["seq"] for m in got})  # in order, none twice
    assert logs.at(logging.WARNING) == []
    infos = [r.getMessage() for r in logs.records if r.name == "bondtape.feed" and r.levelno == logging.INFO]
    assert len(infos) == 1 and "passed when tried again" in infos[0] and "database is locked" in infos[0], infos


def test_a_recheck_failing_for_another_reason_ends_with_1011_and_the_traceback_stays_in_the_log(feed):
    engine, pub, report = feed

    def recheck(conn):
        raise KeyError("session")  # a bug, not the database: no retry

    with Records() as logs, Server(create_app(pub, recheck=recheck, recheck_seconds=0.05), free_port()) as srv:
        texts, close = _ws_session(f"ws://127.0.0.1:{srv.port}/feed/ws?data_sets=CORP")
        with httpx.Client(timeout=15) as http:
            with http.stream("GET", f"http://127.0.0.1:{srv.port}/feed/sse?data_sets=CORP") as r:
                lines = list(r.iter_lines())
    assert close is not None and close.code == 1011 and close.reason.startswith("INTERNAL_ERROR: "), close
    assert "event: INTERNAL_ERROR" in lines and not any("Traceback" in line or "KeyError" in line for line in lines)
    errors = logs.at(logging.WARNING)
    assert [r.name for r in errors] == ["bondtape.feed", "bondtape.feed"], [r.getMessage() for r in errors]
    assert all("ended with INTERNAL_ERROR" in r.getMessage() and r.exc_info for r in errors)


def test_the_database_failing_at_the_opening_is_service_unavailable_not_http_500(feed):
    engine, pub, report = feed

    def entitled(conn):
        raise sa.exc.OperationalError("UPDATE sessions", {}, sqlite3.OperationalError("database is locked"))

    with Records() as logs, Server(create_app(pub, entitled=entitled), free_port()) as srv:
        texts, close = _ws_session(f"ws://127.0.0.1:{srv.port}/feed/ws?data_sets=CORP")
        r = httpx.get(f"http://127.0.0.1:{srv.port}/feed/sse?data_sets=CORP", timeout=15)
    assert texts == [] and close is not None and close.code == 1013, close
    assert close.reason.startswith("SERVICE_UNAVAILABLE: ")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
    problems = logs.at(logging.WARNING)
    assert len(problems) == 2 and all(p.exc_info is None and "database is locked" in p.getMessage()
                                      for p in problems), [p.getMessage() for p in problems]

"""The feed's transports: WebSocket and SSE (a real server on 127.0.0.1), the resuming
client, entitlement filtering, retransmission, time and sales, and NATS JetStream."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
import uuid
from decimal import Decimal

import httpx
import pytest
import uvicorn
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from bondtape.dissemination.client import FeedClient
from bondtape.dissemination.publisher import Publisher
from bondtape.dissemination.web import create_app, format_positions, parse_positions
from bondtape.engine import Engine
from tests.conftest import AGCY, HY, IG
from tests.helpers import DEFAULT_EXEC, act, new, standard_sqlite

DAY = "2024-03-04"
NATS_URL = os.environ.get("BONDTAPE_TEST_NATS_URL")


@pytest.fixture
def feed(tmp_path):
    db = standard_sqlite(tmp_path / 'feed.db')
    engine = Engine(db)
    pub = Publisher(db)
    engine.listeners.append(pub.apply_live)
    counter = iter(range(1, 1_000_000))

    def report(n: int = 1, **kw):
        return engine.submit([new(ref=f"r{next(counter)}", execution_us=DEFAULT_EXEC + next(counter), **kw)
                              for _ in range(n)])

    yield engine, pub, report
    db.dispose()


def stored(pub: Publisher, ds: str = "CORP") -> list[str]:
    return [m.body for m in pub.messages(ds)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread on 127.0.0.1."""

    def __init__(self, app, port: int):
        self.port = port
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    timeout_graceful_shutdown=1, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def test_positions_round_trip_and_refuse_garbage():
    pos = {"CORP": (DAY, 17), "AGCY": ("2024-03-05", 1)}
    assert parse_positions(format_positions(pos)) == pos
    from bondtape.dissemination.publisher import FeedError

    for bad in ("CORP:2024-03-04", "MUNI:2024-03-04:1", "CORP:2024-03-04:x"):
        with pytest.raises(FeedError):
            parse_positions(bad)


def test_websocket_retransmits_from_any_number_then_goes_live(feed):
    engine, pub, report = feed
    report(4)
    with TestClient(create_app(pub)) as client:
        with client.websocket_connect(f"/feed/ws?data_sets=CORP&from=CORP:{DAY}:3") as ws:
            assert [ws.receive_text() for _ in range(3)] == stored(pub)[2:]
            report(1)
            assert ws.receive_text() == stored(pub)[5]
        with client.websocket_connect("/feed/ws?data_sets=CORP") as ws:  # live from now
            report(1, price=Decimal("77"))
            assert json.loads(ws.receive_text())["trade"]["price"] == "77"


def test_websocket_refuses_bad_requests_and_unentitled_data_sets(feed):
    engine, pub, report = feed
    app = create_app(pub, entitled=lambda conn: {"CORP"})
    with TestClient(app) as client:
        with pytest.raises(WebSocketDisconnect) as e:
            with client.websocket_connect("/feed/ws?data_sets=AGCY") as ws:
                ws.receive_text()
        assert e.value.code == 4403
        with pytest.raises(WebSocketDisconnect) as e:
            with client.websocket_connect("/feed/ws?from=nonsense") as ws:
                ws.receive_text()
        assert e.value.code == 4400
        # no data set named: only the entitled ones are sent
        with client.websocket_connect(f"/feed/ws?from_seq=1&date={DAY}") as ws:
            report(1, cusip=AGCY)
            report(1, cusip=IG)
            first = json.loads(ws.receive_text())
            second = json.loads(ws.receive_text())
            assert first["data_set"] == second["data_set"] == "CORP" and second["type"] == "TRADE"
        r = client.get("/feed/sse?data_sets=AGCY")
        assert r.status_code == 403 and r.json()["error"]["code"] == "NOT_ENTITLED"
        r = client.get("/feed/messages?data_set=AGCY")
        assert r.status_code == 403
        r = client.get(f"/time-and-sales/{AGCY}")
        assert r.status_code == 403
        r = client.get("/feed/snapshot/AGCY/2024-03-04")
        assert r.status_code == 403
        assert set(client.get("/feed/status").json()["data_sets"]) == {"CORP"}


def test_http_retransmission_time_and_sales_and_snapshot(feed):
    engine, pub, report = feed
    a, b = report(2, quantity=Decimal("6000000"))
    engine.submit([act("CANCEL", a.control_number, ref="cx")])
    with TestClient(create_app(pub)) as client:
        r = client.get(f"/feed/messages?data_set=CORP&date={DAY}&from_seq=2&limit=2")
        assert r.status_code == 200 and r.text.splitlines() == stored(pub)[1:3]
        assert client.get("/feed/messages?data_set=CORP&limit=0").json()["error"]["code"] == "LIMIT_INVALID"
        assert client.get("/feed/messages").json()["error"]["code"] == "DATA_SET_REQUIRED"
        tas = client.get(f"/time-and-sales/{IG}").json()
        assert [t["quantity"] for t in tas["trades"]] == ["5MM+"]  # the cancelled one is gone
        assert "DLRA" not in json.dumps(tas)
        assert client.get("/time-and-sales/999999999").status_code == 404
        snap = client.get(f"/feed/snapshot/CORP/{DAY}")
        assert snap.text.splitlines() == stored(pub)
        status = client.get("/feed/status").json()["data_sets"]
        assert status["CORP"] == {"date": DAY, "last_seq": 4, "closed": False}


def test_start_positions_that_are_malformed_or_impossible_are_refused(feed):
    engine, pub, report = feed
    report(4)  # CORP DAY: START_OF_DAY + 4 trades, seqs 1-5
    with TestClient(create_app(pub)) as client:
        for query in ("data_set=CORP&from=CORP:2024-99-99:1", "data_set=CORP&date=garbage123&from_seq=1",
                      "data_set=CORP&date=2099-01-01&from_seq=1", f"data_set=CORP&date={DAY}&from_seq=99",
                      "data_set=CORP&from=CORP::99", "data_set=CORP&from=CORP:2024-03-04:0"):
            r = client.get(f"/feed/messages?{query}")
            assert r.status_code == 400 and r.json()["error"]["code"] == "POSITION_INVALID", (query, r.text)
        for query in ("from=CORP:2099-01-01:1", f"from=CORP:{DAY}:1000"):
            with pytest.raises(WebSocketDisconnect) as e:
                with client.websocket_connect(f"/feed/ws?data_sets=CORP&{query}") as ws:
                    ws.receive_text()
            assert e.value.code == 4400, query
        # no date: the first day, as documented; never a message before the seq asked for
        for query in ("from=CORP::3", "from_seq=3"):
            r = client.get(f"/feed/messages?data_set=CORP&{query}")
            assert r.status_code == 200 and r.text.splitlines() == stored(pub)[2:], query
        r = client.get(f"/feed/messages?data_set=CORP&date={DAY}&from_seq=6")  # the next one: empty, fine
        assert r.status_code == 200 and r.text == ""


def test_snapshot_of_a_malformed_date_is_a_clear_400(feed):
    engine, pub, report = feed
    with TestClient(create_app(pub), raise_server_exceptions=False) as client:
        for bad in ("not-a-date", "2026-1-1", "2024-02-30"):
            r = client.get(f"/feed/snapshot/CORP/{bad}")
            assert r.status_code == 400, bad
            assert r.json()["error"]["code"] == "DATE_INVALID" and r.json()["error"]["field"] == "date"


def test_live_streams_end_when_access_ends(feed):
    """Access is checked again while a stream runs (here every 0.05 s): once the caller may
    no longer receive its data sets (signed out, disabled, entitlement ended), nothing more
    is delivered: the WebSocket closes with 4403, the SSE stream ends."""
    engine, pub, report = feed
    allowed = {"CORP"}
    app = create_app(pub, entitled=lambda conn: set(allowed), recheck_seconds=0.05)
    with TestClient(app) as client:
        with pytest.raises(WebSocketDisconnect) as e:
            with client.websocket_connect("/feed/ws?data_sets=CORP") as ws:
                report(1)
                assert [json.loads(ws.receive_text())["type"] for _ in range(2)] == ["START_OF_DAY", "TRADE"]
                allowed.clear()
                time.sleep(0.1)
                report(1)  # due for a check before it is delivered: never sent
                got = ws.receive_text()
                raise AssertionError(f"delivered after access ended: {got}")
        assert e.value.code == 4403
        allowed.add("CORP")
        with pytest.raises(WebSocketDisconnect) as e:  # also while no message flows
            with client.websocket_connect("/feed/ws?data_sets=CORP") as ws:
                allowed.clear()
                ws.receive_text()
        assert e.value.code == 4403
    allowed.add("CORP")
    with Server(create_app(pub, entitled=lambda conn: set(allowed), recheck_seconds=0.05), free_port()) as srv:
        with httpx.Client(timeout=10) as http:
            with http.stream("GET", f"http://127.0.0.1:{srv.port}/feed/sse?data_sets=CORP") as r:
                assert r.status_code == 200
                threading.Thread(target=lambda: (time.sleep(0.2), allowed.clear(), time.sleep(0.2), report(1))).start()
                lines = list(r.iter_lines())  # ends by itself
            assert "event: ACCESS_ENDED" in lines and not any(line.startswith("event: TRADE") for line in lines)


def _sse_events(response, n: int) -> list[tuple[str, str]]:
    events, ident, data = [], None, None
    for line in response.iter_lines():
        if line.startswith("id: "):
            ident = line[4:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and data is not None:
            events.append((ident, data))
            ident = data = None
            if len(events) == n:
                return events
    return events


def test_server_sent_events_over_a_real_server_resume_with_last_event_id(feed):
    engine, pub, report = feed
    report(3)
    report(1, cusip=AGCY)
    with Server(create_app(pub), free_port()) as srv:
        base = f"http://127.0.0.1:{srv.port}"
        with httpx.Client(timeout=10) as http:
            with http.stream("GET", f"{base}/feed/sse?data_sets=CORP,AGCY&from=CORP:{DAY}:1,AGCY:{DAY}:1") as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                events = _sse_events(r, 6)
            assert [d for _, d in events] == stored(pub, "CORP") + stored(pub, "AGCY")  # stored part per data set
            last_id = events[2][0]
            assert parse_positions(last_id, min_seq=0) == {"CORP": (DAY, 3), "AGCY": (DAY, 0)}  # AGCY not carried yet
            assert parse_positions(events[5][0]) == {"CORP": (DAY, 4), "AGCY": (DAY, 2)}
            with http.stream("GET", f"{base}/feed/sse?data_sets=CORP,AGCY", headers={"Last-Event-ID": last_id}) as r:
                report(1)
                again = _sse_events(r, 4)
            # CORP after its position; AGCY, not carried yet, from where that stream started it
            got = [d for _, d in again]
            assert [d for d in got if '"data_set":"CORP"' in d] == stored(pub, "CORP")[3:]
            assert [d for d in got if '"data_set":"AGCY"' in d] == stored(pub, "AGCY")


def test_sse_resume_has_no_gap_on_a_data_set_not_carried_yet(feed):
    """The event id names every subscribed data set: one that sent nothing before the
    disconnect resumes where the stream started it, not live (what came meanwhile is sent)."""
    engine, pub, report = feed
    report(1)
    report(1, cusip=AGCY)
    with Server(create_app(pub), free_port()) as srv:
        base = f"http://127.0.0.1:{srv.port}"
        with httpx.Client(timeout=10) as http:
            with http.stream("GET", f"{base}/feed/sse?data_sets=CORP,AGCY") as r:  # live from now
                threading.Thread(target=lambda: (time.sleep(0.3), report(1))).start()
                [(last_id, _)] = _sse_events(r, 1)
            assert parse_positions(last_id) == {"CORP": (DAY, 3), "AGCY": (DAY, 2)}
            report(1, cusip=AGCY)  # published while disconnected
            with http.stream("GET", f"{base}/feed/sse?data_sets=CORP,AGCY", headers={"Last-Event-ID": last_id}) as r:
                [(_, data)] = _sse_events(r, 1)
            assert data == stored(pub, "AGCY")[2]


def test_client_resumes_after_the_server_goes_away_without_gap_or_repeat(feed):
    engine, pub, report = feed
    report(5)
    port = free_port()
    app = create_app(pub)
    received: list[str] = []

    async def follow() -> None:
        client = FeedClient(f"ws://127.0.0.1:{port}/feed/ws", ["CORP"], start={"CORP": ("", 1)},
                            reconnect_delay=0.05, max_reconnects=200)
        server = Server(app, port).__enter__()
        try:
            async for text in client.raw():
                received.append(text)
                if len(received) == 3:  # the server goes away mid-stream; reports keep coming
                    await asyncio.to_thread(server.__exit__)
                    await asyncio.to_thread(report, 4)
                    server = await asyncio.to_thread(Server(app, port).__enter__)
                if len(received) == 6:
                    await asyncio.to_thread(report, 2)
                if len(received) == len(stored(pub)) and len(received) >= 12:
                    break
        finally:
            await client.close()
            await asyncio.to_thread(server.__exit__)
        assert client.reconnects >= 1

    asyncio.run(asyncio.wait_for(follow(), 30))
    assert received == stored(pub)
    seqs = [json.loads(t)["seq"] for t in received]
    assert seqs == list(range(1, 13))


def test_client_without_start_follows_live_and_is_refused_when_not_entitled(feed):
    engine, pub, report = feed
    report(2)
    port = free_port()

    async def follow() -> list[dict]:
        got = []
        async with FeedClient(f"ws://127.0.0.1:{port}/feed/ws", ["CORP"]) as client:
            task = asyncio.create_task(asyncio.to_thread(_later, report))
            async for msg in client:
                got.append(msg)
                if len(got) == 2:
                    break
            await task
        return got

    with Server(create_app(pub, entitled=lambda conn: {"CORP"}), port):
        got = asyncio.run(asyncio.wait_for(follow(), 20))
        assert [m["seq"] for m in got] == [4, 5]  # after the 3 stored ones, nothing missed

        async def refused() -> None:
            async for _ in FeedClient(f"ws://127.0.0.1:{port}/feed/ws", ["AGCY"], start={"AGCY": ("", 1)}).raw():
                pass

        with pytest.raises(PermissionError):
            asyncio.run(asyncio.wait_for(refused(), 10))


def _later(report) -> None:
    time.sleep(0.2)  # the client has connected by then; what it misses it would get on resume anyway
    report(2)


@pytest.mark.nats
@pytest.mark.skipif(not NATS_URL, reason="BONDTAPE_TEST_NATS_URL is not set: no NATS JetStream server to test against")
def test_jetstream_publishes_a_subject_per_data_set_and_resumes_without_repeat(feed):
    import nats

    from bondtape.dissemination.jetstream import JetStreamPublisher

    engine, pub, report = feed
    stream, prefix = f"BT_TEST_{uuid.uuid4().hex[:8]}", f"bttest.{uuid.uuid4().hex[:8]}"
    report(3)
    report(1, cusip=AGCY)
    js_pub = JetStreamPublisher(pub, NATS_URL, stream=stream, prefix=prefix).start()
    try:
        report(2, cusip=HY)
        assert js_pub.flush()
    finally:
        js_pub.stop()
    report(2)  # published while the NATS side is down
    js_pub = JetStreamPublisher(pub, NATS_URL, stream=stream, prefix=prefix).start()
    try:
        report(1)
        assert js_pub.flush()
    finally:
        js_pub.stop()

    async def read_back() -> dict[str, list[str]]:
        nc = await nats.connect(NATS_URL)
        js = nc.jetstream()
        out = {}
        try:
            info = await js.stream_info(stream)
            for ds in ("CORP", "AGCY"):
                sub = await js.subscribe(f"{prefix}.{ds}", ordered_consumer=True)
                bodies = []
                want = len(stored(pub, ds))
                while len(bodies) < want:
                    msg = await sub.next_msg(timeout=5)
                    bodies.append(msg.data.decode())
                out[ds] = bodies
                await sub.unsubscribe()
            out["_total"] = info.state.messages
        finally:
            await js.delete_stream(stream)
            await nc.close()
        return out

    got = asyncio.run(read_back())
    assert got["CORP"] == stored(pub, "CORP") and got["AGCY"] == stored(pub, "AGCY")
    assert got["_total"] == len(stored(pub, "CORP")) + len(stored(pub, "AGCY"))  # no repeat

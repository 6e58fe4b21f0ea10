"""Dissemination: accepted report -> message received by a subscriber.

    python benchmarks/run.py dissemination [--rate 2000] [--seconds 5] [--burst 5000]

For each transport (in-process subscription, WebSocket, NATS JetStream) the run:

1. latency: reports go through the real intake (``Sequencer`` -> ``Engine``, SQLite WAL with
   synchronous=FULL) at a sustained ``--rate`` for ``--seconds``; the publisher follows the
   engine and a subscriber records when each message arrives. "Accepted" is the engine's
   listener call right after the journal commit. The WebSocket and NATS subscribers run in
   their own processes (CLOCK_MONOTONIC is shared), like real subscribers;
2. throughput: ``--burst`` reports as fast as the engine takes them, delivered rate
   (messages/s received), against a bare publish of the same message bytes on the same
   transport (a queue between threads; a WebSocket endpoint sending the bytes; JetStream
   publishes of the bytes), in the same run: ``ratio_to_bare_transport`` = ours / bare.

NATS is measured when BONDTAPE_TEST_NATS_URL (or --nats URL) names a JetStream server.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import itertools
import json
import os
import queue
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from array import array
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def now_ns() -> int:
    return time.monotonic_ns()


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 3)


# --- the subscriber processes --------------------------------------------------------------


def _subscriber_main(argv: list[str]) -> None:
    """Run as a separate process: follow a transport, print READY, record arrivals until
    stdin closes, then print one JSON line per message: [data_set, date, seq, t_ns].

    The arrival time is taken as soon as the client library hands the message over; the
    message is parsed after the run (a subscriber's own parsing is not the feed's latency,
    and while it runs it would delay the time stamps of the messages behind it)."""
    kind, target = argv[0], argv[1]
    times = array("q")
    bodies: list = []

    async def ws() -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        loop = asyncio.get_running_loop()
        async with connect(target, max_size=2 ** 22) as conn:
            threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(
                lambda: loop.create_task(conn.close()))), daemon=True).start()
            gc.collect()
            gc.freeze()
            print("READY", flush=True)
            try:
                while True:
                    text = await conn.recv()
                    times.append(now_ns())
                    bodies.append(text)
            except ConnectionClosed:
                pass

    async def nats_sub() -> None:
        import nats

        url, subject = target.split("|")
        nc = await nats.connect(url)
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        threading.Thread(target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(done.set)), daemon=True).start()

        async def cb(msg) -> None:
            times.append(now_ns())
            bodies.append(msg.data)

        await nc.subscribe(subject, cb=cb)
        await nc.flush()
        gc.collect()
        gc.freeze()
        print("READY", flush=True)
        await done.wait()
        await nc.drain()

    asyncio.run(ws() if kind == "ws" else nats_sub())
    out = sys.stdout
    for t, body in zip(times, bodies):
        m = json.loads(body)
        out.write(json.dumps((m["data_set"], m["date"], m["seq"], t)) + "\n")
    out.flush()


class SubscriberProcess:
    def __init__(self, kind: str, target: str):
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self.proc = subprocess.Popen([sys.executable, __file__, "--subscriber", kind, target], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"subscriber did not start: {line!r}")

    def finish(self) -> list[tuple[str, str, int, int]]:
        out, _ = self.proc.communicate(timeout=60)
        return [tuple(json.loads(line)) for line in out.splitlines() if line.startswith("[")]


# --- the system under test -------------------------------------------------------------------


class Market:
    """A fresh SQLite database, securities and firms, the engine, a sequencer and the publisher."""

    def __init__(self, folder: Path):
        from bondtape.db import connect
        from bondtape.dissemination.publisher import Publisher
        from bondtape.engine import Engine, Sequencer
        from bondtape.reference.store import upsert_firms, upsert_securities
        from bondtape.simulate.market import build_firms, build_universe

        self.db = connect(f"sqlite:///{folder / 'bench.db'}")
        rng = random.Random(7)
        self.universe = [s.security for s in build_universe(rng, 60, dt.date.today())]
        firms = build_firms()
        self.dealers = [f.mpid for f in firms if f.finra_member and not f.test_only]
        with self.db.begin() as conn:
            upsert_securities(conn, self.universe)
            upsert_firms(conn, firms)
        self.engine = Engine(self.db)
        self.accepted: dict[int, int] = {}
        self.engine.listeners.append(self._accepted)
        self.publisher = Publisher(self.db).start(self.engine)
        self.sequencer = Sequencer(self.engine)
        self.journal_of: dict[tuple[str, str, int], int] = {}
        self.publisher.subscribe(self._map)  # message position -> journal event, for out-of-process receivers
        self.rng = rng
        self.n = 0

    def _accepted(self, events) -> None:
        t = now_ns()
        for e in events:
            self.accepted[e.seq] = t

    def _map(self, m) -> None:
        if m.journal_seq is not None:
            self.journal_of[(m.data_set, m.date, m.seq)] = m.journal_seq

    def command(self):
        from bondtape.clock import now_us
        from bondtape.reporting.commands import Command, Terms

        self.n += 1
        sec = self.rng.choice(self.universe)
        dealer = self.rng.choice(self.dealers)
        inter = self.rng.random() < 0.3
        terms = Terms(cusip=sec.cusip, side="S" if inter else self.rng.choice("BS"), capacity="P",
                      contra=self.rng.choice([d for d in self.dealers if d != dealer]) if inter else "C",
                      quantity=Decimal(self.rng.choice([10_000, 50_000, 250_000, 2_000_000, 8_000_000])),
                      price=Decimal(self.rng.randint(90_000, 110_000)) / 1000, yield_=None,
                      execution_us=now_us() - 5_000_000 - self.n, settlement_date=None, commission=None)
        return Command("NEW", dealer, f"B{uuid.uuid4().hex[:12]}", terms, channel="bench")

    def paced(self, rate: float, seconds: float) -> int:
        """Submit through the sequencer at ``rate`` reports/s; returns how many were accepted."""
        total = int(rate * seconds)
        commands = [self.command() for _ in range(total)]
        gc.collect()
        gc.freeze()  # the load generator's own objects stay out of the collector's way
        # The load generator keeps no future: a server's request handler lets go of its
        # future once answered, and 10,000 live futures would make each full collection of
        # the (shared) process several times longer than the server's own heap does.
        answered_n, accepted_n = itertools.count(1), itertools.count(1)  # next() is atomic
        accepted = [0]
        done = threading.Event()

        def answered(f) -> None:  # in the sequencer's thread, or here if already answered
            if f.exception() is None and f.result().accepted:
                accepted[0] = max(accepted[0], next(accepted_n))
            if next(answered_n) == total:
                done.set()

        start = time.perf_counter()
        for i, c in enumerate(commands):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self.sequencer.submit(c).add_done_callback(answered)
        commands.clear()
        if total:
            done.wait(60)
        return accepted[0]

    def burst(self, count: int, batch: int = 500) -> tuple[int, int]:
        """Submit ``count`` reports as fast as the engine takes them; (first, last) journal seq."""
        commands = [self.command() for _ in range(count)]
        first = last = None
        for i in range(0, count, batch):
            for r in self.engine.submit(commands[i:i + batch]):
                if r.accepted:
                    first = first or r.seq
                    last = r.seq
        return first, last

    def drain(self) -> None:
        head = max(self.accepted) if self.accepted else 0
        self.publisher.wait_for(head, 60)

    def close(self) -> None:
        self.sequencer.close()
        self.publisher.stop()
        self.db.dispose()


def latencies(market: Market, arrivals, keyed_by_position: bool, since_seq: int) -> list[float]:
    out = []
    for a in arrivals:
        if keyed_by_position:
            ds, date, seq, t = a
            jseq = market.journal_of.get((ds, date, seq))
        else:
            jseq, t = a
        if jseq is None or jseq <= since_seq:
            continue
        out.append((t - market.accepted[jseq]) / 1e6)
    return out


def summary(lat: list[float], rate: float, seconds: float) -> dict:
    return {"p50_ms": pct(lat, 0.50), "p99_ms": pct(lat, 0.99), "max_ms": pct(lat, 1.0), "messages": len(lat),
            "rate_reports_per_s": rate, "seconds": seconds}


# --- transports ------------------------------------------------------------------------------


class Arrivals:
    """(journal seq, arrival time) pairs kept as two arrays of integers: nothing for the
    collector to scan, so the recording subscriber adds no collection time of its own."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.seqs, self.times = array("q"), array("q")

    def __call__(self, m) -> None:  # the in-process subscriber
        if m.journal_seq:
            self.times.append(now_ns())
            self.seqs.append(m.journal_seq)

    def __iter__(self):
        return iter(zip(self.seqs, self.times))


def bench_in_process(market: Market, rate: float, seconds: float, burst: int) -> dict:
    arrivals = Arrivals()
    sub = market.publisher.subscribe(arrivals)
    base = max(market.accepted, default=0)
    market.paced(rate, seconds)
    market.drain()
    lat = latencies(market, arrivals, False, base)
    result = summary(lat, rate, seconds)
    # throughput: ours, then a bare queue between two threads carrying the same bytes
    arrivals.clear()
    t0 = now_ns()
    first, last = market.burst(burst)
    market.drain()
    got = [a for a in arrivals if a[0] >= first]
    ours = len(got) / ((got[-1][1] - t0) / 1e9)
    sub.close()
    bodies = [m.body for m in market.publisher.iter_all()][-len(got):]
    q: queue.Queue = queue.Queue()
    received = []

    def consumer() -> None:
        while True:
            b = q.get()
            if b is None:
                return
            received.append(now_ns())

    th = threading.Thread(target=consumer)
    th.start()
    t0 = now_ns()
    for b in bodies:
        q.put(b)
    q.put(None)
    th.join()
    bare = len(received) / ((received[-1] - t0) / 1e9)
    result.update(delivered_per_s=round(ours), bare_per_s=round(bare), ratio_to_bare_transport=round(ours / bare, 4),
                  bare_transport="queue.Queue between two threads")
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def bench_websocket(market: Market, rate: float, seconds: float, burst: int) -> dict:
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute

    from bondtape.dissemination.web import feed_routes

    bare_bodies: list[str] = []

    async def bare(websocket) -> None:  # the same bytes, sent as fast as the socket takes them
        await websocket.accept()
        await asyncio.sleep(0.2)  # the subscriber is reading by then
        for b in bare_bodies:
            await websocket.send_text(b)
        await websocket.receive()

    app = Starlette(routes=feed_routes(market.publisher) + [WebSocketRoute("/bare", bare)])
    srv = _Server(app)
    try:
        url = f"ws://127.0.0.1:{srv.port}/feed/ws"
        base = max(market.accepted, default=0)
        sub = SubscriberProcess("ws", url)
        market.paced(rate, seconds)
        market.drain()
        time.sleep(0.5)
        lat = latencies(market, sub.finish(), True, base)
        result = summary(lat, rate, seconds)
        sub = SubscriberProcess("ws", url)
        t0 = now_ns()
        first, last = market.burst(burst)
        market.drain()
        time.sleep(1.0)
        got = [a for a in sub.finish() if market.journal_of.get(tuple(a[:3]), 0) >= first]
        ours = len(got) / ((got[-1][3] - t0) / 1e9)
        bare_bodies.extend(m.body for m in list(market.publisher.iter_all())[-len(got):])
        sub = SubscriberProcess("ws", f"ws://127.0.0.1:{srv.port}/bare")
        time.sleep(0.5 + len(bare_bodies) / 2000)  # ample time for the bare endpoint to send them all
        arr = sub.finish()
        bare_rate = len(arr) / ((arr[-1][3] - arr[0][3]) / 1e9) if len(arr) > 1 else None
    finally:
        srv.stop()
    result.update(delivered_per_s=round(ours), bare_per_s=round(bare_rate) if bare_rate else None,
                  ratio_to_bare_transport=round(ours / bare_rate, 4) if bare_rate else None,
                  bare_transport="a Starlette WebSocket endpoint sending the same message texts",
                  subscriber="separate process (websockets client)")
    return result


def bench_nats(market: Market, url: str, rate: float, seconds: float, burst: int) -> dict:
    import nats

    from bondtape.dissemination.jetstream import JetStreamPublisher

    stream, prefix = f"BT_BENCH_{uuid.uuid4().hex[:8]}", f"btbench.{uuid.uuid4().hex[:8]}"
    js_pub = JetStreamPublisher(market.publisher, url, stream=stream, prefix=prefix).start()
    try:
        base = max(market.accepted, default=0)
        sub = SubscriberProcess("nats", f"{url}|{prefix}.>")
        market.paced(rate, seconds)
        market.drain()
        js_pub.flush(30)
        time.sleep(0.5)
        lat = latencies(market, sub.finish(), True, base)
        result = summary(lat, rate, seconds)
        sub = SubscriberProcess("nats", f"{url}|{prefix}.>")
        t0 = now_ns()
        first, last = market.burst(burst)
        market.drain()
        js_pub.flush(60)
        time.sleep(0.5)
        got = [a for a in sub.finish() if market.journal_of.get(tuple(a[:3]), 0) >= first]
        ours = len(got) / ((got[-1][3] - t0) / 1e9)
        bodies = [m.body for m in list(market.publisher.iter_all())[-len(got):]]
    finally:
        js_pub.stop()

    bare_subject = f"{prefix}bare.CORP"
    sub = SubscriberProcess("nats", f"{url}|{bare_subject}")

    async def bare() -> float:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(name=stream + "_BARE", subjects=[bare_subject])
        t0 = now_ns()
        for i in range(0, len(bodies), 256):  # the same pipelining of acks as the feed's publisher
            acks = [await js.publish_async(bare_subject, b.encode()) for b in bodies[i:i + 256]]
            await asyncio.gather(*acks)
        await js.delete_stream(stream + "_BARE")
        await js.delete_stream(stream)
        await nc.close()
        return t0

    t0 = asyncio.run(bare())
    time.sleep(0.5)
    arr = sub.finish()
    bare_rate = len(arr) / ((arr[-1][3] - t0) / 1e9) if arr else None
    result.update(delivered_per_s=round(ours), bare_per_s=round(bare_rate) if bare_rate else None,
                  ratio_to_bare_transport=round(ours / bare_rate, 4) if bare_rate else None,
                  bare_transport="JetStream publish_async of the same bytes (acks awaited 256 at a time)",
                  subscriber="separate process (core NATS subscription on the subjects)")
    return result


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="run.py dissemination")
    ap.add_argument("--rate", type=float, default=2000.0, help="reports per second, sustained")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--burst", type=int, default=5000, help="reports for the throughput ratio")
    ap.add_argument("--nats", default=os.environ.get("BONDTAPE_TEST_NATS_URL"))
    ap.add_argument("--only", choices=["in_process", "websocket", "nats"], default=None)
    args = ap.parse_args(argv)
    out: dict = {"benchmark": "dissemination", "database": "SQLite WAL, synchronous=FULL (journal)",
                 "gc": "gc.freeze() after set-up and between transports; collector on",
                 "cores": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                 "goal": {"in_process_p99_ms": 5, "websocket_p99_ms": 20, "rate": 2000}}
    with tempfile.TemporaryDirectory(prefix="bt-bench-") as folder:
        market = Market(Path(folder))

        def settle() -> None:
            # Objects made so far (reference data, caches, earlier phases' records) are moved
            # out of the collector's way, as a long-running server does after start-up; the
            # collector stays on for everything made during the measurement.
            gc.collect()
            gc.freeze()

        try:
            settle()
            if args.only in (None, "in_process"):
                out["in_process"] = bench_in_process(market, args.rate, args.seconds, args.burst)
                settle()
            if args.only in (None, "websocket"):
                out["websocket"] = bench_websocket(market, args.rate, args.seconds, args.burst)
                settle()
            if args.only in (None, "nats"):
                if args.nats:
                    out["nats"] = bench_nats(market, args.nats, args.rate, args.seconds, args.burst)
                else:
                    out["nats"] = {"skipped": "no NATS server: set BONDTAPE_TEST_NATS_URL or --nats"}
        finally:
            market.close()
    out["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    for k in ("in_process", "websocket", "nats"):
        if isinstance(out.get(k), dict) and "p99_ms" in out[k]:
            out.setdefault("p50_ms", {})[k] = out[k]["p50_ms"]
            out.setdefault("p99_ms", {})[k] = out[k]["p99_ms"]
            out.setdefault("ratio_to_bare_transport", {})[k] = out[k]["ratio_to_bare_transport"]
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--subscriber":
        _subscriber_main(sys.argv[2:])
    else:
        print(json.dumps(main(sys.argv[1:]), indent=2))

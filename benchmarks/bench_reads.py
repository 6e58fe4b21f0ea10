"""Reads beside intake on SQLite: how long a small read waits while the engine writes.

    python benchmarks/run.py reads [--seconds S] [--batch B]

A child process runs the engine on a fresh SQLite file, batch after batch (as a bulk
intake or a busy gateway does). Meanwhile this process times a small read (one
``count(*)`` over reference data) every 20 ms, alternating two ways of opening it:

- ``plain``: ``with db.connect()``, whose transaction begins with ``BEGIN IMMEDIATE``
  like every SQLite transaction that may write, so it queues for the write lock (the
  baseline);
- ``reading``: ``with bondtape.db.reading(db)``, a deferred read-only WAL snapshot.

Prints p50/p99/max of both and ``ratio_p99_to_plain`` (reading's p99 over plain's).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _writer(url: str, batch: int, ready, stop, counts) -> None:  # the child: intake, batch after batch
    import bench_intake as bi

    from bondtape.batching import configure_gc
    from bondtape.db import connect
    from bondtape.engine import Engine

    configure_gc()
    db = connect(url)
    engine = Engine(db)
    cusips = bi._setup(db)
    ready.set()
    start = 0
    while not stop.is_set():
        counts.value += sum(r.accepted for r in engine.submit(bi._commands(batch, cusips, start)))
        start += batch


def _percentiles(values: list[float]) -> dict:
    from bondtape.production.loadkit import percentile

    return {"reads": len(values), **{f"{k}_ms": round(percentile(values, p), 3)
                                     for k, p in (("p50", 50), ("p99", 99), ("max", 100))}}


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="run.py reads")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--batch", type=int, default=5_000, help="reports per engine batch in the writer")
    a = p.parse_args(argv)
    import sqlalchemy as sa

    from bondtape.db import connect, reading

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/reads.db"
        connect(url).dispose()  # schema first, so the two processes do not race to migrate
        ctx = mp.get_context("fork")  # the child needs nothing of this process but the URL
        ready, stop, counts = ctx.Event(), ctx.Event(), ctx.Value("q", 0)
        child = ctx.Process(target=_writer, args=(url, a.batch, ready, stop, counts))
        child.start()
        try:
            if not ready.wait(120):
                raise RuntimeError("the writer did not start")
            db = connect(url)
            query = sa.text("SELECT count(*) FROM securities")
            times: dict[str, list[float]] = {"plain": [], "reading": []}
            start_count, t_start = counts.value, time.perf_counter()
            end = t_start + a.seconds
            while time.perf_counter() < end:
                for name in ("plain", "reading"):
                    t0 = time.perf_counter()
                    with (db.connect() if name == "plain" else reading(db)) as conn:
                        conn.execute(query).scalar_one()
                    times[name].append((time.perf_counter() - t0) * 1000)
                    time.sleep(0.02)
            written = counts.value - start_count
            elapsed = time.perf_counter() - t_start
        finally:
            stop.set()
            child.join(60)
    plain, read = _percentiles(times["plain"]), _percentiles(times["reading"])
    return {
        "benchmark": "a small read on SQLite while the engine writes in another process",
        "writer_reports_per_s": round(written / elapsed),
        "plain": plain, "reading": read,
        "ratio_p99_to_plain": round(read["p99_ms"] / plain["p99_ms"], 4),
        "baseline": "the same read through a plain connection (BEGIN IMMEDIATE), alternating with reading(db)",
    }

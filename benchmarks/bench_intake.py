"""Intake throughput: accepted reports per second through the engine (parse-free commands,
validation, journal, projection, one transaction per batch), against a bare ``executemany``
of the same rows (the journal and trade_reports rows the engine wrote) into copies of both
tables with the same indexes, in the same database, same run.

    python benchmarks/run.py intake [--reports N] [--batch B] [--db URL] [--per-batch]

The batches go through ``Engine.submit_stream``, as ``bondtape report`` sends a file (on a
SQLite file each batch is validated while the one before commits); ``--per-batch`` calls
``Engine.submit`` once a batch instead, as group commits under REST and FIX do.

Without --db, a fresh SQLite file in a temporary folder is used; with --db, a fresh
database is expected (the benchmark adds its own securities and firms).

Also printed: the time of each ``Engine.submit`` (one batch, commit included; p50, p99 and
max in ms: what a FIX or REST caller waits on top of its queueing) and, on SQLite, how the
WAL was checkpointed: ``wal_restarts`` (times the WAL started over from its beginning, which
it does only after a checkpoint copied all of it into the database file; from the counter
in the WAL file's header), the WAL file's largest size, and the engine's background
checkpointer's counts. The baseline runs on the same database under the same checkpoint
regime: its commits wake the engine's checkpointer as the engine's own do.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import resource
import struct
import tempfile
import time
from decimal import Decimal

import sqlalchemy as sa

from bondtape.clock import MARKET_TZ, to_us
from bondtape.db import connect
from bondtape.engine import Engine
from bondtape.journal.schema import journal, trade_reports
from bondtape.reference.cusip import cusip_check_digit
from bondtape.reference.model import Firm, Security
from bondtape.reference.store import upsert_firms, upsert_securities
from bondtape.reporting.commands import Command, Terms


def _commands(n: int, cusips: list[str], start: int, day: int = 4) -> list[Command]:
    rng = random.Random(5 + start)
    dealers = [f"D{i:03d}" for i in range(20)]
    base = to_us(dt.datetime(2024, 3, day, 9, 0, tzinfo=MARKET_TZ))
    out = []
    for i in range(n):
        ex = base + i * 1000
        t = Terms(cusip=rng.choice(cusips), side="S", capacity="P", contra="C",
                  quantity=Decimal(1000 * rng.randint(1, 9000)), price=Decimal(f"{rng.uniform(80, 120):.3f}"),
                  yield_=None, execution_us=ex, settlement_date=None, commission=None)
        out.append(Command("NEW", rng.choice(dealers), f"b{start + i}", t, channel="bulk", report_us=ex + 30_000_000))
    return out


def _setup(db: sa.Engine) -> list[str]:
    """The benchmark's 500 securities and 20 dealers; returns the CUSIPs."""
    cusips = []
    for i in range(500):
        base = f"{i:06d}AA"
        cusips.append(base + str(cusip_check_digit(base)))
    with db.begin() as conn:
        upsert_securities(conn, [Security(c, f"S{i:05d}", "Issuer", Decimal("5"), dt.date(2040, 1, 1), "CORP",
                                          "IG" if i % 3 else "HY", False, dt.date(2002, 7, 1)) for i, c in enumerate(cusips)])
        upsert_firms(conn, [Firm(f"D{i:03d}", f"Dealer {i}") for i in range(20)])
    return cusips


def _wal_restarts(wal: str | None) -> int | None:
    """The WAL header's checkpoint sequence number (bytes 12-15, big-endian): SQLite adds one
    each time the WAL starts over after a complete checkpoint."""
    try:
        with open(wal, "rb") as f:  # type: ignore[arg-type]
            header = f.read(16)
    except (OSError, TypeError):
        return None
    return struct.unpack(">I", header[12:16])[0] if len(header) == 16 else None


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _process_cpu(pid: int) -> float | None:
    """User and system CPU seconds of a running process so far (Linux /proc), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(url: str, reports: int, batch: int, per_batch: bool = False) -> dict:
    db = connect(url)
    cusips = _setup(db)
    engine = Engine(db)
    engine.submit(_commands(100, cusips, 10_000_000, day=1))  # warm-up: reference data loaded
    commands = _commands(reports, cusips, 0)
    wal = f"{db.url.database}-wal" if db.dialect.name == "sqlite" and db.url.database else None
    restarts0 = _wal_restarts(wal)
    wal_max = 0
    note_commit = getattr(engine, "note_commit", lambda: None)  # the code before it had none
    latencies = []
    cpu0 = _own_cpu()
    t0 = time.perf_counter()
    accepted = 0
    batches = [commands[i:i + batch] for i in range(0, reports, batch)]
    if per_batch:
        for b in batches:
            b0 = time.perf_counter()
            accepted += sum(r.accepted for r in engine.submit(b))
            latencies.append(time.perf_counter() - b0)
            if wal:
                wal_max = max(wal_max, os.path.getsize(wal))
    else:
        # latency: from a batch's turn (the one before answered, or the start) to its answer
        turn = [t0]

        def answered(results: list) -> None:
            nonlocal accepted, wal_max
            now = time.perf_counter()
            accepted += sum(r.accepted for r in results)
            latencies.append(now - turn[0])
            turn[0] = now
            if wal:
                wal_max = max(wal_max, os.path.getsize(wal))

        engine.submit_stream(batches, answered)
    engine_s = time.perf_counter() - t0
    engine_cpu = _own_cpu() - cpu0
    writer = getattr(engine, "_writer", None)  # the journal writer process (SQLite file), if one ran
    writer_cpu = _process_cpu(writer.proc.pid) if writer is not None else None
    restarts = None if restarts0 is None else (_wal_restarts(wal) - restarts0) % 2 ** 32
    ckpt = getattr(engine, "checkpointer", None)
    ckpt_stats = ckpt.stats() if ckpt is not None else None

    # Baselines, from the rows the engine wrote (its journal rows and trade_reports rows, the
    # warm-up left out): a bare executemany of the same rows into copies of both tables with
    # the same keys and indexes, one transaction per batch of the same size, both tables in
    # each. For reference also the trade_reports rows alone, with and without indexes.
    with db.connect() as conn:
        journal_rows = [tuple(r) for r in conn.execute(sa.select(journal).where(journal.c.seq > 100).order_by(journal.c.seq))]
        report_rows = [tuple(r) for r in conn.execute(sa.select(trade_reports).where(trade_reports.c.seq > 100).order_by(trade_reports.c.seq))]
    marker = "?" if db.dialect.name == "sqlite" else "%s"
    rates = {}
    for label, tables, keep in (("both", (journal, trade_reports), True), ("projection", (trade_reports,), True),
                                ("projection_unindexed", (trade_reports,), False)):
        md = sa.MetaData()
        copies = [_copy_table(t, md, f"bench_{label}_{t.name}", keep) for t in tables]
        md.create_all(db)
        work = [(f"INSERT INTO {c.name} VALUES ({', '.join([marker] * len(c.columns))})",
                 journal_rows if t is journal else report_rows) for c, t in zip(copies, tables)]
        n = len(report_rows)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            with db.begin() as conn:
                for sql, rows in work:
                    conn.exec_driver_sql(sql, rows[i:i + batch])
            note_commit()
        rates[label] = n / (time.perf_counter() - t0)
        md.drop_all(db)
    close = getattr(engine, "close", None)
    if close:
        close()
    db.dispose()
    rate = accepted / engine_s
    from bondtape.production.loadkit import percentile

    ms = [x * 1000 for x in latencies]
    return {
        "database": db.dialect.name, "reports": reports, "accepted": accepted, "batch": batch,
        "path": "Engine.submit per batch" if per_batch else "Engine.submit_stream",
        "reports_per_s": round(rate),
        # per batch: Engine.submit's time, or in a stream the time between two batches' answers
        "submit_ms": {"p50": round(percentile(ms, 50), 1), "p99": round(percentile(ms, 99), 1),
                      "max": round(max(ms), 1), "batches": len(ms)},
        # CPU time a report: this process (the engine, its WAL checkpointer thread) and the
        # journal writer process (its whole life: it starts with the first measured batch);
        # cores_busy near the machine's core count means the run was CPU-bound
        "cpu_us_per_report": {
            "engine_process": round(engine_cpu / accepted * 1e6, 1),
            "writer_process": None if writer_cpu is None else round(writer_cpu / accepted * 1e6, 1),
            "cores_busy": round((engine_cpu + (writer_cpu or 0.0)) / engine_s, 2), "cores": os.cpu_count()},
        "wal": None if not wal else {"restarts": restarts, "max_bytes": wal_max, "checkpointer": ckpt_stats},
        "raw_insert_rows_per_s": round(rates["both"]),
        "ratio_to_raw_insert": round(rate / rates["both"], 3),
        "raw_insert_projection_only_rows_per_s": round(rates["projection"]),
        "ratio_to_raw_insert_projection_only": round(rate / rates["projection"], 3),
        "raw_insert_projection_unindexed_rows_per_s": round(rates["projection_unindexed"]),
        "ratio_to_raw_insert_projection_unindexed": round(rate / rates["projection_unindexed"], 3),
        "baseline": "bare executemany of the rows the engine wrote (its journal rows and trade_reports rows) into "
                    "copies of both tables with the same keys and indexes, one transaction per batch of the same "
                    "size; for reference, the trade_reports rows alone, with and without indexes",
    }


def _copy_table(table: sa.Table, md: sa.MetaData, name: str, keep_indexes: bool) -> sa.Table:
    """A table with ``table``'s columns; with its primary key, unique constraints and indexes
    (partial ones included) when ``keep_indexes``."""
    cols = [sa.Column(c.name, c.type, primary_key=c.primary_key and keep_indexes, autoincrement=False)
            for c in table.columns]
    extra = []
    if keep_indexes:
        extra = [sa.UniqueConstraint(*[c.name for c in u.columns]) for u in table.constraints
                 if isinstance(u, sa.UniqueConstraint)]
    copy = sa.Table(name, md, *cols, *extra)
    if keep_indexes:
        for i, idx in enumerate(table.indexes):
            where = {k: v for k, v in idx.dialect_kwargs.items() if k.endswith("_where")}
            sa.Index(f"{name}_ix{i}", *[copy.c[c.name] for c in idx.columns], unique=idx.unique, **where)
    return copy


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="run.py intake")
    p.add_argument("--reports", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=5_000)
    p.add_argument("--db", default=None, help="a fresh database URL (default: temporary SQLite)")
    p.add_argument("--per-batch", action="store_true",
                   help="one Engine.submit a batch (as group commits are) instead of Engine.submit_stream")
    p.add_argument("--postgres", default=os.environ.get("BONDTAPE_TEST_POSTGRES_URL"),
                   help="also measure on a fresh database created on this PostgreSQL server")
    a = p.parse_args(argv)
    from bondtape.batching import configure_gc

    configure_gc()  # the collector's policy of every bondtape process (cli.main), baseline included
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        out["sqlite"] = run(a.db or f"sqlite:///{tmp}/bench.db", a.reports, a.batch, a.per_batch)
    if a.postgres and not a.db:
        import uuid

        name = "bench_" + uuid.uuid4().hex[:8]
        admin = sa.create_engine(a.postgres, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.exec_driver_sql(f"CREATE DATABASE {name}")
        try:
            out["postgresql"] = run(a.postgres.rsplit("/", 1)[0] + "/" + name, a.reports, a.batch, a.per_batch)
        finally:
            with admin.connect() as c:
                c.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    return out

"""FIX gateway throughput: Trade Capture Reports (35=AE) in, acks (35=AR) out.

    python benchmarks/run.py fix [--reports N] [--db-dir DIR]

A client process logs on (a real user, the real access check) and sends N reports
pipelined on one session, then N/4 on each of four sessions at once; each run reads every
ack. ``reports_per_s`` is acks received per second, from the first report sent to the last
ack read: each ack is sent only after the report is journaled and the session's state is
durable (SQLite, synchronous=FULL). The baseline, measured in the same run on the same
bytes, is a bare parse-and-ack loop (framing, AE mapping, parse_command, AR encoding; no
engine, no database, no network): ``ratio_to_parse_loop`` is the full path's rate over it.
``engine_alone_reports_per_s`` is Engine.submit on the same reports without FIX, for scale:
the gateway, the engine and the session store share one process (and its GIL).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SECURITY_BASES = ["11111111", "22222222", "33333333", "44444444"]
FIRMS = ["DLRA", "DLRB", "DLRC", "DLRD"]
PASSWORD = "Bench-Password-2024!"
EXEC = "20240304-15:00:00"


def _cusips() -> list[str]:
    from bondtape.reference.cusip import cusip_check_digit

    return [b + str(cusip_check_digit(b)) for b in SECURITY_BASES]


def report_messages(sender: str, mpid: str, n: int, first_seq: int, prefix: str) -> list[bytes]:
    """N distinct new reports, already framed, MsgSeqNum from first_seq."""
    from bondtape.fix import codec

    cusips = _cusips()
    out = []
    for i in range(n):
        body = [(571, f"{prefix}{i}"), (487, "0"), (856, "0"), (48, cusips[i % 4]), (22, "1"),
                (32, str(10000 + i)), (31, "99.5"), (60, EXEC), (552, "1"), (54, "2"), (453, "2"),
                (448, mpid), (447, "C"), (452, "1"), (448, "C"), (447, "C"), (452, "17"), (528, "P")]
        out.append(codec.encode("AE", sender, "BONDTAPE", first_seq + i, "20240304-15:05:00.000", body))
    return out


# -- the client (a separate process) -----------------------------------------------------------

async def _client_session(port: int, sender: str, username: str, mpid: str, n: int, prefix: str,
                          barrier: asyncio.Barrier) -> dict:
    from bondtape.fix import codec

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    logon = codec.encode("A", sender, "BONDTAPE", 1, "20240304-15:05:00.000",
                         [(98, "0"), (108, "30"), (553, username), (554, PASSWORD), (141, "Y")])
    writer.write(logon)
    await writer.drain()
    buf = b""
    while b"\x0135=A\x01" not in buf:
        chunk = await reader.read(65536)
        if not chunk:
            raise SystemExit(f"logon refused: {buf!r}")
        buf += chunk
    messages = report_messages(sender, mpid, n, 2, prefix)
    await barrier.wait()  # every session is logged on: all start sending together

    async def send() -> None:
        for i in range(0, len(messages), 200):
            writer.write(b"".join(messages[i:i + 200]))
            await writer.drain()

    start = time.perf_counter()
    sender_task = asyncio.create_task(send())
    acks = accepted = 0
    tail = b""
    while acks < n:
        chunk = await reader.read(1 << 18)
        if not chunk:
            break
        data = tail + chunk
        cut = data.rfind(b"\x0110=")
        cut = data.find(b"\x01", cut + 4) + 1 if cut >= 0 else 0
        done, tail = data[:cut], data[cut:]
        acks += done.count(b"\x0135=AR\x01")
        accepted += done.count(b"\x01939=0\x01")
    end = time.perf_counter()
    await sender_task
    writer.close()
    return {"acks": acks, "accepted": accepted, "start": start, "end": end}


async def _client(port: int, sessions: list[tuple[str, str, str]], n: int) -> dict:
    barrier = asyncio.Barrier(len(sessions))
    results = await asyncio.gather(*[
        _client_session(port, sender, user, mpid, n, f"{sender}-", barrier) for sender, user, mpid in sessions])
    # from the first report sent (by any session) to the last ack read (by any session)
    return {"acks": sum(r["acks"] for r in results), "accepted": sum(r["accepted"] for r in results),
            "seconds": max(r["end"] for r in results) - min(r["start"] for r in results)}


# -- the acceptor (this process) ---------------------------------------------------------------

def _prepare(url: str) -> None:
    import datetime as dt
    from decimal import Decimal

    from bondtape.access.api import create_active_user, create_organisation
    from bondtape.db import connect
    from bondtape.reference.model import Firm, Security
    from bondtape.reference.store import upsert_firms, upsert_securities

    db = connect(url)
    securities = [Security(c, f"BNCH40{i:05d}", f"Bench Issuer {i}", Decimal("5"), dt.date(2035, 1, 1), "CORP", "IG",
                           False, dt.date(2002, 7, 1)) for i, c in enumerate(_cusips())]
    with db.begin() as conn:
        upsert_securities(conn, securities)
        upsert_firms(conn, [Firm(m, f"Dealer {m}") for m in FIRMS])
    for mpid in FIRMS:
        org = create_organisation(db, f"Dealer {mpid}", "FIRM", mpid=mpid)
        create_active_user(db, org_id=org, username=f"trader_{mpid.lower()}", password=PASSWORD, roles=["trader"])
    db.dispose()


async def _serve_and_run(url: str, sessions: list[tuple[str, str, str]], n: int) -> dict:
    from bondtape.clock import MARKET_TZ, to_us
    from bondtape.db import connect
    from bondtape.engine import Engine, Sequencer
    from bondtape.fix import start_fix_server
    import datetime as dt

    db = connect(url)
    report_time = to_us(dt.datetime(2024, 3, 4, 10, 5, tzinfo=MARKET_TZ))
    sequencer = Sequencer(Engine(db, clock=lambda: report_time))
    server = await start_fix_server(db, "127.0.0.1", 0, sequencer=sequencer)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "client", str(server.port), json.dumps(sessions), str(n),
            stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"client failed ({proc.returncode})")
        return json.loads(out)
    finally:
        await server.close()
        sequencer.close()
        db.dispose()


def run_gateway(directory: Path, name: str, sessions: int, per_session: int) -> dict:
    url = f"sqlite:///{directory / (name + '.db')}"
    _prepare(url)
    chosen = [(f"BENCH{i}", f"trader_{FIRMS[i].lower()}", FIRMS[i]) for i in range(sessions)]
    result = asyncio.run(_serve_and_run(url, chosen, per_session))
    total = sessions * per_session
    if result["acks"] != total or result["accepted"] != total:
        raise RuntimeError(f"expected {total} accepted acks, got {result}")
    return {"reports": total, "seconds": round(result["seconds"], 3),
            "reports_per_s": round(total / result["seconds"])}


def parse_loop(messages: list[bytes]) -> float:
    """Reports per second of framing + mapping + parse_command + encoding an AR, no engine."""
    from bondtape.engine import Result
    from bondtape.fix import codec, mapping
    from bondtape.reporting.commands import parse_command

    framer = codec.Framer()
    stream = b"".join(messages)
    start = time.perf_counter()
    out = 0
    for i in range(0, len(stream), 65536):
        for m in framer.feed(stream[i:i + 65536]):
            report = mapping.read_trade_report(m)
            report.fields.setdefault("reporting_mpid", "DLRA")
            command = parse_command(report.fields, channel="fix")
            result = Result(command.action, command.client_ref, "ACCEPTED", control_number=1_000_000_000 + out)
            codec.encode("AR", "BONDTAPE", "BENCH0", out + 2, codec.utc_timestamp(1_700_000_000_000_000),
                         [(t, str(v)) for t, v in mapping.ack_body(report, result, None)])
            out += 1
    elapsed = time.perf_counter() - start
    assert out == len(messages)
    return out / elapsed


def engine_alone(directory: Path, messages: list[bytes]) -> float:
    """Reports per second of Engine.submit alone (batches of 1000) on the same reports: the
    part of the full path that is not FIX. Parsing is done before the clock starts."""
    import datetime as dt

    from bondtape.clock import MARKET_TZ, to_us
    from bondtape.db import connect
    from bondtape.engine import Engine
    from bondtape.fix import codec, mapping
    from bondtape.reporting.commands import parse_command

    url = f"sqlite:///{directory / 'engine.db'}"
    _prepare(url)
    db = connect(url)
    report_time = to_us(dt.datetime(2024, 3, 4, 10, 5, tzinfo=MARKET_TZ))
    engine = Engine(db, clock=lambda: report_time)
    commands = [parse_command(mapping.read_trade_report(m).fields, channel="fix")
                for m in codec.Framer().feed(b"".join(messages))]
    start = time.perf_counter()
    for i in range(0, len(commands), 1000):
        results = engine.submit(commands[i:i + 1000])
        assert all(r.accepted for r in results)
    elapsed = time.perf_counter() - start
    db.dispose()
    return len(commands) / elapsed


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="bench fix")
    parser.add_argument("--reports", type=int, default=20000, help="reports per run (four sessions share them)")
    parser.add_argument("--db-dir", default=None, help="where the SQLite files go (default: a temporary directory)")
    args = parser.parse_args(argv)
    from bondtape.batching import configure_gc

    configure_gc()  # the collector's policy of every bondtape process (cli.main), baseline included
    with tempfile.TemporaryDirectory(dir=args.db_dir) as tmp:
        directory = Path(tmp)
        messages = report_messages("BENCH0", "DLRA", args.reports, 2, "BENCH0-")
        baseline = parse_loop(messages)
        engine_rate = engine_alone(directory, messages)
        one = run_gateway(directory, "one", 1, args.reports)
        four = run_gateway(directory, "four", 4, args.reports // 4)
    return {
        "benchmark": "fix",
        "reports": args.reports,
        "reports_per_s": {"one_session": one["reports_per_s"], "four_sessions": four["reports_per_s"]},
        "seconds": {"one_session": one["seconds"], "four_sessions": four["seconds"]},
        "parse_loop_reports_per_s": round(baseline),
        "ratio_to_parse_loop": {"one_session": round(one["reports_per_s"] / baseline, 3),
                                "four_sessions": round(four["reports_per_s"] / baseline, 3)},
        "engine_alone_reports_per_s": round(engine_rate),
        "goal_one_session_reports_per_s": 10000,
        "database": "SQLite (WAL, synchronous=FULL), temporary file",
        "cpus": os.cpu_count(),
    }


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "client":
    port, sessions, n = int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(asyncio.run(_client(port, [tuple(s) for s in sessions], n))))

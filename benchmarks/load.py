"""Load: a simulated trading day replayed over HTTPS (REST API) and FIX at a multiple of
real time against ``bondtape serve --config`` (loopback only, bounded in time).

    python benchmarks/load.py                       # a full day (08:00-18:30 ET) at 10x: ~63 min
    python benchmarks/load.py --hours 0.5           # its first half hour at 10x: ~3 min
    python benchmarks/load.py --speed 60 --trades 20000 --workers 2 --nats

The server is the real deployment: the supervisor, ``--workers`` worker processes on a
private PostgreSQL cluster (SQLite with ``--sqlite`` or when PostgreSQL cannot run here),
the FIX gateway, and with ``--nats`` a private NATS JetStream server for the feed.

Reported (JSON on stdout, also written to ``--out``):
- ``replay``: reports offered and answered, ``offered_per_s`` (the day's rate at this
  speed), ``throughput_per_s`` (answers per second of wall time), latency percentiles
  (p50, p90, p99, max; from sending a report to reading its acknowledgement) overall and
  per channel, reject codes;
- ``capacity`` (the baseline, same run, same server): a burst of reports sent without
  pacing, 64 in flight: the most this deployment answered per second;
  ``headroom = capacity_per_s / offered_per_s`` (above 1: the service keeps up);
- ``memory``: peak resident memory (VmHWM) of the supervisor and each worker, and of this
  load generator.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

DAY_TRADES = 40_000  # reports of one day of the simulated market (order of TRACE's corporate volume)


def _peak_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _summary(answers, seconds: float) -> dict:
    from bondtape.production.loadkit import percentile

    def lat(items) -> dict:
        values = [a.latency_s * 1000 for a in items]
        return {"n": len(values), **{f"p{p}_ms": round(percentile(values, p), 2) if values else None
                                     for p in (50, 90, 99)},
                "max_ms": round(max(values), 2) if values else None}

    statuses = Counter(a.status for a in answers)
    return {
        "answered": len(answers), "seconds": round(seconds, 2),
        "throughput_per_s": round(len(answers) / seconds, 1) if seconds else None,
        "statuses": dict(statuses), "codes": dict(Counter(a.code for a in answers if a.code)),
        "latency": lat(answers),
        "latency_by_channel": {ch: lat([a for a in answers if a.channel == ch]) for ch in ("http", "fix")},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speed", type=float, default=10.0, help="multiple of real time (default 10)")
    ap.add_argument("--trades", type=int, default=DAY_TRADES, help="reports in the whole day")
    ap.add_argument("--hours", type=float, default=None, help="replay only the day's first HOURS (same density)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fix-share", type=float, default=0.5, help="share of reports sent over FIX")
    ap.add_argument("--capacity", type=int, default=3000, help="reports in the unpaced burst (0: skip)")
    ap.add_argument("--sqlite", action="store_true", help="SQLite instead of PostgreSQL (one worker)")
    ap.add_argument("--nats", action="store_true", help="also publish the feed to a private NATS JetStream")
    ap.add_argument("--max-seconds", type=float, default=4500, help="stop the replay after this long")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args(argv)

    from bondtape.production.loadkit import SESSION_END_S, SESSION_START_S, LoadRun, ServerProcess, provision, trading_day
    from tests.servers import PrivateNats, PrivatePostgres, nats_unavailable_reason, postgres_unavailable_reason

    folder = Path(tempfile.mkdtemp(prefix="bondtape-load-"))
    load_before = os.getloadavg()
    pg = nats = server = None
    try:
        if args.sqlite or postgres_unavailable_reason():
            url, workers, database = f"sqlite:///{folder}/bondtape.db", 1, "sqlite"
        else:
            pg = PrivatePostgres(Path(tempfile.mkdtemp(prefix="bondtape-pg-")))
            pg.start()
            url, workers, database = pg.url, args.workers, "postgresql"
        if args.nats:
            if nats_unavailable_reason():
                raise SystemExit(nats_unavailable_reason())
            nats = PrivateNats(Path(tempfile.mkdtemp(prefix="bondtape-nats-")))
            nats.start()
        dep = provision(url, folder / "deployment")
        server = ServerProcess(dep, workers=workers, nats_url=nats.url if nats else None)
        server.start()
        session_h = (SESSION_END_S - SESSION_START_S) / 3600
        hours = min(args.hours or session_h, session_h)
        n = round(args.trades * hours / session_h)
        orders = trading_day(dep, trades=n, seed=args.seed, hours=hours, fix_share=args.fix_share)
        # the day's U-shaped profile, not only its first hours: trading_day spreads n over `hours`
        offered = n / (hours * 3600 / args.speed)
        run = LoadRun(dep, server.https_url, server.fix_port, speed=args.speed)
        started = time.perf_counter()

        async def replay():
            return await asyncio.wait_for(run.run(orders, concurrency=256), args.max_seconds)

        try:
            asyncio.run(replay())
            complete = True
        except asyncio.TimeoutError:
            complete = False
        replay_s = time.perf_counter() - started
        result = {
            "benchmark": "load", "database": database, "workers": workers, "nats": bool(nats),
            "speed": args.speed, "day_trades": args.trades, "hours_replayed": round(hours, 3), "reports": n,
            "complete": complete, "offered_per_s": round(offered, 2),
            "replay": _summary(run.answers, replay_s),
            "machine": {"cpus": os.cpu_count(), "load_average_before": load_before,
                        "load_average_after": os.getloadavg()},
        }
        if args.capacity:
            burst = trading_day(dep, trades=args.capacity, seed=args.seed + 1, hours=0.0, fix_share=args.fix_share)
            burst = [o.__class__(**{**o.__dict__, "ref": "C" + o.ref}) for o in burst]
            cap = LoadRun(dep, server.https_url, server.fix_port, speed=1.0)
            t0 = time.perf_counter()
            asyncio.run(cap.run(burst, concurrency=64))
            cap_s = time.perf_counter() - t0
            result["capacity"] = _summary(cap.answers, cap_s)
            result["capacity_per_s"] = result["capacity"]["throughput_per_s"]
            result["headroom"] = round(result["capacity_per_s"] / offered, 2) if offered else None
        pids = [server.proc.pid, *_children(server.proc.pid)]
        result["memory"] = {
            "server_peak_rss_mib": {str(p): round((_peak_kib(p) or 0) / 1024, 1) for p in pids},
            "server_peak_rss_total_mib": round(sum(_peak_kib(p) or 0 for p in pids) / 1024, 1),
            "load_generator_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        result["graceful_stop_exit_code"] = server.stop(60)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        return result
    finally:
        if server is not None:
            server.kill()
        if nats is not None:
            nats.close()
        if pg is not None:
            pg.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))

"""REST API throughput: accepted reports per second over HTTPS (TLS with a client
certificate, HTTP Basic login and password, JSON, the access checks, parsing, the shared
sequencer and engine, the feed publisher following), against the in-process engine on the
same kind of database with the same reports, same run.

    python benchmarks/run.py api [--reports N] [--batch B] [--concurrency C] [--single N]

The server is ``bondtape.serve.build_app`` under uvicorn (one process, one event loop) on
127.0.0.1 with a fresh SQLite file; the clients run in a separate process, each on one
kept-alive TLS connection, posting ``{"reports": [...]}`` batches of B reports. Every
request carries the certificate and the password (checked with argon2id, then remembered
briefly by the access layer), and each request is at least one engine transaction, so a
batch of reports per request is how a firm's program gets volume through;
``single_reports_per_s`` is one report per request, measured too.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import os
import random
import tempfile
import time
from decimal import Decimal
from pathlib import Path

PASSWORD = "benchmark password 42"


def _market_instant() -> int:
    """A recent weekday at 10:00 New York time: the clock of server and engine (reports
    then fall in system hours whatever the wall clock says)."""
    from bondtape.clock import MARKET_TZ, to_us

    from bondtape.rulebook import default_rulebook

    day = dt.date.today() - dt.timedelta(days=1)
    while not default_rulebook().at(day).calendar.is_business_day(day):
        day -= dt.timedelta(days=1)
    return to_us(dt.datetime(day.year, day.month, day.day, 10, 0, tzinfo=MARKET_TZ))


def _reference(db, n_securities: int = 200) -> list[str]:
    from bondtape.reference.cusip import cusip_check_digit
    from bondtape.reference.model import Firm, Security
    from bondtape.reference.store import upsert_firms, upsert_securities

    cusips = []
    for i in range(n_securities):
        base = f"{i:06d}AB"
        cusips.append(base + str(cusip_check_digit(base)))
    secs = [Security(c, f"BENCH{i:05d}", f"Issuer {i}", Decimal("5"), dt.date(2040, 1, 1), "CORP",
                     "IG" if i % 3 else "HY", False, dt.date(2002, 7, 1)) for i, c in enumerate(cusips)]
    with db.begin() as conn:
        upsert_securities(conn, secs)
        upsert_firms(conn, [Firm("DLRA", "Dealer A")])
    return cusips


def _reports(n: int, cusips: list[str], clock_us: int, prefix: str) -> list[dict]:
    from bondtape.clock import iso_market

    rng = random.Random(hash(prefix) & 0xFFFF)
    out = []
    for i in range(n):
        out.append({"client_ref": f"{prefix}{i}", "cusip": rng.choice(cusips), "side": "S", "capacity": "P",
                    "contra": "C", "quantity": str(1000 * rng.randint(1, 9000)),
                    "price": f"{rng.uniform(80, 120):.3f}",
                    "execution_time": iso_market(clock_us - 60_000_000 - i % 1000 * 1000)})
    return out


CLIENT = r"""
import json, ssl, sys, httpx
base, cert, key, ca, user, password, path, single = sys.argv[1:9]
batches = json.load(open(path))
accepted = 0
tls = ssl.create_default_context(cafile=ca)
tls.load_cert_chain(cert, key)
# bodies encoded before the clock starts: the firm's program's JSON encoding is not the server's cost
bodies = [json.dumps(b[0] if single == "1" else {"reports": b}).encode() for b in batches]
headers = {"content-type": "application/json"}
with httpx.Client(base_url=base, verify=tls, auth=(user, password), timeout=120) as http:
    print("ready", flush=True)
    sys.stdin.readline()
    for body in bodies:
        if single == "1":
            r = http.post("/api/v1/reports", content=body, headers=headers)
            accepted += r.status_code == 200 and r.json()["status"] == "ACCEPTED"
        else:
            r = http.post("/api/v1/reports", content=body, headers=headers)
            if r.status_code != 200:
                print("error", r.status_code, r.text[:300], flush=True)
                sys.exit(1)
            accepted += r.json()["accepted"]
print(accepted, flush=True)
"""


def _load(base, files, user, work: list[list[dict]], concurrency: int, single: bool, tmp: Path) -> tuple[float, int]:
    """Clients in their own processes; timed from the go signal to the last answer."""
    procs = []
    for n in range(concurrency):
        share = work[n::concurrency]
        if not share:
            continue
        path = tmp / f"work-{single}-{n}.json"
        path.write_text(json.dumps(share))
        procs.append(subprocess.Popen([sys.executable, "-c", CLIENT, base, *files, user, PASSWORD, str(path),
                                       "1" if single else "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True))
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    accepted = 0
    for p in procs:
        line = p.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"a client failed: {line!r}")
        accepted += int(line)
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.wait(30)
    return elapsed, accepted


def run(reports: int, batch: int, concurrency: int, single: int) -> dict:
    from bondtape.access import accounts
    from bondtape.access.ca import CertificateAuthority
    from bondtape.access.settings import AccessSettings
    from bondtape.db import connect
    from bondtape.engine import Engine
    from bondtape.reporting.commands import parse_command
    from bondtape.serve import build_app
    from bondtape.web.tls import BackgroundServer, server_config

    clock_us = _market_instant()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # the in-process engine: the same reports, parsed the same way, in the same batches
        base_db = connect(f"sqlite:///{tmp / 'engine.db'}")
        cusips = _reference(base_db)
        engine = Engine(base_db, clock=lambda: clock_us)
        commands = [parse_command({**r, "reporting_mpid": "DLRA"}, channel="api")
                    for r in _reports(reports, cusips, clock_us, "e")]
        t0 = time.perf_counter()
        done = 0
        for i in range(0, len(commands), batch):
            done += sum(r.accepted for r in engine.submit(commands[i:i + batch]))
        engine_s = time.perf_counter() - t0
        base_db.dispose()

        # the engine with the feed publisher following it, as in `bondtape serve`: the HTTP
        # layer's own cost is the gap between this and the HTTP rate
        from bondtape.dissemination.publisher import Publisher

        feed_db = connect(f"sqlite:///{tmp / 'feed.db'}")
        _reference(feed_db)
        feed_engine = Engine(feed_db, clock=lambda: clock_us)
        publisher = Publisher(feed_db, clock=lambda: clock_us).start(feed_engine)
        t0 = time.perf_counter()
        with_feed, last_seq = 0, 0
        for i in range(0, len(commands), batch):
            results = feed_engine.submit(commands[i:i + batch])
            with_feed += sum(r.accepted for r in results)
            last_seq = max([last_seq] + [r.seq for r in results if r.seq])
        publisher.wait_for(last_seq, timeout=600)
        feed_s = time.perf_counter() - t0
        publisher.stop()
        feed_db.dispose()

        db = connect(f"sqlite:///{tmp / 'api.db'}")
        _reference(db)
        settings = AccessSettings(secret_key=os.urandom(32), ca_dir=tmp / "ca", cookie_secure=False)
        ca = CertificateAuthority.create(settings.ca_dir, now_us=clock_us - 3_600_000_000)
        server_cert, server_key = ca.issue_server(["127.0.0.1"], tmp / "tls", now_us=clock_us - 3_600_000_000)
        with db.begin() as conn:
            org = accounts.create_organisation(conn, "Dealer A", "FIRM", mpid="DLRA", at_us=clock_us)
            uid, _ = accounts.create_active_user(conn, org_id=org, username="bench-trader", password=PASSWORD,
                                                 roles="trader", at_us=clock_us)
            cert_pem, key_pem, _ = ca.issue_client(conn, uid, now_us=clock_us - 3_600_000_000)
        (tmp / "c.crt").write_bytes(cert_pem)
        (tmp / "c.key").write_bytes(key_pem)
        files = (str(tmp / "c.crt"), str(tmp / "c.key"), str(ca.cert_path))
        app = build_app(db, settings, clock=lambda: clock_us)
        config = server_config(app, host="127.0.0.1", port=0, certfile=server_cert, keyfile=server_key,
                               ca_certs=ca.cert_path)
        try:
            with BackgroundServer(config) as server:
                base = f"https://127.0.0.1:{server.port}"
                data = _reports(reports, cusips, clock_us, "h")
                work = [data[i:i + batch] for i in range(0, len(data), batch)]
                http_s, accepted = _load(base, files, "bench-trader", work, concurrency, False, tmp)
                singles = [[r] for r in _reports(single, cusips, clock_us, "s")]
                single_s, single_ok = _load(base, files, "bench-trader", singles, concurrency, True, tmp) \
                    if single else (0.0, 0)
        finally:
            app.state.services.close()
    http_rate = accepted / http_s
    engine_rate = done / engine_s
    return {
        "reports": reports, "batch_per_request": batch, "concurrency": concurrency,
        "accepted_http": accepted, "accepted_engine": done,
        "reports_per_s": round(http_rate), "engine_reports_per_s": round(engine_rate),
        "ratio_to_engine": round(http_rate / engine_rate, 3),
        "engine_with_feed_reports_per_s": round(with_feed / feed_s),
        "ratio_to_engine_with_feed": round(http_rate / (with_feed / feed_s), 3),
        "requests_per_s": round(len(work) / http_s, 1),
        "single_report_requests": single, "single_accepted": single_ok,
        "single_reports_per_s": round(single_ok / single_s, 1) if single else None,
        "transport": "HTTPS, client certificate + HTTP Basic on every request (argon2id, then the access layer's "
                     "per-process memory of verified credentials), JSON; "
                     "uvicorn, one process; clients in another process, one kept-alive connection each",
        "database": "SQLite (WAL), fresh file", "cpus": os.cpu_count(),
    }


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="run.py api")
    ap.add_argument("--reports", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=300, help="reports per HTTP request (at most 500; 64 KiB a body)")
    ap.add_argument("--concurrency", type=int, default=4, help="client connections, each in its own process")
    ap.add_argument("--single", type=int, default=200, help="one-report requests to time as well (0: none)")
    args = ap.parse_args(argv)
    return run(args.reports, args.batch, args.concurrency, args.single)

"""Monthly Rule 7730 invoicing against a bare Polars group-by of the same rows.

``python benchmarks/run.py fees [--reports N] [--orgs N] [--formats json,csv,html] [--db PATH]``

Set-up (not timed): a fresh SQLite database (bondtape's migrations, so the same indexes as
production) filled by generating rows straight into ``trade_reports`` and the ``journal``
with one INSERT ... SELECT each, not through the engine: the engine's own speed is
measured elsewhere, and 3,000,000 reports through it would take far longer than the
invoicing being measured. The month has N reports (0.1% test reports, 0.5% corrections'
new reports, 2% as-of, 1% late) over ``orgs`` firms, 1% of reports cancelled in the journal,
two web user IDs and one CTCI line per firm.

Timed:
- ``invoice``: :func:`bondtape.fees.build_invoices` (read, group, price every line with its
  control numbers) and writing every invoice in each format plus ``summary.json``;
- ``groupby``: Polars ``read_database`` of the same rows (same WHERE, same connection type)
  and a group-by of MPID and par tier with count and sum: the least any invoicer must do.

Each is run ``--repeat`` times, alternately, and the best time of each is used. Each
invoicing run writes into a new directory, as a month-end run does (removing the previous
run's 100+ MB first made the next run's file creation wait on this machine's ext4
``discard``); dirty pages are flushed (``os.sync``) before each run, outside the timing,
and every output is removed at the end.
``ratio_to_groupby`` = invoicing's reports/s divided by the group-by's reports/s.
The result is checked: the invoices' control numbers and exact tier amounts must agree
with the group-by.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import tempfile
import time
from decimal import Decimal
from pathlib import Path

MONTH = "2010-04"


def generate(path: Path, reports: int, orgs: int) -> None:
    from bondtape.db import connect

    engine = connect(f"sqlite:///{path}")
    engine.dispose()
    con = sqlite3.connect(path)
    con.execute("PRAGMA synchronous=OFF")
    con.execute("PRAGMA journal_mode=WAL")
    # 2010-04-01 00:00 America/New_York = 04:00 UTC
    base_us = 1_270_094_400_000_000
    con.execute(
        """
        INSERT INTO trade_reports (control_number, seq, report_us, report_date, first_control_number,
          first_report_date, prior_control_number, reporting_mpid, client_ref, channel, cusip, symbol, data_set,
          grade, rule_144a, side, capacity, contra, contra_type, quantity_c, price_u, yield_u, execution_us,
          execution_date, settlement_date, commission_c, when_issued, special_price, weighted_average,
          trading_market, merger_transfer, remuneration, locked_in, agu, is_test, as_of, late, modifier3,
          disseminated, duplicate_of, terms_key, status, closed_seq, closed_us, successor_control_number)
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :reports)
        SELECT 1000000000 + i, i, :base + (((i / 7) % 30) * 86400 + 50000) * 1000000,
          printf('2010-04-%02d', 1 + (i / 7) % 30), 1000000000 + i, '2010-04-01',
          CASE WHEN (i / 11) % 200 = 7 THEN 1000000000 + i - 1 END, printf('F%03d', (i * 104729) % :orgs), NULL, 'BULK',
          '111111111', 'SYM', 'CORP', 'IG', 0, 'S', 'P', 'C', 'C',
          CASE (i / 1000) % 4 WHEN 0 THEN 1 + (i * 2654435761) % 20000000
                     WHEN 1 THEN 20000000 + (i * 2654435761) % 80000000
                     WHEN 2 THEN 1 + (i * 40503) % 20000100
                     ELSE 100000000 + (i * 2654435761) % 900000000 END,
          100000000, NULL, :base, '2010-04-01', '2010-04-06', NULL, 0, 0, 0, 'S1', 0, NULL, 0, 0,
          ((i / 3) % 1000 = 3), ((i / 7) % 50 = 1), ((i / 7) % 100 = 1), NULL, 1, NULL, 'k', 'ACTIVE', NULL, NULL, NULL
        FROM n
        """, {"reports": reports, "orgs": orgs, "base": base_us})
    con.execute(
        """
        INSERT INTO journal (seq, recorded_us, event_type, channel, mpid, client_ref, control_number,
                             ref_control_number, payload)
        SELECT :reports + control_number - 1000000000, report_us + 3600000000, 'CANCEL', 'BULK', reporting_mpid,
               NULL, control_number, control_number, '{}'
        FROM trade_reports WHERE (control_number / 13) % 100 = 11
        """, {"reports": reports})
    con.execute("INSERT INTO organisations (id, name, kind, mpid, created_us) "
                "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < :orgs - 1) "
                "SELECT i + 1, printf('Firm %03d', i), 'FIRM', printf('F%03d', i), 0 FROM n", {"orgs": orgs})
    con.execute("INSERT INTO users (org_id, username, email, full_name, roles, status, web_access, web_data_sets, "
                "created_us, activated_us) SELECT id, 'u1_' || mpid, 'x@example.com', 'x', 'trader', 'ACTIVE', "
                "'LEVEL_II', 'CORP,AGCY', 0, 1 FROM organisations")
    con.execute("INSERT INTO users (org_id, username, email, full_name, roles, status, web_access, web_data_sets, "
                "created_us, activated_us) SELECT id, 'u2_' || mpid, 'x@example.com', 'x', 'trader', 'ACTIVE', "
                "'LEVEL_I', '', 0, 2 FROM organisations")
    con.execute("INSERT INTO fee_subscriptions (org_id, product, quantity, start_date, created_us) "
                "SELECT id, 'CTCI', 1, '2009-01-01', 0 FROM organisations")
    con.commit()
    con.execute("ANALYZE")
    con.close()


def where_clause() -> str:
    return "report_date >= '2010-04-01' AND report_date <= '2010-04-30' AND is_test = 0"


def run_groupby(path: Path, t1: int, t3: int):
    import polars as pl

    con = sqlite3.connect(path)
    t0 = time.perf_counter()
    df = pl.read_database(
        f"SELECT reporting_mpid, control_number, quantity_c, prior_control_number FROM trade_reports "
        f"WHERE {where_clause()}", con,
        schema_overrides={"reporting_mpid": pl.String, "control_number": pl.Int64, "quantity_c": pl.Int64,
                          "prior_control_number": pl.Int64})
    loaded = time.perf_counter()
    tier = pl.when(pl.col("quantity_c") <= t1).then(1).when(pl.col("quantity_c") >= t3).then(3).otherwise(2)
    out = (df.filter(pl.col("prior_control_number").is_null())
           .group_by("reporting_mpid", tier.alias("tier"))
           .agg(pl.len().alias("n"), pl.col("quantity_c").sum().alias("par_c")))
    done = time.perf_counter()
    con.close()
    return out, done - t0, done - loaded, df.height


def run_invoice(path: Path, out_dir: Path, formats: tuple[str, ...], workers: int | None):
    from bondtape.db import connect
    from bondtape.fees import build_invoices, write_invoices

    db = connect(f"sqlite:///{path}")
    os.sync()  # no write-back of an earlier run inside the timing
    t0 = time.perf_counter()
    invoices, unbilled, schedule = build_invoices(db, MONTH, workers=workers)
    built = time.perf_counter()
    write_invoices(out_dir, MONTH, schedule.name, invoices, unbilled, formats)
    done = time.perf_counter()
    db.dispose()
    return invoices, unbilled, schedule, done - t0, built - t0


def check(invoices, grouped, schedule) -> dict:
    """The invoices agree with the group-by: same reports, same exact tier amounts."""
    import polars as pl

    counts = {1: 0, 2: 0, 3: 0}
    par2 = 0
    for row in grouped.group_by("tier").agg(pl.col("n").sum(), pl.col("par_c").sum()).iter_rows():
        counts[row[0]] = row[1]
        if row[0] == 2:
            par2 = row[2]
    lines = [line for inv in invoices for line in inv.lines if line.code.startswith("RPT_TIER")]
    cns = {code: sum(len(line.sources["control_numbers"]) for line in lines if line.code == code)
           for code in ("RPT_TIER1", "RPT_TIER2", "RPT_TIER3")}
    assert cns == {"RPT_TIER1": counts[1], "RPT_TIER2": counts[2], "RPT_TIER3": counts[3]}, (cns, counts)
    exact2 = sum((line.exact_amount for line in lines if line.code == "RPT_TIER2"), Decimal(0))
    assert exact2 == schedule.tier2_rate * Decimal(par2) / 100, (exact2, par2)
    return {"tier_counts": counts, "checked": True}


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="run.py fees")
    ap.add_argument("--reports", type=int, default=3_000_000)
    ap.add_argument("--orgs", type=int, default=1000)
    ap.add_argument("--formats", default="json,csv,html")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None, help="connections reading reports (default: up to 4)")
    ap.add_argument("--db", type=Path, help="reuse (or create) this SQLite file instead of a temporary one")
    args = ap.parse_args(argv)
    from bondtape.fees import default_schedules

    work = Path(tempfile.mkdtemp(prefix="bondtape-bench-fees-"))
    path = args.db or work / "fees.db"
    try:
        t0 = time.perf_counter()
        if not path.exists():
            generate(path, args.reports, args.orgs)
        setup_s = time.perf_counter() - t0
        schedule = default_schedules().for_month(MONTH)
        t1, t3 = schedule.tier_thresholds_c()
        con = sqlite3.connect(path)  # warm the page cache for both contenders alike
        con.execute(f"SELECT count(*), sum(quantity_c) FROM trade_reports WHERE {where_clause()}").fetchone()
        con.close()
        formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
        best_g = best_i = best_build = best_mem = float("inf")
        for k in range(max(1, args.repeat)):
            grouped, g_s, mem_s, rows = run_groupby(path, t1, t3)
            out_dir = work / f"out{k}"
            invoices, unbilled, _, i_s, build_s = run_invoice(path, out_dir, formats, args.workers)
            best_g, best_mem = min(best_g, g_s), min(best_mem, mem_s)
            if i_s < best_i:
                best_i, best_build = i_s, build_s
        verdict = check(invoices, grouped, schedule)
        files = sum(1 for _ in out_dir.iterdir())
        out_mb = sum(p.stat().st_size for p in out_dir.iterdir()) / 1e6
        return {
            "benchmark": "fees",
            "reports": rows,
            "organisations": args.orgs,
            "cpus": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "invoices": len(invoices),
            "unbilled_mpids": len(unbilled),
            "formats": list(formats),
            "files_written": files,
            "output_mb": round(out_mb, 1),
            "setup_s": round(setup_s, 1),
            "invoice_s": round(best_i, 3),
            "invoice_build_s": round(best_build, 3),
            "invoice_write_s": round(best_i - best_build, 3),
            "groupby_s": round(best_g, 3),
            "groupby_in_memory_s": round(best_mem, 4),
            "reports_per_s": round(rows / best_i),
            "groupby_reports_per_s": round(rows / best_g),
            "ratio_to_groupby": round(best_g / best_i, 3),
            "goal": "invoice_s < 5 and ratio_to_groupby >= 0.3",
            "goal_met": best_i < 5 and best_g / best_i >= 0.3,
            **verdict,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

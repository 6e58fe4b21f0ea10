"""``bondtape demo``: a demo market on SQLite, and a tour of what it holds."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import sqlalchemy as sa
from rich.console import Console

from bondtape.db import connect
from bondtape.journal.schema import journal, trade_reports


def run_demo(directory: Path, *, days: int, trades_per_day: int, console: Console) -> str:
    """Create (or reuse) the demo database in ``directory``; return its URL."""
    from bondtape.cli_core import progress_bar
    from bondtape.intake.bulk import run_bulk
    from bondtape.engine import Engine
    from bondtape.journal.verify import verify
    from bondtape.simulate.market import simulate_market

    directory.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{(directory / 'bondtape.db').resolve()}"
    db = connect(url)
    with db.connect() as conn:
        existing = conn.execute(sa.select(sa.func.count()).select_from(journal)).scalar_one()
    start = dt.date(2024, 1, 2)
    if not existing:
        console.print(f"[bold]Building a demo market[/] in {directory}/: {days} days from {start}, {trades_per_day} trades a day")
        with progress_bar() as bar:
            task = bar.add_task("simulating", total=days, rate="")
            summary = simulate_market(db, start, days, trades_per_day, seed=2010,
                                      progress=lambda d, n: bar.update(task, advance=1, rate=f"{d}: {n} reports"))
        console.print(summary.text())
    sample = directory / "sample-reports.csv"
    with db.connect() as conn:
        row = conn.execute(sa.select(trade_reports).where(trade_reports.c.contra_type == "C",
                                                          trade_reports.c.is_test.is_(False)).limit(1)).one()
    exec_time = "2024-03-04T10:15:00-05:00"
    sample.write_text(
        "action,client_ref,reporting_mpid,cusip,side,capacity,contra,quantity,price,execution_time,report_time,original_control_number\n"
        f"NEW,DEMO-1,{row.reporting_mpid},{row.cusip},S,P,C,250000,101.25,{exec_time},2024-03-04T10:16:00-05:00,\n"
        f"NEW,DEMO-2,{row.reporting_mpid},{row.cusip[:8]}{(int(row.cusip[8]) + 1) % 10},S,P,C,250000,101.25,{exec_time},2024-03-04T10:17:00-05:00,\n"
        f"NEW,DEMO-3,{row.reporting_mpid},{row.cusip},B,P,C,-5,101.25,{exec_time},2024-03-04T10:18:00-05:00,\n"
        f"NEW,DEMO-4,{row.reporting_mpid},{row.cusip},S,P,C,7500000,99.5,{exec_time},2024-03-04T10:40:00-05:00,\n"
    )
    results = directory / "sample-reports.results.csv"
    with open(sample, newline="") as src, open(results, "w", newline="") as out:
        run_bulk(Engine(db), src, out, use_report_time=True)
    check = verify(db)
    console.print()
    console.print("[bold]bondtape demo[/]: the database is " + url)
    console.print(f"journal: {check.lines()[0]}")
    console.print(f"\nA bulk file and its results ({sample.name} -> {results.name}):")
    console.print(results.read_text(), markup=False, highlight=False)
    console.print("Try:")
    for cmd in (
        f"bondtape --help",
        f"bondtape securities list --db {url}",
        f"bondtape report {sample} --use-report-time --db {url}",
        f"bondtape journal show --from-seq 1 --limit 5 --db {url}",
        f"bondtape journal verify --db {url}",
    ):
        console.print(f"  .venv/bin/{cmd}", markup=False, highlight=False)
    return url

"""Bulk intake through the CLI, determinism of the simulator, and a SIGKILL crash test."""
import csv
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from bondtape.cli import cli
from bondtape.db import connect
from bondtape.journal.schema import journal
from bondtape.journal.verify import verify
from tests.conftest import IG, STANDARD_FIRMS, STANDARD_SECURITIES


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_report_command_writes_results_file(market, db_url, tmp_path):
    src = tmp_path / "in.csv"
    write_csv(src, [
        dict(action="NEW", client_ref="a", reporting_mpid="DLRA", cusip=IG, side="S", capacity="P", contra="C",
             quantity="1,000,000", price="100.5", execution_time="2024-03-04T10:00:00-05:00",
             report_time="2024-03-04T10:02:00-05:00", original_control_number="", special_price="Y"),
        dict(action="NEW", client_ref="b", reporting_mpid="DLRA", cusip="BADCUSIP1", side="S", capacity="P",
             contra="C", quantity="1000", price="100", execution_time="2024-03-04T10:00:00-05:00",
             report_time="2024-03-04T10:02:00-05:00", original_control_number="", special_price=""),
        dict(action="CANCEL", client_ref="c", reporting_mpid="DLRA", cusip="", side="", capacity="", contra="",
             quantity="", price="", execution_time="", report_time="2024-03-04T11:00:00-05:00",
             original_control_number="1000000001", special_price=""),
    ])
    out = tmp_path / "out.csv"
    res = CliRunner().invoke(cli, ["report", str(src), "--results", str(out), "--use-report-time", "--db", db_url])
    assert res.exit_code == 0, res.output
    assert "3 lines: 2 accepted, 1 rejected" in res.output
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == ["line", "client_ref", "status", "control_number", "reject_code", "field", "message"]
    assert [(r["line"], r["status"], r["reject_code"]) for r in rows] == [
        ("2", "ACCEPTED", ""), ("3", "REJECTED", "CUSIP_CHECK_DIGIT"), ("4", "ACCEPTED", "")]
    assert rows[2]["control_number"] == "1000000001"


def test_without_use_report_time_the_real_clock_is_used(market, db_url, tmp_path):
    src = tmp_path / "in.csv"
    write_csv(src, [dict(client_ref="a", reporting_mpid="DLRA", cusip=IG, side="S", capacity="P", contra="C",
                         quantity="1000", price="100", execution_time="2024-03-04T10:00:00-05:00",
                         report_time="2024-03-04T10:01:00-05:00")])
    res = CliRunner().invoke(cli, ["report", str(src), "--db", db_url])
    assert res.exit_code == 0, res.output
    with market.connect() as conn:
        recorded = conn.execute(sa.select(journal.c.recorded_us)).scalar_one()
    assert recorded > 1_700_000_000_000_000 + 10**15 * 0  # now, not 2024-03-04 10:01
    assert dt.datetime.fromtimestamp(recorded / 1e6).year >= 2025


def test_malformed_file_rows_get_results_not_tracebacks(market, db_url, tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("action,client_ref,reporting_mpid\nNEW,a,DLRA,extra,cells\nNEW,b\n")
    out = tmp_path / "out.csv"
    res = CliRunner().invoke(cli, ["report", str(src), "--results", str(out), "--db", db_url])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out)))
    assert rows[0]["reject_code"] == "FIELD_INVALID" and rows[0]["field"] == "line"
    assert rows[0]["client_ref"] == "a"  # echoed as given (from its column), though the line has too many cells
    assert [(r["line"], r["client_ref"], r["reject_code"]) for r in rows[1:]] == [("3", "b", "FIELD_REQUIRED")]
    # an unterminated quote (a line that is not CSV) refuses the whole file: test_bad_input.py


def test_simulation_is_deterministic(tmp_path):
    from bondtape.simulate.market import simulate_market

    payloads = []
    for name in ("a", "b"):
        db = connect(f"sqlite:///{tmp_path / name}.db")
        summary = simulate_market(db, dt.date(2024, 1, 2), 2, 300, seed=11, n_securities=30)
        with db.connect() as conn:
            payloads.append(conn.execute(sa.select(journal.c.seq, journal.c.event_type, journal.c.payload,
                                                   journal.c.recorded_us).order_by(journal.c.seq)).all())
        db.dispose()
    assert payloads[0] == payloads[1]
    kinds = {p.event_type for p in payloads[0]}
    assert {"NEW", "CANCEL", "CORRECT"} <= kinds
    assert summary.kinds["inter-dealer"] > 0 and summary.kinds["late"] > 0


@pytest.mark.slow
def test_sigkill_during_bulk_intake_loses_and_duplicates_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'crash.db'}"
    db = connect(url)
    from bondtape.reference.store import upsert_firms, upsert_securities

    with db.begin() as conn:
        upsert_securities(conn, STANDARD_SECURITIES)
        upsert_firms(conn, STANDARD_FIRMS)
    n = 60_000
    src = tmp_path / "big.csv"
    rows = [dict(action="NEW", client_ref=f"k{i}", reporting_mpid="DLRA", cusip=IG, side="S", capacity="P",
                 contra="C", quantity=str(1000 + i), price="100", execution_time="2024-03-04T10:00:00-05:00",
                 report_time="2024-03-04T10:01:00-05:00") for i in range(n)]
    write_csv(src, rows)
    out = tmp_path / "results.csv"
    cmd = [sys.executable, "-m", "bondtape", "report", str(src), "--results", str(out), "--use-report-time",
           "--batch-size", "500", "--db", url]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill once some results are acknowledged
        if out.exists() and out.stat().st_size > 20_000:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    acknowledged = [r for r in csv.DictReader(open(out)) if r.get("status") == "ACCEPTED" and r.get("control_number")]
    assert acknowledged, "the process was killed before acknowledging anything"
    assert len(acknowledged) < n, "the intake finished before the kill: make the file larger"
    db2 = connect(url)
    with db2.connect() as conn:
        journaled = dict(conn.execute(sa.select(journal.c.client_ref, journal.c.control_number)).all())
    for r in acknowledged:  # every acknowledged report is there, with its control number
        assert journaled[r["client_ref"]] == int(r["control_number"])
    assert verify(db2).ok  # gapless, replay equals state
    # sending the whole file again completes it without duplicating anything
    res = subprocess.run(cmd[:-4] + ["--results", str(tmp_path / "again.csv"), "--use-report-time", "--db", url],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    with db2.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(journal)).scalar_one()
    assert count == n
    assert verify(db2).ok

"""Builders for commands in tests."""
from __future__ import annotations

from decimal import Decimal

from bondtape.reporting.commands import Command, Terms
from tests.conftest import IG, STANDARD_FIRMS, STANDARD_SECURITIES, et

DEFAULT_EXEC = et(2024, 3, 4, 10, 0, 0)  # a Monday


def terms(**kw) -> Terms:
    base = dict(cusip=IG, side="S", capacity="P", contra="C", quantity=Decimal("100000"), price=Decimal("99.5"),
                yield_=None, execution_us=DEFAULT_EXEC, settlement_date=None, commission=None)
    base.update(kw)
    return Terms(**base)


def new(mpid="DLRA", report_us=None, ref=None, test=False, allow_duplicate=False, **kw) -> Command:
    return Command("NEW", mpid, ref, terms(**kw), test=test, allow_duplicate=allow_duplicate,
                   report_us=report_us if report_us is not None else DEFAULT_EXEC + 60_000_000)


def act(action, cn, mpid="DLRA", report_us=None, ref=None, **kw) -> Command:
    return Command(action, mpid, ref, terms(**kw) if action == "CORRECT" else None, original_control_number=cn,
                   report_us=report_us if report_us is not None else DEFAULT_EXEC + 120_000_000)


def standard_sqlite(path):
    """A SQLite database at ``path`` holding the standard securities and firms (SQLite only:
    for tests whose logic does not depend on the database)."""
    from bondtape.db import connect
    from bondtape.reference.store import upsert_firms, upsert_securities

    db = connect(f"sqlite:///{path}")
    with db.begin() as conn:
        upsert_securities(conn, STANDARD_SECURITIES)
        upsert_firms(conn, STANDARD_FIRMS)
    return db


def bulk_results(db, header: list[str], rows: list[dict]) -> dict[int, dict]:
    """``rows`` as a bulk file (CSV with ``header``) through the engine, report times as
    given: its results by line number."""
    import csv
    import io

    from bondtape.engine import Engine
    from bondtape.intake.bulk import run_bulk

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header)
    w.writeheader()
    w.writerows(rows)
    out = io.StringIO()
    run_bulk(Engine(db), io.StringIO(buf.getvalue()), out, use_report_time=True)
    return {int(r["line"]): r for r in csv.DictReader(io.StringIO(out.getvalue()))}

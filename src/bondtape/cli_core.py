"""Core commands: reference data, bulk reporting, the journal, simulation, the demo."""
from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import click
import sqlalchemy as sa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from bondtape.cli import db_option, interrupted, interrupts_kept, open_db
from bondtape.db import reading

console = Console(stderr=True, soft_wrap=True)  # long lines (URLs, commands) stay whole


def progress_bar(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console, transient=transient,
    )


# --- reference data ---------------------------------------------------------------------


def _import_file(load, db_url: str | None, file: Path):
    from bondtape.reference.store import ImportFileError

    try:
        return load(open_db(db_url), file)
    except ImportFileError as exc:
        raise click.ClickException(f"{file}: {exc}") from None
    except OSError as exc:
        raise click.ClickException(f"cannot read {file}: {exc.strerror or exc}") from None


def _report_import(result, what: str) -> None:
    for line, reason in result.errors:
        click.echo(f"line {line}: {reason}", err=True)
    click.echo(f"{result.loaded} {what} loaded, {len(result.errors)} rows rejected")
    if result.errors and not result.loaded:
        sys.exit(1)


@click.group()
def securities() -> None:
    """Securities reference data (CUSIP, symbol, grade, 144A, data set)."""


@securities.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@db_option
def securities_import(file: Path, db_url: str | None) -> None:
    """Load securities from FILE.csv.

    Columns: cusip,symbol,issuer,coupon,maturity,data_set,grade,rule_144a and optionally
    eligible_from,eligible_to (no others). data_set CORP or AGCY; grade IG or HY; rule_144a Y
    or N; coupon percent, at most 6 decimals; dates YYYY-MM-DD. Bad rows are reported with
    their line number; good rows load. A file that is not UTF-8 CSV, or whose header repeats
    or misspells a column, loads nothing.
    """
    from bondtape.reference.store import import_securities

    _report_import(_import_file(import_securities, db_url, file), "securities")


@securities.command("list")
@click.option("--data-set", type=click.Choice(["CORP", "AGCY"], case_sensitive=False))
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@db_option
def securities_list(data_set: str | None, fmt: str, db_url: str | None) -> None:
    """List securities."""
    from bondtape.reference.store import load_securities

    with reading(open_db(db_url, must_exist=True)) as conn:
        items = [s for s in load_securities(conn).values() if not data_set or s.data_set == data_set.upper()]
    cols = ["cusip", "symbol", "issuer", "coupon", "maturity", "data_set", "grade", "rule_144a", "eligible_from", "eligible_to"]
    rows = [[s.cusip, s.symbol, s.issuer, s.coupon if s.coupon is not None else "", s.maturity or "", s.data_set,
             s.grade, "Y" if s.rule_144a else "N", s.eligible_from, s.eligible_to or ""] for s in items]
    _print_rows(cols, rows, fmt, "securities")


@click.group()
def firms() -> None:
    """Firms reference data (MPID, name, FINRA membership)."""


@firms.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@db_option
def firms_import(file: Path, db_url: str | None) -> None:
    """Load firms from FILE.csv: columns mpid,name and optionally finra_member,test_only (Y/N).

    Bad rows are reported with their line number; good rows load. A file that is not UTF-8
    CSV, or whose header repeats or misspells a column, loads nothing.
    """
    from bondtape.reference.store import import_firms

    _report_import(_import_file(import_firms, db_url, file), "firms")


@firms.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@db_option
def firms_list(fmt: str, db_url: str | None) -> None:
    """List firms."""
    from bondtape.reference.store import load_firms

    with reading(open_db(db_url, must_exist=True)) as conn:
        items = list(load_firms(conn).values())
    rows = [[f.mpid, f.name, "Y" if f.finra_member else "N", "Y" if f.test_only else "N"] for f in items]
    _print_rows(["mpid", "name", "finra_member", "test_only"], rows, fmt, "firms")


def _print_rows(cols: list[str], rows: list[list], fmt: str, title: str) -> None:
    if fmt == "json":
        click.echo(json.dumps([dict(zip(cols, map(str, r))) for r in rows], indent=1))
    elif fmt == "csv":
        import csv

        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(cols)
        w.writerows(rows)
    else:
        table = Table(title=f"{len(rows)} {title}")
        for c in cols:
            table.add_column(c)
        for r in rows:
            table.add_row(*map(str, r))
        Console().print(table)


# --- reporting --------------------------------------------------------------------------


@click.command("report")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--results", "results_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the results file here (default: FILE.results.csv).")
@click.option("--use-report-time", is_flag=True,
              help="Take each row's time of receipt from its report_time column (back-filling and "
                   "simulation only; production uses the real clock).")
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=5000, show_default=True,
              help="Rows per group commit.")
@db_option
def report(file: Path, results_path: Path | None, use_report_time: bool, batch_size: int, db_url: str | None) -> None:
    """Submit a bulk FILE.csv of NEW, CANCEL, CORRECT and REVERSE actions.

    Writes one result row per input line: line,client_ref,status,control_number,
    reject_code,field,message. Columns of the input: docs/reporting.md. A file that cannot
    be read as a whole (not UTF-8, not CSV, empty, a column named twice or unknown) is
    refused before anything is submitted.
    """
    from bondtape.engine import Engine, EngineUnavailable
    from bondtape.intake.bulk import BulkFileError, check_path, run_bulk

    results_path = results_path or file.with_suffix(".results.csv")
    if results_path.resolve() == file.resolve():
        raise click.BadParameter("the results file would overwrite the input FILE; choose another path",
                                 param_hint="'--results'")
    if not results_path.parent.is_dir():
        raise click.BadParameter(f"folder {str(results_path.parent)!r} does not exist", param_hint="'--results'")
    try:
        total = check_path(file)
    except BulkFileError as exc:
        raise click.ClickException(f"{file}: {exc.code} ({exc.field}): {exc.message}") from None
    except OSError as exc:
        raise click.ClickException(f"cannot read {file}: {exc.strerror or exc}") from None
    engine = Engine(open_db(db_url))
    try:
        out_file = open(results_path, "w", newline="")
    except OSError as exc:
        raise click.ClickException(f"cannot write the results file {results_path}: {exc.strerror or exc}") from None
    try:
        with interrupts_kept(), open(file, newline="", encoding="utf-8-sig") as src, out_file as out, \
                progress_bar() as bar:
            task = bar.add_task("reporting", total=total, rate="")
            summary = run_bulk(engine, src, out, use_report_time=use_report_time, batch_size=batch_size,
                               progress=lambda n: bar.update(task, advance=n), pipelined=True)
    except BulkFileError as exc:  # the file changed since it was checked: stop at the line
        raise click.ClickException(f"{file}: {exc.code} ({exc.field}): {exc.message} (the file changed while it was "
                                   f"being sent: the rows answered in {results_path} are journaled, the others "
                                   f"are not; fix the file and send it again)") from None
    except EngineUnavailable as exc:
        raise click.ClickException(f"database unavailable, nothing more was journaled; the results so far are in "
                                   f"{results_path}; send the file again to complete it: {exc}") from exc
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the batch under way rolled back or was committed
        interrupted(f"{_answered(results_path):,} rows answered in {results_path}; run the same file again to "
                    "continue (client_ref gives the first answers back)", exc)
    click.echo(f"{summary.lines} lines: {summary.accepted} accepted, {summary.rejected} rejected; results in {results_path}")


def _answered(results_path: Path) -> int:
    """The result rows in a results file (closed, so every row written is in it): each is a
    row of a batch that was committed before it was written."""
    import csv

    try:
        with open(results_path, newline="") as f:
            return max(0, sum(1 for _ in csv.reader(f)) - 1)  # less the header
    except OSError:
        return 0


# --- journal ----------------------------------------------------------------------------


@click.group()
def journal() -> None:
    """The append-only journal and the state derived from it."""


@journal.command("verify")
@db_option
def journal_verify(db_url: str | None) -> None:
    """Check the journal (gapless sequence) and that replay equals the stored state."""
    from bondtape.journal.verify import verify

    report_ = verify(open_db(db_url, must_exist=True))
    for line in report_.lines():
        click.echo(line)
    if not report_.ok:
        sys.exit(1)


@journal.command("replay")
@db_option
def journal_replay(db_url: str | None) -> None:
    """Rebuild the trade state from the journal (from empty)."""
    from bondtape.journal.projection import replay
    from bondtape.journal.schema import journal as jt

    db = open_db(db_url)
    with db.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(jt)).scalar_one()
    with db.begin() as conn, progress_bar() as bar:
        task = bar.add_task("replaying", total=total, rate="")
        n = replay(conn, progress=lambda k: bar.update(task, advance=k))
    click.echo(f"replayed {n} events")


@journal.command("show")
@click.option("--from-seq", type=click.IntRange(1, 2**62), default=1, show_default=True)
@click.option("--limit", type=click.IntRange(1, 10_000_000), default=20, show_default=True)
@db_option
def journal_show(from_seq: int, limit: int, db_url: str | None) -> None:
    """Print journal events as JSON lines."""
    from bondtape.journal.projection import decode_payload
    from bondtape.journal.schema import journal as jt

    with reading(open_db(db_url, must_exist=True)) as conn:
        for r in conn.execute(sa.select(jt).where(jt.c.seq >= from_seq).order_by(jt.c.seq).limit(limit)):
            row = dict(r._mapping)
            row["payload"] = decode_payload(row["payload"])
            click.echo(json.dumps(row, default=str))


# --- simulation and demo ----------------------------------------------------------------


@click.command("simulate")
@click.option("--start", "start", type=click.DateTime(["%Y-%m-%d"]), required=True, help="First trading day.")
@click.option("--days", type=click.IntRange(1, 3650), default=5, show_default=True)
@click.option("--trades-per-day", type=click.IntRange(1, 2_000_000), default=1000, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--securities", "n_securities", type=click.IntRange(4, 100_000), default=200, show_default=True)
@db_option
def simulate(start: dt.datetime, days: int, trades_per_day: int, seed: int, n_securities: int, db_url: str | None) -> None:
    """Create a synthetic market and trade it through the intake path.

    The same seed gives the same market. Reports carry realistic shares of late and
    as-of reports, cancels, corrections and reversals.
    """
    from bondtape.simulate.market import simulate_market

    db = open_db(db_url)
    try:
        with interrupts_kept(), progress_bar() as bar:
            task = bar.add_task("simulating", total=days, rate="")
            summary = simulate_market(db, start.date(), days, trades_per_day, seed, n_securities=n_securities,
                                      progress=lambda day, n: bar.update(task, advance=1, rate=f"{day} {n} reports"))
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: every group commit so far stays (docs/simulate.md)
        interrupted("what was journaled stays; run the same command again to finish the market (it ends as one "
                    "uninterrupted run would)", exc)
    click.echo(summary.text())


@click.command("demo")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"),
              show_default=True, help="Folder for the demo database and files.")
@click.option("--days", default=10, show_default=True)
@click.option("--trades-per-day", default=2000, show_default=True)
@click.option("--serve/--no-serve", default=True, show_default=True,
              help="Start the website, REST API, feed and FIX gateway (Ctrl-C stops them).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="The website (HTTP).")
@click.option("--tls-port", type=click.IntRange(0, 65535), default=8443, show_default=True,
              help="HTTPS with client certificates: REST API, downloads.")
@click.option("--fix-port", type=click.IntRange(0, 65535), default=9878, show_default=True, help="The FIX gateway.")
def demo(directory: Path, days: int, trades_per_day: int, serve: bool, host: str, port: int, tls_port: int,
         fix_port: int) -> None:
    """Build a demo market on SQLite, users to sign in as, and serve the website on it."""
    from bondtape.demo import run_demo

    run_demo(directory, days=days, trades_per_day=trades_per_day, console=console, serve=serve, host=host, port=port,
             tls_port=tls_port, fix_port=fix_port)


COMMANDS = [securities, firms, report, journal, simulate, demo]

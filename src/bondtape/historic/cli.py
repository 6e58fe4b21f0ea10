"""``bondtape historic build``: publish a Historic TRACE data set."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from bondtape.cli import db_option, interrupted, interrupts_kept, open_db


@click.group()
def historic() -> None:
    """Historic TRACE Data: aged, uncapped data sets per data set and calendar year."""


@historic.command("build")
@click.option("--data-set", "data_set", type=click.Choice(["corporate", "agency"], case_sensitive=False),
              required=True, help="Historic Corporate Bond Data Set or Historic Agency Data Set.")
@click.option("--year", type=int, required=True, help="Calendar year of trade report dates (2003 Corporate includes 2002).")
@click.option("--as-of", "as_of", type=click.DateTime(["%Y-%m-%d"]), default=None,
              help="Date of publication, for the 18-month aging check: today or an earlier date. "
                   "Default: today (America/New_York).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to create (must not exist, or be empty).")
@db_option
def build(data_set: str, year: int, as_of: dt.datetime | None, out: Path, db_url: str | None) -> None:
    """Build one data set for one year into OUT.

    Writes ehts/ (FINRA Enhanced Time and Sales, one pipe-delimited file per trade report
    date), parquet/ (WRDS trace_enhanced column names), final/ (each trade as it stands
    after its cancels, corrections and reversals), data_dictionary.json and manifest.json.

    The folder is built beside OUT and renamed to OUT only when complete. Ctrl-C or SIGTERM
    stops the build, removes the half-built folder and exits 130 (SIGTERM: 143); the same
    command then builds it again from the start. A second build of the same OUT while one
    runs is refused (OUT_BUSY).
    """
    from bondtape.clock import market_date, now_us
    from bondtape.cli_core import progress_bar
    from bondtape.historic.builder import HistoricError, build_data_set, check_available, check_out, coverage

    day = as_of.date() if as_of else market_date(now_us())
    try:
        check_available(data_set, year, day)  # refuse before touching the database
        first, last = coverage(data_set, year)
        check_out(out)
    except HistoricError as exc:
        raise click.ClickException(f"{exc.code} ({exc.field}): {exc.message}") from exc
    db = open_db(db_url, must_exist=True)  # reads only: a mistyped path is not a new, empty database
    total = (last - first).days + 1
    try:
        with interrupts_kept(), progress_bar() as bar:  # SIGTERM arrives as KeyboardInterrupt (cli.main)
            task = bar.add_task(f"{data_set.lower()} {year}", total=total, rate="")
            count = [0]

            def advance(day: dt.date, n: int) -> None:
                count[0] += n
                bar.update(task, advance=1, rate=f"{day} {count[0]:,} records")

            result = build_data_set(db, data_set, year, day, out, progress=advance)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated): the builder removed its folder
        interrupted(f"{out} was not written (nothing half-built is left); run the same command again to build it",
                    exc)
    except HistoricError as exc:
        raise click.ClickException(f"{exc.code} ({exc.field}): {exc.message}") from exc
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc}") from exc
    t = result.manifest["totals"]
    by = ", ".join(f"{k} {v}" for k, v in t["by_status"].items())
    click.echo(f"{result.records} records ({by}) on {result.days} report dates; "
               f"{result.final_records} trades in the final view; written to {result.out}")


COMMANDS = [historic]

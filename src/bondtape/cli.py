"""The ``bondtape`` command.

Each capability adds its own group of subcommands in its own ``cli`` module, registered in
``_SUBCOMMANDS`` below; every command takes ``--db URL`` (or ``BONDTAPE_DATABASE_URL``).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Iterator, NoReturn

import click
import sqlalchemy as sa

from bondtape import __version__
from bondtape.db import ENV_VAR, connect, resolve_url

# module path -> attribute: click commands or groups added to the top-level group
_SUBCOMMANDS = [
    ("bondtape.cli_core", "COMMANDS"),
    ("bondtape.fix.cli", "COMMANDS"),
    ("bondtape.fees.cli", "COMMANDS"),
    ("bondtape.dissemination.cli", "COMMANDS"),
    ("bondtape.historic.cli", "COMMANDS"),
    ("bondtape.access.cli", "COMMANDS"),
    ("bondtape.serve", "COMMANDS"),
]

DEBUG_VAR = "BONDTAPE_DEBUG"
DB_HELP = f"Database URL (SQLite or PostgreSQL). Default: ${ENV_VAR}, else sqlite:///bondtape.db"


def db_option(fn):
    return click.option("--db", "db_url", envvar=ENV_VAR, default=None, metavar="URL", help=DB_HELP)(fn)


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
MARKET_TABLE = "journal"  # every bondtape database has it (migration 0002_journal, applied on first open)


def _refuse(code: str, message: str) -> NoReturn:
    raise click.ClickException(f"{code} (db): {message}: give the URL of an existing bondtape database with "
                               f"--db or ${ENV_VAR} (sqlite:///PATH or postgresql://...)")


def _check_sqlite_market(path: str) -> None:
    """Refuse a SQLite path that holds no bondtape market, before anything opens it for
    writing (which would create it, or write the schema into it): not there, a zero-byte
    file or a database without tables (DATABASE_NOT_FOUND: there is no market there), a
    file that is not a SQLite database, or a SQLite database that is not a bondtape one
    (DATABASE_INVALID). Only reads: the file's first bytes, then its table names through
    a read-only connection."""
    p = Path(path)
    if not p.exists():
        _refuse("DATABASE_NOT_FOUND", f"there is no database at {path}")
    if p.is_dir():
        _refuse("DATABASE_INVALID", f"cannot open database {path}: it is a folder, not a database file")
    try:
        with open(p, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError as exc:
        _refuse("DATABASE_INVALID", f"cannot open database {path}: {exc.strerror or exc}")
    if not header:
        _refuse("DATABASE_NOT_FOUND", f"{path} is an empty file (0 bytes), not a database: there is no market there")
    if header != SQLITE_HEADER:
        _refuse("DATABASE_INVALID", f"cannot open database {path}: it is not a SQLite database (it does not begin "
                                    f"with the SQLite header)")
    try:
        con = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.OperationalError as exc:  # locked, unreadable: not a verdict on the file
        raise click.ClickException(f"cannot open database {path}: {exc}") from None
    except sqlite3.DatabaseError as exc:  # "file is not a database", "malformed"
        _refuse("DATABASE_INVALID", f"cannot open database {path}: it is not a readable SQLite database ({exc})")
    if not tables:
        _refuse("DATABASE_NOT_FOUND", f"{path} is an empty SQLite database (no tables): there is no market there")
    if MARKET_TABLE not in tables:
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        _refuse("DATABASE_INVALID", f"{path} is a SQLite database but not a bondtape one: it has no "
                                    f"{MARKET_TABLE} table (its tables: {shown})")


def open_db(db_url: str | None, *, must_exist: bool = False):
    """The database of ``--db`` (or the environment's). ``must_exist``: a command that only
    reads a market refuses a SQLite path that holds none instead of creating an empty
    database (or writing the schema into the file) and reading nothing from it: not there,
    a zero-byte file or an empty database (DATABASE_NOT_FOUND), a file that is not a SQLite
    database or a SQLite database without a journal table (DATABASE_INVALID). Nothing is
    written to a refused file."""
    if must_exist:
        url = sa.engine.make_url(resolve_url(db_url))
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
                and not url.database.startswith("file:"):
            _check_sqlite_market(url.database)
    try:
        return connect(db_url)
    except Exception as exc:  # a user sees what failed, not a traceback
        reason = str(exc).split("\n(Background on this error", 1)[0].strip()
        raise click.ClickException(f"cannot open database {resolve_url(db_url)}: {reason}") from exc


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt: a finite command
    stopped by a supervisor cleans up as it does on Ctrl-C (see :func:`terminate_as_interrupt`)."""


def _raise_terminated(_signum, _frame) -> NoReturn:
    raise Terminated()


@contextlib.contextmanager
def terminate_as_interrupt():
    """While inside: SIGTERM raises :class:`Terminated` in the main thread, so the work stops
    where it is with the cleanup of Ctrl-C (``finally`` blocks, rollbacks, temporary folders
    removed) instead of the process dying on the spot. SIGINT keeps the disposition it came
    with (ignored in a shell's background job), and so does a SIGTERM that came in ignored.
    The servers take both signals over with their loop's handlers while they serve
    (:func:`bondtape.serve.stop_signal`) and stop gracefully instead."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def interrupt_status(exc: BaseException) -> int:
    """The exit status of an interrupted command: 143 for SIGTERM, 130 for Ctrl-C (128 + signal)."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def interrupt_in(exc: BaseException | None) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM (KeyboardInterrupt) that ``exc`` was raised while handling, if
    any: a driver's cleanup can fail because the interrupt left its connection mid-query
    (psycopg: "can't change 'autocommit' now: connection in transaction status ACTIVE"),
    and that error then stands in the interrupt's place."""
    seen: set[int] = set()
    todo = [exc]
    while todo:  # the exceptions it was raised from or while handling (a library may wrap the driver's)
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        todo += [exc.__cause__, exc.__context__]
    return None


@contextlib.contextmanager
def interrupts_kept() -> Iterator[None]:
    """Inside: an error raised while an interrupt was being handled is raised as that
    interrupt, so the command ends as interrupted (its own message, exit 130 or 143), not
    with an internal error."""
    try:
        yield
    except Exception as exc:
        interrupt = interrupt_in(exc)
        if interrupt is None:
            raise
        raise interrupt from None


def interrupted(message: str, exc: BaseException) -> NoReturn:
    """End an interrupted command: one line ``interrupted: MESSAGE`` on stderr (saying what
    was left and how to go on), exit 130 (Ctrl-C) or 143 (SIGTERM); no "Aborted!"."""
    click.echo(f"interrupted: {message}", err=True)
    sys.exit(interrupt_status(exc))


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            with interrupts_kept():
                return super().invoke(ctx)
        except KeyboardInterrupt as exc:  # a command that says nothing of its own
            interrupted("the command stopped before it finished", exc)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="bondtape")
def cli() -> None:
    """bondtape: trade reporting and transparency for OTC bonds (a TRACE-like system).

    Reference data, trade reporting (bulk files, REST, FIX, the TRAQS website), the
    journal, real-time dissemination, Historic TRACE Data and Rule 7730 fees.
    """


def _register() -> None:
    for module, attr in _SUBCOMMANDS:
        for command in getattr(importlib.import_module(module), attr):
            cli.add_command(command)


_register()


def main() -> None:
    from bondtape.batching import configure_gc

    configure_gc()
    try:
        with terminate_as_interrupt(), interrupts_kept():  # every finite command: SIGTERM cleans up as Ctrl-C does
            cli(standalone_mode=True)
    except KeyboardInterrupt as exc:  # before or after a command ran (click turns the rest into Abort)
        sys.exit(interrupt_status(exc))
    except Exception as exc:  # a failure no command foresaw: one line, not a traceback
        if os.environ.get(DEBUG_VAR):
            raise
        click.echo(f"Error: internal error ({type(exc).__name__}: {str(exc)[:300]}); nothing more was done. "
                   f"Run again with {DEBUG_VAR}=1 for the traceback, and report it.", err=True)
        sys.exit(1)

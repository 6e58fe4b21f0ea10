"""The ``bondtape`` command.

Each capability adds its own group of subcommands in its own ``cli`` module, registered in
``_SUBCOMMANDS`` below; every command takes ``--db URL`` (or ``BONDTAPE_DATABASE_URL``).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

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


def open_db(db_url: str | None, *, must_exist: bool = False):
    """The database of ``--db`` (or the environment's). ``must_exist``: a command that only
    reads refuses a SQLite file that is not there (DATABASE_NOT_FOUND) instead of creating
    an empty database and reading nothing from it (a mistyped path)."""
    if must_exist:
        url = sa.engine.make_url(resolve_url(db_url))
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
                and not url.database.startswith("file:") and not Path(url.database).exists():
            raise click.ClickException(
                f"DATABASE_NOT_FOUND (db): there is no database at {url.database}: give the URL of an existing "
                f"database with --db or ${ENV_VAR} (sqlite:///PATH or postgresql://...)")
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


def interrupted(message: str, exc: BaseException) -> NoReturn:
    """End an interrupted command: one line ``interrupted: MESSAGE`` on stderr (saying what
    was left and how to go on), exit 130 (Ctrl-C) or 143 (SIGTERM); no "Aborted!"."""
    click.echo(f"interrupted: {message}", err=True)
    sys.exit(interrupt_status(exc))


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
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
        with terminate_as_interrupt():  # every finite command: SIGTERM cleans up as Ctrl-C does
            cli(standalone_mode=True)
    except KeyboardInterrupt as exc:  # before or after a command ran (click turns the rest into Abort)
        sys.exit(interrupt_status(exc))
    except Exception as exc:  # a failure no command foresaw: one line, not a traceback
        if os.environ.get(DEBUG_VAR):
            raise
        click.echo(f"Error: internal error ({type(exc).__name__}: {str(exc)[:300]}); nothing more was done. "
                   f"Run again with {DEBUG_VAR}=1 for the traceback, and report it.", err=True)
        sys.exit(1)

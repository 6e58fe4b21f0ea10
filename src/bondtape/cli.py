"""The ``bondtape`` command.

Each capability adds its own group of subcommands in its own ``cli`` module, registered in
``_SUBCOMMANDS`` below; every command takes ``--db URL`` (or ``BONDTAPE_DATABASE_URL``).
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import click

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


def open_db(db_url: str | None):
    try:
        return connect(db_url)
    except Exception as exc:  # a user sees what failed, not a traceback
        reason = str(exc).split("\n(Background on this error", 1)[0].strip()
        raise click.ClickException(f"cannot open database {resolve_url(db_url)}: {reason}") from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
        cli(standalone_mode=True)
    except KeyboardInterrupt:  # pragma: no cover
        sys.exit(130)
    except Exception as exc:  # a failure no command foresaw: one line, not a traceback
        if os.environ.get(DEBUG_VAR):
            raise
        click.echo(f"Error: internal error ({type(exc).__name__}: {str(exc)[:300]}); nothing more was done. "
                   f"Run again with {DEBUG_VAR}=1 for the traceback, and report it.", err=True)
        sys.exit(1)

"""The ``bondtape`` console script (and ``python -m bondtape``).

Loading the command imports every capability's commands, which takes a moment; Ctrl-C in
that moment ends the command as Ctrl-C does once it runs (exit 130, no traceback), and so
does SIGTERM, which the command itself turns into the same clean stop once it is loaded."""
from __future__ import annotations

import signal
import sys


def main() -> None:
    try:
        from bondtape.cli import main as run
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)
    run()

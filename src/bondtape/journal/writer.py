"""The engine's side of the journal writer process (``writer_child``, whose docstring has
the protocol): start it, open the database in it, and send it a batch's transaction."""
from __future__ import annotations

import fcntl
import subprocess
import sys
import tempfile

import orjson

from bondtape.db import SQLITE_PRAGMAS
from bondtape.journal.projection import insert_sql, update_sql
from bondtape.journal.schema import journal, trade_reports
from bondtape.journal.writer_child import FAILED, frame, read_frame

__all__ = ["WriterProcess", "WriterError", "WriterGone"]

_PIPE_BYTES = 1 << 20  # the request pipe's buffer: a chunk or two in flight, not one 64 KiB at a time
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class WriterError(RuntimeError):
    """The writer process's database failed the request (``kind``: the exception's class
    name, ``OperationalError`` for a locked, full or unreadable database). Nothing of the
    transaction was committed."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class WriterGone(RuntimeError):
    """The writer process ended (or could not be reached): nothing of an open transaction
    was committed, except that a commit sent just before it ended may have been."""


class WriterProcess:
    """One writer process, holding one connection to a SQLite file. Not thread-safe: the
    engine uses it under its lock."""

    def __init__(self, path: str, wal_autocheckpoint: int):
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "bondtape.journal.writer_child"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        try:
            fcntl.fcntl(self.proc.stdin.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)  # type: ignore[union-attr]
        except OSError:  # a smaller limit (/proc/sys/fs/pipe-max-size): the default buffer works too
            pass
        spec = {
            "path": path,
            "pragmas": [*SQLITE_PRAGMAS, f"PRAGMA wal_autocheckpoint={wal_autocheckpoint}"],
            "sql": {"journal": insert_sql("?", journal), "reports": insert_sql("?", trade_reports),
                    "updates": update_sql("?"), "head": "UPDATE journal_head SET last_seq = ? WHERE id = 1"},
        }
        self._call(b"O", orjson.dumps(spec))

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _send(self, op: bytes, payload: bytes = b"") -> None:
        try:
            self.proc.stdin.write(frame(op, payload))  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except (BrokenPipeError, ValueError, OSError):
            self._gone()

    def _call(self, op: bytes, payload: bytes = b"") -> None:
        self._send(op, payload)
        try:
            status, answer = read_frame(self.proc.stdout)
        except (EOFError, ValueError, OSError):
            self._gone()
        if status == FAILED:
            failure = orjson.loads(answer)
            raise WriterError(failure["error"], failure["message"])

    def _gone(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        detail = ""
        if not self._stderr.closed:
            self._stderr.seek(0)
            detail = self._stderr.read().decode(errors="replace").strip()[-2000:]
        self._close_pipes()
        raise WriterGone(f"the journal writer process ended (exit {self.proc.returncode})" + (f": {detail}" if detail else ""))

    def begin(self) -> None:
        """Take the database's write lock (``BEGIN IMMEDIATE``) and return once it is held."""
        self._call(b"B")

    def write(self, journal_rows: list[tuple], report_rows: list[tuple], updates: list[tuple]) -> None:
        """Insert these rows in the open transaction; returns at once (a failure comes back
        from :meth:`commit`)."""
        self._send(b"W", orjson.dumps([journal_rows, report_rows, updates]))

    def commit(self, last_seq: int) -> None:
        """Set the journal's head and commit; returns once the transaction is durable."""
        self._call(b"C", orjson.dumps(last_seq))

    def rollback(self) -> None:
        self._call(b"R")

    def kill(self) -> None:
        """End the process at once (an open transaction is rolled back by SQLite)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._close_pipes()

    def close(self, timeout: float = 10.0) -> None:
        """Close its input (it rolls back what is open and exits) and wait for it."""
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
            try:
                stream.close()  # type: ignore[union-attr]
            except (OSError, ValueError):
                pass

    def __repr__(self) -> str:
        return f"WriterProcess(pid={self.proc.pid}, alive={self.alive})"

"""The engine's side of the journal writer process (``writer_child``, whose docstring has
the protocol): start it, open the database in it, and send it a batch's transaction."""
from __future__ import annotations

import fcntl
import subprocess
import sys
import tempfile

import orjson

from bondtape.db import SQLITE_PRAGMAS
from bondtape.journal.projection import Event, insert_sql, update_sql, wire, wire_report_positions
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
        positions, withheld = wire_report_positions()
        spec = {
            "path": path,
            "pragmas": [*SQLITE_PRAGMAS, f"PRAGMA wal_autocheckpoint={wal_autocheckpoint}"],
            "sql": {"journal": insert_sql("?", journal), "reports": insert_sql("?", trade_reports),
                    "updates": update_sql("?"), "head": "UPDATE journal_head SET last_seq = ? WHERE id = 1"},
            "report_positions": positions, "withheld_position": withheld,
        }
        self._unanswered = 0  # requests sent with the *_async methods whose answers are not read yet
        self._call(b"O", orjson.dumps(spec))

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _send(self, op: bytes, payload: bytes = b"") -> None:
        try:
            self.proc.stdin.write(frame(op, payload))  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except (BrokenPipeError, ValueError, OSError):
            self._gone(keep_answers=True)

    def _call(self, op: bytes, payload: bytes = b"") -> None:
        if self._unanswered:
            raise RuntimeError("the journal writer has answers not yet read: read them with answer() first")
        self._send(op, payload)
        self._read_answer()

    def _read_answer(self) -> None:
        try:
            status, answer = read_frame(self.proc.stdout)
        except (EOFError, ValueError, OSError):
            self._gone()
        if status == FAILED:
            failure = orjson.loads(answer)
            raise WriterError(failure["error"], failure["message"])

    # -- requests answered later: the engine works on while the writer takes the lock or commits
    def begin_async(self) -> None:
        """:meth:`begin`, whose answer :meth:`answer` reads later (in the order sent)."""
        self._send(b"B")
        self._unanswered += 1

    def commit_async(self, last_seq: int) -> None:
        """:meth:`commit`, whose answer :meth:`answer` reads later (in the order sent)."""
        self._send(b"C", orjson.dumps(last_seq))
        self._unanswered += 1

    @property
    def unanswered(self) -> int:
        return self._unanswered

    def answer(self) -> None:
        """Read the answer to the oldest request sent with an ``*_async`` method, waiting for
        it; raises :class:`WriterError` if that request failed."""
        if not self._unanswered:
            raise RuntimeError("no journal writer request is waiting for its answer")
        self._unanswered -= 1
        self._read_answer()

    def _gone(self, keep_answers: bool = False) -> None:
        """The process ended: raise :class:`WriterGone`. With ``keep_answers`` (a request
        could not be sent), the answers it gave before it ended stay readable with
        :meth:`answer` (a commit it made and answered is not lost to the caller)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        detail = ""
        if not self._stderr.closed:
            self._stderr.seek(0)
            detail = self._stderr.read().decode(errors="replace").strip()[-2000:]
        if keep_answers:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
            except (OSError, ValueError):
                pass
        else:
            self._close_pipes()
        raise WriterGone(f"the journal writer process ended (exit {self.proc.returncode})" + (f": {detail}" if detail else ""))

    def begin(self) -> None:
        """Take the database's write lock (``BEGIN IMMEDIATE``) and return once it is held."""
        self._call(b"B")

    def write(self, events: list[Event]) -> None:
        """Journal these events and apply them to the projection, in the open transaction;
        returns at once (a failure comes back from :meth:`commit`)."""
        self._send(b"W", orjson.dumps(wire(events)))

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

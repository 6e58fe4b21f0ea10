"""Reading the trade state for a build: statements in, one text per statement out.

Every statement the build runs is a :func:`bondtape.historic.records.lines_select`: the
database joins the rows it selects into one text of delimited lines (one value handed over
a day's statement, where a driver otherwise pays for every value of every row), and
:func:`bondtape.historic.records.parse` turns that text into Arrow with pyarrow's CSV reader.
All statements of a build read one consistent snapshot. Two readers run them:

- ``process`` (the default for a SQLite file): a process of its own (``reader_child.py``)
  with APSW's SQLite, one read transaction, running the statements in order: the next one
  while this process works on the text before (up to ``AHEAD`` requests wait in the pipe; a
  text larger than the pipe holds the child until it is read, so it is one text ahead). Another core does the
  database's work, and APSW's SQLite (3.45 or later, built with its own optimisations) runs
  these statements in about half the time of the system's ``sqlite3`` library. Never in this
  process: two copies of SQLite in one process do not share POSIX advisory locks; closing
  one's file releases the other's locks on the same file, the corruption hazard SQLite's
  documentation warns of (an earlier reader, the ADBC SQLite driver, did exactly that).
- ``inline``: the engine's own connection, one statement after another: an in-memory SQLite
  database (which only its own connection can see) and PostgreSQL (``REPEATABLE READ``,
  ``READ ONLY``).
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Union

import sqlalchemy as sa

__all__ = ["READERS", "Query", "Source", "open_source"]

READERS = ("auto", "process", "inline")
AHEAD = 4  # statements sent to the reader process ahead of the texts being used: bounds memory


Query = Union[sa.Select, tuple[sa.Select, dict[str, Any]]]  # a statement, with values for its bind parameters


def _split(query: Query) -> tuple[sa.Select, dict[str, Any]]:
    return query if isinstance(query, tuple) else (query, {})


class Source(Protocol):
    name: str

    def texts(self, queries: Iterable[Query]) -> Iterator[bytes | None]:
        """Each query's text (UTF-8; None when it selected no rows), in order. A statement
        run again with other values (each day's) is compiled once."""


class _Process:
    """SQLite through APSW in a process of its own (``reader_child.py``). Used only from the
    thread that iterates."""

    name = "process"

    def __init__(self, path: str, dialect: sa.Dialect) -> None:
        self.dialect = dialect
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("reader_child.py")), path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        self._in_flight = 0  # statements sent whose texts are not yet read
        self._compiled: dict[int, tuple[sa.Select, bytes, Any]] = {}  # by id(statement), which it keeps alive

    def _send(self, query: Query) -> None:
        stmt, values = _split(query)
        entry = self._compiled.get(id(stmt))
        if entry is None:
            compiled = stmt.compile(dialect=self.dialect)  # SQLite's qmark style: positional values
            entry = self._compiled[id(stmt)] = (stmt, str(compiled).encode(), compiled)
        _, sql, compiled = entry
        params = compiled.construct_params(values)
        data = json.dumps([params[name] for name in compiled.positiontup]).encode()
        try:
            self.proc.stdin.write(b"S" + len(sql).to_bytes(8, "little") + sql  # type: ignore[union-attr]
                                  + len(data).to_bytes(8, "little") + data)
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except BrokenPipeError:
            self._failed("")
        self._in_flight += 1

    def _read(self, n: int) -> bytes:
        data = self.proc.stdout.read(n)  # type: ignore[union-attr]
        if len(data) != n:
            self._failed("")
        return data

    def _answer(self) -> bytes | None:
        length = int.from_bytes(self._read(8), "little")
        if length == _CHILD_ERROR:
            self._failed(self._read(int.from_bytes(self._read(8), "little")).decode(errors="replace"))
        text = self._read(length) if length else None
        self._in_flight -= 1  # only once read whole: an interrupted read leaves the child to be killed
        return text

    def _failed(self, message: str) -> None:
        self.proc.wait(10)
        self._stderr.seek(0)
        detail = message or self._stderr.read().decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"the SQLite reader process failed (exit {self.proc.returncode}): {detail}")

    def texts(self, queries: Iterable[Query]) -> Iterator[bytes | None]:
        while self._in_flight:  # texts a caller that stopped early left unread: never another's
            self._answer()
        pending = iter(queries)
        more = True
        while True:
            while more and self._in_flight < AHEAD:  # the child works on these while the caller works
                query = next(pending, None)
                if query is None:
                    more = False
                else:
                    self._send(query)
            if not self._in_flight:
                return
            yield self._answer()

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]  # the child rolls back and exits
        except OSError:
            pass
        if self._in_flight:  # texts nobody will read (an interrupted build): the child may be writing one
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()  # type: ignore[union-attr]
        self._stderr.close()


_CHILD_ERROR = (1 << 64) - 1


class _Inline:
    name = "inline"

    def __init__(self, conn: sa.Connection) -> None:
        self.conn = conn

    def texts(self, queries: Iterable[Query]) -> Iterator[bytes | None]:
        for query in queries:
            text = self.conn.execute(*_split(query)).scalar()
            yield text.encode() if text else None


@contextlib.contextmanager
def _snapshot(db: sa.Engine) -> Iterator[sa.Connection]:
    """One read-only connection holding one consistent snapshot for the whole build.

    On SQLite a deferred transaction (the core's connections begin IMMEDIATE, which would
    lock out the engine's writes for the whole build); on PostgreSQL REPEATABLE READ.
    """
    if db.dialect.name == "sqlite" and db.url.database in (None, "", ":memory:"):
        with db.begin() as conn:  # an in-memory database has one connection: read through it
            yield conn
    elif db.dialect.name == "sqlite":
        reader = sa.create_engine(db.url, poolclass=sa.pool.NullPool,
                                  connect_args={"check_same_thread": False, "isolation_level": None})
        try:
            with reader.connect() as conn:
                conn.exec_driver_sql("PRAGMA busy_timeout=30000")
                conn.exec_driver_sql("BEGIN DEFERRED")
                try:
                    yield conn
                finally:
                    conn.exec_driver_sql("ROLLBACK")
        finally:
            reader.dispose()
    else:
        with db.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                yield conn


def _sqlite_file(db: sa.Engine) -> str | None:
    """The path of a SQLite database another process can open, else None."""
    database = db.url.database
    if db.dialect.name != "sqlite" or database in (None, "", ":memory:") or database.startswith("file:"):
        return None
    return database


@contextlib.contextmanager
def open_source(db: sa.Engine, reader: str = "auto") -> Iterator[Source]:
    """A source for ``db``: ``auto`` takes the reader process for a SQLite file, else inline."""
    if reader not in READERS:
        raise ValueError(f"reader {reader!r}: one of {', '.join(READERS)}")
    path = _sqlite_file(db) if reader != "inline" else None
    if reader == "process" and path is None:
        raise ValueError(f"the reader process reads SQLite files only, not {db.dialect.name} database "
                         f"{db.url.database!r}")
    if path is None:
        with _snapshot(db) as conn:
            yield _Inline(conn)
        return
    source = _Process(path, db.dialect)
    try:
        yield source
    finally:
        source.close()

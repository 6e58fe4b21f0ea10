"""Reading the trade state for a build: SQL statements in, Arrow record batches out.

The build reads two streams at once (reports created, reports closed), both inside one
consistent snapshot:

- ``adbc`` (the default wherever it applies): Arrow's columnar database drivers.
  PostgreSQL: one connection per stream, the second joining the first one's exported
  snapshot (``REPEATABLE READ``, ``READ ONLY``); rows travel as binary ``COPY`` and land in
  Arrow without a Python object per value. SQLite: in a process of its own
  (``adbc_child.py``), one connection, one read transaction, both statements stepping side
  by side, each batch sent back as Arrow IPC. Never in this process: the ADBC SQLite driver
  carries its own copy of SQLite, and two copies of SQLite in one process do not share POSIX
  advisory locks; closing the driver's file released the locks of this process's own
  ``sqlite3`` connections to the same file, and the next write through them failed ("disk
  I/O error"; a process serving on after a build saw "file is not a database"), the
  corruption hazard SQLite's documentation warns of.
- ``dbapi``: the engine's own driver through SQLAlchemy, rows converted to Arrow batch by
  batch. Used for an in-memory SQLite database (which only its own connection can see) and
  any database the ADBC drivers do not serve.

Both give batches of the same Arrow schema (the caller's), so everything after reading is
the same code.
"""
from __future__ import annotations

import contextlib
from collections import deque
from typing import Any, Iterator, Protocol

import pyarrow as pa
import sqlalchemy as sa

__all__ = ["READERS", "Source", "open_source", "render"]

READERS = ("auto", "adbc", "dbapi")
BATCH_ROWS = 8_192


class Source(Protocol):
    name: str

    def stream(self, stmt: sa.Select, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
        """The statement's rows as batches of ``schema`` (columns in select order)."""


def render(stmt: sa.Select, dialect: sa.Dialect) -> str:
    """SQL text with its values inlined: every value is an integer, a date string or a
    fixed code the builder chose (never user text), so no driver's parameter style matters."""
    return str(stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """Driver types -> the caller's (e.g. PostgreSQL int4 sums, SQLite's all-null batches)."""
    if batch.schema.equals(schema):
        return batch
    arrays = []
    for column, field in zip(batch.columns, schema):
        if column.type != field.type:
            if pa.types.is_null(column.type) or column.null_count == len(column):
                column = pa.nulls(len(column), field.type)
            else:
                column = column.cast(field.type)
        arrays.append(column)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _reader_batches(reader: Any, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    for batch in reader:
        if batch.num_rows:
            yield _conform(batch, schema)


# --- ADBC ---------------------------------------------------------------------------------
#
# The drivers' low-level API (the DB-API layer on top of it imports pandas and Polars when
# they are installed: a fifth of a second for nothing).


def _query(conn: Any, sql: str, **options: str) -> tuple[pa.RecordBatchReader, Any]:
    """The statement's result stream, and the statement (to close once the stream is read)."""
    import adbc_driver_manager as adbc

    stmt = adbc.AdbcStatement(conn)
    if options:
        stmt.set_options(**options)
    stmt.set_sql_query(sql)
    stream, _ = stmt.execute_query()
    reader = pa.RecordBatchReader._import_from_c(stream.address)
    return reader, stmt


def _run(conn: Any, sql: str) -> None:
    import adbc_driver_manager as adbc

    stmt = adbc.AdbcStatement(conn)
    try:
        stmt.set_sql_query(sql)
        stmt.execute_update()
    finally:
        stmt.close()


class _Adbc:
    name = "adbc"

    def __init__(self, dialect: sa.Dialect) -> None:
        self.dialect = dialect
        self.handles: list[Any] = []  # closed in reverse order: statements, connections, databases
        self.options: dict[str, str] = {}

    def _connection(self) -> Any:
        raise NotImplementedError

    def stream(self, stmt: sa.Select, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
        reader, handle = _query(self._connection(), render(stmt, self.dialect), **self.options)
        try:
            yield from _reader_batches(reader, schema)
        finally:
            reader.close()
            handle.close()

    def close(self) -> None:
        for handle in reversed(self.handles):
            if hasattr(handle, "rollback"):  # a read-only transaction: nothing to keep
                with contextlib.suppress(Exception):
                    handle.rollback()
            with contextlib.suppress(Exception):
                handle.close()


class _AdbcPostgres(_Adbc):
    def __init__(self, uri: str, dialect: sa.Dialect) -> None:
        import adbc_driver_postgresql

        super().__init__(dialect)
        self.database = adbc_driver_postgresql.connect(uri)
        self.handles.append(self.database)
        first = self._open()
        reader, stmt = _query(first, "SELECT pg_export_snapshot()")
        try:
            self.snapshot = reader.read_all().column(0)[0].as_py()
        finally:
            reader.close()
            stmt.close()
        self.spare: Any | None = first  # the first stream reads on the exporting connection

    def _open(self, snapshot: str | None = None) -> Any:
        import adbc_driver_manager as adbc

        conn = adbc.AdbcConnection(self.database)
        self.handles.append(conn)
        conn.set_autocommit(False)
        _run(conn, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        if snapshot:
            _run(conn, f"SET TRANSACTION SNAPSHOT '{snapshot}'")
        return conn

    def _connection(self) -> Any:
        conn, self.spare = (self.spare, None) if self.spare is not None else (self._open(self.snapshot), None)
        return conn


class _AdbcProcess:
    """SQLite through ADBC in a process of its own (``adbc_child.py``): safe, since no other
    copy of SQLite shares that process, and the reading runs on another core. Each stream
    keeps one request for its next batch in flight, so the child reads ahead while this
    process works on the batch it has. Used only from the thread that iterates."""

    name = "adbc"

    def __init__(self, path: str, dialect: sa.Dialect) -> None:
        import subprocess
        import sys
        import tempfile
        from pathlib import Path

        self.dialect = dialect
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("adbc_child.py")), path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        self._count = 0
        self._in_flight: deque[int] = deque()  # statement numbers whose answers are due, in order
        self._early: dict[int, bytes] = {}  # answers read while waiting for another statement's

    def _send(self, op: bytes, number: int, payload: bytes | None = None) -> None:
        data = op + number.to_bytes(4, "little")
        if payload is not None:
            data += len(payload).to_bytes(8, "little") + payload
        try:
            self.proc.stdin.write(data)  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except BrokenPipeError:
            self._failed("")
        self._in_flight.append(number)

    def _read(self, n: int) -> bytes:
        data = self.proc.stdout.read(n)  # type: ignore[union-attr]
        if len(data) != n:
            self._failed("")
        return data

    def _answer(self, number: int) -> bytes:
        if number in self._early:
            return self._early.pop(number)
        while True:
            due = self._in_flight.popleft()
            length = int.from_bytes(self._read(8), "little")
            if length == _CHILD_ERROR:
                self._failed(self._read(int.from_bytes(self._read(8), "little")).decode(errors="replace"))
            data = self._read(length) if length else b""
            if due == number:
                return data
            self._early[due] = data

    def _failed(self, message: str) -> None:
        self.proc.wait(10)
        self._stderr.seek(0)
        detail = message or self._stderr.read().decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"the ADBC reader process failed (exit {self.proc.returncode}): {detail}")

    def stream(self, stmt: sa.Select, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
        self._count += 1
        number = self._count
        self._send(b"O", number, render(stmt, self.dialect).encode())
        self._answer(number)
        self._send(b"N", number)
        while True:
            data = self._answer(number)
            if not data:
                return
            self._send(b"N", number)  # the child reads the next batch while this one is used
            yield _conform(pa.ipc.open_stream(data).read_next_batch(), schema)

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]  # the child rolls back and exits
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()  # type: ignore[union-attr]
        self._stderr.close()


_CHILD_ERROR = (1 << 64) - 1


# --- DB-API through SQLAlchemy ------------------------------------------------------------


class _Dbapi:
    name = "dbapi"

    def __init__(self, conn: sa.Connection) -> None:
        self.conn = conn
        self.count = 0

    def stream(self, stmt: sa.Select, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
        if self.conn.dialect.name == "postgresql":  # a server-side cursor: rows arrive in chunks
            self.count += 1
            cursor = self.conn.connection.driver_connection.cursor(name=f"bondtape_historic_{self.count}")  # type: ignore[union-attr]
        else:
            cursor = self.conn.connection.cursor()
        try:
            cursor.execute(render(stmt, self.conn.dialect))
            while True:
                rows = cursor.fetchmany(BATCH_ROWS)
                if not rows:
                    return
                columns = list(zip(*rows))
                yield pa.RecordBatch.from_arrays(
                    [pa.array(values, field.type) for values, field in zip(columns, schema)], schema=schema)
        finally:
            cursor.close()


@contextlib.contextmanager
def _dbapi_snapshot(db: sa.Engine) -> Iterator[sa.Connection]:
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


def _adbc_target(db: sa.Engine) -> tuple[str, str] | None:
    """("sqlite", path) or ("postgresql", libpq URI) where an ADBC driver can read ``db``
    (SQLite only from a process of its own: see the module's docstring)."""
    url = db.url
    if db.dialect.name == "sqlite":
        if url.database in (None, "", ":memory:") or url.database.startswith("file:"):
            return None
        try:
            import adbc_driver_sqlite  # noqa: F401
        except ImportError:
            return None
        return "sqlite", url.database
    if db.dialect.name == "postgresql":
        try:
            import adbc_driver_postgresql  # noqa: F401
        except ImportError:
            return None
        return "postgresql", url.set(drivername="postgresql").render_as_string(hide_password=False)
    return None


@contextlib.contextmanager
def open_source(db: sa.Engine, reader: str = "auto") -> Iterator[Source]:
    """A source for ``db``: ``auto`` takes ADBC where it can read the database, else DB-API."""
    if reader not in READERS:
        raise ValueError(f"reader {reader!r}: one of {', '.join(READERS)}")
    target = _adbc_target(db) if reader != "dbapi" else None
    if reader == "adbc" and target is None:
        raise ValueError(f"no ADBC driver reads {db.dialect.name} database {db.url.database!r} here")
    if target is None:
        with _dbapi_snapshot(db) as conn:
            yield _Dbapi(conn)
        return
    kind, where = target
    source = _AdbcProcess(where, db.dialect) if kind == "sqlite" else _AdbcPostgres(where, db.dialect)
    try:
        yield source
    finally:
        source.close()

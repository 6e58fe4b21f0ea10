"""The journal writer's own process, for the engine on a SQLite file.

The engine validates a batch in its process and this process writes it: the rows of each
chunk of the batch are inserted here while the engine validates the next chunk, so the
inserts (every value is bound with the GIL held, about half of a bare insert's time) and
the validation run on two cores. A thread could not do this: the engine's validation holds
the GIL, and a writer thread would wait for it after every row.

The inserts go through APSW, with the SQLite it carries, not through the standard library's
``sqlite3`` and the system's SQLite: the same rows insert in about 60 % of the CPU time
(docs/benchmarks.md). Both libraries read and write the same file format, WAL and locks.

Run as ``python -m bondtape.journal.writer_child`` (it imports no other bondtape module).
Protocol on stdin and stdout; a request is an op byte, an 8-byte little-endian length and
that many bytes; a reply is ``K`` (done) or ``E`` (failed), a length and that many bytes.

- ``O`` open, payload a JSON object: ``path``, ``pragmas`` (statements run on the new
  connection), ``sql`` (``journal``, ``reports``, ``updates``, ``head``: the statements
  of ``W`` and ``C``), ``report_positions`` and ``withheld_position`` (``row_maker``).
  Replied.
- ``B`` begin: ``BEGIN IMMEDIATE``, which takes the database's write lock (waiting as the
  busy timeout allows). If it fails, that transaction's ``W`` are skipped and its ``C``
  fails too (the engine may have sent them before reading this answer). Replied, so that the engine reads its snapshot only once it holds
  the lock: no other writer can commit between that snapshot and this transaction's commit.
- ``W`` write, payload a JSON array ``[events, status updates]``
  (``bondtape.journal.projection.wire``): the events become journal rows, and new reports'
  and corrections' also trade_reports rows, here (``row_maker``). Refused (kept as the
  transaction's failure) if no transaction is open.
  Not replied: the engine goes on with its next chunk. A failure is kept, the transaction
  rolled back, and every later ``W`` of the transaction ignored; ``C`` replies with it.
- ``C`` commit, payload the journal's new last sequence number (JSON): updates
  ``journal_head`` and commits. Replied (``E``: nothing of the transaction was committed).
- ``R`` roll back. Replied.

An ``E`` payload is a JSON object: ``error`` (the kind of failure, named as the DB-API's
exceptions are: ``OperationalError`` for a locked, full or unreadable database,
``IntegrityError`` for a violated constraint) and ``message``. The end of stdin (the engine
closed it, or its process died) rolls back whatever is open and ends this process. Ctrl-C
and SIGTERM are ignored: they are the engine's process's to handle, and this process ends
with its stdin. ``synchronous=FULL`` is among the pragmas: a ``K`` to ``C`` means durable.
"""
from __future__ import annotations

import signal
import sys
from operator import itemgetter

import apsw
import orjson

OK, FAILED = b"K", b"E"

# APSW's exceptions, by the DB-API kind the engine acts on, as pysqlite names them
# (``OperationalError``: the database cannot take the batch now, which the engine reports
# as unavailable; pysqlite also says it for SQLITE_ERROR, e.g. a table missing)
_OPERATIONAL = (apsw.SQLError, apsw.BusyError, apsw.LockedError, apsw.FullError, apsw.IOError, apsw.CantOpenError,
                apsw.ReadOnlyError, apsw.CorruptError, apsw.NotADBError, apsw.ProtocolError,
                apsw.PermissionsError, apsw.NoMemError, apsw.InterruptError)


def read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError
    return data


def read_frame(stream) -> tuple[bytes, bytes]:
    """One message: (op or status byte, payload)."""
    head = read_exact(stream, 9)
    n = int.from_bytes(head[1:], "little")
    return head[:1], read_exact(stream, n) if n else b""


def frame(op: bytes, payload: bytes = b"") -> bytes:
    return op + len(payload).to_bytes(8, "little") + payload


def _kind(exc: BaseException) -> str:
    if isinstance(exc, _OPERATIONAL):
        return "OperationalError"
    if isinstance(exc, apsw.ConstraintError):
        return "IntegrityError"
    return type(exc).__name__


def _failure(exc: BaseException) -> bytes:
    return orjson.dumps({"error": _kind(exc), "message": str(exc)})


def row_maker(report_positions: list[int], withheld: int):
    """The function that makes a chunk's journal rows and trade_reports rows (in event order)
    from its events as ``projection.wire`` sends them: [*header, payload], the payload a new
    report's or correction's layout-1 values (a JSON array) or another event's object; and
    a new report's row after it where the engine made that row."""
    pick = itemgetter(*report_positions)
    dumps = orjson.dumps

    def rows(events: list[list]) -> tuple[list[list], list]:
        report_rows: list = []
        for event in events:
            if len(event) == 10:  # a trade_reports row made by the engine (a payload not in layout 1)
                report_rows.append(event.pop())
            payload = event[8]
            if type(payload) is list:  # layout 1: the text encode_payload gives, the row project gives
                event[8] = dumps([1, *payload]).decode()
                report_rows.append(pick([*event[:8], *payload, payload[withheld] is None, "ACTIVE", None]))
            else:
                event[8] = dumps(payload).decode()
        return events, report_rows

    return rows


def serve(inp, out) -> int:
    conn: apsw.Connection | None = None
    cursor: apsw.Cursor | None = None
    sql: dict[str, str] = {}
    rows = None  # the row maker, once opened
    failed: bytes | None = None  # the first failure of the open transaction

    def reply(status: bytes, payload: bytes = b"") -> None:
        out.write(frame(status, payload))
        out.flush()

    def rollback() -> None:
        if conn is not None and conn.in_transaction:
            conn.execute("ROLLBACK")

    try:
        while True:
            op, payload = read_frame(inp)
            try:
                if op == b"W":
                    if failed is None:
                        if not conn.in_transaction:  # type: ignore[union-attr]
                            # never commit rows one by one (after a BEGIN that failed, say)
                            raise RuntimeError("rows to write with no transaction open")
                        events, updates = orjson.loads(payload)
                        journal_rows, report_rows = rows(events)
                        if journal_rows:
                            cursor.executemany(sql["journal"], journal_rows)  # type: ignore[union-attr]
                        if report_rows:
                            cursor.executemany(sql["reports"], report_rows)  # type: ignore[union-attr]
                        if updates:
                            cursor.executemany(sql["updates"], updates)  # type: ignore[union-attr]
                    continue
                if op == b"B":
                    failed = None
                    rollback()
                    conn.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]
                elif op == b"C":
                    if failed is not None:
                        reply(FAILED, failed)
                        failed = None
                        continue
                    if not conn.in_transaction:  # type: ignore[union-attr]
                        raise RuntimeError("a commit with no transaction open")
                    conn.execute(sql["head"], (orjson.loads(payload),))  # type: ignore[union-attr]
                    conn.execute("COMMIT")  # type: ignore[union-attr]
                elif op == b"R":
                    failed = None
                    rollback()
                elif op == b"O":
                    spec = orjson.loads(payload)
                    # the database exists (the engine made it): opening never creates one
                    conn = apsw.Connection(spec["path"], flags=apsw.SQLITE_OPEN_READWRITE)
                    cursor = conn.cursor()
                    for pragma in spec["pragmas"]:
                        conn.execute(pragma).fetchall()
                    sql = spec["sql"]
                    rows = row_maker(spec["report_positions"], spec["withheld_position"])
                else:
                    raise ValueError(f"unknown request {op!r}")
            except Exception as exc:
                failure = _failure(exc)
                try:
                    rollback()
                except apsw.Error:
                    pass
                if op == b"W":
                    failed = failure  # for the commit to answer
                else:
                    reply(FAILED, failure)
                    if op == b"B":  # its transaction's writes are skipped, its commit fails
                        failed = failure
                continue
            reply(OK)
    except (EOFError, BrokenPipeError):
        return 0
    finally:
        if conn is not None:
            try:
                rollback()
            finally:
                conn.close()


def main() -> int:
    # Ctrl-C in a terminal reaches the whole process group, and a service manager may stop
    # the group: the engine's process decides, and this one ends when its stdin closes
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return serve(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    sys.exit(main())

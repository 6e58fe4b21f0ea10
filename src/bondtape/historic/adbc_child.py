"""The ADBC SQLite reader's own process (run as a script: it imports no bondtape module).

The ADBC SQLite driver carries its own copy of SQLite. Two copies of SQLite in one process
do not share POSIX advisory locks, so the builder must not open the file through the driver
in its own process (bondtape.historic.source). Here, alone in a process, the driver reads
the statements it is sent on one connection, in one read transaction (one snapshot), and
answers each request for a statement's next batch with that batch.

Protocol, on stdin and stdout (lengths are 8-byte little-endian unsigned integers):

- request ``O`` + statement number (4 bytes) + length + SQL text: run the statement;
- request ``N`` + statement number: its next non-empty batch;
- request ``Q``, or the end of stdin: roll back, close and exit.

Each request gets one answer: a length and that many bytes, an Arrow IPC stream holding the
batch (``O``: an empty answer; ``N``: an empty answer at the end of the statement's rows), or
the length 2**64 - 1 followed by a length and a UTF-8 error message, after which this process
exits.
"""
from __future__ import annotations

import signal
import sys

ERROR = (1 << 64) - 1
BATCH_ROWS = "8192"


def _read(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError
    return data


def _block(stream) -> bytes:
    return _read(stream, int.from_bytes(_read(stream, 8), "little"))


def _answer(out, data: bytes) -> None:
    out.write(len(data).to_bytes(8, "little"))
    out.write(data)
    out.flush()


def main(path: str) -> int:
    # Ctrl-C in a terminal reaches the whole process group: the parent decides, and closes
    # this process's stdin, which ends it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    handles: list = []
    try:
        import adbc_driver_manager as adbc
        import adbc_driver_sqlite
        import pyarrow as pa

        database = adbc_driver_sqlite.connect(path)
        handles.append(database)
        conn = adbc.AdbcConnection(database)
        handles.append(conn)
        conn.set_autocommit(False)  # one read transaction: every statement reads one snapshot
        readers: dict[int, pa.RecordBatchReader] = {}
        while True:
            op = inp.read(1)
            if op in (b"", b"Q"):
                return 0
            number = int.from_bytes(_read(inp, 4), "little")
            if op == b"O":
                stmt = adbc.AdbcStatement(conn)
                handles.append(stmt)
                stmt.set_options(**{"adbc.sqlite.query.batch_rows": BATCH_ROWS})
                stmt.set_sql_query(_block(inp).decode())
                stream, _ = stmt.execute_query()
                readers[number] = pa.RecordBatchReader._import_from_c(stream.address)
                _answer(out, b"")
            elif op == b"N":
                batch = None
                while batch is None:
                    try:
                        batch = readers[number].read_next_batch()
                    except StopIteration:
                        break
                    if not batch.num_rows:
                        batch = None
                if batch is None:
                    _answer(out, b"")
                    continue
                sink = pa.BufferOutputStream()
                with pa.ipc.new_stream(sink, batch.schema) as writer:
                    writer.write_batch(batch)
                _answer(out, sink.getvalue().to_pybytes())
            else:
                raise ValueError(f"unknown request {op!r}")
    except EOFError:
        return 0
    except Exception as exc:  # the parent raises it as its own error
        message = f"{type(exc).__name__}: {exc}".encode()
        out.write(ERROR.to_bytes(8, "little"))
        _answer(out, message)
        return 1
    finally:
        for handle in reversed(handles):
            if hasattr(handle, "rollback"):
                try:
                    handle.rollback()
                except Exception:
                    pass
            try:
                handle.close()
            except Exception:
                pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

"""The Historic build's SQLite reader, a process of its own (run as a script: it imports no
bondtape module).

It opens the database with APSW's SQLite, begins one read transaction (every statement
reads one snapshot) and answers each statement it is sent with the statement's one value,
a text (``bondtape.historic.records.lines_select``). Alone in its process, its copy of SQLite
shares no file with another copy (``bondtape.historic.source``).

Protocol, on stdin and stdout (lengths are 8-byte little-endian unsigned integers):

- request ``S`` + length + SQL text + length + its values (a JSON array, in the order of
  its ``?`` parameters): run the statement (prepared once: APSW keeps a statement cache);
- request ``Q``, or the end of stdin: roll back, close and exit.

Each statement gets one answer, in order: a length and that many bytes, the text in UTF-8
(length 0: the statement selected no rows), or the length 2**64 - 1 followed by a length
and a UTF-8 error message (also written to stderr), after which this process exits.
"""
from __future__ import annotations

import json
import signal
import sys

ERROR = (1 << 64) - 1


def _read(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError
    return data


def _answer(out, data: bytes) -> None:
    out.write(len(data).to_bytes(8, "little"))
    out.write(data)
    out.flush()


def main(path: str) -> int:
    # Ctrl-C in a terminal reaches the whole process group: the parent decides, and closes
    # this process's stdin (or kills it), which ends it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    conn = None
    try:
        import apsw

        conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE)  # never creates a file
        conn.setbusytimeout(30_000)
        conn.execute("BEGIN")  # deferred: the first statement takes the snapshot, the rest share it
        while True:
            op = inp.read(1)
            if op in (b"", b"Q"):
                return 0
            if op != b"S":
                raise ValueError(f"unknown request {op!r}")
            sql = _read(inp, int.from_bytes(_read(inp, 8), "little")).decode()
            values = json.loads(_read(inp, int.from_bytes(_read(inp, 8), "little")))
            row = conn.execute(sql, values).fetchone()
            value = row[0] if row else None
            _answer(out, value.encode() if value else b"")
    except EOFError:
        return 0
    except Exception as exc:  # the parent raises it as its own error
        message = f"{type(exc).__name__}: {exc}"
        print(message, file=sys.stderr, flush=True)  # also there: the parent may find the pipe closed first
        try:
            out.write(ERROR.to_bytes(8, "little"))
            _answer(out, message.encode())
        except OSError:
            pass
        return 1
    finally:
        if conn is not None:
            try:
                if not conn.getautocommit():
                    conn.execute("ROLLBACK")
                conn.close()
            except Exception:
                pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

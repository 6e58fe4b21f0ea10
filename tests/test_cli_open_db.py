"""Commands that only read a market refuse a SQLite path that holds none, without writing a
byte into it: a zero-byte file or an empty database is DATABASE_NOT_FOUND (no market
there), a file that is not a SQLite database or a SQLite database that is not a bondtape
one is DATABASE_INVALID, each naming the file (a missing file: tests/test_bad_input.py)."""
from __future__ import annotations

import hashlib
import sqlite3

import pytest
from click.testing import CliRunner

from bondtape.cli import cli
from tests.helpers import standard_sqlite

READ_ONLY = [
    ["journal", "verify"], ["journal", "show"], ["securities", "list"], ["firms", "list"], ["feed", "status"],
    ["feed", "replay"], ["fees", "records"], ["fees", "invoice", "--month", "2024-01", "--out", "{tmp}/inv"],
    ["historic", "build", "--data-set", "agency", "--year", "2024", "--as-of", "2026-07-01", "--out", "{tmp}/h"],
]


def _zero_bytes(path):
    path.write_bytes(b"")  # `touch`, or a mistyped earlier command


def _not_sqlite(path):
    path.write_text("cusip,symbol,issuer\n111111118,ACME,Acme Industrial\n")  # a CSV given as --db


def _foreign(path):
    con = sqlite3.connect(path)  # someone else's SQLite database
    con.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    con.execute("INSERT INTO notes (body) VALUES ('not a market')")
    con.commit()
    con.close()


def _empty_sqlite(path):
    con = sqlite3.connect(path)  # a SQLite file with no table at all
    con.execute("PRAGMA user_version = 1")
    con.commit()
    con.close()


KINDS = {  # what is made, then the refusal (after "Error: ")
    "zero-byte": (_zero_bytes, "DATABASE_NOT_FOUND (db): {path} is an empty file (0 bytes), not a database: "
                               "there is no market there"),
    "not-sqlite": (_not_sqlite, "DATABASE_INVALID (db): cannot open database {path}: it is not a SQLite database"),
    "foreign-sqlite": (_foreign, "DATABASE_INVALID (db): {path} is a SQLite database but not a bondtape one: it "
                                 "has no journal table (its tables: notes)"),
    "empty-sqlite": (_empty_sqlite, "DATABASE_NOT_FOUND (db): {path} is an empty SQLite database (no tables): "
                                    "there is no market there"),
}


def _fingerprint(path) -> tuple[int, str]:
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("argv", READ_ONLY, ids=lambda a: " ".join(a[:2]))
def test_a_command_that_reads_refuses_a_file_that_holds_no_market_and_leaves_it_untouched(tmp_path, argv, kind):
    """Before: a zero-byte file or a foreign SQLite database got the whole bondtape schema
    written into it (69 tables; the zero-byte file became 1.1 MB) and the command reported
    on an empty market as if it were this one (`journal verify`: "0 journal events, 0 trade
    reports: OK", an invoice summary and a Historic data set of 0 records); a file that is
    not a database was "cannot open database ...: (sqlite3.DatabaseError) file is not a
    database", without a code."""
    make, says = KINDS[kind]
    path = tmp_path / "market.db"
    make(path)
    before = _fingerprint(path)
    res = CliRunner().invoke(cli, [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--db", f"sqlite:///{path}"])
    assert res.exit_code == 1, res.output
    assert "Error: " + says.format(path=path) in res.output and len(res.output.splitlines()) == 1, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)  # a refusal, not a crash
    assert _fingerprint(path) == before  # not a byte written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["market.db"]  # no -wal/-shm, no output written


def test_a_folder_is_refused_as_not_a_database(tmp_path):
    res = CliRunner().invoke(cli, ["journal", "verify", "--db", f"sqlite:///{tmp_path}"])
    assert res.exit_code == 1 and f"DATABASE_INVALID (db): cannot open database {tmp_path}: it is a folder" \
        in res.output, res.output


def test_a_bondtape_database_is_still_read_also_while_a_writer_holds_it_open(tmp_path):
    """The check only reads: a market in WAL mode with a writer's connection open (a running
    server) passes, and the commands read it."""
    path = tmp_path / "market.db"
    db = standard_sqlite(path)
    writer = db.raw_connection()  # a server's open connection: the WAL is there, not checkpointed
    try:
        writer.execute("SELECT count(*) FROM journal")
        assert (tmp_path / "market.db-wal").exists()
        res = CliRunner().invoke(cli, ["firms", "list", "--format", "csv", "--db", f"sqlite:///{path}"])
        assert res.exit_code == 0 and "DLRA" in res.output, res.output
        res = CliRunner().invoke(cli, ["journal", "verify", "--db", f"sqlite:///{path}"])
        assert res.exit_code == 0 and "OK" in res.output, res.output
    finally:
        writer.close()
        db.dispose()

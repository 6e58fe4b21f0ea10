"""The journal's and the projection's keys on SQLite: the table's rowid, no second B-tree;
databases made with the earlier BIGINT keys keep working."""
from __future__ import annotations

import sqlite3
from decimal import Decimal

import sqlalchemy as sa

from bondtape.db import connect
from bondtape.engine import Engine
from bondtape.journal.schema import journal, trade_reports
from bondtape.journal.verify import verify
from bondtape.reference.store import upsert_firms, upsert_securities
from tests.conftest import STANDARD_FIRMS, STANDARD_SECURITIES
from tests.helpers import act, new


def _single_key_indexes(path, table: str, key: str) -> list[str]:
    """Indexes of ``table`` whose only column is ``key`` (a BIGINT primary key's B-tree)."""
    with sqlite3.connect(path) as c:
        names = [r[1] for r in c.execute(f"PRAGMA index_list({table})")]
        return [n for n in names if [r[2] for r in c.execute(f"PRAGMA index_info({n})")] == [key]]


def _market(db):
    with db.begin() as conn:
        upsert_securities(conn, STANDARD_SECURITIES)
        upsert_firms(conn, STANDARD_FIRMS)
    return db


def _use(db):
    engine = Engine(db)
    a, b = engine.submit([new(ref="k1"), new(ref="k2", quantity=Decimal("5000"))])
    [c] = engine.submit([act("CANCEL", a.control_number)])
    assert a.accepted and b.accepted and c.accepted
    engine.close()
    with db.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(journal)).scalar_one() == 3
        statuses = dict(conn.execute(sa.select(trade_reports.c.control_number, trade_reports.c.status)).all())
        assert statuses == {a.control_number: "CANCELLED", b.control_number: "ACTIVE"}
    assert verify(db).problems == []


def test_keys_are_the_rowid_on_sqlite(tmp_path):
    path = tmp_path / "k.db"
    db = _market(connect(f"sqlite:///{path}"))
    assert _single_key_indexes(path, "journal", "seq") == []
    assert _single_key_indexes(path, "trade_reports", "control_number") == []
    _use(db)
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT count(*) FROM journal WHERE rowid <> seq").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM trade_reports WHERE rowid <> control_number").fetchone()[0] == 0
    db.dispose()


def test_a_database_with_the_earlier_bigint_keys_still_works(tmp_path):
    path = tmp_path / "old.db"
    connect(f"sqlite:///{path}").dispose()
    with sqlite3.connect(path) as c:  # the two tables as they were made before: BIGINT keys
        for table, key in (("journal", "seq"), ("trade_reports", "control_number")):
            ddl = c.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()[0]
            extra = [r[0] for r in c.execute("SELECT sql FROM sqlite_master WHERE type IN ('index', 'trigger') "
                                             "AND tbl_name = ? AND sql IS NOT NULL", (table,))]
            earlier = ddl.replace(f"{key} INTEGER NOT NULL", f"{key} BIGINT NOT NULL", 1)
            assert earlier != ddl
            c.execute(f"DROP TABLE {table}")
            c.execute(earlier)
            for sql in extra:
                c.execute(sql)
    assert _single_key_indexes(path, "journal", "seq")  # the earlier layout: a second B-tree
    assert _single_key_indexes(path, "trade_reports", "control_number")
    db = _market(connect(f"sqlite:///{path}"))
    _use(db)
    db.dispose()

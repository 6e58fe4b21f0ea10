"""Database connection, the shared table metadata and schema migrations.

SQLite (WAL) is the embedded default; PostgreSQL is selected by URL. Every command takes
``--db URL`` or ``BONDTAPE_DATABASE_URL``; without either, ``bondtape.db`` in the current
directory is used.

Migrations are ordered, named steps recorded in ``schema_migrations``. Each capability
registers its own steps with :func:`migration`; :func:`migrate` applies the ones a
database has not seen, each in its own transaction.
"""
from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

ENV_VAR = "BONDTAPE_DATABASE_URL"
DEFAULT_URL = "sqlite:///bondtape.db"

metadata = sa.MetaData()

schema_migrations = sa.Table(
    "schema_migrations",
    metadata,
    sa.Column("id", sa.String(100), primary_key=True),
    sa.Column("applied_us", sa.BigInteger, nullable=False),
)


def resolve_url(url: str | None = None) -> str:
    """The database URL: the argument, else ``BONDTAPE_DATABASE_URL``, else ./bondtape.db."""
    url = url or os.environ.get(ENV_VAR) or DEFAULT_URL
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    elif url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url[len("postgres://") :]
    return url


# Run on every new SQLite connection (and by the journal writer process on its own).
SQLITE_PRAGMAS = (
    # A new database's pages are 16 KiB, not 4 KiB (it must come before journal_mode: once
    # in WAL mode the size is fixed; a database made before keeps its size). An intake
    # commit writes each page it changed into the WAL, two writes a page: with 16 KiB pages
    # the journal writer's CPU a report fell from 16-17 to 13.5-14 us (docs/benchmarks.md).
    "PRAGMA page_size=16384",
    "PRAGMA journal_mode=WAL",
    # FULL: a committed transaction survives a power loss, not only a process crash.
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=30000",
    # A page cache of 64 MiB per connection (SQLite's default is 2 MiB): intake inserts into
    # indexes keyed by CUSIP and by terms, all over their B-trees, so a small cache keeps
    # reading back the pages it has just evicted.
    "PRAGMA cache_size=-65536",
)


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # pragma: no cover - trivial
    cursor = dbapi_connection.cursor()
    for pragma in SQLITE_PRAGMAS:
        cursor.execute(pragma)
    cursor.close()


# pysqlite binds a bool, and None, as what they are (0/1, NULL), but only after looking for
# an adapter and for __adapt__/__conform__ and failing (~0.2-0.3 us a value; a trade report
# row has eleven bools and about nine NULLs). Registered adapters store exactly the same
# values, directly: int for bool, and for None a C callable that returns None ({}.get).
sqlite3.register_adapter(bool, int)
sqlite3.register_adapter(type(None), {}.get)

_READ_ONLY = "bondtape_read_only"


def _sqlite_begin(conn: Connection) -> None:
    # A transaction that may write takes the write lock at once (IMMEDIATE): one that read
    # first and wrote later could not wait for the lock (SQLITE_BUSY_SNAPSHOT). A read-only
    # transaction (see ``reading``) is deferred: a WAL snapshot that neither waits for the
    # engine's batches nor holds them up, and that refuses writes (query_only).
    if conn.get_execution_options().get(_READ_ONLY):
        conn.exec_driver_sql("BEGIN")
        conn.exec_driver_sql("PRAGMA query_only=ON")
        conn.info["query_only"] = True
        return
    if conn.info.pop("query_only", False):
        conn.exec_driver_sql("PRAGMA query_only=OFF")
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_checkin(dbapi_connection, record) -> None:  # back in the pool: writable again
    # None: the connection was invalidated (SQLAlchemy closes it, e.g. when Ctrl-C lands in an
    # execute) and is not coming back; the flag goes with it
    if record.info.pop("query_only", False) and dbapi_connection is not None:
        dbapi_connection.execute("PRAGMA query_only=OFF")


def reading(db: Engine) -> Connection:
    """A connection whose transactions only read.

    On SQLite they are deferred: each reads one consistent WAL snapshot without taking the
    write lock, so a long read (``journal verify``, an invoice, a feed replay) neither waits
    for the engine's batches nor holds intake up, and a write in them fails
    (``PRAGMA query_only``). On PostgreSQL they are ``READ ONLY`` transactions. Use it as
    ``with reading(db) as conn:``.
    """
    conn = db.connect()
    if db.dialect.name == "postgresql":
        return conn.execution_options(postgresql_readonly=True)
    return conn.execution_options(**{_READ_ONLY: True})


def connect(url: str | None = None, *, migrate_schema: bool = True) -> Engine:
    """Open the database (creating a SQLite file if needed) and bring its schema up to date."""
    url = resolve_url(url)
    kwargs: dict = {"future": True}
    if url.startswith("sqlite"):
        # The engine's sequencer is the only writer; one connection per thread is enough.
        kwargs["connect_args"] = {"check_same_thread": False, "isolation_level": None}
    else:
        kwargs["pool_pre_ping"] = True
    engine = sa.create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling is off (isolation_level=None); emit BEGIN
        # ourselves so that SQLAlchemy's transactions are real SQLite transactions.
        sa.event.listen(engine, "begin", _sqlite_begin)
        sa.event.listen(engine.pool, "checkin", _sqlite_checkin)
    if migrate_schema:
        migrate(engine)
    return engine


def is_sqlite(engine: Engine | Connection) -> bool:
    return engine.dialect.name == "sqlite"


@dataclass(frozen=True)
class Migration:
    id: str
    upgrade: Callable[[Connection], None]


_MIGRATIONS: dict[str, Migration] = {}


def migration(id: str) -> Callable[[Callable[[Connection], None]], Callable[[Connection], None]]:
    """Register a schema step. Ids sort in the order they must run (``0001_core``...)."""

    def register(fn: Callable[[Connection], None]) -> Callable[[Connection], None]:
        if id in _MIGRATIONS and _MIGRATIONS[id].upgrade is not fn:
            raise ValueError(f"migration {id} registered twice")
        _MIGRATIONS[id] = Migration(id, fn)
        return fn

    return register


def create_tables(conn: Connection, *tables: sa.Table) -> None:
    """A migration step's usual body: create these tables and their indexes."""
    for table in tables:
        table.create(conn, checkfirst=True)


def _load_migrations() -> None:
    # Importing a capability's schema module registers its migrations.
    from bondtape import schema  # noqa: F401


def pending_migrations(engine: Engine) -> list[str]:
    _load_migrations()
    with engine.connect() as conn:
        schema_migrations.create(conn, checkfirst=True)
        conn.commit()
        done = {row[0] for row in conn.execute(sa.select(schema_migrations.c.id))}
    return [m for m in sorted(_MIGRATIONS) if m not in done]


def migrate(engine: Engine) -> list[str]:
    """Apply pending migrations; return their ids."""
    from bondtape.clock import now_us

    applied = []
    for mid in pending_migrations(engine):
        with engine.begin() as conn:
            if conn.execute(
                sa.select(schema_migrations.c.id).where(schema_migrations.c.id == mid)
            ).first():
                continue  # another process applied it meanwhile
            _MIGRATIONS[mid].upgrade(conn)
            conn.execute(schema_migrations.insert().values(id=mid, applied_us=now_us()))
        applied.append(mid)
    return applied

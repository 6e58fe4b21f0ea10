from __future__ import annotations

import sqlalchemy as sa

from bondtape.db import create_tables, metadata, migration

securities = sa.Table(
    "securities",
    metadata,
    sa.Column("cusip", sa.String(9), primary_key=True),
    sa.Column("symbol", sa.String(14), nullable=False, unique=True),
    sa.Column("issuer", sa.String(200), nullable=False),
    sa.Column("coupon", sa.String(20)),  # exact decimal text, percent
    sa.Column("maturity", sa.String(10)),  # YYYY-MM-DD
    sa.Column("data_set", sa.String(4), nullable=False),
    sa.Column("grade", sa.String(2), nullable=False),
    sa.Column("rule_144a", sa.Boolean, nullable=False),
    sa.Column("eligible_from", sa.String(10), nullable=False),
    sa.Column("eligible_to", sa.String(10)),
    sa.Column("updated_us", sa.BigInteger, nullable=False),
)

firms = sa.Table(
    "firms",
    metadata,
    sa.Column("mpid", sa.String(4), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("finra_member", sa.Boolean, nullable=False),
    sa.Column("test_only", sa.Boolean, nullable=False),
    sa.Column("updated_us", sa.BigInteger, nullable=False),
)


# One row: bumped in the transaction of every change to securities or firms
# (reference.store's upserts, the only writers), so that the engine can tell with one read
# whether the reference data it holds in memory is current.
reference_version = sa.Table(
    "reference_version",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.BigInteger, nullable=False),
)


@migration("0001_reference")
def _create(conn: sa.Connection) -> None:
    create_tables(conn, securities, firms)


@migration("0006_reference_version")
def _create_version(conn: sa.Connection) -> None:
    create_tables(conn, reference_version)
    if conn.execute(sa.select(reference_version.c.id)).first() is None:
        conn.execute(reference_version.insert().values(id=1, version=0))

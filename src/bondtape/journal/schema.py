"""Tables of the journal and of the trade-state projection.

Amounts are scaled integers (exact on every database): quantity in cents of par
(``quantity_c``), price and yield in millionths (``price_u``, ``yield_u``), commission
in cents. Times are UTC microseconds since the epoch (``*_us``); dates are YYYY-MM-DD text.
"""
from __future__ import annotations

import sqlalchemy as sa

from bondtape.db import create_tables, metadata, migration

CONTROL_BASE = 1_000_000_000  # control number = CONTROL_BASE + journal seq of the event

# The two tables' keys: BIGINT, except that on SQLite they are INTEGER, which makes the key
# the table's rowid. A BIGINT PRIMARY KEY on SQLite is a second B-tree beside the table, one
# more insert for each journal row and each report (about 8 % of a bare insert's CPU,
# docs/benchmarks.md). The values stored are the same 64-bit integers. Databases created
# before keep their BIGINT keys: both work alike.
_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

journal = sa.Table(
    "journal",
    metadata,
    sa.Column("seq", _KEY, primary_key=True, autoincrement=False),
    sa.Column("recorded_us", sa.BigInteger, nullable=False),  # time of receipt
    sa.Column("event_type", sa.String(16), nullable=False),
    sa.Column("channel", sa.String(16), nullable=False),
    sa.Column("mpid", sa.String(4)),
    sa.Column("client_ref", sa.String(64)),
    sa.Column("control_number", sa.BigInteger),  # the report created or acted on
    sa.Column("ref_control_number", sa.BigInteger),  # the report acted on (cancel, correct, reverse)
    sa.Column("payload", sa.Text, nullable=False),  # JSON: everything replay needs
    sa.UniqueConstraint("mpid", "client_ref", name="uq_journal_client_ref"),
)

journal_head = sa.Table(
    "journal_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
)

trade_reports = sa.Table(
    "trade_reports",
    metadata,
    sa.Column("control_number", _KEY, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger, nullable=False),  # journal event that created it
    sa.Column("report_us", sa.BigInteger, nullable=False),
    sa.Column("report_date", sa.String(10), nullable=False),  # market date of receipt
    sa.Column("first_control_number", sa.BigInteger, nullable=False),
    sa.Column("first_report_date", sa.String(10), nullable=False),
    sa.Column("prior_control_number", sa.BigInteger),  # a correction's predecessor
    sa.Column("reporting_mpid", sa.String(4), nullable=False),
    sa.Column("client_ref", sa.String(64)),
    sa.Column("channel", sa.String(16), nullable=False),
    sa.Column("cusip", sa.String(9), nullable=False),
    sa.Column("symbol", sa.String(14), nullable=False),
    sa.Column("data_set", sa.String(4), nullable=False),
    sa.Column("grade", sa.String(2), nullable=False),
    sa.Column("rule_144a", sa.Boolean, nullable=False),
    sa.Column("side", sa.String(1), nullable=False),
    sa.Column("capacity", sa.String(1), nullable=False),
    sa.Column("contra", sa.String(4), nullable=False),
    sa.Column("contra_type", sa.String(1), nullable=False),
    sa.Column("quantity_c", sa.BigInteger, nullable=False),
    sa.Column("price_u", sa.BigInteger, nullable=False),
    sa.Column("yield_u", sa.BigInteger),
    sa.Column("execution_us", sa.BigInteger, nullable=False),
    sa.Column("execution_date", sa.String(10), nullable=False),
    sa.Column("settlement_date", sa.String(10), nullable=False),
    sa.Column("commission_c", sa.BigInteger),
    sa.Column("when_issued", sa.Boolean, nullable=False),
    sa.Column("special_price", sa.Boolean, nullable=False),
    sa.Column("weighted_average", sa.Boolean, nullable=False),
    sa.Column("trading_market", sa.String(2), nullable=False),
    sa.Column("merger_transfer", sa.Boolean, nullable=False),
    sa.Column("remuneration", sa.String(1)),
    sa.Column("locked_in", sa.Boolean, nullable=False),
    sa.Column("agu", sa.Boolean, nullable=False),
    sa.Column("is_test", sa.Boolean, nullable=False),
    sa.Column("as_of", sa.Boolean, nullable=False),
    sa.Column("late", sa.Boolean, nullable=False),
    sa.Column("modifier3", sa.String(1)),
    sa.Column("disseminated", sa.Boolean, nullable=False),  # the decision at the time
    sa.Column("duplicate_of", sa.BigInteger),  # flagged possible duplicate (policy "flag")
    sa.Column("terms_key", sa.String(32), nullable=False),
    sa.Column("status", sa.String(10), nullable=False),  # ACTIVE CANCELLED CORRECTED REVERSED
    sa.Column("closed_seq", sa.BigInteger),
    sa.Column("closed_us", sa.BigInteger),
    sa.Column("successor_control_number", sa.BigInteger),  # correction's new report or reversal
    sa.Index("ix_trade_reports_firm_date", "reporting_mpid", "report_date"),
    # time and sales by CUSIP and execution time; with the terms key, the engine's lookup of
    # an active report with the same terms (the key holds the CUSIP and execution time)
    sa.Index("ix_trade_reports_cusip_exec_terms", "cusip", "execution_us", "terms_key"),
)


@migration("0002_journal")
def _create(conn: sa.Connection) -> None:
    create_tables(conn, journal, journal_head, trade_reports)
    if conn.execute(sa.select(journal_head.c.id)).first() is None:
        conn.execute(journal_head.insert().values(id=1, last_seq=0))


@migration("0003_journal_drop_report_date_index")
def _drop_redundant_index(conn: sa.Connection) -> None:
    # ix_fees_trade_reports_month (report_date, ...) serves every query by report date
    conn.exec_driver_sql("DROP INDEX IF EXISTS ix_trade_reports_report_date")


@migration("0004_journal_drop_control_index")
def _drop_control_index(conn: sa.Connection) -> None:
    # nothing looks journal events up by control number (trade_reports answers that), and
    # every accepted report paid for keeping the index
    conn.exec_driver_sql("DROP INDEX IF EXISTS ix_journal_control")


@migration("0005_journal_cusip_exec_terms_index")
def _one_index_for_time_and_sales_and_duplicates(conn: sa.Connection) -> None:
    # One index (cusip, execution_us, terms_key) instead of (cusip, execution_us) and a
    # random-keyed (terms_key): every report paid a B-tree insert at a random place for it.
    conn.exec_driver_sql("DROP INDEX IF EXISTS ix_trade_reports_terms")
    conn.exec_driver_sql("DROP INDEX IF EXISTS ix_trade_reports_cusip_exec")
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_trade_reports_cusip_exec_terms "
                         "ON trade_reports (cusip, execution_us, terms_key)")

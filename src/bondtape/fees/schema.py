"""Billable records: what an organisation subscribes to or buys, with its dates.

Keyed like the access capability's entitlements so that both can be joined: organisation
id, product, data set, year, start and end. Web user IDs (Level I/II) are billed from the
shared ``users`` table; reporting fees from ``trade_reports`` and the ``journal``.

Dates are YYYY-MM-DD market dates; ``end_date`` is the last day of service (inclusive),
NULL while open. Money is in cents. A record keyed wrong is voided (``voided_us``,
``void_reason``), never deleted or edited: it stays listed and is billed in no month.
"""
from __future__ import annotations

import sqlalchemy as sa

from bondtape.db import create_tables, metadata, migration
from bondtape.journal.schema import journal, trade_reports

# Monthly services (Rule 7730 system and market data fees).
SUBSCRIPTION_PRODUCTS = (
    "CTCI",                   # CTCI / third-party connection: per firm per month
    "BTDS_TERMINAL",          # BTDS professional display: per terminal per data set per month
    "BTDS_UNLIMITED",         # BTDS flat fee per data set per month, unlimited internal use
    "VENDOR_FEED",            # continuous vendor real-time feed per data set per month
    "VENDOR_SNAPSHOT",        # daily snapshot vendor feed per data set per month
    "BTDS_NON_PROFESSIONAL",  # non-professional display: no charge
)
# One-off Historic TRACE Data orders (Rule 7730(d), (e)).
HISTORIC_PRODUCTS = (
    "SETUP",           # set-up fee, once per organisation
    "DATA",            # one calendar year of one data set
    "REDISTRIBUTION",  # bulk re-distribution to one recipient: CUSIPs of one data set and year
    "AD_HOC",          # a non-professional's ad-hoc request: media plus delivery
    "OTHER_REQUEST",   # 7730(e): other data on request, amount set by the operator
)

fee_subscriptions = sa.Table(
    "fee_subscriptions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("org_id", sa.Integer, sa.ForeignKey("organisations.id"), nullable=False),
    sa.Column("product", sa.String(24), nullable=False),  # one of SUBSCRIPTION_PRODUCTS
    sa.Column("data_set", sa.String(4)),  # CORP or AGCY; NULL for CTCI
    sa.Column("quantity", sa.Integer, nullable=False, server_default="1"),  # terminals
    sa.Column("reference", sa.String(100)),  # terminal ids, circuit id, contract number
    sa.Column("start_date", sa.String(10), nullable=False),
    sa.Column("end_date", sa.String(10)),  # last day of service, inclusive
    sa.Column("created_us", sa.BigInteger, nullable=False),
    sa.Column("voided_us", sa.BigInteger),  # voided by the operator (keyed wrong): billed never
    sa.Column("void_reason", sa.String(200)),
    sa.Index("ix_fee_subscriptions_org", "org_id", "product"),
)

historic_orders = sa.Table(
    "historic_orders",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("org_id", sa.Integer, sa.ForeignKey("organisations.id"), nullable=False),
    sa.Column("product", sa.String(16), nullable=False),  # one of HISTORIC_PRODUCTS
    sa.Column("data_set", sa.String(4)),  # CORP or AGCY (DATA, REDISTRIBUTION)
    sa.Column("year", sa.Integer),  # calendar year of the data (DATA, REDISTRIBUTION)
    sa.Column("recipient", sa.String(200)),  # REDISTRIBUTION: who receives the data
    sa.Column("cusips", sa.Integer),  # REDISTRIBUTION: CUSIPs newly delivered to the recipient
    sa.Column("media_cost_c", sa.BigInteger),  # AD_HOC
    sa.Column("delivery_cost_c", sa.BigInteger),  # AD_HOC
    sa.Column("amount_c", sa.BigInteger),  # OTHER_REQUEST
    sa.Column("description", sa.String(200)),
    sa.Column("order_date", sa.String(10), nullable=False),  # billed in this date's month
    sa.Column("created_us", sa.BigInteger, nullable=False),
    sa.Column("voided_us", sa.BigInteger),  # voided by the operator (keyed wrong): billed never
    sa.Column("void_reason", sa.String(200)),
    sa.Index("ix_historic_orders_org", "org_id", "product"),
    sa.Index("ix_historic_orders_date", "order_date"),
)

# Indexes on core tables that make the monthly run read only index pages. The first
# covers every column the reporting-fee query needs; the second holds only the journal's
# cancel/correct/reverse events (partial), so NEW reports pay nothing to maintain it.
fees_report_index = sa.Index(
    "ix_fees_trade_reports_month", trade_reports.c.report_date, trade_reports.c.reporting_mpid,
    trade_reports.c.is_test, trade_reports.c.quantity_c, trade_reports.c.control_number,
    trade_reports.c.as_of, trade_reports.c.late, trade_reports.c.prior_control_number,
)
_NOT_NEW = sa.text("event_type <> 'NEW'")
fees_journal_index = sa.Index(
    "ix_fees_journal_actions", journal.c.recorded_us,
    sqlite_where=_NOT_NEW, postgresql_where=_NOT_NEW,
)


@migration("0050_fees")
def _create(conn: sa.Connection) -> None:
    create_tables(conn, fee_subscriptions, historic_orders)
    fees_report_index.create(conn, checkfirst=True)
    fees_journal_index.create(conn, checkfirst=True)


@migration("0051_fees_void")
def _void_columns(conn: sa.Connection) -> None:
    # databases made by 0050 before the columns were declared on the tables
    for table in (fee_subscriptions, historic_orders):
        columns = {c["name"] for c in sa.inspect(conn).get_columns(table.name)}
        if "voided_us" not in columns:
            conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN voided_us BIGINT")
        if "void_reason" not in columns:
            conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN void_reason VARCHAR(200)")

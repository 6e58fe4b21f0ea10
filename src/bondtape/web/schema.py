"""Tables of the website's own workflows: a Non-Professional's ad-hoc request for Historic
TRACE Data (requested, fulfilled from the aged data by the operator, downloaded, billed at
the cost of media and delivery only)."""
from __future__ import annotations

import sqlalchemy as sa

from bondtape.db import create_tables, metadata, migration

historic_requests = sa.Table(
    "historic_requests",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("org_id", sa.Integer, sa.ForeignKey("organisations.id"), nullable=False),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("cusips", sa.String(200), nullable=False),  # comma-separated
    sa.Column("date_from", sa.String(10), nullable=False),
    sa.Column("date_to", sa.String(10), nullable=False),
    sa.Column("note", sa.String(500)),
    sa.Column("status", sa.String(10), nullable=False),  # REQUESTED FULFILLED REJECTED
    sa.Column("requested_us", sa.BigInteger, nullable=False),
    sa.Column("decided_us", sa.BigInteger),
    sa.Column("decided_by", sa.Integer),  # users.id of the operator
    sa.Column("decision_note", sa.String(500)),
    sa.Column("extract", sa.Text),  # the CSV extract, when fulfilled
    sa.Column("extract_rows", sa.Integer),
    sa.Column("fee_order_id", sa.Integer),  # historic_orders.id of the AD_HOC charge
    sa.Index("ix_historic_requests_org", "org_id", "status"),
)


@migration("0700_web_historic_requests")
def _create(conn: sa.Connection) -> None:
    create_tables(conn, historic_requests)

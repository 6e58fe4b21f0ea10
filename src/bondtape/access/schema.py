"""Organisations and users: shared by access (who may do what) and fees (what is billable).

Access owns the other access tables; fees owns subscriptions, terminals and purchases,
which refer to these by id.
"""
from __future__ import annotations

import sqlalchemy as sa

from bondtape.db import create_tables, metadata, migration

ORG_KINDS = ("OPERATOR", "FIRM", "VENDOR", "PROFESSIONAL", "NON_PROFESSIONAL", "TAX_EXEMPT")
ROLES = ("operator_admin", "org_admin", "trader", "viewer", "subscriber")
USER_STATUSES = ("REQUESTED", "APPROVED", "INVITED", "ACTIVE", "LOCKED", "DISABLED", "REJECTED")

organisations = sa.Table(
    "organisations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("kind", sa.String(20), nullable=False),  # one of ORG_KINDS
    sa.Column("mpid", sa.String(4)),  # a reporting firm's MPID (firms.mpid)
    sa.Column("email", sa.String(200)),  # billing / administrative contact
    sa.Column("created_us", sa.BigInteger, nullable=False),
    sa.Column("closed_us", sa.BigInteger),
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("org_id", sa.Integer, sa.ForeignKey("organisations.id"), nullable=False),
    sa.Column("username", sa.String(64), nullable=False, unique=True),
    sa.Column("email", sa.String(200), nullable=False),
    sa.Column("full_name", sa.String(200), nullable=False),
    sa.Column("roles", sa.String(200), nullable=False),  # comma-separated ROLES
    sa.Column("status", sa.String(12), nullable=False),  # one of USER_STATUSES
    # web access level for Rule 7730 system fees: LEVEL_I (trade report only), LEVEL_II, NONE
    sa.Column("web_access", sa.String(10), nullable=False, server_default="NONE"),
    sa.Column("web_data_sets", sa.String(20), nullable=False, server_default=""),  # "CORP,AGCY" for Level II
    sa.Column("password_hash", sa.String(200)),
    sa.Column("totp_secret", sa.String(64)),
    sa.Column("created_us", sa.BigInteger, nullable=False),
    sa.Column("activated_us", sa.BigInteger),
    sa.Column("deactivated_us", sa.BigInteger),
)


@migration("0010_access_accounts")
def _create(conn: sa.Connection) -> None:
    create_tables(conn, organisations, users)

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


# --- access's own tables -----------------------------------------------------------------
# Secrets never appear in clear: passwords are argon2 hashes (users.password_hash), TOTP
# secrets are AES-GCM ciphertexts under the configured key (users.totp_secret), invitation
# and session tokens and recovery codes are stored as SHA-256 digests.

login_state = sa.Table(
    "login_state",
    metadata,
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), primary_key=True, autoincrement=False),
    sa.Column("failed_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_failed_us", sa.BigInteger),
    sa.Column("locked_until_us", sa.BigInteger),
    sa.Column("totp_last_step", sa.BigInteger),  # highest TOTP time step accepted: no replay
    sa.Column("mfa_enrolled_us", sa.BigInteger),
    sa.Column("password_changed_us", sa.BigInteger),
)

invitations = sa.Table(
    "invitations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("created_us", sa.BigInteger, nullable=False),
    sa.Column("expires_us", sa.BigInteger, nullable=False),
    sa.Column("used_us", sa.BigInteger),
    sa.Column("revoked_us", sa.BigInteger),
    sa.Column("created_by", sa.Integer),  # users.id of the operator
    # the authenticator being enrolled (encrypted like users.totp_secret); it replaces the
    # user's secret only when the enrollment completes, so an abandoned one breaks nothing
    sa.Column("pending_totp_secret", sa.String(64)),
)

order_forms = sa.Table(
    "order_forms",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("org_id", sa.Integer, sa.ForeignKey("organisations.id"), nullable=False),
    sa.Column("requested_by", sa.Integer),  # users.id of the organisation administrator
    sa.Column("requested_us", sa.BigInteger, nullable=False),
    sa.Column("decided_by", sa.Integer),
    sa.Column("decided_us", sa.BigInteger),
    sa.Column("decision", sa.String(10)),  # APPROVED or REJECTED
    sa.Column("note", sa.String(500)),
)

recovery_codes = sa.Table(
    "recovery_codes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False, index=True),
    sa.Column("code_sha256", sa.String(64), nullable=False),
    sa.Column("created_us", sa.BigInteger, nullable=False),
    sa.Column("used_us", sa.BigInteger),
)

web_sessions = sa.Table(
    "web_sessions",
    metadata,
    sa.Column("token_sha256", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("csrf_token", sa.String(64), nullable=False),
    sa.Column("method", sa.String(12), nullable=False),  # mfa, certificate, recovery
    sa.Column("created_us", sa.BigInteger, nullable=False),
    sa.Column("last_seen_us", sa.BigInteger, nullable=False),
    sa.Column("expires_us", sa.BigInteger, nullable=False),  # absolute end
    sa.Column("ended_us", sa.BigInteger),
    sa.Column("source", sa.String(64)),
)

client_certificates = sa.Table(
    "client_certificates",
    metadata,
    sa.Column("serial", sa.String(40), primary_key=True),  # hex
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False, index=True),
    sa.Column("fingerprint_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("subject", sa.String(300), nullable=False),
    sa.Column("not_before_us", sa.BigInteger, nullable=False),
    sa.Column("not_after_us", sa.BigInteger, nullable=False),
    sa.Column("issued_us", sa.BigInteger, nullable=False),
    sa.Column("issued_by", sa.String(64)),
    sa.Column("revoked_us", sa.BigInteger),
    sa.Column("revoked_reason", sa.String(200)),
    sa.Column("cert_pem", sa.Text, nullable=False),
)

# Entitlements: what an organisation may receive. Fees bills from its own records and joins
# on (org_id, product, data_set, year, start_us/end_us).
ENTITLEMENT_PRODUCTS = ("REALTIME", "HISTORIC", "REFERENCE")
entitlements = sa.Table(
    "entitlements",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("org_id", sa.Integer, sa.ForeignKey("organisations.id"), nullable=False, index=True),
    sa.Column("product", sa.String(10), nullable=False),  # one of ENTITLEMENT_PRODUCTS
    sa.Column("data_set", sa.String(8), nullable=False, server_default=""),  # CORP, AGCY, 144A; "" for REFERENCE
    sa.Column("year", sa.Integer),  # HISTORIC only: the calendar year purchased
    sa.Column("start_us", sa.BigInteger, nullable=False),
    sa.Column("end_us", sa.BigInteger),  # exclusive; NULL = open
    sa.Column("granted_by", sa.Integer),
    sa.Column("granted_us", sa.BigInteger, nullable=False),
    sa.Column("note", sa.String(200)),
)

# A Non-Professional's attestation to the four conditions of Rule 7730(f)(1), kept forever.
attestations = sa.Table(
    "attestations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False, index=True),
    sa.Column("org_id", sa.Integer, sa.ForeignKey("organisations.id"), nullable=False),
    sa.Column("kind", sa.String(20), nullable=False),  # NON_PROFESSIONAL or TAX_EXEMPT
    sa.Column("statements", sa.Text, nullable=False),  # JSON: each condition and the answer
    sa.Column("signed_name", sa.String(200), nullable=False),
    sa.Column("attested_us", sa.BigInteger, nullable=False),
    sa.Column("source", sa.String(64)),
)

# The audit trail: append-only (database triggers refuse UPDATE and DELETE).
audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("at_us", sa.BigInteger, nullable=False),
    sa.Column("action", sa.String(40), nullable=False),
    sa.Column("outcome", sa.String(10), nullable=False),  # ok, denied, failed
    sa.Column("actor_user_id", sa.Integer),
    sa.Column("actor", sa.String(64)),  # username as given (even when unknown)
    sa.Column("org_id", sa.Integer),
    sa.Column("target", sa.String(200)),
    sa.Column("source", sa.String(64)),  # address or channel
    sa.Column("detail", sa.Text),  # JSON, never a secret
    sa.Index("ix_audit_at", "at_us"),
    sa.Index("ix_audit_actor", "actor", "at_us"),
    sa.Index("ix_audit_source", "source", "at_us"),
)

_SQLITE_AUDIT_GUARDS = [
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
]
_POSTGRES_AUDIT_GUARDS = [
    "CREATE OR REPLACE FUNCTION audit_log_append_only() RETURNS trigger AS $$ "
    "BEGIN RAISE EXCEPTION 'audit_log is append-only'; END; $$ LANGUAGE plpgsql",
    "DROP TRIGGER IF EXISTS audit_log_no_change ON audit_log",
    "CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log "
    "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()",
]


@migration("0011_access_security")
def _create_security(conn: sa.Connection) -> None:
    create_tables(
        conn, login_state, invitations, order_forms, recovery_codes, web_sessions,
        client_certificates, entitlements, attestations, audit_log,
    )
    guards = _SQLITE_AUDIT_GUARDS if conn.dialect.name == "sqlite" else _POSTGRES_AUDIT_GUARDS
    for statement in guards:
        conn.exec_driver_sql(statement)


@migration("0012_audit_source_index")
def _audit_source_index(conn: sa.Connection) -> None:
    # databases made by 0011 before the index was declared on the table
    for index in audit_log.indexes:
        if index.name == "ix_audit_source":
            index.create(conn, checkfirst=True)


@migration("0013_invitation_pending_secret")
def _pending_secret(conn: sa.Connection) -> None:
    columns = {c["name"] for c in sa.inspect(conn).get_columns("invitations")}
    if "pending_totp_secret" not in columns:
        conn.exec_driver_sql("ALTER TABLE invitations ADD COLUMN pending_totp_secret VARCHAR(64)")


# --- a user ID's service history -----------------------------------------------------------
# A user ID is in service from users.activated_us (its first activation) up to, not
# including, users.deactivated_us (NULL while in service), except in its breaks: one row
# here for each time it was disabled and later enabled again, [disabled_us, enabled_us).
# Enabling a user writes its break (from the deactivated_us it clears to the enable) in the
# same transaction; rows are only added, never changed or deleted (database triggers refuse
# both). So its periods of service are [activated, 1st break's disabled), [1st break's
# enabled, 2nd break's disabled), ..., [last break's enabled, deactivated): what the monthly
# fees bill (fees/invoice.py) and `bondtape users history` lists. The audit trail says who:
# each break's disabled_us is an admin.user.disabled row's at_us, its enabled_us an
# admin.user.active row's, for target user:ID.
user_service_breaks = sa.Table(
    "user_service_breaks",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("disabled_us", sa.BigInteger, nullable=False),
    sa.Column("enabled_us", sa.BigInteger, nullable=False),  # exclusive: in service again from here
    sa.Index("ix_user_service_breaks_user", "user_id", "disabled_us", unique=True),
)

_SQLITE_BREAK_GUARDS = [
    "CREATE TRIGGER IF NOT EXISTS user_service_breaks_no_update BEFORE UPDATE ON user_service_breaks "
    "BEGIN SELECT RAISE(ABORT, 'user_service_breaks is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS user_service_breaks_no_delete BEFORE DELETE ON user_service_breaks "
    "BEGIN SELECT RAISE(ABORT, 'user_service_breaks is append-only'); END",
]
_POSTGRES_BREAK_GUARDS = [
    "CREATE OR REPLACE FUNCTION user_service_breaks_append_only() RETURNS trigger AS $$ "
    "BEGIN RAISE EXCEPTION 'user_service_breaks is append-only'; END; $$ LANGUAGE plpgsql",
    "DROP TRIGGER IF EXISTS user_service_breaks_no_change ON user_service_breaks",
    "CREATE TRIGGER user_service_breaks_no_change BEFORE UPDATE OR DELETE ON user_service_breaks "
    "FOR EACH ROW EXECUTE FUNCTION user_service_breaks_append_only()",
]


@migration("0014_user_service_breaks")
def _service_breaks(conn: sa.Connection) -> None:
    # Nothing to copy: each existing user's activated_us and deactivated_us stay its first
    # period of service, with no break (enabling used to clear deactivated_us, so a user
    # disabled and enabled before this has served, as billed, from its first activation).
    create_tables(conn, user_service_breaks)
    guards = _SQLITE_BREAK_GUARDS if conn.dialect.name == "sqlite" else _POSTGRES_BREAK_GUARDS
    for statement in guards:
        conn.exec_driver_sql(statement)

"""The access functions other channels call (the FIX gateway, the feed, the REST API).

    from bondtape.access.api import authenticate_password, may

    user = authenticate_password(db, "alice", "pw", now_us=now, source="fix:10.0.0.5")
    if user is None: refuse the logon (the reason is in the audit trail)
    if not may(db, user, "fix.logon", now_us=now): refuse

Lockout and the audit trail apply exactly as on the website.
"""
from __future__ import annotations

from sqlalchemy.engine import Engine

from bondtape.access import accounts, audit
from bondtape.access.model import AccessError, AuthenticatedUser
from bondtape.access.settings import LockoutPolicy
from bondtape.db import reading

__all__ = [
    "AccessError",
    "AuthenticatedUser",
    "authenticate_password",
    "create_active_user",
    "create_organisation",
    "may",
    "record_audit",
]


def authenticate_password(
    db: Engine, username: str, password: str, *, now_us: int, source: str,
    lockout: LockoutPolicy | None = None, action: str = "login.password",
) -> AuthenticatedUser | None:
    """The user for this name and password, or None (unknown, wrong, locked or not active).

    Consecutive failures lock the user (``LockoutPolicy``: 5, for 30 minutes); every
    attempt is audited with ``source`` (e.g. ``fix:203.0.113.7``); the password never is.
    """
    lockout = lockout or LockoutPolicy()
    with db.begin() as conn:
        check = accounts.password_step(conn, username, password, now_us=now_us, source=source, lockout=lockout,
                                       action=action)
        if check.user is None:
            return None
        accounts.register_success(conn, check.user.id)
        user = accounts.authenticated(conn, check.user.id, "password")
        audit.record(conn, action, at_us=now_us, actor_user_id=user.user_id, actor=user.username, org_id=user.org_id,
                     source=source)
        return user


def create_active_user(
    db: Engine, *, org_id: int, username: str, password: str, roles, now_us: int | None = None,
    email: str | None = None, full_name: str | None = None, master_key: bytes | None = None,
) -> int:
    """For operators and tests: an ACTIVE user with this password, skipping the order form.

    With ``master_key`` the user is also enrolled in TOTP (see ``accounts.create_active_user``
    to get the secret back). Returns the user id.
    """
    from bondtape.clock import now_us as wall

    with db.begin() as conn:
        user_id, _ = accounts.create_active_user(
            conn, org_id=org_id, username=username, password=password, roles=roles, at_us=now_us or wall(),
            email=email, full_name=full_name, master_key=master_key)
    return user_id


def create_organisation(db: Engine, name: str, kind: str, *, mpid: str | None = None, email: str | None = None,
                        now_us: int | None = None) -> int:
    """For operators and tests: an organisation (kind FIRM needs its MPID)."""
    from bondtape.clock import now_us as wall

    with db.begin() as conn:
        return accounts.create_organisation(conn, name, kind, mpid=mpid, email=email, at_us=now_us or wall())


def may(db: Engine, actor: AuthenticatedUser | None, action: str, resource=None, *, now_us: int) -> bool:
    """May this actor do this to that? (See ``bondtape.access.authz``.)"""
    from bondtape.access.authz import decide

    with reading(db) as conn:
        return decide(conn, actor, action, resource, now_us=now_us).allowed


def record_audit(db: Engine, action: str, *, now_us: int, actor: AuthenticatedUser | None = None, outcome: str = "ok",
                 target: str | None = None, source: str | None = None, detail: dict | None = None) -> None:
    """Add one row to the audit trail (report actions, feed connections, ...)."""
    audit.record_now(db, action, at_us=now_us, outcome=outcome, actor_user_id=actor and actor.user_id,
                     actor=actor and actor.username, org_id=actor and actor.org_id, target=target, source=source,
                     detail=detail)

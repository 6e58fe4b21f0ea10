"""The access functions other channels call: password authentication with lockout and audit."""
from __future__ import annotations

import sqlalchemy as sa

from bondtape.access import audit
from bondtape.access.api import authenticate_password, create_active_user, create_organisation, may
from bondtape.access.schema import audit_log
from bondtape.access.settings import LockoutPolicy

T0 = 1_700_000_000_000_000
PW = "correct horse battery"


def _firm_trader(db):
    org = create_organisation(db, "Dealer A", "FIRM", mpid="DLRA", now_us=T0)
    uid = create_active_user(db, org_id=org, username="alice", password=PW, roles="trader", now_us=T0)
    return org, uid


def test_password_authentication_returns_the_actor(db):
    org, uid = _firm_trader(db)
    user = authenticate_password(db, "alice", PW, now_us=T0 + 1, source="fix:127.0.0.1")
    assert user is not None
    assert (user.user_id, user.username, user.org_id, user.org_kind, user.mpid, user.roles) == (
        uid, "alice", org, "FIRM", "DLRA", ("trader",))
    assert may(db, user, "fix.logon", now_us=T0)
    with db.connect() as conn:
        rows = audit.search(conn, actor="alice")
    assert rows[0].action == "login.password" and rows[0].outcome == "ok" and rows[0].source == "fix:127.0.0.1"


def test_password_guessing_locks_the_user_out(db):
    _firm_trader(db)
    policy = LockoutPolicy(max_failures=5, lock_minutes=30)
    for i in range(5):
        assert authenticate_password(db, "alice", f"guess-{i}-xxxxxx", now_us=T0 + i, source="fix:x", lockout=policy) is None
    # locked: even the right password is refused
    assert authenticate_password(db, "alice", PW, now_us=T0 + 10, source="fix:x", lockout=policy) is None
    # after the lock period, the right password works again
    later = T0 + 31 * 60_000_000
    assert authenticate_password(db, "alice", PW, now_us=later, source="fix:x", lockout=policy) is not None
    with db.connect() as conn:
        actions = [(e.action, e.outcome) for e in audit.search(conn, actor="alice", limit=50)]
    assert ("login.lockout", "denied") in actions
    assert actions.count(("login.password.failed", "failed")) == 5
    assert ("login.password.failed", "denied") in actions  # the refused right password while locked


def test_unknown_user_and_wrong_password_are_refused_and_audited(db):
    _firm_trader(db)
    assert authenticate_password(db, "mallory", PW, now_us=T0, source="fix:x") is None
    assert authenticate_password(db, "alice", "wrong password!!", now_us=T0, source="fix:x") is None
    with db.connect() as conn:
        details = [e.detail["reason"] for e in audit.search(conn, action="login.password.failed")]
    assert sorted(details) == ["bad_password", "unknown_user"]


def test_audit_trail_is_append_only(db):
    _firm_trader(db)
    authenticate_password(db, "alice", PW, now_us=T0, source="fix:x")
    import pytest

    with pytest.raises(sa.exc.DBAPIError):
        with db.begin() as conn:
            conn.execute(audit_log.update().values(outcome="failed"))
    with pytest.raises(sa.exc.DBAPIError):
        with db.begin() as conn:
            conn.execute(audit_log.delete())
    with db.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar_one() >= 2


def test_password_spraying_from_one_address_is_throttled(db):
    org, _ = _firm_trader(db)
    policy = LockoutPolicy(max_failures=5, lock_minutes=30, max_failures_per_source=8, source_window_minutes=15)
    for i in range(8):  # one guess each at many user names: no single user reaches its lockout
        assert authenticate_password(db, f"user{i}", "Winter2026!!", now_us=T0 + i, source="10.0.0.9", lockout=policy) is None
    # the address is refused now, even with a right password; another address is not
    assert authenticate_password(db, "alice", PW, now_us=T0 + 100, source="10.0.0.9", lockout=policy) is None
    assert authenticate_password(db, "alice", PW, now_us=T0 + 101, source="10.0.0.10", lockout=policy) is not None
    with db.connect() as conn:
        assert audit.search(conn, actor="alice", outcome="denied")[0].detail == {"reason": "source_throttled"}
    # once the failures have aged out of the window, the address may try again
    later = T0 + 16 * 60_000_000
    assert authenticate_password(db, "alice", PW, now_us=later, source="10.0.0.9", lockout=policy) is not None

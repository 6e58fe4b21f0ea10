"""Organisations, users, the order form, invitations, enrollment, lockout and second factors.

Functions take a connection (the caller's transaction) and the time; they never read the
clock. Refusals raise :class:`AccessError` with a stable code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import pyotp
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bondtape.access import audit
from bondtape.access.crypto import (
    WeakPassword, check_password_policy, decrypt_totp_secret, encrypt_totp_secret, hash_password,
    new_recovery_code, new_token, new_totp_secret, normalise_recovery_code, sha256_hex, verify_password,
)
from bondtape.access.model import AccessError, AuthenticatedUser
from bondtape.access.schema import (
    ORG_KINDS, ROLES, invitations, login_state, order_forms, organisations, recovery_codes, user_service_breaks, users,
)
from bondtape.access.settings import MINUTE_US, LockoutPolicy
from bondtape.clock import iso_market

USERNAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{2,63}$")
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
HOUR_US = 60 * MINUTE_US
TOTP_STEP_SECONDS = 30
RECOVERY_CODE_COUNT = 10
SUBSCRIBER_KINDS = ("VENDOR", "PROFESSIONAL", "NON_PROFESSIONAL", "TAX_EXEMPT")

# which roles an organisation of each kind may give its users
ROLES_FOR_KIND = {
    "OPERATOR": {"operator_admin", "viewer"},
    "FIRM": {"org_admin", "trader", "viewer", "subscriber"},
    **{kind: {"org_admin", "subscriber", "viewer"} for kind in SUBSCRIBER_KINDS},
}


# --- organisations -----------------------------------------------------------------------


def create_organisation(
    conn: Connection, name: str, kind: str, *, at_us: int, mpid: str | None = None,
    email: str | None = None, actor: AuthenticatedUser | None = None, source: str | None = None,
) -> int:
    name = name.strip()
    if not name or len(name) > 200:
        raise AccessError("ORG_NAME", "organisation name is required (1 to 200 characters)", "name")
    kind = kind.upper()
    if kind not in ORG_KINDS:
        raise AccessError("ORG_KIND", f"kind must be one of {', '.join(ORG_KINDS)}; got {kind!r}", "kind")
    if kind == "FIRM":
        if not mpid or not re.fullmatch(r"[A-Z]{4}", mpid.upper()):
            raise AccessError("ORG_MPID", "a reporting firm needs its MPID: four letters", "mpid")
        mpid = mpid.upper()
    elif mpid:
        raise AccessError("ORG_MPID", "only a reporting firm (kind FIRM) has an MPID", "mpid")
    if email is not None:
        email = email.strip()
        if not EMAIL_RE.match(email) or len(email) > 200:
            raise AccessError("ORG_EMAIL", f"email must be an address like billing@example.com (at most 200 characters); got {email[:60]!r}", "email")
    if conn.execute(sa.select(organisations.c.id).where(organisations.c.name == name)).first():
        raise AccessError("ORG_EXISTS", f"an organisation named {name!r} exists", "name")
    if mpid:
        # one open organisation per MPID: its reports are billed to, and traded by, that one
        holder = conn.execute(sa.select(organisations.c.name).where(
            organisations.c.mpid == mpid, organisations.c.closed_us.is_(None))).first()
        if holder is not None:
            raise AccessError("ORG_MPID_TAKEN", f"MPID {mpid} belongs to the organisation {holder.name!r}", "mpid")
    org_id = conn.execute(
        organisations.insert().values(name=name, kind=kind, mpid=mpid, email=email, created_us=at_us)
    ).inserted_primary_key[0]
    audit.record(
        conn, "admin.org.create", at_us=at_us, actor_user_id=actor and actor.user_id,
        actor=actor and actor.username, org_id=org_id, target=f"org:{org_id}", source=source,
        detail={"name": name, "kind": kind, "mpid": mpid},
    )
    return int(org_id)


def organisation(conn: Connection, org_id: int):
    return conn.execute(sa.select(organisations).where(organisations.c.id == org_id)).first()


# --- users -------------------------------------------------------------------------------


def parse_roles(roles: str | list[str] | tuple[str, ...], org_kind: str) -> tuple[str, ...]:
    items = [r.strip() for r in (roles.split(",") if isinstance(roles, str) else roles) if r.strip()]
    if not items:
        raise AccessError("USER_ROLES", f"at least one role is required: {', '.join(ROLES)}", "roles")
    for role in items:
        if role not in ROLES:
            raise AccessError("USER_ROLES", f"unknown role {role!r}; accepted: {', '.join(ROLES)}", "roles")
        if role not in ROLES_FOR_KIND[org_kind]:
            allowed = ", ".join(sorted(ROLES_FOR_KIND[org_kind]))
            raise AccessError("USER_ROLES", f"an organisation of kind {org_kind} may give {allowed}; not {role}", "roles")
    return tuple(dict.fromkeys(items))


def user_by_name(conn: Connection, username: str):
    return conn.execute(sa.select(users).where(users.c.username == username.strip().lower())).first()


def user_by_id(conn: Connection, user_id: int):
    return conn.execute(sa.select(users).where(users.c.id == user_id)).first()


def authenticated(conn: Connection, user_id: int, method: str) -> AuthenticatedUser:
    row = conn.execute(
        sa.select(users.c.id, users.c.username, users.c.roles, users.c.org_id, organisations.c.kind, organisations.c.mpid)
        .join(organisations, organisations.c.id == users.c.org_id)
        .where(users.c.id == user_id)
    ).one()
    roles = tuple(r for r in row.roles.split(",") if r)
    return AuthenticatedUser(row.id, row.username, row.org_id, row.kind, row.mpid, roles, method)


def _new_user(conn: Connection, *, org_id: int, username: str, email: str, full_name: str, roles, status: str,
              at_us: int) -> int:
    org = organisation(conn, org_id)
    if org is None:
        raise AccessError("ORG_UNKNOWN", f"no organisation with id {org_id}", "org_id")
    if org.closed_us is not None:
        raise AccessError("ORG_CLOSED", f"organisation {org.name} is closed", "org_id")
    username = username.strip().lower()
    if not USERNAME_RE.match(username):
        raise AccessError("USER_NAME", "user name: 3 to 64 characters a-z 0-9 . _ - starting with a letter or digit", "username")
    if not EMAIL_RE.match(email.strip()):
        raise AccessError("USER_EMAIL", f"{email!r} is not an email address", "email")
    if not full_name.strip():
        raise AccessError("USER_FULL_NAME", "the user's full name is required", "full_name")
    role_tuple = parse_roles(roles, org.kind)
    if user_by_name(conn, username) is not None:
        raise AccessError("USER_EXISTS", f"user name {username!r} is taken", "username")
    user_id = conn.execute(
        users.insert().values(
            org_id=org_id, username=username, email=email.strip(), full_name=full_name.strip(),
            roles=",".join(role_tuple), status=status, created_us=at_us,
        )
    ).inserted_primary_key[0]
    conn.execute(login_state.insert().values(user_id=user_id, failed_count=0))
    return int(user_id)


def create_active_user(
    conn: Connection, *, org_id: int, username: str, password: str, roles, at_us: int,
    email: str | None = None, full_name: str | None = None, master_key: bytes | None = None,
) -> tuple[int, str | None]:
    """An operator's shortcut (bootstrap, tests): an ACTIVE user with this password.

    With ``master_key`` the user is also enrolled in TOTP and the base32 secret is returned
    (once; it is stored encrypted), else the second element is None.
    """
    try:
        check_password_policy(password, username=username)
    except WeakPassword as exc:
        raise AccessError("PASSWORD_POLICY", str(exc), "password") from None
    user_id = _new_user(
        conn, org_id=org_id, username=username, email=email or f"{username.strip().lower()}@example.invalid",
        full_name=full_name or username, roles=roles, status="ACTIVE", at_us=at_us,
    )
    values = dict(password_hash=hash_password(password), activated_us=at_us)
    secret = None
    if master_key is not None:
        secret = new_totp_secret()
        values["totp_secret"] = encrypt_totp_secret(master_key, user_id, secret)
        conn.execute(login_state.update().where(login_state.c.user_id == user_id).values(mfa_enrolled_us=at_us))
    conn.execute(users.update().where(users.c.id == user_id).values(**values))
    conn.execute(login_state.update().where(login_state.c.user_id == user_id).values(password_changed_us=at_us))
    audit.record(conn, "admin.user.create_active", at_us=at_us, actor="operator", org_id=org_id,
                 target=f"user:{user_id}", detail={"username": username, "mfa": secret is not None})
    return user_id, secret


# --- a user ID's service history (what the monthly fees bill) ------------------------------


@dataclass(frozen=True)
class ServicePeriod:
    start_us: int
    end_us: int | None  # exclusive; None while the user is in service


def service_history(conn: Connection, user_id: int) -> list[ServicePeriod]:
    """The user's periods of service, oldest first: from its first activation to its
    deactivation, less its breaks (see schema.user_service_breaks). None before activation."""
    row = conn.execute(sa.select(users.c.activated_us, users.c.deactivated_us).where(users.c.id == user_id)).first()
    if row is None or row.activated_us is None:
        return []
    b = user_service_breaks.c
    periods, start = [], row.activated_us
    for r in conn.execute(sa.select(b.disabled_us, b.enabled_us).where(b.user_id == user_id).order_by(b.disabled_us)):
        periods.append(ServicePeriod(start, r.disabled_us))
        start = r.enabled_us
    return periods + [ServicePeriod(start, row.deactivated_us)]


def set_user_status(conn: Connection, user_id: int, status: str, *, actor: AuthenticatedUser | None, at_us: int,
                    source: str | None = None) -> None:
    """Disable a user (it is out of service from ``at_us``; its sessions end) or enable a
    disabled one (in service again from ``at_us``). Enabling records the break, so the months
    the user was disabled stay unbilled however often an invoice is re-run."""
    if status not in ("ACTIVE", "DISABLED"):
        raise AccessError("USER_STATUS", "status may be set to ACTIVE or DISABLED", "status")
    # the row is locked (PostgreSQL; SQLite writers hold the database's lock) so that two
    # operators acting at once cannot both record a break
    row = conn.execute(sa.select(users).where(users.c.id == user_id).with_for_update()).first()
    if row is None:
        raise AccessError("USER_UNKNOWN", f"no user with id {user_id}", "user_id")
    if status == "ACTIVE" and row.password_hash is None:
        raise AccessError("USER_NOT_ENROLLED", "the user has not enrolled: send an invitation instead", "status")
    b = user_service_breaks.c
    last_enable = conn.execute(sa.select(sa.func.max(b.enabled_us)).where(b.user_id == user_id)).scalar()
    if row.status == status:
        when = row.deactivated_us if status == "DISABLED" else (last_enable or row.activated_us)
        since = f" since {iso_market(when)}" if when is not None else ""
        raise AccessError(f"USER_ALREADY_{status}", f"{row.username} is already {status}{since}; accepted: "
                          f"{'enable' if status == 'DISABLED' else 'disable'} it", "status")
    if status == "DISABLED":
        if last_enable is not None and at_us <= last_enable:
            raise AccessError("USER_STATUS_TIME", f"{row.username} was enabled at {iso_market(last_enable)}; "
                              "accepted: a time after that", "at")
        values = dict(status="DISABLED", deactivated_us=at_us)
    else:
        if row.status != "DISABLED":
            raise AccessError("USER_STATUS", f"only a DISABLED user can be enabled; {row.username} is {row.status} "
                              "(an invited user becomes ACTIVE by completing enrollment)", "status")
        if row.deactivated_us is not None and at_us < row.deactivated_us:
            raise AccessError("USER_STATUS_TIME", f"{row.username} was disabled at {iso_market(row.deactivated_us)}; "
                              "accepted: a time at or after that", "at")
        if row.activated_us is not None and row.deactivated_us is not None:  # it served, then stopped: a break
            conn.execute(user_service_breaks.insert().values(
                user_id=user_id, disabled_us=row.deactivated_us, enabled_us=at_us))
        values = dict(status="ACTIVE", deactivated_us=None, activated_us=row.activated_us or at_us)
    conn.execute(users.update().where(users.c.id == user_id).values(**values))
    if status == "DISABLED":  # end the user's web sessions
        from bondtape.access.schema import web_sessions

        conn.execute(web_sessions.update().where(web_sessions.c.user_id == user_id, web_sessions.c.ended_us.is_(None))
                     .values(ended_us=at_us))
    audit.record(conn, f"admin.user.{status.lower()}", at_us=at_us, actor_user_id=actor and actor.user_id,
                 actor=actor and actor.username, org_id=row.org_id, target=f"user:{user_id}", source=source)


def unlock(conn: Connection, user_id: int, *, actor: AuthenticatedUser | None, at_us: int, source: str | None = None) -> None:
    conn.execute(login_state.update().where(login_state.c.user_id == user_id).values(failed_count=0, locked_until_us=None))
    row = user_by_id(conn, user_id)
    audit.record(conn, "admin.user.unlock", at_us=at_us, actor_user_id=actor and actor.user_id,
                 actor=actor and actor.username, org_id=row.org_id if row else None, target=f"user:{user_id}", source=source)


# --- the password step and lockout -------------------------------------------------------


@dataclass(frozen=True)
class PasswordCheck:
    user: object | None  # the users row when the password matched an active, unlocked user
    reason: str | None  # None, or: unknown_user, not_active, locked, bad_password, throttled


def _state(conn: Connection, user_id: int):
    row = conn.execute(sa.select(login_state).where(login_state.c.user_id == user_id)).first()
    if row is None:
        conn.execute(login_state.insert().values(user_id=user_id, failed_count=0))
        row = conn.execute(sa.select(login_state).where(login_state.c.user_id == user_id)).first()
    return row


def is_locked(conn: Connection, user_id: int, now_us: int) -> bool:
    state = _state(conn, user_id)
    return state.locked_until_us is not None and now_us < state.locked_until_us


def register_failure(conn: Connection, user, *, now_us: int, lockout: LockoutPolicy, source: str | None,
                     action: str, reason: str) -> bool:
    """Count a failed attempt; lock the user at the threshold. True when now locked."""
    _state(conn, user.id)
    conn.execute(login_state.update().where(login_state.c.user_id == user.id)
                 .values(failed_count=login_state.c.failed_count + 1, last_failed_us=now_us))
    count = conn.execute(sa.select(login_state.c.failed_count).where(login_state.c.user_id == user.id)).scalar_one()
    audit.record(conn, action, at_us=now_us, outcome="failed", actor_user_id=user.id, actor=user.username,
                 org_id=user.org_id, source=source, detail={"reason": reason, "consecutive_failures": count})
    if count >= lockout.max_failures:
        until = now_us + lockout.lock_minutes * MINUTE_US
        conn.execute(login_state.update().where(login_state.c.user_id == user.id)
                     .values(locked_until_us=until, failed_count=0))
        audit.record(conn, "login.lockout", at_us=now_us, outcome="denied", actor_user_id=user.id, actor=user.username,
                     org_id=user.org_id, source=source, detail={"locked_until_us": until, "failures": count})
        return True
    return False


def register_success(conn: Connection, user_id: int) -> None:
    conn.execute(login_state.update().where(login_state.c.user_id == user_id)
                 .values(failed_count=0, locked_until_us=None))


def _source_failures(source: str, now_us: int, lockout: LockoutPolicy) -> tuple:
    """The audit rows that count against an address: its failed logins within the window."""
    from bondtape.access.schema import audit_log

    since = now_us - lockout.source_window_minutes * MINUTE_US
    return audit_log.c.source == source[:64], audit_log.c.at_us >= since, audit_log.c.outcome == "failed"


def source_throttled(conn: Connection, source: str, *, now_us: int, lockout: LockoutPolicy) -> bool:
    from bondtape.access.schema import audit_log

    failures = conn.execute(sa.select(sa.func.count()).select_from(audit_log)
                            .where(*_source_failures(source, now_us, lockout))).scalar_one()
    return failures >= lockout.max_failures_per_source


def source_retry_after_s(conn: Connection, source: str, *, now_us: int, lockout: LockoutPolicy) -> int:
    """Whole seconds until a throttled address may try again (Retry-After), counting only
    the failures already recorded: :func:`source_throttled` refuses it while
    ``max_failures_per_source`` failures lie within the window, so it is let in once the
    latest that many of them are out of it (refusals while throttled are not failures and
    do not extend the wait)."""
    from bondtape.access.schema import audit_log

    nth_latest = conn.execute(
        sa.select(audit_log.c.at_us).where(*_source_failures(source, now_us, lockout))
        .order_by(audit_log.c.at_us.desc()).offset(max(lockout.max_failures_per_source - 1, 0)).limit(1)
    ).scalar()
    if nth_latest is None:
        return 1
    # counted while at_us >= now - window: free from nth_latest + window + 1 microsecond
    window_us = lockout.source_window_minutes * MINUTE_US
    return max(1, -(-(nth_latest + window_us + 1 - now_us) // 1_000_000))


def password_step(conn: Connection, username: str, password: str, *, now_us: int, source: str | None,
                  lockout: LockoutPolicy, action: str = "login") -> PasswordCheck:
    """Check a user name and password with lockout; audits every failure (never the password).

    Besides the per-user lockout, an address with too many failed logins (over any user
    names: password spraying) within the window is refused until its failures age out.
    """
    if source and source_throttled(conn, source, now_us=now_us, lockout=lockout):
        audit.record(conn, f"{action}.failed", at_us=now_us, outcome="denied", actor=(username or "")[:64],
                     source=source, detail={"reason": "source_throttled"})
        return PasswordCheck(None, "throttled")
    row = user_by_name(conn, username) if username and len(username) <= 64 else None
    if row is None:
        verify_password(None, password)  # same cost as a real check
        audit.record(conn, f"{action}.failed", at_us=now_us, outcome="failed", actor=(username or "")[:64],
                     source=source, detail={"reason": "unknown_user"})
        return PasswordCheck(None, "unknown_user")
    if is_locked(conn, row.id, now_us):
        verify_password(None, password)
        audit.record(conn, f"{action}.failed", at_us=now_us, outcome="denied", actor_user_id=row.id, actor=row.username,
                     org_id=row.org_id, source=source, detail={"reason": "locked"})
        return PasswordCheck(None, "locked")
    if not verify_password(row.password_hash, password):
        locked = register_failure(conn, row, now_us=now_us, lockout=lockout, source=source,
                                  action=f"{action}.failed", reason="bad_password")
        return PasswordCheck(None, "locked" if locked else "bad_password")
    if row.status != "ACTIVE":
        audit.record(conn, f"{action}.failed", at_us=now_us, outcome="denied", actor_user_id=row.id, actor=row.username,
                     org_id=row.org_id, source=source, detail={"reason": "not_active", "status": row.status})
        return PasswordCheck(None, "not_active")
    return PasswordCheck(row, None)


# --- TOTP and recovery codes -------------------------------------------------------------


def totp_for(master_key: bytes, user) -> pyotp.TOTP:
    if not user.totp_secret:
        raise AccessError("MFA_NOT_ENROLLED", "the user has no authenticator enrolled", "totp")
    return pyotp.TOTP(decrypt_totp_secret(master_key, user.id, user.totp_secret), interval=TOTP_STEP_SECONDS)


def verify_totp(conn: Connection, master_key: bytes, user, code: str, *, now_us: int) -> bool:
    """A six-digit code for the current step (one step of drift either way), used once only.

    The step accepted is recorded; a code for that step or any earlier one is refused, so
    a code seen over a shoulder or in a proxy log cannot be replayed.
    """
    code = (code or "").strip().replace(" ", "")
    if not re.fullmatch(r"\d{6}", code):
        return False
    totp = totp_for(master_key, user)
    now_s = now_us // 1_000_000
    step = None
    for drift in (0, -1, 1):
        candidate = now_s // TOTP_STEP_SECONDS + drift
        if pyotp.utils.strings_equal(totp.at(candidate * TOTP_STEP_SECONDS), code):
            step = candidate
            break
    if step is None:
        return False
    _state(conn, user.id)
    result = conn.execute(
        login_state.update()
        .where(login_state.c.user_id == user.id)
        .where(sa.or_(login_state.c.totp_last_step.is_(None), login_state.c.totp_last_step < step))
        .values(totp_last_step=step)
    )
    return result.rowcount == 1


def new_recovery_codes(conn: Connection, user_id: int, *, now_us: int) -> list[str]:
    """Replace the user's recovery codes; the clear codes are returned once, stored hashed."""
    conn.execute(recovery_codes.delete().where(recovery_codes.c.user_id == user_id, recovery_codes.c.used_us.is_(None)))
    codes = [new_recovery_code() for _ in range(RECOVERY_CODE_COUNT)]
    conn.execute(recovery_codes.insert(), [
        {"user_id": user_id, "code_sha256": sha256_hex(c), "created_us": now_us} for c in codes])
    return codes


def use_recovery_code(conn: Connection, user_id: int, code: str, *, now_us: int) -> bool:
    digest = sha256_hex(normalise_recovery_code(code or ""))
    result = conn.execute(
        recovery_codes.update()
        .where(recovery_codes.c.user_id == user_id, recovery_codes.c.code_sha256 == digest,
               recovery_codes.c.used_us.is_(None))
        .values(used_us=now_us)
    )
    return result.rowcount == 1


def recovery_codes_left(conn: Connection, user_id: int) -> int:
    return conn.execute(sa.select(sa.func.count()).select_from(recovery_codes)
                        .where(recovery_codes.c.user_id == user_id, recovery_codes.c.used_us.is_(None))).scalar_one()


# --- the order form and invitations ------------------------------------------------------


def request_user(conn: Connection, *, actor: AuthenticatedUser, org_id: int, username: str, email: str,
                 full_name: str, roles, now_us: int, source: str | None, note: str | None = None) -> int:
    """The order form: an organisation administrator asks for a new user ID. Returns the order id."""
    if not (actor.is_operator or (actor.has_role("org_admin") and actor.org_id == org_id)):
        raise AccessError("NOT_ALLOWED", "only the organisation's administrator or the operator may request a user", "org_id")
    user_id = _new_user(conn, org_id=org_id, username=username, email=email, full_name=full_name, roles=roles,
                        status="REQUESTED", at_us=now_us)
    order_id = conn.execute(order_forms.insert().values(
        user_id=user_id, org_id=org_id, requested_by=actor.user_id, requested_us=now_us, note=(note or None) and note[:500],
    )).inserted_primary_key[0]
    audit.record(conn, "admin.order.request", at_us=now_us, actor_user_id=actor.user_id, actor=actor.username,
                 org_id=org_id, target=f"order:{order_id}", source=source,
                 detail={"username": username.strip().lower(), "roles": str(roles)})
    return int(order_id)


def order_list(conn: Connection, org_id: int | None = None):
    q = (sa.select(order_forms, users.c.username, users.c.email, users.c.full_name, users.c.roles, organisations.c.name.label("org_name"))
         .join(users, users.c.id == order_forms.c.user_id).join(organisations, organisations.c.id == order_forms.c.org_id)
         .order_by(order_forms.c.id))
    if org_id is not None:
        q = q.where(order_forms.c.org_id == org_id)
    return list(conn.execute(q))


def decide_order(conn: Connection, order_id: int, *, approve: bool, actor: AuthenticatedUser, now_us: int,
                 source: str | None, invitation_hours: int, note: str | None = None) -> str | None:
    """The operator approves (returns the invitation token, to be emailed) or rejects (None)."""
    if not actor.is_operator:
        raise AccessError("NOT_ALLOWED", "only the operator approves order forms", "order")
    order = conn.execute(sa.select(order_forms).where(order_forms.c.id == order_id)).first()
    if order is None:
        raise AccessError("ORDER_UNKNOWN", f"no order form {order_id}", "order")
    if order.decision is not None:
        raise AccessError("ORDER_DECIDED", f"order form {order_id} was already {order.decision.lower()}", "order")
    decision = "APPROVED" if approve else "REJECTED"
    conn.execute(order_forms.update().where(order_forms.c.id == order_id).values(
        decision=decision, decided_by=actor.user_id, decided_us=now_us, note=note or order.note))
    audit.record(conn, f"admin.order.{decision.lower()}", at_us=now_us, actor_user_id=actor.user_id, actor=actor.username,
                 org_id=order.org_id, target=f"order:{order_id}", source=source)
    if not approve:
        conn.execute(users.update().where(users.c.id == order.user_id).values(status="REJECTED"))
        return None
    conn.execute(users.update().where(users.c.id == order.user_id).values(status="APPROVED"))
    return issue_invitation(conn, order.user_id, actor=actor, now_us=now_us, source=source, hours=invitation_hours)


def issue_invitation(conn: Connection, user_id: int, *, actor: AuthenticatedUser | None, now_us: int,
                     source: str | None, hours: int) -> str:
    """A one-time enrollment link token, valid for ``hours``; earlier unused ones are revoked."""
    row = user_by_id(conn, user_id)
    if row is None:
        raise AccessError("USER_UNKNOWN", f"no user with id {user_id}", "user_id")
    if row.status in ("REJECTED", "DISABLED", "REQUESTED"):
        raise AccessError("USER_STATUS", f"cannot invite a user whose status is {row.status}", "user_id")
    conn.execute(invitations.update().where(invitations.c.user_id == user_id, invitations.c.used_us.is_(None),
                                            invitations.c.revoked_us.is_(None)).values(revoked_us=now_us))
    token = new_token()
    conn.execute(invitations.insert().values(user_id=user_id, token_sha256=sha256_hex(token), created_us=now_us,
                                             expires_us=now_us + hours * HOUR_US, created_by=actor and actor.user_id))
    if row.status == "APPROVED":
        conn.execute(users.update().where(users.c.id == user_id).values(status="INVITED"))
    audit.record(conn, "enroll.invite", at_us=now_us, actor_user_id=actor and actor.user_id, actor=actor and actor.username,
                 org_id=row.org_id, target=f"user:{user_id}", source=source, detail={"expires_hours": hours})
    return token


def invitation(conn: Connection, token: str, *, now_us: int, source: str | None = None):
    """The (invitation, user) for a usable token, else AccessError (and an audit row)."""
    inv = conn.execute(sa.select(invitations).where(invitations.c.token_sha256 == sha256_hex(token or ""))).first()
    reason = None
    if inv is None:
        reason = ("INVITATION_UNKNOWN", "this enrollment link is not valid")
    elif inv.used_us is not None:
        reason = ("INVITATION_USED", "this enrollment link was already used; ask your administrator for a new one")
    elif inv.revoked_us is not None:
        reason = ("INVITATION_REVOKED", "this enrollment link was replaced by a newer one")
    elif now_us >= inv.expires_us:
        reason = ("INVITATION_EXPIRED", "this enrollment link has expired; ask your administrator for a new one")
    if reason is None:
        user = user_by_id(conn, inv.user_id)
        if user.status not in ("INVITED", "ACTIVE"):
            reason = ("USER_STATUS", f"the account is {user.status}")
    if reason is not None:
        audit.record(conn, "enroll.refused", at_us=now_us, outcome="denied", actor_user_id=inv and inv.user_id,
                     source=source, detail={"code": reason[0]})
        raise AccessError(reason[0], reason[1], "token")
    return inv, user


def begin_enrollment(conn: Connection, master_key: bytes, token: str, password: str, *, now_us: int,
                     source: str | None, lockout: LockoutPolicy) -> str:
    """Step 1: a new user sets a password (an existing user proves theirs); returns the new
    TOTP secret (base32) to show as a QR code. The link stays usable until step 2."""
    inv, user = invitation(conn, token, now_us=now_us, source=source)
    if user.status == "ACTIVE" and user.password_hash:
        if is_locked(conn, user.id, now_us) or not verify_password(user.password_hash, password):
            register_failure(conn, user, now_us=now_us, lockout=lockout, source=source, action="enroll.failed",
                             reason="bad_password")
            raise AccessError("PASSWORD_WRONG", "enter your current password", "password")
        values = {}
    else:
        try:
            check_password_policy(password, username=user.username)
        except WeakPassword as exc:
            raise AccessError("PASSWORD_POLICY", str(exc), "password") from None
        values = {"password_hash": hash_password(password)}
        conn.execute(login_state.update().where(login_state.c.user_id == user.id).values(password_changed_us=now_us))
    secret = new_totp_secret()
    if values:
        conn.execute(users.update().where(users.c.id == user.id).values(**values))
    conn.execute(invitations.update().where(invitations.c.id == inv.id)
                 .values(pending_totp_secret=encrypt_totp_secret(master_key, user.id, secret)))
    audit.record(conn, "enroll.password", at_us=now_us, actor_user_id=user.id, actor=user.username, org_id=user.org_id,
                 source=source)
    return secret


def pending_secret(conn: Connection, master_key: bytes, token: str, *, now_us: int) -> tuple[str, str]:
    """(username, base32 secret) of an enrollment in progress, to redraw its QR code."""
    inv, user = invitation(conn, token, now_us=now_us)
    if not inv.pending_totp_secret:
        raise AccessError("ENROLL_ORDER", "set your password first", "token")
    return user.username, decrypt_totp_secret(master_key, user.id, inv.pending_totp_secret)


@dataclass(frozen=True)
class _PendingAuthenticator:
    id: int
    totp_secret: str


def complete_enrollment(conn: Connection, master_key: bytes, token: str, code: str, *, now_us: int,
                        source: str | None, lockout: LockoutPolicy) -> tuple[int, list[str]]:
    """Step 2: the user proves the authenticator works; the account becomes ACTIVE, the link
    is spent, and ten recovery codes are returned (shown once)."""
    inv, user = invitation(conn, token, now_us=now_us, source=source)
    if not inv.pending_totp_secret or not user.password_hash:
        raise AccessError("ENROLL_ORDER", "set your password first", "token")
    candidate = _PendingAuthenticator(user.id, inv.pending_totp_secret)
    if not verify_totp(conn, master_key, candidate, code, now_us=now_us):
        register_failure(conn, user, now_us=now_us, lockout=lockout, source=source, action="enroll.failed",
                         reason="bad_totp")
        raise AccessError("TOTP_WRONG", "the six-digit code did not match; check the time on your device", "code")
    spent = conn.execute(invitations.update().where(invitations.c.id == inv.id, invitations.c.used_us.is_(None))
                         .values(used_us=now_us))
    if spent.rowcount != 1:
        raise AccessError("INVITATION_USED", "this enrollment link was already used", "token")
    conn.execute(users.update().where(users.c.id == user.id).values(
        status="ACTIVE", activated_us=user.activated_us or now_us, totp_secret=inv.pending_totp_secret))
    conn.execute(login_state.update().where(login_state.c.user_id == user.id).values(mfa_enrolled_us=now_us))
    register_success(conn, user.id)
    codes = new_recovery_codes(conn, user.id, now_us=now_us)
    audit.record(conn, "enroll.complete", at_us=now_us, actor_user_id=user.id, actor=user.username, org_id=user.org_id,
                 source=source)
    return user.id, codes


def users_needing_mfa(conn: Connection) -> list:
    """Active users with a password but no authenticator: to be invited to enroll (seed R5)."""
    return list(conn.execute(
        sa.select(users).join(login_state, login_state.c.user_id == users.c.id)
        .where(users.c.status == "ACTIVE", login_state.c.mfa_enrolled_us.is_(None)).order_by(users.c.id)))

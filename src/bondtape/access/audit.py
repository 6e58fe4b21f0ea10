"""The audit trail: who did what, when, from where. Append-only; searchable by the operator.

Every login and failed login, enrollment step, certificate use, download, report action and
administrative change is one row. ``detail`` is JSON and never holds a secret.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from bondtape.access.schema import audit_log

OUTCOMES = ("ok", "denied", "failed")


def record(
    conn: Connection,
    action: str,
    *,
    at_us: int,
    outcome: str = "ok",
    actor_user_id: int | None = None,
    actor: str | None = None,
    org_id: int | None = None,
    target: str | None = None,
    source: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    if outcome not in OUTCOMES:
        raise ValueError(f"audit outcome must be one of {OUTCOMES}; got {outcome!r}")
    conn.execute(
        audit_log.insert().values(
            at_us=at_us, action=action[:40], outcome=outcome, actor_user_id=actor_user_id,
            actor=(actor or None) and actor[:64], org_id=org_id, target=(target or None) and target[:200],
            source=(source or None) and source[:64],
            detail=json.dumps(detail, sort_keys=True, default=str) if detail else None,
        )
    )


def record_now(db: Engine, action: str, **kwargs: Any) -> None:
    """Record in a transaction of its own (for events outside any other transaction)."""
    with db.begin() as conn:
        record(conn, action, **kwargs)


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at_us: int
    action: str
    outcome: str
    actor_user_id: int | None
    actor: str | None
    org_id: int | None
    target: str | None
    source: str | None
    detail: dict[str, Any] | None


def search(
    conn: Connection,
    *,
    actor: str | None = None,
    action: str | None = None,
    outcome: str | None = None,
    org_id: int | None = None,
    target: str | None = None,
    since_us: int | None = None,
    until_us: int | None = None,
    limit: int = 200,
) -> list[AuditEntry]:
    """Newest first. ``action`` matches a prefix (``login`` finds ``login.failed`` too)."""
    q = sa.select(audit_log)
    if actor:
        q = q.where(audit_log.c.actor == actor)
    if action:
        q = q.where(audit_log.c.action.like(action.replace("%", "") + "%"))
    if outcome:
        q = q.where(audit_log.c.outcome == outcome)
    if org_id is not None:
        q = q.where(audit_log.c.org_id == org_id)
    if target:
        q = q.where(audit_log.c.target == target)
    if since_us is not None:
        q = q.where(audit_log.c.at_us >= since_us)
    if until_us is not None:
        q = q.where(audit_log.c.at_us < until_us)
    q = q.order_by(audit_log.c.id.desc()).limit(max(1, min(limit, 10_000)))
    return [
        AuditEntry(
            r.id, r.at_us, r.action, r.outcome, r.actor_user_id, r.actor, r.org_id, r.target, r.source,
            json.loads(r.detail) if r.detail else None,
        )
        for r in conn.execute(q)
    ]

"""Server-side web sessions: a random cookie, its SHA-256 in the database, idle and absolute
expiry, and the session's CSRF token. Before sign-in, forms carry a pre-session CSRF token
(double-submit cookie)."""
from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bondtape.access.crypto import new_token, sha256_hex
from bondtape.access.schema import users, web_sessions
from bondtape.access.settings import MINUTE_US, AccessSettings

SESSION_COOKIE = "bt_session"
PRE_CSRF_COOKIE = "bt_csrf"


@dataclass(frozen=True)
class Session:
    token_sha256: str
    user_id: int
    csrf_token: str
    method: str
    created_us: int
    expires_us: int


def start(conn: Connection, user_id: int, *, method: str, now_us: int, settings: AccessSettings,
          source: str | None) -> tuple[str, Session]:
    token = new_token()
    session = Session(sha256_hex(token), user_id, new_token(), method, now_us,
                      now_us + settings.session_max_hours * 60 * MINUTE_US)
    conn.execute(web_sessions.insert().values(
        token_sha256=session.token_sha256, user_id=user_id, csrf_token=session.csrf_token, method=method,
        created_us=now_us, last_seen_us=now_us, expires_us=session.expires_us, source=(source or "")[:64]))
    return token, session


def resume(conn: Connection, token: str | None, *, now_us: int, settings: AccessSettings,
           touch: bool = True, touch_every_us: int = 0) -> Session | None:
    """The live session for this cookie, touched (unless ``touch`` is False; with
    ``touch_every_us``, only once that long has passed since the last touch: a live feed
    stream's re-checks, every few seconds); None when unknown, ended, idle, too old, or
    when its user is no longer ACTIVE (disabled by any route or command)."""
    if not token or len(token) > 100:
        return None
    digest = sha256_hex(token)
    row = conn.execute(sa.select(web_sessions, users.c.status).join(users, users.c.id == web_sessions.c.user_id)
                       .where(web_sessions.c.token_sha256 == digest)).first()
    if row is None or row.ended_us is not None:
        return None
    idle_limit = row.last_seen_us + settings.session_idle_minutes * MINUTE_US
    if now_us >= row.expires_us or now_us >= idle_limit or row.status != "ACTIVE":
        conn.execute(web_sessions.update().where(web_sessions.c.token_sha256 == digest).values(ended_us=now_us))
        return None
    if touch and now_us - row.last_seen_us >= touch_every_us:
        conn.execute(web_sessions.update().where(web_sessions.c.token_sha256 == digest).values(last_seen_us=now_us))
    return Session(row.token_sha256, row.user_id, row.csrf_token, row.method, row.created_us, row.expires_us)


def end(conn: Connection, session: Session, *, now_us: int) -> None:
    conn.execute(web_sessions.update().where(web_sessions.c.token_sha256 == session.token_sha256).values(ended_us=now_us))

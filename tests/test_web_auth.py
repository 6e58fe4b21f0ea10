"""Website sign-in, enrollment by invitation, sessions and the attack tests of issue 6."""
from __future__ import annotations

import email
import re
import socket

import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller

from bondtape.access import audit
from bondtape.access.mail import SmtpMailer
from bondtape.access.schema import invitations, users
from bondtape.web.routing import GuardedRoute
from bondtape.web.testing import CSRF_RE, World
from tests.conftest import et

NOW = et(2026, 6, 1, 10, 0, 0)  # MFA-only period


def _world(db, tmp_path):
    w = World(db, tmp_path, NOW)
    w.op_org = w.org("Market Operator", "OPERATOR")
    w.operator = w.user("opadmin", w.op_org, "operator_admin")
    w.firm = w.org("Dealer A", "FIRM", mpid="DLRA")
    w.admin = w.user("dlra-admin", w.firm, "org_admin")
    w.trader = w.user("dlra-trader", w.firm, "trader")
    return w


@pytest.fixture
def world(tmp_path):
    """SQLite only: behaviour that does not depend on the database."""
    from bondtape.db import connect

    engine = connect(f"sqlite:///{tmp_path / 'web.db'}")
    yield _world(engine, tmp_path)
    engine.dispose()


@pytest.fixture
def world_any(db, tmp_path):
    """Every backend (PostgreSQL too when configured): what rests on database semantics."""
    return _world(db, tmp_path)


class _Sink:
    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def smtp():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = _Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    sink.port = port
    yield sink
    controller.stop()


def _enroll_link(message) -> str:
    body = message.get_payload(decode=True).decode()
    return re.search(r"https://testserver(/enroll/[A-Za-z0-9_\-]+)", body).group(1)


def _order_and_approve(world, smtp, username="bob") -> str:
    """The admin submits the order form, the operator approves: returns the emailed link path."""
    world.app.state.mailer = SmtpMailer("127.0.0.1", smtp.port, "bondtape@test")
    admin = world.client()
    assert admin.login(world.admin).status_code == 303
    r = admin.post("/orders", {"username": username, "full_name": "Bob Example", "email": f"{username}@dealer-a.test",
                               "role_trader": "on"}, csrf_from="/orders")
    assert r.status_code == 303, r.text
    world.clock.advance(30)
    op = world.client()
    assert op.login(world.operator).status_code == 303
    page = op.get("/operator/orders")
    order_id = re.search(r"/operator/orders/(\d+)/approve", page.text).group(1)
    r = op.post(f"/operator/orders/{order_id}/approve", csrf_from="/operator/orders")
    assert r.status_code == 303, r.text
    assert smtp.messages and smtp.messages[-1]["To"] == f"{username}@dealer-a.test"
    return _enroll_link(smtp.messages[-1])


def _enroll(world, link, password="my own long passphrase 9"):
    c = world.client()
    token = c.csrf(link)
    r = c.http.post(link, data={"csrf_token": token, "password": password, "password2": password})
    assert r.status_code == 303, r.text
    page = c.get(link + "/authenticator")
    assert 'src="data:image/svg+xml;base64,' in page.text  # the QR code
    secret = re.search(r'<code class="secret">([A-Z2-7 ]+)</code>', page.text).group(1).replace(" ", "")
    import pyotp

    code = pyotp.TOTP(secret).at(world.clock.t // 1_000_000)
    r = c.http.post(link + "/confirm", data={"csrf_token": CSRF_RE.search(page.text).group(1), "code": code})
    assert r.status_code == 200, r.text
    codes = re.findall(r"<code>([A-Z2-9]{4}-[A-Z2-9]{4}-[A-Z2-9]{4})</code>", r.text)
    assert len(codes) == 10
    return secret, codes


def test_order_form_invitation_enrollment_and_sign_in(world_any, smtp):
    world = world_any
    link = _order_and_approve(world, smtp)
    with world.db.connect() as conn:
        assert conn.execute(sa.select(users.c.status).where(users.c.username == "bob")).scalar_one() == "INVITED"
    secret, codes = _enroll(world, link)
    with world.db.connect() as conn:
        bob = conn.execute(sa.select(users).where(users.c.username == "bob")).one()
    assert bob.status == "ACTIVE" and bob.password_hash.startswith("$argon2id$")
    world.clock.advance(30)
    import pyotp

    c = world.client()
    r = c.http.post("/login", data={"csrf_token": c.csrf(), "username": "bob", "password": "my own long passphrase 9",
                                    "code": pyotp.TOTP(secret).at(world.clock.t // 1_000_000), "next": "/account"})
    assert r.status_code == 303 and r.headers["location"] == "/account"
    assert "bob" in c.get("/account").text
    with world.db.connect() as conn:
        actions = [e.action for e in audit.search(conn, limit=100)]
    for expected in ("admin.order.request", "admin.order.approved", "enroll.invite", "enroll.password",
                     "enroll.complete", "login"):
        assert expected in actions


def test_invitation_cannot_be_reused(world, smtp):
    link = _order_and_approve(world, smtp)
    _enroll(world, link)
    c = world.client()
    r = c.get(link)
    assert r.status_code == 400 and "INVITATION_USED" in r.text
    r = c.http.post(link, data={"csrf_token": c.csrf("/login"), "password": "another long password", "password2": "another long password"})
    assert r.status_code == 400 and "INVITATION_USED" in r.text


def test_expired_invitation_is_refused(world, smtp):
    link = _order_and_approve(world, smtp)
    world.clock.advance(world.settings.invitation_hours * 3600 + 1)
    c = world.client()
    r = c.get(link)
    assert r.status_code == 400 and "INVITATION_EXPIRED" in r.text
    with world.db.connect() as conn:
        assert audit.search(conn, action="enroll.refused")[0].detail == {"code": "INVITATION_EXPIRED"}


def test_unknown_invitation_token_is_refused(world):
    r = world.client().get("/enroll/not-a-real-token")
    assert r.status_code == 400 and "INVITATION_UNKNOWN" in r.text


def test_password_guessing_locks_out_on_the_website(world_any):
    world = world_any
    c = world.client()
    for i in range(5):
        r = c.login(world.trader, password=f"wrong guess number {i}")
        assert r.status_code in (401, 423)
    assert r.status_code == 423
    world.clock.advance(31)
    r = c.login(world.trader)  # the right password and code: still locked
    assert r.status_code == 423
    world.clock.advance(31 * 60)
    assert c.login(world.trader).status_code == 303


def test_wrong_totp_codes_count_toward_lockout(world):
    c = world.client()
    for _ in range(5):
        r = c.login(world.trader, code="000000")
    assert r.status_code == 423


def test_totp_code_cannot_be_replayed(world_any):
    world = world_any
    c = world.client()
    code = world.trader.code(world.clock)
    assert c.login(world.trader, code=code).status_code == 303
    r = c.post("/logout")
    assert r.status_code == 303
    world.clock.advance(5)  # the same 30-second step: the code is still "current"
    r = world.client().login(world.trader, code=code)
    assert r.status_code == 401
    with world.db.connect() as conn:
        assert audit.search(conn, action="login.failed")[0].detail["reason"] == "bad_second_factor"


def test_earlier_code_refused_after_later_one(world):
    import pyotp

    earlier = pyotp.TOTP(world.trader.secret).at(world.clock.t // 1_000_000 - 30)  # within the drift window
    assert world.client().login(world.trader).status_code == 303
    assert world.client().login(world.trader, code=earlier).status_code == 401


def test_recovery_code_works_once(world, smtp):
    link = _order_and_approve(world, smtp, username="carol")
    _, codes = _enroll(world, link, password="another long passphrase 8")
    world.clock.advance(60)

    def sign_in(code):
        c = world.client()
        return c.http.post("/login", data={"csrf_token": c.csrf(), "username": "carol",
                                           "password": "another long passphrase 8", "code": code, "next": "/"})

    assert sign_in(codes[0].lower().replace("-", " ")).status_code == 303
    assert sign_in(codes[0]).status_code == 401
    assert sign_in(codes[1]).status_code == 303


def test_password_alone_is_refused_after_cut_over(world):
    assert world.client().login(world.trader, code="").status_code == 401


def test_session_expires_when_idle_and_at_the_absolute_limit(world_any):
    world = world_any
    c = world.client()
    assert c.login(world.trader).status_code == 303
    assert c.get("/account").status_code == 200
    world.clock.advance(world.settings.session_idle_minutes * 60 + 1)
    r = c.get("/account")
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    world.clock.advance(30)
    c2 = world.client()
    assert c2.login(world.trader).status_code == 303
    for _ in range(world.settings.session_max_hours * 60 // 20 + 1):  # active every 20 minutes
        world.clock.advance(20 * 60)
        r = c2.get("/account")
        if r.status_code != 200:
            break
    assert r.status_code == 303


def test_sign_out_ends_the_session_on_the_server(world):
    c = world.client()
    c.login(world.trader)
    cookie = c.http.cookies.get("bt_session")
    c.post("/logout")
    other = world.client()
    other.http.cookies.set("bt_session", cookie, domain="testserver.local")
    r = other.http.get("/account", headers={"cookie": f"bt_session={cookie}"})
    assert r.status_code == 303


def test_session_cookie_is_secure_httponly_samesite(world):
    r = world.client().login(world.trader)
    cookie = r.headers["set-cookie"]
    assert "bt_session=" in cookie and "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert r.headers["x-frame-options"] == "DENY" and r.headers["referrer-policy"] == "no-referrer"


def _post_routes(app):
    out = []
    for r in app.routes:
        if isinstance(r, GuardedRoute) and r.auth == "session" and "POST" in r.methods:
            path = re.sub(r"\{(\w+):int\}", "1", r.path)
            out.append(re.sub(r"\{(\w+)\}", "sometoken", path))
    return out


def test_csrf_is_checked_on_every_form(world):
    """Every POST route (taken from the route table) refuses a missing or foreign token,
    for a signed-in user and for a visitor."""
    signed_in = world.client()
    assert signed_in.login(world.operator).status_code == 303
    visitor = world.client()
    attacker = world.client()
    foreign = attacker.csrf("/login")  # a valid token, but of another browser
    paths = _post_routes(world.app)
    assert "/login" in paths and "/logout" in paths and "/orders" in paths
    for path in paths:
        for client in (signed_in, visitor):
            for data in ({}, {"csrf_token": foreign}, {"csrf_token": ""}):
                r = client.http.post(path, data={**data, "username": "opadmin", "password": "x"})
                assert r.status_code == 403 and "CSRF" in r.text, (path, data, r.status_code)
    with world.db.connect() as conn:
        assert len(audit.search(conn, action="csrf.refused", limit=1000)) == len(paths) * 6
    # the operator is still signed in and nothing changed
    assert signed_in.get("/operator/audit").status_code == 200


def test_secrets_never_stored_or_logged_in_clear(world_any, smtp, caplog):
    world = world_any
    import logging

    caplog.set_level(logging.DEBUG)
    link = _order_and_approve(world, smtp, username="dave")
    password = "unique secret phrase 42"
    secret, codes = _enroll(world, link, password=password)
    world.clock.advance(60)
    c = world.client()
    c.login(world.trader, password="a wrong password here")  # a failed attempt is logged too
    # every value of every row of every table, as text
    dump = []
    with world.db.connect() as conn:
        meta = sa.MetaData()
        meta.reflect(conn)
        for table in meta.sorted_tables:
            for row in conn.execute(sa.select(table)):
                dump.extend(str(v) for v in row)
    text = "\n".join(dump) + "\n" + caplog.text
    for raw in (password, world.trader.password, world.operator.secret, world.trader.secret, secret, *codes,
                "a wrong password here"):
        assert raw not in text, raw
        assert raw.lower() not in text.lower()
    assert any(v.startswith("$argon2id$") for v in dump)


def test_org_admin_may_not_order_roles_its_kind_cannot_have(world):
    c = world.client()
    c.login(world.admin)
    r = c.post("/orders", {"username": "eve", "full_name": "Eve", "email": "eve@x.test", "role_operator_admin": "on"},
               csrf_from="/orders")
    assert r.status_code == 400 and "USER_ROLES" in r.text


def test_state_changing_requests_are_audited_with_user_and_address(world):
    c = world.client()
    c.login(world.admin)
    c.post("/orders", {"username": "frank", "full_name": "Frank", "email": "frank@x.test", "role_viewer": "on"},
           csrf_from="/orders")
    with world.db.connect() as conn:
        [entry] = audit.search(conn, action="request", actor="dlra-admin")
    assert entry.target == "/orders" and entry.source == "testclient"
    assert entry.detail == {"method": "POST", "route": "/orders", "status": 303}


def test_disabling_a_user_ends_their_session(world):
    c = world.client()
    c.login(world.trader)
    assert c.get("/account").status_code == 200
    with world.db.begin() as conn:  # however the status changes, the session no longer works
        conn.execute(users.update().where(users.c.id == world.trader.id).values(status="DISABLED"))
    r = c.get("/account")
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    with world.db.begin() as conn:
        conn.execute(users.update().where(users.c.id == world.trader.id).values(status="ACTIVE"))
    assert c.get("/account").status_code == 303  # the ended session stays ended


def test_basic_credentials_parser_never_fails():
    from hypothesis import given, settings, strategies as st
    from starlette.requests import Request

    from bondtape.web.routing import _basic_credentials

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def check(raw):
        scope = {"type": "http", "headers": [(b"authorization", b"Basic " + raw)]}
        result = _basic_credentials(Request(scope))
        assert result is None or isinstance(result, tuple)

    check()


def test_existing_user_enrolls_mfa_with_the_current_password(world):
    """Seed R5: active users without MFA are invited to enroll; the link asks for their
    current password, not a new one."""
    import pyotp

    from bondtape.access import accounts

    legacy = world.user("legacy-user", world.firm, "viewer", mfa=False)
    assert world.client().login(legacy, code="").status_code == 401  # MFA only: no way in yet
    with world.db.begin() as conn:
        assert [u.username for u in accounts.users_needing_mfa(conn)] == ["legacy-user"]
        token = accounts.issue_invitation(conn, legacy.id, actor=None, now_us=world.clock.t, source="test", hours=72)
    c = world.client()
    link = f"/enroll/{token}"
    assert "confirm your current password" in c.get(link).text
    r = c.http.post(link, data={"csrf_token": c.csrf(link), "password": "not my password at all"})
    assert r.status_code == 400 and "PASSWORD_WRONG" in r.text
    r = c.http.post(link, data={"csrf_token": c.csrf(link), "password": legacy.password})
    assert r.status_code == 303
    page = c.get(link + "/authenticator")
    secret = re.search(r'<code class="secret">([A-Z2-7 ]+)</code>', page.text).group(1).replace(" ", "")
    r = c.http.post(link + "/confirm", data={"csrf_token": CSRF_RE.search(page.text).group(1),
                                             "code": pyotp.TOTP(secret).at(world.clock.t // 1_000_000)})
    assert r.status_code == 200 and "recovery codes" in r.text
    world.clock.advance(31)
    assert world.client().login(legacy, code=pyotp.TOTP(secret).at(world.clock.t // 1_000_000)).status_code == 303
    with world.db.begin() as conn:
        assert accounts.users_needing_mfa(conn) == []


def test_audit_trail_never_records_an_enrollment_token(world):
    """A refused form (no CSRF token) on an enrollment link is audited with its path: the
    link's one-time token must not be in the trail (it would let a reader enroll)."""
    from bondtape.access import accounts
    from bondtape.access.schema import audit_log

    legacy = world.user("token-user", world.firm, "viewer", mfa=False)
    with world.db.begin() as conn:
        token = accounts.issue_invitation(conn, legacy.id, actor=None, now_us=world.clock.t, source="test", hours=72)
    c = world.client()
    for path in (f"/enroll/{token}/confirm", f"/enroll/{token}"):
        assert c.http.post(path, data={"code": "123456"}).status_code == 403
    with world.db.connect() as conn:
        rows = conn.execute(sa.select(audit_log)).all()
    refused = [r for r in rows if r.action == "csrf.refused"]
    assert {r.target for r in refused} >= {"/enroll/[redacted]/confirm", "/enroll/[redacted]"}
    assert not any(token in repr(tuple(r)) for r in rows)


def test_abandoned_re_enrollment_keeps_the_current_authenticator(world):
    """A new invitation for an enrolled user: until step 2 completes, the old device works."""
    from bondtape.access import accounts

    with world.db.begin() as conn:
        token = accounts.issue_invitation(conn, world.trader.id, actor=None, now_us=world.clock.t, source="t", hours=72)
    c = world.client()
    link = f"/enroll/{token}"
    assert c.http.post(link, data={"csrf_token": c.csrf(link), "password": world.trader.password}).status_code == 303
    assert c.get(link + "/authenticator").status_code == 200  # new QR shown, not confirmed
    world.clock.advance(31)
    assert world.client().login(world.trader).status_code == 303  # the old authenticator still signs in


def test_a_live_feed_stream_keeps_its_session_from_going_idle(market, tmp_path):
    """The feed's re-checks (every few seconds) touch the session at most once a minute:
    a subscriber watching the live feed is not signed out at the idle limit, and the
    absolute limit still ends the session."""
    from bondtape.access.api import create_active_user, create_organisation
    from bondtape.access.settings import AccessSettings
    from bondtape.serve import STREAM_TOUCH_US
    from bondtape.web import sessions

    settings = AccessSettings(secret_key=b"k" * 32)
    org = create_organisation(market, "Market Operator", "OPERATOR")
    user = create_active_user(market, org_id=org, username="olive", password="operator password 1",
                              roles=["operator_admin"])
    minute, t = 60_000_000, 1_000_000_000_000
    with market.begin() as conn:
        token, _ = sessions.start(conn, user, method="mfa", now_us=t, settings=settings, source="test")

    def recheck(at: int) -> bool:
        with market.begin() as conn:
            return sessions.resume(conn, token, now_us=at, settings=settings,
                                   touch_every_us=STREAM_TOUCH_US) is not None

    idle = settings.session_idle_minutes * minute
    at = t
    while at < t + 2 * idle:  # a stream re-checking every 5 s for twice the idle limit
        at += 5_000_000
        assert recheck(at), at - t
    with market.connect() as conn:  # one write a minute, not one a re-check
        last = conn.execute(sa.select(sessions.web_sessions.c.last_seen_us)).scalar()
    assert at - STREAM_TOUCH_US <= last <= at
    assert not recheck(t + settings.session_max_hours * 60 * minute)  # the absolute limit ends it

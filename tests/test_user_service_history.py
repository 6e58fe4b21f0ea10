"""A user ID's service history: disabling and enabling keep every period of service, and
the monthly fees bill a user ID for the months it was in service at some moment.

Before, ``bondtape users enable`` (and the operator page's *enable*) cleared the user's
``deactivated_us``: a user disabled in March and enabled in June was billed again for April
and May the next time those months were invoiced, and a past invoice could not be
reproduced. Now enabling records the break, [disabled, enabled), in
``user_service_breaks`` (append-only) before it clears ``deactivated_us``; the periods of
service are the first activation to the deactivation less the breaks.
"""
from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from bondtape.access import accounts
from bondtape.access.model import AccessError
from bondtape.access.schema import audit_log, users
from bondtape.cli import cli
from bondtape.db import _MIGRATIONS, _load_migrations, connect, migrate, schema_migrations
from bondtape.fees import build_invoices
from bondtape.fees.records import set_web_access
from tests.conftest import et

JAN = et(2011, 1, 4, 9, 0)
MARCH_10 = et(2011, 3, 10, 17, 30)
JUNE_15 = et(2011, 6, 15, 8, 0)
HISTORY_MIGRATION = "0014_user_service_breaks"


def billed(db, month):
    """{username: line code} of every user ID billed in ``month``, over all invoices."""
    out = {}
    for inv in build_invoices(db, month)[0]:
        for line in inv.lines:
            for who in line.sources.get("users", []):
                name = who.split(":", 1)[1]
                assert name not in out, f"{name} billed twice in {month}"
                out[name] = (line.code, line.quantity)
    return out


def invoice_json(db, month):
    return json.dumps([inv.as_dict() for inv in build_invoices(db, month)[0]], sort_keys=True)


def firm_with_user(db, username="dana", level="LEVEL_I", data_sets=None, at_us=JAN, org=None):
    with db.begin() as conn:
        if org is None:
            org = accounts.create_organisation(conn, "Dealer A", "FIRM", mpid="DLRA", at_us=at_us)
        uid, _ = accounts.create_active_user(conn, org_id=org, username=username, password="Correct-Horse-42!",
                                             roles="trader", at_us=at_us)
    set_web_access(db, username, level, data_sets)
    return org, uid


def set_status(db, uid, status, at_us):
    with db.begin() as conn:
        accounts.set_user_status(conn, uid, status, actor=None, at_us=at_us, source="test")


def periods(db, uid):
    with db.connect() as conn:
        return [(p.start_us, p.end_us) for p in accounts.service_history(conn, uid)]


def test_disabled_in_march_enabled_in_june_bills_march_and_june_not_april_or_may(db):
    _, uid = firm_with_user(db)
    set_status(db, uid, "DISABLED", MARCH_10)
    set_status(db, uid, "ACTIVE", JUNE_15)
    assert billed(db, "2011-02") == {"dana": ("SYS_LEVEL_I", 1)}
    assert billed(db, "2011-03") == {"dana": ("SYS_LEVEL_I", 1)}  # in service to March 10
    assert billed(db, "2011-04") == {}
    assert billed(db, "2011-05") == {}
    assert billed(db, "2011-06") == {"dana": ("SYS_LEVEL_I", 1)}  # from June 15
    assert billed(db, "2011-07") == {"dana": ("SYS_LEVEL_I", 1)}
    assert periods(db, uid) == [(JAN, MARCH_10), (JUNE_15, None)]
    with db.connect() as conn:
        row = accounts.user_by_id(conn, uid)
    assert (row.status, row.activated_us, row.deactivated_us) == ("ACTIVE", JAN, None)


def test_a_past_month_rerun_after_enable_gives_the_same_invoice(db):
    org, uid = firm_with_user(db)
    firm_with_user(db, "eve", org=org)  # in service throughout: April has an invoice either way
    set_status(db, uid, "DISABLED", MARCH_10)
    before = {m: invoice_json(db, m) for m in ("2011-03", "2011-04", "2011-05")}
    set_status(db, uid, "ACTIVE", JUNE_15)
    assert {m: invoice_json(db, m) for m in before} == before
    set_status(db, uid, "DISABLED", et(2011, 8, 2, 9, 0))  # and again: nothing earlier moves
    assert {m: invoice_json(db, m) for m in before} == before
    assert '"dana"' not in before["2011-04"] and "dana" in before["2011-03"]


def test_several_periods_in_one_month_bill_the_user_id_once(db):
    _, uid = firm_with_user(db)
    for status, day in (("DISABLED", 5), ("ACTIVE", 12), ("DISABLED", 19), ("ACTIVE", 26)):
        set_status(db, uid, status, et(2011, 4, day, 9, 0))
    assert billed(db, "2011-04") == {"dana": ("SYS_LEVEL_I", 1)}
    assert len(periods(db, uid)) == 3


def test_the_single_period_month_rule_is_unchanged(db):
    """From its activation up to, not including, its deactivation: disabled at 00:00 on
    April 1 (market time) the user ID served no moment of April; a microsecond later it did;
    enabled again at 00:00 on June 1 it serves June, not May."""
    org, olga = firm_with_user(db, "olga")
    _, omar = firm_with_user(db, "omar", org=org)
    set_status(db, olga, "DISABLED", et(2011, 4, 1, 0, 0))
    set_status(db, omar, "DISABLED", et(2011, 4, 1, 0, 0, 1))
    set_status(db, olga, "ACTIVE", et(2011, 6, 1, 0, 0))
    assert set(billed(db, "2011-03")) == {"olga", "omar"}
    assert set(billed(db, "2011-04")) == {"omar"}
    assert set(billed(db, "2011-05")) == set()
    assert set(billed(db, "2011-06")) == {"olga"}


def test_level_ii_first_user_id_is_still_the_earliest_activated(db):
    """The 'single or first user ID' rate goes to the earliest activation among the IDs in
    service that month; a re-enabled ID keeps its first activation."""
    org, first = firm_with_user(db, "fay", "LEVEL_II", "CORP")
    _, second = firm_with_user(db, "gus", "LEVEL_II", "CORP", at_us=et(2011, 2, 1, 9, 0), org=org)
    set_status(db, first, "DISABLED", MARCH_10)
    set_status(db, first, "ACTIVE", JUNE_15)
    assert billed(db, "2011-04") == {"gus": ("SYS_LEVEL_II_FIRST_1", 1)}
    assert billed(db, "2011-06") == {"fay": ("SYS_LEVEL_II_FIRST_1", 1), "gus": ("SYS_LEVEL_II_ADDITIONAL_1", 1)}


def test_history_agrees_with_the_audit_trail(db):
    """Every period starts at an audited activation (create, enrollment or enable) and ends
    at an audited disable, at the same instant and for the same user."""
    _, uid = firm_with_user(db)
    times = [MARCH_10, et(2011, 4, 2, 9, 0), et(2011, 5, 3, 9, 0), JUNE_15]
    for status, at in zip(("DISABLED", "ACTIVE", "DISABLED", "ACTIVE"), times):
        set_status(db, uid, status, at)
    with db.connect() as conn:
        events = [(r.action, r.at_us, r.source) for r in conn.execute(
            sa.select(audit_log).where(audit_log.c.target == f"user:{uid}",
                                       audit_log.c.action.like("admin.user.%")).order_by(audit_log.c.id))]
    assert events == [("admin.user.create_active", JAN, None), ("admin.user.disabled", MARCH_10, "test"),
                      ("admin.user.active", times[1], "test"), ("admin.user.disabled", times[2], "test"),
                      ("admin.user.active", JUNE_15, "test")]
    starts = [at for action, at, _ in events if action in ("admin.user.create_active", "admin.user.active")]
    ends = [at for action, at, _ in events if action == "admin.user.disabled"]
    assert periods(db, uid) == list(zip(starts, ends + [None]))


def test_refused_changes_leave_history_and_audit_alone(db):
    _, uid = firm_with_user(db)
    set_status(db, uid, "DISABLED", MARCH_10)
    with db.connect() as conn:
        audited = conn.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar_one()
    cases = [("DISABLED", et(2011, 4, 1, 9, 0), "USER_ALREADY_DISABLED"),  # would move the end to April
             ("ACTIVE", et(2011, 3, 1, 9, 0), "USER_STATUS_TIME")]  # before the period it follows ended
    for status, at, code in cases:
        with pytest.raises(AccessError) as exc, db.begin() as conn:
            accounts.set_user_status(conn, uid, status, actor=None, at_us=at)
        assert (exc.value.code, exc.value.field) == (code, "status" if code != "USER_STATUS_TIME" else "at")
    set_status(db, uid, "ACTIVE", JUNE_15)
    with pytest.raises(AccessError) as exc, db.begin() as conn:
        accounts.set_user_status(conn, uid, "ACTIVE", actor=None, at_us=et(2011, 7, 1))
    assert exc.value.code == "USER_ALREADY_ACTIVE" and "disable" in exc.value.message
    with pytest.raises(AccessError) as exc, db.begin() as conn:  # before the enable it would undo
        accounts.set_user_status(conn, uid, "DISABLED", actor=None, at_us=JUNE_15 - 1)
    assert (exc.value.code, exc.value.field) == ("USER_STATUS_TIME", "at") and "2011-06-15T08:00" in exc.value.message
    assert periods(db, uid) == [(JAN, MARCH_10), (JUNE_15, None)]
    with db.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar_one() == audited + 1


def test_breaks_are_never_rewritten(db):
    """The database refuses to change or delete a recorded break."""
    from bondtape.access.schema import user_service_breaks

    _, uid = firm_with_user(db)
    set_status(db, uid, "DISABLED", MARCH_10)
    set_status(db, uid, "ACTIVE", JUNE_15)
    b = user_service_breaks.c
    for stmt in (user_service_breaks.update().where(b.user_id == uid).values(enabled_us=MARCH_10 + 1),
                 user_service_breaks.update().where(b.user_id == uid).values(disabled_us=JUNE_15 - 1),
                 user_service_breaks.delete().where(b.user_id == uid)):
        with pytest.raises(sa.exc.DBAPIError), db.begin() as conn:
            conn.execute(stmt)
    with db.connect() as conn:
        assert [tuple(r) for r in conn.execute(sa.select(b.disabled_us, b.enabled_us))] == [(MARCH_10, JUNE_15)]
    assert billed(db, "2011-04") == {}


def test_a_disabled_user_still_cannot_sign_in_and_can_after_enable(db):
    from bondtape.access.settings import LockoutPolicy

    _, uid = firm_with_user(db)

    def check(at):
        with db.begin() as conn:
            return accounts.password_step(conn, "dana", "Correct-Horse-42!", now_us=at, source="test",
                                          lockout=LockoutPolicy())

    set_status(db, uid, "DISABLED", MARCH_10)
    assert check(MARCH_10 + 1).reason == "not_active"
    set_status(db, uid, "ACTIVE", JUNE_15)
    ok = check(JUNE_15 + 1)
    assert ok.reason is None and ok.user.id == uid


def test_cli_disable_enable_keeps_history_and_errors_are_codes(db, db_url, monkeypatch):
    """``bondtape users disable`` / ``enable`` at the given times, then ``users history``."""
    import bondtape.access.cli as access_cli

    _, uid = firm_with_user(db)
    runner = CliRunner()
    clock = iter([MARCH_10, JUNE_15, et(2011, 7, 1), et(2011, 7, 2), et(2011, 7, 3)])
    monkeypatch.setattr(access_cli, "now_us", lambda: next(clock))

    def users_cmd(*args):
        r = runner.invoke(cli, ["users", *args, "--db", db_url])
        assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
        assert "Traceback" not in r.output
        return r.exit_code, r.output

    assert users_cmd("disable", "dana") == (0, "dana disabled\n")
    assert users_cmd("enable", "dana") == (0, "dana enabled\n")
    code, out = users_cmd("enable", "dana")
    assert code == 1 and "USER_ALREADY_ACTIVE (status)" in out
    assert users_cmd("disable", "dana")[0] == 0
    code, out = users_cmd("disable", "dana")
    assert code == 1 and "USER_ALREADY_DISABLED (status)" in out
    code, out = users_cmd("disable", "nobody")
    assert code == 1 and "USER_UNKNOWN (username)" in out
    assert billed(db, "2011-04") == {} and set(billed(db, "2011-06")) == {"dana"}
    code, out = users_cmd("history", "dana", "--format", "json")
    assert code == 0, out
    assert json.loads(out) == [
        {"user": "dana", "period": 1, "start": "2011-01-04T09:00:00-05:00", "end": "2011-03-10T17:30:00-05:00"},
        {"user": "dana", "period": 2, "start": "2011-06-15T08:00:00-04:00", "end": "2011-07-02T00:00:00-04:00"},
    ]


def _database_before_history(db_url):
    """A database as it was before ``0014_user_service_breaks``: every other migration."""
    _load_migrations()
    engine = connect(db_url, migrate_schema=False)
    with engine.begin() as conn:
        schema_migrations.create(conn, checkfirst=True)
        for mid in sorted(m for m in _MIGRATIONS if m != HISTORY_MIGRATION):
            _MIGRATIONS[mid].upgrade(conn)
            conn.execute(schema_migrations.insert().values(id=mid, applied_us=0))
        assert not sa.inspect(conn).has_table("user_service_breaks")
    return engine


def test_migration_makes_each_users_dates_its_first_period(db_url):
    engine = _database_before_history(db_url)
    try:
        with engine.begin() as conn:
            org = conn.execute(sa.text("INSERT INTO organisations (name, kind, mpid, created_us) "
                                       "VALUES ('Dealer A', 'FIRM', 'DLRA', 0) RETURNING id")).scalar_one()
            rows = {"ann": ("ACTIVE", JAN, None), "ben": ("DISABLED", JAN, MARCH_10),
                    "cat": ("INVITED", None, None)}
            ids = {}
            for name, (status, on, off) in rows.items():
                ids[name] = conn.execute(users.insert().values(
                    org_id=org, username=name, email=f"{name}@example.com", full_name=name, roles="trader",
                    status=status, web_access="LEVEL_I", password_hash="x", created_us=0,
                    activated_us=on, deactivated_us=off)).inserted_primary_key[0]
                conn.execute(sa.text("INSERT INTO login_state (user_id, failed_count) VALUES (:u, 0)"),
                             {"u": ids[name]})
        assert migrate(engine) == [HISTORY_MIGRATION]
        assert sa.inspect(engine).has_table("user_service_breaks")
        assert periods(engine, ids["ann"]) == [(JAN, None)]
        assert periods(engine, ids["ben"]) == [(JAN, MARCH_10)]
        assert periods(engine, ids["cat"]) == []
        # what the users' dates billed before: both in March (ben to March 10), ann alone in April
        assert set(billed(engine, "2011-03")) == {"ann", "ben"} and set(billed(engine, "2011-04")) == {"ann"}
        before = {m: invoice_json(engine, m) for m in ("2011-03", "2011-04", "2011-05")}
        assert migrate(engine) == []  # once
        # ben, enabled after the migration, is not billed again for the months he was off
        with engine.begin() as conn:
            accounts.set_user_status(conn, ids["ben"], "ACTIVE", actor=None, at_us=JUNE_15)
        assert {m: invoice_json(engine, m) for m in before} == before
        assert set(billed(engine, "2011-05")) == {"ann"} and set(billed(engine, "2011-06")) == {"ann", "ben"}
    finally:
        engine.dispose()


def test_enrollment_starts_the_first_period_and_re_enrollment_adds_none(db):
    import os

    import pyotp

    from bondtape.access.model import AuthenticatedUser
    from bondtape.access.settings import LockoutPolicy

    key, password = os.urandom(32), "Correct-Horse-42!"
    with db.begin() as conn:
        op_org = accounts.create_organisation(conn, "Operator", "OPERATOR", at_us=JAN)
        org = accounts.create_organisation(conn, "Dealer A", "FIRM", mpid="DLRA", at_us=JAN)
        op_id, _ = accounts.create_active_user(conn, org_id=op_org, username="op-admin", password=password,
                                               roles="operator_admin", at_us=JAN)
        op = accounts.authenticated(conn, op_id, "mfa")
        order = accounts.request_user(conn, actor=op, org_id=org, username="hal", email="hal@example.com",
                                      full_name="Hal", roles="trader", now_us=JAN, source="test")
        token = accounts.decide_order(conn, order, approve=True, actor=op, now_us=JAN, source="test",
                                      invitation_hours=72)
    assert isinstance(op, AuthenticatedUser)

    def enroll(token, at):
        with db.begin() as conn:
            secret = accounts.begin_enrollment(conn, key, token, password, now_us=at, source="test",
                                               lockout=LockoutPolicy())
            code = pyotp.TOTP(secret).at(at // 1_000_000)
            return accounts.complete_enrollment(conn, key, token, code, now_us=at, source="test",
                                                lockout=LockoutPolicy())[0]

    enrolled = et(2011, 1, 5, 9, 0)
    uid = enroll(token, enrolled)
    assert periods(db, uid) == [(enrolled, None)]
    with db.begin() as conn:  # a new authenticator: the same period goes on
        again = accounts.issue_invitation(conn, uid, actor=op, now_us=et(2011, 3, 1), source="test", hours=72)
    assert enroll(again, et(2011, 3, 1, 9, 0)) == uid
    assert periods(db, uid) == [(enrolled, None)]
    set_status(db, uid, "DISABLED", et(2011, 3, 2))
    with db.connect() as conn:
        [started] = conn.execute(sa.select(audit_log.c.at_us).where(audit_log.c.action == "enroll.complete",
                                                                    audit_log.c.actor_user_id == uid)
                                 .order_by(audit_log.c.id).limit(1)).scalars()
    assert periods(db, uid) == [(started, et(2011, 3, 2))]


def test_a_user_written_by_hand_is_billed_by_its_dates(db):
    """A users row written directly (a script, the fees tests) is billed [activated_us,
    deactivated_us) as before; enabled, its dates until then are its first period."""
    org, _ = firm_with_user(db, "eve")
    with db.begin() as conn:
        uid = conn.execute(users.insert().values(
            org_id=org, username="ivy", email="ivy@example.com", full_name="Ivy", roles="trader", status="DISABLED",
            web_access="LEVEL_I", password_hash="x", created_us=0, activated_us=JAN,
            deactivated_us=MARCH_10)).inserted_primary_key[0]
    assert periods(db, uid) == [(JAN, MARCH_10)]
    assert set(billed(db, "2011-03")) == {"eve", "ivy"} and set(billed(db, "2011-04")) == {"eve"}
    set_status(db, uid, "ACTIVE", JUNE_15)
    assert periods(db, uid) == [(JAN, MARCH_10), (JUNE_15, None)]
    assert set(billed(db, "2011-03")) == {"eve", "ivy"} and set(billed(db, "2011-05")) == {"eve"}
    assert set(billed(db, "2011-06")) == {"eve", "ivy"}


def test_operator_page_disable_and_enable_keep_history(market, tmp_path):
    from bondtape.web.testing import World

    # 2026: the website's sign-in with a code (earlier years' policy wants a certificate)
    jan, march_10, june_15 = et(2026, 1, 5, 9, 0), et(2026, 3, 10, 17, 30), et(2026, 6, 15, 8, 0)
    w = World(market, tmp_path, jan, cookie_secure=False)
    op_org, org = w.org("Operator", "OPERATOR"), w.org("Dealer A", "FIRM", mpid="DLRA")
    op, trader = w.user("op-admin", op_org, "operator_admin"), w.user("a-trader", org, "trader")
    set_web_access(market, "a-trader", "LEVEL_I")

    def act(action, at):  # signed in a minute before: a session lasts hours, not months
        w.clock.t = at - 60_000_000
        site = w.client()
        assert site.login(op).status_code == 303
        w.clock.t = at
        return site.post("/operator/users", {"user_id": str(trader.id), "action": action},
                         csrf_from="/operator/users")

    try:
        assert act("disable", march_10).status_code == 303
        assert act("enable", june_15).status_code == 303
        again = act("enable", june_15 + 60_000_000)
        assert again.status_code == 400 and "USER_ALREADY_ACTIVE" in again.text and "Traceback" not in again.text
        assert periods(market, trader.id) == [(jan, march_10), (june_15, None)]
        assert billed(market, "2026-04") == {} and set(billed(market, "2026-06")) == {"a-trader"}
        with market.connect() as conn:
            who = [(r.action, r.actor, r.at_us) for r in conn.execute(
                sa.select(audit_log).where(audit_log.c.target == f"user:{trader.id}",
                                           audit_log.c.action.in_(("admin.user.disabled", "admin.user.active")))
                .order_by(audit_log.c.id))]
        assert who == [("admin.user.disabled", "op-admin", march_10), ("admin.user.active", "op-admin", june_15)]
    finally:
        w.close()

"""The authorization matrix: every role against every route, feed, download and FIX logon.

Generated from the route table and from ``authz.ACTIONS``: a new route or action without
an expectation here fails, and so does a route without an access rule.
"""
from __future__ import annotations

import re

import pytest
from starlette.routing import Mount

from bondtape.access import entitlements
from bondtape.access.authz import ACTIONS, HistoricSet, decide
from bondtape.engine import Engine
from bondtape.web.routing import GuardedRoute
from bondtape.web.testing import World
from tests.conftest import et
from tests.helpers import new

NOW = et(2026, 6, 1, 10, 0, 0)
SIGNED_IN = {"operator", "firm_admin", "trader", "viewer", "other_trader", "subscriber", "unentitled", "nonpro"}
EVERYONE = SIGNED_IN | {"anonymous"}
FIRM_A = {"operator", "firm_admin", "trader", "viewer"}

# (method, route path) -> who may use it
EXPECTED_ROUTES = {
    ("GET", "/"): EVERYONE,
    ("GET", "/login"): EVERYONE,
    ("POST", "/login"): EVERYONE,
    ("POST", "/logout"): SIGNED_IN,
    ("GET", "/enroll/{token}"): EVERYONE,
    ("POST", "/enroll/{token}"): EVERYONE,
    ("GET", "/enroll/{token}/authenticator"): EVERYONE,
    ("POST", "/enroll/{token}/confirm"): EVERYONE,
    ("GET", "/account"): SIGNED_IN,
    ("POST", "/account/recovery-codes"): SIGNED_IN,
    ("GET", "/account/attest"): SIGNED_IN,
    ("POST", "/account/attest"): SIGNED_IN,
    ("GET", "/orders"): {"operator", "firm_admin"},
    ("POST", "/orders"): {"operator", "firm_admin"},
    ("GET", "/operator/orders"): {"operator"},
    ("POST", "/operator/orders/{order_id:int}/approve"): {"operator"},
    ("POST", "/operator/orders/{order_id:int}/reject"): {"operator"},
    ("GET", "/operator/audit"): {"operator"},
    ("GET", "/reports/{control_number:int}"): FIRM_A,
    ("GET", "/download/reference/securities-{day}.csv"): FIRM_A | {"other_trader", "subscriber"},
    ("GET", "/download/historic/"): SIGNED_IN,
    ("GET", "/download/historic/{data_set}/{year:int}/{path:path}"): {"operator", "subscriber"},
    # trading pages (routes_trading)
    ("GET", "/trade/new"): {"trader", "other_trader"},
    ("POST", "/trade/new"): {"trader", "other_trader"},
    ("GET", "/journal"): FIRM_A | {"other_trader"},
    ("GET", "/journal.csv"): FIRM_A | {"other_trader"},
    ("GET", "/reports/{control_number:int}/history"): FIRM_A,
    ("POST", "/reports/{control_number:int}/cancel"): {"trader"},
    ("POST", "/reports/{control_number:int}/reverse"): {"trader"},
    ("GET", "/reports/{control_number:int}/correct"): {"trader"},
    ("POST", "/reports/{control_number:int}/correct"): {"trader"},
    # market data (routes_market)
    ("GET", "/market"): EVERYONE,
    ("GET", "/market/security"): EVERYONE,
    # operator pages (routes_operator)
    ("GET", "/operator"): {"operator"},
    ("GET", "/operator/firms"): {"operator"},
    ("GET", "/operator/users"): {"operator"},
    ("POST", "/operator/users"): {"operator"},
    ("GET", "/operator/securities"): {"operator"},
    ("GET", "/operator/halts"): {"operator"},
    ("POST", "/operator/halts/{action}"): {"operator"},
    # Historic data, ad-hoc requests, invoices (routes_data)
    ("GET", "/data"): SIGNED_IN,
    ("GET", "/data/requests"): SIGNED_IN,
    ("POST", "/data/requests"): SIGNED_IN,
    ("GET", "/data/requests/extract.csv"): SIGNED_IN,
    ("GET", "/operator/requests"): {"operator"},
    ("POST", "/operator/requests/{action}"): {"operator"},
    ("GET", "/invoices"): {"operator", "firm_admin"},
    # REST API (web/api.py)
    ("GET", "/openapi.json"): EVERYONE,
    ("GET", "/api/v1/time-and-sales"): EVERYONE,
    ("POST", "/api/v1/reports"): {"trader", "other_trader"},
    ("GET", "/api/v1/reports"): FIRM_A | {"other_trader"},
    ("GET", "/api/v1/reports/{control_number:int}"): FIRM_A | {"other_trader"},
    ("POST", "/api/v1/reports/{control_number:int}/cancel"): {"trader", "other_trader"},
    ("POST", "/api/v1/reports/{control_number:int}/reverse"): {"trader", "other_trader"},
    ("POST", "/api/v1/reports/{control_number:int}/correct"): {"trader", "other_trader"},
    ("POST", "/api/v1/bulk"): {"trader", "other_trader"},
    ("GET", "/api/v1/securities"): FIRM_A | {"other_trader", "subscriber"},
    # operations (routes_ops): health public, metrics the operator (or a scrape token)
    ("GET", "/healthz"): EVERYONE,
    ("GET", "/readyz"): EVERYONE,
    ("GET", "/metrics"): {"operator"},
}

# action -> [(resource, who may)]
EXPECTED_ACTIONS = {
    "public": [(None, EVERYONE)],
    "account": [(None, SIGNED_IN)],
    "operator": [(None, {"operator"})],
    "org.admin": [(None, {"operator", "firm_admin"})],
    "trade.report": [("DLRA", {"trader"}), ("DLRB", {"other_trader"})],
    "trade.view": [("DLRA", FIRM_A), ("DLRB", {"operator", "other_trader"})],
    "trade.act": [("DLRA", {"trader"}), ("DLRB", {"other_trader"})],
    "fix.logon": [(None, {"trader", "other_trader"})],
    "feed.realtime": [("CORP", {"operator", "subscriber"}), ("AGCY", {"operator"}), ("144A", {"operator"})],
    "download.reference": [(None, FIRM_A | {"other_trader", "subscriber"})],
    "download.historic": [
        (HistoricSet("CORP", 2023), {"operator", "subscriber"}),
        (HistoricSet("AGCY", 2023), {"operator"}),
        (HistoricSet("CORP", 2025), set()),  # not yet 18 months old on 2026-06-01
    ],
}


@pytest.fixture
def world(market, tmp_path):
    w = World(market, tmp_path, NOW)
    op = w.org("Operator", "OPERATOR")
    a = w.org("Dealer A", "FIRM", mpid="DLRA")
    b = w.org("Dealer B", "FIRM", mpid="DLRB")
    vendor = w.org("Vendor V", "VENDOR")
    bare = w.org("Vendor W", "VENDOR")
    person = w.org("Pat Person", "NON_PROFESSIONAL")
    w.users = {
        "operator": w.user("op-admin", op, "operator_admin"),
        "firm_admin": w.user("a-admin", a, "org_admin"),
        "trader": w.user("a-trader", a, "trader"),
        "viewer": w.user("a-viewer", a, "viewer"),
        "other_trader": w.user("b-trader", b, "trader"),
        "subscriber": w.user("v-sub", vendor, "subscriber"),
        "unentitled": w.user("w-sub", bare, "subscriber"),
        "nonpro": w.user("pat", person, "subscriber"),
    }
    with market.begin() as conn:
        for org, product, data_set, year in ((vendor, "REALTIME", "CORP", None), (vendor, "REFERENCE", "", None),
                                             (vendor, "HISTORIC", "CORP", 2023), (vendor, "HISTORIC", "CORP", 2025),
                                             (person, "REALTIME", "CORP", None)):
            entitlements.grant(conn, org_id=org, product=product, data_set=data_set, year=year, start_us=NOW - 1,
                               actor=None, at_us=NOW)
    [result] = Engine(market).submit([new(mpid="DLRA", ref="m1")])
    w.report = result.control_number
    return w


def _actors(world):
    from bondtape.access import accounts

    with world.db.connect() as conn:
        actors = {name: accounts.authenticated(conn, u.id, "mfa") for name, u in world.users.items()}
    actors["anonymous"] = None
    return actors


def test_every_route_has_a_rule_and_an_expectation(world):
    seen = set()
    for r in world.app.routes:
        if isinstance(r, Mount) and r.path == "/static":
            continue
        assert isinstance(r, GuardedRoute), f"route {r.path} does not declare an access rule"
        for method in r.methods - {"HEAD"}:
            key = (method, r.path)
            assert key in EXPECTED_ROUTES, f"no authorization expectation for {key}: add it to EXPECTED_ROUTES"
            seen.add(key)
    assert seen == set(EXPECTED_ROUTES), f"expectations for routes that do not exist: {set(EXPECTED_ROUTES) - seen}"


def test_every_action_has_an_expectation(world):
    assert set(EXPECTED_ACTIONS) == set(ACTIONS)


def test_action_matrix(world):
    actors = _actors(world)
    with world.db.connect() as conn:
        for action, cases in EXPECTED_ACTIONS.items():
            for resource, allowed in cases:
                for name, actor in actors.items():
                    got = decide(conn, actor, action, resource, now_us=NOW).allowed
                    assert got == (name in allowed), (action, resource, name, got)


def test_non_professional_needs_the_attestation(world):
    actors = _actors(world)
    pat = actors["nonpro"]
    with world.db.connect() as conn:
        assert decide(conn, pat, "feed.realtime", "CORP", now_us=NOW).reason == "no_attestation"
    answers = {k: True for k in entitlements.NON_PROFESSIONAL_STATEMENTS}
    with world.db.begin() as conn:
        with pytest.raises(Exception) as refused:
            entitlements.attest_non_professional(conn, pat, {**answers, "no_redistribution": False}, "Pat Person",
                                                 at_us=NOW, source="test")
        assert refused.value.code == "ATTEST_INCOMPLETE"
    with world.db.begin() as conn:
        entitlements.attest_non_professional(conn, pat, answers, "Pat Person", at_us=NOW, source="test")
    with world.db.connect() as conn:
        assert decide(conn, pat, "feed.realtime", "CORP", now_us=NOW).allowed


def _sample_path(world, path: str) -> str:
    path = path.replace("{control_number:int}", str(world.report)).replace("{order_id:int}", "999")
    path = path.replace("{day}", "2026-06-01").replace("{data_set}", "corporate").replace("{year:int}", "2023")
    path = path.replace("{path:path}", "manifest.json")
    return re.sub(r"\{(\w+)\}", "sometoken", path)


def _sample_resource(world, r: GuardedRoute):
    if r.rule == "download.historic":
        return HistoricSet("CORP", 2023)
    return None


def test_route_matrix(world):
    """Session routes through the app with each role signed in; certificate routes (REST,
    downloads) through the same decision the guard makes (their TLS wiring is tested in
    test_web_auth_tls)."""
    actors = _actors(world)
    clients = {"anonymous": world.client()}
    for name, user in world.users.items():
        clients[name] = world.client()
        assert clients[name].login(user).status_code == 303, name
    routes = [r for r in world.app.routes if isinstance(r, GuardedRoute)]
    routes.sort(key=lambda r: r.path == "/logout")  # sign out last
    for r in routes:
        for method in sorted(r.methods - {"HEAD"}):
            allowed = EXPECTED_ROUTES[(method, r.path)]
            if r.auth == "certificate":
                with world.db.connect() as conn:
                    for name, actor in actors.items():
                        got = decide(conn, actor, r.rule, _sample_resource(world, r), now_us=NOW).allowed
                        assert got == (name in allowed), (method, r.path, name)
                continue
            path = _sample_path(world, r.path)
            for name, client in clients.items():
                if method == "GET":
                    resp = client.get(path)
                else:
                    resp = client.post(path, {"username": "nobody", "password": "x"})
                denied = resp.status_code in (403, 404) or (
                    resp.status_code == 303 and resp.headers["location"].startswith("/login?next="))
                if r.path == "/reports/{control_number:int}" and name == "other_trader":
                    assert resp.status_code == 404  # another firm's report: as if it did not exist
                assert denied == (name not in allowed), (method, r.path, name, resp.status_code)

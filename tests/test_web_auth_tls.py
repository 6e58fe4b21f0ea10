"""Real TLS on 127.0.0.1: the download service needs the user's client certificate AND the
login and password; the website's certificate sign-in follows the effective-dated policy."""
from __future__ import annotations

import base64
import datetime as dt
import json
import re
import ssl

import httpx
import pytest

from bondtape.access import audit, entitlements
from bondtape.access.ca import CertificateAuthority, revoke
from bondtape.access.policy import parse_policy
from bondtape.reference.store import upsert_securities
from bondtape.web.testing import World
from bondtape.web.tls import BackgroundServer, server_config
from tests.conftest import STANDARD_SECURITIES

DAY_US = 86_400 * 1_000_000


def policy_around(today):
    """The seed's shape, dated around today: TLS checks certificates against the real clock,
    so the test moves the policy, not the certificates, in time."""
    day = lambda n: (today + dt.timedelta(days=n)).isoformat()  # noqa: E731
    return parse_policy(f"""
[[period]]
from = "{day(-30)}"
website = "certificate"
[[period]]
from = "{day(2)}"
website = "parallel"
[[period]]
from = "{day(10)}"
website = "mfa_only"
""")


@pytest.fixture
def tls(tmp_path):
    """SQLite: the TLS wiring does not depend on the database (test_web_auth covers both)."""
    from bondtape.clock import market_date, now_us
    from bondtape.db import connect

    db = connect(f"sqlite:///{tmp_path / 'tls.db'}")

    wall = now_us()
    today = market_date(wall)
    w = World(db, tmp_path, wall, policy=policy_around(today))
    w.young = today.year - 1  # never 18 months old during this year
    w.ca = CertificateAuthority.create(w.settings.ca_dir, now_us=wall)
    cert, key = w.ca.issue_server(["127.0.0.1", "localhost"], tmp_path / "server", now_us=wall)
    with db.begin() as conn:
        upsert_securities(conn, STANDARD_SECURITIES)
    vendor = w.org("Vendor V", "VENDOR")
    other = w.org("Vendor W", "VENDOR")
    firm = w.org("Dealer A", "FIRM", mpid="DLRA")
    w.sub = w.user("vendor-sub", vendor, "subscriber")
    w.other_sub = w.user("other-sub", other, "subscriber")
    w.trader = w.user("dlra-trader", firm, "trader")
    with db.begin() as conn:
        for product, data_set, year in (("REFERENCE", "", None), ("HISTORIC", "CORP", 2023), ("HISTORIC", "CORP", w.young)):
            entitlements.grant(conn, org_id=vendor, product=product, data_set=data_set, year=year, start_us=wall - DAY_US,
                               actor=None, at_us=wall)
    for name, year in (("corporate", 2023), ("agency", 2023), ("corporate", w.young)):
        folder = w.settings.historic_dir / name / str(year)
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"data_set": name, "year": year}))
    (w.settings.historic_dir / "secret.txt").write_text("not for download")
    w.certs = {}
    for user in (w.sub, w.other_sub, w.trader):
        with db.begin() as conn:
            cert_pem, key_pem, serial = w.ca.issue_client(conn, user.id, now_us=wall)
        (tmp_path / f"{user.username}.crt").write_bytes(cert_pem)
        (tmp_path / f"{user.username}.key").write_bytes(key_pem)
        w.certs[user.username] = (tmp_path / f"{user.username}.crt", tmp_path / f"{user.username}.key", serial)
    w.today_file = f"/download/reference/securities-{today.isoformat()}.csv"
    config = server_config(w.app, host="127.0.0.1", port=0, certfile=cert, keyfile=key, ca_certs=w.ca.cert_path)
    with BackgroundServer(config) as server:
        w.base = f"https://127.0.0.1:{server.port}"
        yield w
    db.dispose()


def client(w, cert_of=None, ca_path=None):
    ctx = ssl.create_default_context(cafile=str(w.ca.cert_path))
    if cert_of is not None:
        crt, key, _ = w.certs[cert_of] if isinstance(cert_of, str) else cert_of
        ctx.load_cert_chain(str(crt), str(key))
    return httpx.Client(base_url=w.base, verify=ctx, timeout=10, follow_redirects=False)


def basic(user, password=None):
    token = base64.b64encode(f"{user.username}:{password or user.password}".encode()).decode()
    return {"authorization": f"Basic {token}"}




def test_certificate_and_password_download_the_reference_file(tls):
    with client(tls, "vendor-sub") as c:
        r = c.get(tls.today_file, headers=basic(tls.sub))
    assert r.status_code == 200, r.text
    lines = r.text.splitlines()
    assert lines[0] == "cusip,symbol,issuer,coupon,maturity,data_set,grade,rule_144a"
    assert len(lines) == 1 + len(STANDARD_SECURITIES)
    with tls.db.connect() as conn:
        actions = [(e.action, e.actor) for e in audit.search(conn, limit=20)]
    assert ("download", "vendor-sub") in actions and ("cert.use", "vendor-sub") in actions


def test_certificate_without_password_is_refused(tls):
    with client(tls, "vendor-sub") as c:
        r = c.get(tls.today_file)
        assert r.status_code == 401 and r.json()["code"] == "LOGIN_REQUIRED"
        r = c.get(tls.today_file, headers=basic(tls.sub, "not the password at all"))
        assert r.status_code == 401 and r.json()["code"] == "LOGIN_FAILED"


def test_password_without_certificate_is_refused(tls):
    with client(tls, None) as c:
        r = c.get(tls.today_file, headers=basic(tls.sub))
    assert r.status_code == 403 and r.json()["code"] == "CERT_NO_CERTIFICATE"


def test_revoked_certificate_is_refused_at_once(tls):
    with client(tls, "vendor-sub") as c:
        assert c.get(tls.today_file, headers=basic(tls.sub)).status_code == 200
        with tls.db.begin() as conn:
            revoke(conn, tls.certs["vendor-sub"][2], now_us=tls.clock.t, reason="key compromise")
        r = c.get(tls.today_file, headers=basic(tls.sub))
    assert r.status_code == 403 and r.json()["code"] == "CERT_REVOKED"


def test_another_users_certificate_is_refused(tls):
    with client(tls, "other-sub") as c:
        r = c.get(tls.today_file, headers=basic(tls.sub))
    assert r.status_code == 403 and r.json()["code"] == "CERT_USER_MISMATCH"


def test_certificate_from_another_authority_fails_the_handshake(tls, tmp_path):
    from bondtape.clock import now_us

    rogue = CertificateAuthority.create(tmp_path / "rogue", now_us=now_us())
    with tls.db.begin() as conn:  # even a certificate on record, if signed by another CA
        cert_pem, key_pem, serial = rogue.issue_client(conn, tls.sub.id, now_us=now_us())
    (tmp_path / "rogue.crt").write_bytes(cert_pem)
    (tmp_path / "rogue.key").write_bytes(key_pem)
    with client(tls, (tmp_path / "rogue.crt", tmp_path / "rogue.key", serial)) as c:
        with pytest.raises(httpx.TransportError):
            c.get(tls.today_file, headers=basic(tls.sub))


def test_historic_download_checks_entitlement_and_aging(tls):
    with client(tls, "vendor-sub") as c:
        ok = c.get("/download/historic/corporate/2023/manifest.json", headers=basic(tls.sub))
        assert ok.status_code == 200 and ok.json() == {"data_set": "corporate", "year": 2023}
        not_entitled = c.get("/download/historic/agency/2023/manifest.json", headers=basic(tls.sub))
        assert not_entitled.status_code == 403 and not_entitled.json()["code"] == "FORBIDDEN_NOT_ENTITLED"
        young = c.get(f"/download/historic/corporate/{tls.young}/manifest.json", headers=basic(tls.sub))
        assert young.status_code == 403 and young.json()["code"] == "FORBIDDEN_NOT_AGED"
        index = c.get("/download/historic/", headers=basic(tls.sub)).json()["data_sets"]
        assert {(d["data_set"], d["year"], d["allowed"]) for d in index} == {
            ("corporate", 2023, True), ("agency", 2023, False), ("corporate", tls.young, False)}
        for path in ("/download/historic/corporate/2023/../../secret.txt",
                     "/download/historic/corporate/2023/%2e%2e/%2e%2e/secret.txt",
                     "/download/historic/corporate/2023/.%2e/x"):
            r = c.get(path, headers=basic(tls.sub))
            assert r.status_code in (403, 404) and "not for download" not in r.text
    with client(tls, "other-sub") as c:
        r = c.get("/download/historic/corporate/2023/manifest.json", headers=basic(tls.other_sub))
        assert r.status_code == 403 and r.json()["code"] == "FORBIDDEN_NOT_ENTITLED"
    with tls.db.connect() as conn:
        denied = audit.search(conn, action="access.denied", limit=20)
    assert {e.detail["reason"] for e in denied} >= {"not_entitled", "not_aged"}


def _site_login(c, user, code=""):
    page = c.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    return c.post("/login", data={"csrf_token": token, "username": user.username, "password": user.password,
                                  "code": code, "next": "/"})


def test_website_sign_in_follows_the_access_policy(tls):
    start = tls.clock.t
    parallel, mfa_only = start + 3 * DAY_US, start + 11 * DAY_US
    tls.clock.t = parallel
    # parallel period: the certificate and password, or the password and a code
    with client(tls, "dlra-trader") as c:
        assert _site_login(c, tls.trader).status_code == 303
    tls.clock.advance(31)
    with client(tls, None) as c:
        assert _site_login(c, tls.trader, tls.trader.code(tls.clock)).status_code == 303
        tls.clock.advance(31)
        assert _site_login(c, tls.trader).status_code == 401  # neither
    # someone else's certificate is no second factor
    with client(tls, "vendor-sub") as c:
        assert _site_login(c, tls.trader).status_code == 401
    # after the cut-over: MFA only; a certificate is no longer enough
    tls.clock.t = mfa_only
    with client(tls, "dlra-trader") as c:
        assert _site_login(c, tls.trader).status_code == 401
        tls.clock.advance(31)
        assert _site_login(c, tls.trader, tls.trader.code(tls.clock)).status_code == 303
    with tls.db.connect() as conn:
        methods = [e.detail["method"] for e in audit.search(conn, action="login", outcome="ok") if e.action == "login"]
    assert sorted(methods) == ["certificate", "mfa", "mfa"]


def test_certificate_period_refuses_mfa_alone(tls):
    with client(tls, None) as c:
        assert _site_login(c, tls.trader, tls.trader.code(tls.clock)).status_code == 401
    with client(tls, "dlra-trader") as c:
        tls.clock.advance(31)
        assert _site_login(c, tls.trader).status_code == 303  # the certificate and password


def test_remembered_credentials_never_outlive_a_change(tls):
    """Repeated requests skip the argon2 verification of an identical (certificate, login,
    password), but a changed password, a lock or a disabled user applies at once."""
    from bondtape.access import accounts
    from bondtape.access.crypto import hash_password
    from bondtape.access.schema import login_state, users

    with client(tls, "vendor-sub") as c:
        assert c.get(tls.today_file, headers=basic(tls.sub)).status_code == 200
        assert c.get(tls.today_file, headers=basic(tls.sub)).status_code == 200  # remembered
        assert c.get(tls.today_file, headers=basic(tls.sub, "a wrong password!!")).status_code == 401
        with tls.db.begin() as conn:
            conn.execute(login_state.update().where(login_state.c.user_id == tls.sub.id)
                         .values(locked_until_us=tls.clock.t + 60_000_000))
        assert c.get(tls.today_file, headers=basic(tls.sub)).status_code == 401
        with tls.db.begin() as conn:
            accounts.unlock(conn, tls.sub.id, actor=None, at_us=tls.clock.t)
            conn.execute(users.update().where(users.c.id == tls.sub.id)
                         .values(password_hash=hash_password("the new password 2026")))
        assert c.get(tls.today_file, headers=basic(tls.sub)).status_code == 401  # the old password
        assert c.get(tls.today_file, headers=basic(tls.sub, "the new password 2026")).status_code == 200
        with tls.db.begin() as conn:
            accounts.set_user_status(conn, tls.sub.id, "DISABLED", actor=None, at_us=tls.clock.t)
        r = c.get(tls.today_file, headers=basic(tls.sub, "the new password 2026"))
        assert r.status_code == 403 and r.json()["code"] == "CERT_USER_NOT_ACTIVE"

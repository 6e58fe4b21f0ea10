"""Test support for the REST API: the World with a certificate authority, users with client
certificates, and an in-process client that presents a certificate the way uvicorn's TLS
layer does (the real TLS path is tested in test_web_auth_tls and test_api_tls)."""
from __future__ import annotations

from starlette.testclient import TestClient

from bondtape.access.ca import CertificateAuthority
from bondtape.web.testing import World


class WithCertificate:
    """ASGI wrapper: puts a client certificate (PEM) in the scope's TLS extension."""

    def __init__(self, app, pem: bytes | None):
        self.app, self.pem = app, pem

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and self.pem:
            scope = dict(scope)
            scope["extensions"] = {**(scope.get("extensions") or {}),
                                   "tls": {"client_cert_chain": [self.pem.decode()]}}
        await self.app(scope, receive, send)


def api_world(db, folder, now_us) -> World:
    w = World(db, folder, now_us, cookie_secure=False)
    w.ca = CertificateAuthority.create(w.settings.ca_dir, now_us=now_us)
    w.pems = {}
    return w


def with_certificate(w: World, user) -> None:
    with w.db.begin() as conn:
        cert_pem, _key, _serial = w.ca.issue_client(conn, user.id, now_us=w.clock.t)
    w.pems[user.username] = cert_pem


def api_client(w: World, user) -> TestClient:
    client = TestClient(WithCertificate(w.app, w.pems.get(user.username)), base_url="https://testserver",
                        follow_redirects=False)
    client.auth = (user.username, user.password)
    return client


EXEC = "2026-06-01T09:58:00-04:00"  # the API tests' execution time (their clock: 2026-06-01 10:00 ET)


def trade(**kw) -> dict:
    """A report's JSON body (an investment-grade sale to a customer), with ``kw`` over it."""
    from tests.conftest import IG

    t = {"cusip": IG, "side": "S", "capacity": "P", "contra": "C", "quantity": "250000", "price": "101.25",
         "execution_time": EXEC}
    t.update(kw)
    return t

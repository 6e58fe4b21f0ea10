"""The REST API over real TLS on 127.0.0.1: a client certificate AND the login and password
report a trade; the same request without the certificate is refused."""
from __future__ import annotations

import ssl

import httpx

from bondtape.web.tls import BackgroundServer, server_config
from tests.api_support import api_world, with_certificate
from tests.conftest import IG


def test_report_over_https_with_a_client_certificate(market, tmp_path):
    import datetime as dt

    from bondtape.clock import MARKET_TZ, iso_market, to_us
    from bondtape.rulebook import default_rulebook

    # the app's clock: a recent business day at 10:00 New York time, in system hours and in the
    # past, so that certificates issued then are also valid for TLS, which uses the real clock
    day = dt.date.today() - dt.timedelta(days=1)
    while not default_rulebook().at(day).calendar.is_business_day(day):
        day -= dt.timedelta(days=1)
    wall = to_us(dt.datetime(day.year, day.month, day.day, 10, 0, tzinfo=MARKET_TZ))
    w = api_world(market, tmp_path, wall)
    trader = w.user("a-trader", w.org("Dealer A", "FIRM", mpid="DLRA"), "trader")
    with w.db.begin() as conn:
        cert_pem, key_pem, _ = w.ca.issue_client(conn, trader.id, now_us=wall)
    (tmp_path / "t.crt").write_bytes(cert_pem)
    (tmp_path / "t.key").write_bytes(key_pem)
    cert, key = w.ca.issue_server(["127.0.0.1"], tmp_path / "server", now_us=wall)
    body = {"cusip": IG, "side": "S", "capacity": "P", "contra": "C", "quantity": "100000", "price": "100.5",
            "execution_time": iso_market(wall - 60_000_000), "test": "Y"}
    config = server_config(w.app, host="127.0.0.1", port=0, certfile=cert, keyfile=key, ca_certs=w.ca.cert_path)
    try:
        with BackgroundServer(config) as server:
            base = f"https://127.0.0.1:{server.port}"
            with_cert = ssl.create_default_context(cafile=str(w.ca.cert_path))
            with_cert.load_cert_chain(str(tmp_path / "t.crt"), str(tmp_path / "t.key"))
            with httpx.Client(base_url=base, verify=with_cert, auth=(trader.username, trader.password), timeout=20) as c:
                r = c.post("/api/v1/reports", json=body)
                assert r.status_code == 200 and r.json()["status"] == "ACCEPTED", r.text
                assert c.get("/api/v1/securities", params={"cusip": IG}).json()["securities"][0]["cusip"] == IG
            without = ssl.create_default_context(cafile=str(w.ca.cert_path))
            with httpx.Client(base_url=base, verify=without, auth=(trader.username, trader.password), timeout=20) as c:
                r = c.post("/api/v1/reports", json=body)
                assert r.status_code == 403 and r.json()["code"] == "CERT_NO_CERTIFICATE"
    finally:
        w.close()

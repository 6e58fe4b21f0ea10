"""The website in a real browser (Playwright driving Debian's chromium, headless): enroll
with TOTP, sign in, report a trade, see the error for a bad CUSIP, correct the trade, see it
on the security page capped as the rules say, and download a permitted file.

Skips when /usr/bin/chromium or the playwright package is absent (``python3 dev.py test``
installs chromium when run as root). Never downloads a browser."""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pyotp
import pytest
import uvicorn

from bondtape.access import accounts
from bondtape.access.demo import DEMO_OPERATOR
from bondtape.web.testing import World
from bondtape.web.tls import BackgroundServer
from tests.conftest import IG, et

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
NOW = et(2026, 6, 1, 10, 0, 0)
PASSWORD = "a browser test password 9"

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (/usr/bin/chromium): "
                       "apt-get install -y chromium (python3 dev.py test does it as root)"),
    pytest.mark.timeout(120),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (dev extras)")


class LockedClock:
    """The world's clock, safe to advance from the test while the server reads it."""

    def __init__(self, clock):
        self.clock, self.lock = clock, threading.Lock()

    def __call__(self):
        with self.lock:
            return self.clock.t


@pytest.fixture
def site(market, tmp_path):
    w = World(market, tmp_path, NOW, cookie_secure=False, base_url="http://127.0.0.1")
    firm = w.org("Dealer A", "FIRM", mpid="DLRA")
    with market.begin() as conn:
        order = accounts.request_user(conn, actor=DEMO_OPERATOR, org_id=firm, username="alice",
                                      email="alice@dealer-a.example", full_name="Alice Trader",
                                      roles="trader,org_admin", now_us=NOW, source="test")
        w.token = accounts.decide_order(conn, order, approve=True, actor=DEMO_OPERATOR, now_us=NOW, source="test",
                                        invitation_hours=72)
    config = uvicorn.Config(w.app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", access_log=False)
    with BackgroundServer(config) as server:
        w.base = f"http://127.0.0.1:{server.port}"
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
            context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            w.page = context.new_page()
            w.page.set_default_timeout(15_000)
            try:
                yield w
            finally:
                context.close()
                browser.close()
    w.close()


def fill_trade(page, **fields):
    values = {"cusip": IG, "contra": "C", "quantity": "7500000", "price": "101.25",
              "execution_time": "2026-06-01T09:58:00"}
    values.update(fields)
    for name, value in values.items():
        page.fill(f"input[name={name}]", value)
    page.select_option("select[name=side]", "S")


def test_enroll_sign_in_report_correct_and_see_it_capped(site, tmp_path):
    page, clock = site.page, site.clock
    shots = Path(os.environ.get("BONDTAPE_SCREENSHOTS") or tmp_path / "shots")  # to look at the pages

    # enrollment by invitation: password, authenticator (TOTP), recovery codes
    page.goto(f"{site.base}/enroll/{site.token}")
    page.fill("input[name=password]", PASSWORD)
    page.fill("input[name=password2]", PASSWORD)
    page.click("button[type=submit]")
    secret = page.locator("code.secret").inner_text().replace(" ", "")
    assert re.fullmatch(r"[A-Z2-7]{16,}", secret)
    totp = pyotp.TOTP(secret)
    page.fill("input[name=code]", totp.at(clock.t // 1_000_000))
    page.click("button[type=submit]")
    assert page.locator("ul.codes li").count() == 10  # recovery codes, shown once

    # sign in with password and a fresh code (the enrollment's step cannot be replayed)
    clock.advance(30)
    page.goto(f"{site.base}/login")
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", PASSWORD)
    page.fill("input[name=code]", totp.at(clock.t // 1_000_000))
    page.click("button[type=submit]")
    page.wait_for_url(f"{site.base}/")
    assert "Report a trade" in page.locator("nav").inner_text()

    # a bad CUSIP: the error names the field and what is accepted; the typed values stay
    page.click("text=Report a trade")
    bad = IG[:8] + str((int(IG[8]) + 1) % 10)
    fill_trade(page, cusip=bad)
    page.click("form.trade button[type=submit]")
    error = page.locator("#error-cusip")
    assert "CUSIP_CHECK_DIGIT" in error.inner_text() and "check digit" in error.inner_text()
    assert page.locator("input[name=cusip]").input_value() == bad
    page.screenshot(path=str(shots / "trade-entry-error.png"), full_page=True)

    # the report, accepted with its control number
    page.fill("input[name=cusip]", IG)
    page.click("form.trade button[type=submit]")
    first = page.locator("#control-number").inner_text()
    assert first.isdigit()

    # correct it from its history page: a new control number; the first is CORRECTED
    page.click("#control-number a")
    page.click("text=Correct")
    page.fill("input[name=price]", "101.5")
    page.click("form.trade button[type=submit]")
    second = page.locator("#control-number").inner_text()
    assert second.isdigit() and second != first
    page.click("#control-number a")
    history = page.locator("table.journal").inner_text()
    assert f"correction of {first}" in history and "CORRECTED" in history
    page.screenshot(path=str(shots / "history.png"), full_page=True)

    # the security page: the corrected trade as disseminated, its 7.5MM capped at 5MM+
    svc = site.app.state.services
    import sqlalchemy as sa

    from bondtape.journal.schema import journal
    with site.db.connect() as conn:
        assert svc.publisher.wait_for(conn.execute(sa.select(sa.func.max(journal.c.seq))).scalar())
    page.goto(f"{site.base}/market/security?cusip={IG}")
    tas = page.locator("#time-and-sales").inner_text()
    assert "5MM+" in tas and "101.5" in tas and "7500000" not in tas and "DLRA" not in page.content()
    assert "101.25" not in tas  # the corrected-away terms no longer stand
    assert page.locator("#chart svg polyline").count() == 1
    page.screenshot(path=str(shots / "security.png"), full_page=True)

    # the page follows the feed: a new trade appears without reloading
    from bondtape.reporting.commands import parse_command
    result = svc.sequencer(parse_command({"reporting_mpid": "DLRA", "cusip": IG, "side": "B", "capacity": "P",
                                          "contra": "C", "quantity": "40000", "price": "99.875",
                                          "execution_time": "2026-06-01T09:59:00"}, channel="api"))
    assert result.accepted and svc.publisher.wait_for(result.seq)
    sync_api.expect(page.locator("#time-and-sales")).to_contain_text("99.875", timeout=15_000)

    # a permitted file: the firm's own journal as CSV
    page.goto(f"{site.base}/journal")
    with page.expect_download() as info:
        page.click("text=Download CSV")
    path = info.value.path()
    lines = Path(path).read_text().splitlines()
    assert lines[0].startswith("control_number,status") and {line.split(",")[0] for line in lines[1:]} == {first, second, str(result.control_number)}
    page.screenshot(path=str(shots / "journal.png"), full_page=True)
    # and one that is not: another firm's report is answered as if it did not exist
    assert page.goto(f"{site.base}/reports/999999999/history").status == 404

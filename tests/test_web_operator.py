"""Operator pages (users, firms, securities, halts), the Historic data page, a
Non-Professional's ad-hoc request end to end (request, fulfil from aged data, download,
billed at media and delivery cost), and invoices."""
from __future__ import annotations

import csv
import io
from decimal import Decimal

import pytest

from bondtape.access import accounts, entitlements
from bondtape.engine import Engine
from bondtape.web.testing import World
from tests.conftest import HY, IG, et
from tests.helpers import new

NOW = et(2026, 8, 3, 10, 0, 0)  # 2024 is Historic data from 2026-07-01


@pytest.fixture
def world(market, tmp_path):
    w = World(market, tmp_path, NOW, cookie_secure=False)
    op = w.org("Operator", "OPERATOR")
    a = w.org("Dealer A", "FIRM", mpid="DLRA")
    person = w.org("Pat Person", "NON_PROFESSIONAL")
    w.op = w.user("op-admin", op, "operator_admin")
    w.admin = w.user("a-admin", a, "org_admin")
    w.trader = w.user("a-trader", a, "trader")
    w.pat = w.user("pat", person, "subscriber")
    engine = Engine(market)
    w.old = [engine.submit([new(ref=f"o{i}", cusip=IG, quantity=Decimal((i + 1) * 1000))])[0] for i in range(3)]
    engine.submit([new(ref="hy", cusip=HY)])
    yield w
    w.close()


def test_operator_pages_and_user_actions(world):
    op = world.signed_in(world.op)
    for path, text in (("/operator", "Trading halts"), ("/operator/firms", "Dealer A"),
                       ("/operator/users", "a-trader"), ("/operator/securities", "ACME4012345")):
        page = op.get(path)
        assert page.status_code == 200 and text in page.text, path
    assert "ACME4012345" not in op.get("/operator/securities?q=BORE").text
    act = lambda user_id, action: op.post("/operator/users", {"user_id": str(user_id), "action": action},  # noqa: E731
                                          csrf_from="/operator/users")
    assert act(world.trader.id, "disable").status_code == 303
    with world.db.connect() as conn:
        assert accounts.user_by_id(conn, world.trader.id).status == "DISABLED"
    assert act(world.trader.id, "enable").status_code == 303
    assert act(99999, "unlock").status_code == 400 and act(world.trader.id, "delete").status_code == 400
    assert "admin.user.disabled" in op.get("/operator/audit").text


def test_halt_and_resume_are_published_and_shown(world):
    op = world.signed_in(world.op)
    r = op.post("/operator/halts/halt", {"cusip": IG, "reason": "T1"}, csrf_from="/operator/halts")
    assert r.status_code == 303, r.text
    assert IG in op.get("/operator/halts").text
    assert 'id="halted"' in world.client().get(f"/market/security?cusip={IG}").text
    again = op.post("/operator/halts/halt", {"cusip": IG, "reason": "T1"}, csrf_from="/operator/halts")
    assert again.status_code == 400 and "ALREADY_HALTED" in again.text
    assert op.post("/operator/halts/resume", {"cusip": IG}, csrf_from="/operator/halts").status_code == 303
    assert 'id="halted"' not in world.client().get(f"/market/security?cusip={IG}").text
    assert "feed.halt" in op.get("/operator/audit?action=feed").text


def test_non_professional_ad_hoc_request_end_to_end(world):
    pat = world.signed_in(world.pat)
    assert "attest" in pat.get("/data/requests").text
    refused = pat.post("/data/requests", {"cusips": IG, "date_from": "2024-03-01", "date_to": "2024-03-31"},
                       csrf_from="/data/requests")
    assert refused.status_code == 400 and "FORBIDDEN_NO_ATTESTATION" in refused.text
    with world.db.begin() as conn:
        actor = accounts.authenticated(conn, world.pat.id, "mfa")
        entitlements.attest_non_professional(conn, actor, {k: True for k in entitlements.NON_PROFESSIONAL_STATEMENTS},
                                             "Pat Person", at_us=NOW, source="test")
    young = pat.post("/data/requests", {"cusips": IG, "date_from": "2025-03-01", "date_to": "2025-03-31"},
                     csrf_from="/data/requests")
    assert young.status_code == 400 and "NOT_AGED" in young.text
    bad = pat.post("/data/requests", {"cusips": IG[:8] + "0" if IG[8] != "0" else IG[:8] + "1",
                                      "date_from": "2024-03-01", "date_to": "2024-03-31"}, csrf_from="/data/requests")
    assert bad.status_code == 400 and "CUSIP_MALFORMED" in bad.text
    ok = pat.post("/data/requests", {"cusips": IG, "date_from": "2024-03-01", "date_to": "2024-03-31"},
                  csrf_from="/data/requests")
    assert ok.status_code == 303
    assert "REQUESTED" in pat.get("/data/requests").text

    op = world.signed_in(world.op)
    assert "Pat Person" in op.get("/operator/requests").text
    done = op.post("/operator/requests/fulfil", {"id": "1", "media_cost": "5.00", "delivery_cost": "12.50"},
                   csrf_from="/operator/requests")
    assert done.status_code == 303, done.text
    again = op.post("/operator/requests/fulfil", {"id": "1"}, csrf_from="/operator/requests")
    assert again.status_code == 400 and "ALREADY_DECIDED" in again.text

    page = pat.get("/data/requests").text
    assert "FULFILLED" in page and "/data/requests/extract.csv?id=1" in page
    extract = pat.get("/data/requests/extract.csv?id=1")
    rows = list(csv.DictReader(io.StringIO(extract.text)))
    assert sorted(r["quantity"] for r in rows) == ["1000", "2000", "3000"]  # uncapped, standing trades, no MPID
    assert all(r["cusip"] == IG for r in rows) and "DLRA" not in extract.text
    trader = world.signed_in(world.trader)
    assert trader.get("/data/requests/extract.csv?id=1").status_code == 404  # another organisation's

    invoices = op.get("/invoices?month=2026-08").text
    assert "Pat Person" in invoices and "ad-hoc" in invoices and "12.50" in invoices and "5.00" in invoices


def test_ad_hoc_request_dates_and_fulfil_costs_are_refused_with_a_code(world):
    """Dates before TRACE began, or too late for the calendar to age them, and costs beyond a
    database integer or in exponent form: a 400 with the code, nothing written (were 500s, or
    accepted)."""
    import sqlalchemy as sa

    from bondtape.web.schema import historic_requests

    pat = world.signed_in(world.pat)
    with world.db.begin() as conn:
        actor = accounts.authenticated(conn, world.pat.id, "mfa")
        entitlements.attest_non_professional(conn, actor, {k: True for k in entitlements.NON_PROFESSIONAL_STATEMENTS},
                                             "Pat Person", at_us=NOW, source="test")
    for date_from, date_to, code, text in (("2001-01-01", "2024-03-31", "DATE_INVALID", "2002-07-01"),
                                           ("2002-06-30", "2002-12-31", "DATE_INVALID", "2002-07-01"),
                                           ("2024-03-01", "9999-12-30", "NOT_AGED", "after 9999-12-31"),
                                           ("2024-03-01", "9998-01-01", "NOT_AGED", "after 9999-12-31"),
                                           ("2024-03-01", "9997-01-01", "NOT_AGED", "9999-07-01")):
        r = pat.post("/data/requests", {"cusips": IG, "date_from": date_from, "date_to": date_to},
                     csrf_from="/data/requests")
        assert r.status_code == 400 and code in r.text and text in r.text, (date_from, date_to, r.status_code)
    assert pat.post("/data/requests", {"cusips": IG, "date_from": "2002-07-01", "date_to": "2024-03-31"},
                    csrf_from="/data/requests").status_code == 303
    with world.db.begin() as conn:  # a request stored before the first date was checked
        conn.execute(historic_requests.insert().values(
            org_id=world.pat.org_id, user_id=world.pat.id, cusips=IG, date_from="2001-01-01", date_to="2024-03-31",
            status="REQUESTED", requested_us=NOW))

    op = world.signed_in(world.op)
    fulfil = lambda id_, media: op.post("/operator/requests/fulfil",  # noqa: E731
                                        {"id": id_, "media_cost": media, "delivery_cost": "0"},
                                        csrf_from="/operator/requests")
    for media in ("99999999999999999999999", "1e3", "1E+3", "-1", "NaN", "5.001", "1000000000"):
        r = fulfil("1", media)
        assert r.status_code == 400 and "COST_INVALID" in r.text and "999,999,999.99" in r.text, (media, r.text[:300])
    r = fulfil("2", "5")
    assert r.status_code == 400 and "DATE_INVALID" in r.text and "2002-07-01" in r.text
    with world.db.connect() as conn:  # nothing half-written
        assert conn.execute(sa.text("select count(*) from historic_orders")).scalar_one() == 0
        assert set(conn.execute(sa.select(historic_requests.c.status)).scalars()) == {"REQUESTED"}
    assert fulfil("1", "1,000.5").status_code == 303
    with world.db.connect() as conn:
        assert conn.execute(sa.text("select media_cost_c from historic_orders")).scalar_one() == 100050


def test_invoices_for_the_firm_administrator_only_its_own(world):
    admin = world.signed_in(world.admin)
    page = admin.get("/invoices?month=2024-03")
    assert page.status_code == 200 and "Dealer A" in page.text and "Pat Person" not in page.text
    assert admin.get("/invoices?month=2024-13").status_code == 400
    for month in ("9999-12", "0000-01", "2024-3"):  # 9999-12 was an OverflowError, a 500
        page = admin.get(f"/invoices?month={month}")
        assert page.status_code == 400 and "MONTH_INVALID" in page.text and "9999-11" in page.text, month
    assert admin.get("/invoices?month=9999-11").status_code == 200
    op = world.signed_in(world.op)
    assert op.get("/invoices?month=9999-12").status_code == 400
    assert world.signed_in(world.trader).get("/invoices").status_code == 403


def test_historic_page_lists_data_sets_and_entitlement(world):
    folder = world.settings.historic_dir / "corporate" / "2023"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    op = world.signed_in(world.op).get("/data").text
    assert "manifest.json" in op and "2023" in op
    pat = world.signed_in(world.pat).get("/data").text
    assert "not entitled" in pat and "/2023/manifest.json" not in pat

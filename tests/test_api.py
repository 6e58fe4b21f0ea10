"""The REST API: report, cancel, correct, reverse, own reports, bulk files, public time and
sales, reference data, and the same reject codes as every other channel."""
from __future__ import annotations

import pytest

from bondtape.reporting.codes import REJECT_CODES
from tests.api_support import EXEC, api_client, api_world, trade, with_certificate
from tests.conftest import AGCY, HY, IG, et

NOW = et(2026, 6, 1, 10, 0, 0)


@pytest.fixture
def world(market, tmp_path):
    w = api_world(market, tmp_path, NOW)
    a = w.org("Dealer A", "FIRM", mpid="DLRA")
    b = w.org("Dealer B", "FIRM", mpid="DLRB")
    v = w.org("Vendor V", "VENDOR")
    w.trader = w.user("a-trader", a, "trader")
    w.other = w.user("b-trader", b, "trader")
    w.sub = w.user("v-sub", v, "subscriber")
    for u in (w.trader, w.other, w.sub):
        with_certificate(w, u)
    yield w
    w.close()


def test_report_and_act_on_it(world):
    c = api_client(world, world.trader)
    r = c.post("/api/v1/reports", json=trade(client_ref="A-1"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ACCEPTED" and body["timeliness"] == "ON_TIME"
    cn = body["control_number"]
    again = c.post("/api/v1/reports", json=trade(client_ref="A-1")).json()
    assert again["repeated"] and again["control_number"] == cn
    got = c.get(f"/api/v1/reports/{cn}").json()
    assert got["report"]["quantity"] == "250000" and got["report"]["price"] == "101.25"
    corr = c.post(f"/api/v1/reports/{cn}/correct", json=trade(price=101.5))  # a JSON number, read exactly
    assert corr.status_code == 200, corr.text
    new_cn = corr.json()["control_number"]
    hist = c.get(f"/api/v1/reports/{new_cn}").json()["history"]
    assert [h["status"] for h in hist] == ["CORRECTED", "ACTIVE"] and hist[1]["price"] == "101.5"
    assert c.post(f"/api/v1/reports/{cn}/cancel").json()["reject"]["code"] == "REPORT_NOT_ACTIVE"
    rev = c.post(f"/api/v1/reports/{new_cn}/reverse")
    assert rev.status_code == 422 and rev.json()["reject"]["code"] == "WINDOW_OPEN"
    canc = c.post(f"/api/v1/reports/{new_cn}/cancel")
    assert canc.status_code == 200 and canc.json()["status"] == "ACCEPTED"
    listed = c.get("/api/v1/reports", params={"status": "CANCELLED"}).json()["reports"]
    assert [x["control_number"] for x in listed] == [new_cn]


REJECTS = [
    ({"cusip": IG[:8] + str((int(IG[8]) + 1) % 10)}, "CUSIP_CHECK_DIGIT", "cusip"),
    ({"cusip": "ZZZZZZZZ9"}, "CUSIP_CHECK_DIGIT", "cusip"),
    ({"quantity": "-5"}, "QUANTITY_INVALID", "quantity"),
    ({"price": None}, "FIELD_REQUIRED", "price"),
    ({"side": "X"}, "FIELD_INVALID", "side"),
    ({"execution_time": "2027-01-01T10:00:00"}, "EXECUTION_IN_FUTURE", "execution_time"),
    ({"contra": "DLRA"}, "CONTRA_IS_REPORTER", "contra"),
    ({"reporting_mpid": "DLRB"}, "FIELD_INVALID", "reporting_mpid"),
]


def test_rejects_carry_the_codes_of_every_channel(world):
    c = api_client(world, world.trader)
    for fields, code, field in REJECTS:
        r = c.post("/api/v1/reports", json=trade(**fields))
        assert r.status_code == 422, r.text
        reject = r.json()["reject"]
        assert (reject["code"], reject["field"]) == (code, field) and code in REJECT_CODES


def test_batch_bulk_and_malformed_bodies(world):
    c = api_client(world, world.trader)
    r = c.post("/api/v1/reports", json={"reports": [trade(client_ref=f"B-{i}", quantity=str(1000 * (i + 1)))
                                                     for i in range(5)] + [trade(cusip="nope")]})
    body = r.json()
    assert (body["accepted"], body["rejected"]) == (5, 1)
    assert body["results"][5]["reject"]["code"] == "CUSIP_MALFORMED"
    csv_in = ("client_ref,reporting_mpid,cusip,side,capacity,contra,quantity,price,execution_time\n"
              f"F-1,DLRA,{HY},B,P,C,100000,98.5,{EXEC}\n"
              f"F-2,DLRA,{HY},B,P,C,abc,98.5,{EXEC}\n")
    out = c.post("/api/v1/bulk", content=csv_in, headers={"content-type": "text/csv"})
    assert out.status_code == 200 and out.headers["content-type"].startswith("text/csv")
    lines = out.text.splitlines()
    assert len(lines) == 3 and "ACCEPTED" in lines[1] and "QUANTITY_INVALID" in lines[2]
    foreign = c.post("/api/v1/bulk", content=csv_in.replace("DLRA", "DLRB"), headers={"content-type": "text/csv"})
    assert foreign.status_code == 400 and foreign.json()["code"] == "FILE_INVALID"
    assert c.post("/api/v1/reports", content=b"{nope", headers={"content-type": "application/json"}).json()["code"] == "JSON_INVALID"
    assert c.post("/api/v1/reports", json={"colour": "red"}).json()["code"] == "FIELD_UNKNOWN"
    assert c.post("/api/v1/reports", json={"reports": []}).json()["code"] == "BATCH_INVALID"
    assert c.post("/api/v1/reports", json=[1, 2]).status_code == 400


def test_a_client_ref_reused_for_another_request_is_refused(world):
    """The API and bulk files answer as the engine does: a cancel under the client_ref of
    the NEW it cancels is CLIENT_REF_REUSED, not the NEW's first answer (nothing cancelled)."""
    c = api_client(world, world.trader)
    cn = c.post("/api/v1/reports", json=trade(client_ref="A-1")).json()["control_number"]
    r = c.post(f"/api/v1/reports/{cn}/cancel", json={"client_ref": "A-1"})
    assert r.status_code == 422, r.text
    assert (r.json()["reject"]["code"], r.json()["reject"]["field"]) == ("CLIENT_REF_REUSED", "client_ref")
    assert f"control number {cn}" in r.json()["reject"]["message"]
    assert c.get(f"/api/v1/reports/{cn}").json()["report"]["status"] == "ACTIVE"
    done = c.post(f"/api/v1/reports/{cn}/cancel", json={"client_ref": "X-1"})
    assert done.status_code == 200 and done.json()["control_number"] == cn
    again = c.post(f"/api/v1/reports/{cn}/cancel", json={"client_ref": "X-1"}).json()
    assert again["repeated"] and again["status"] == "ACCEPTED"
    other = c.post("/api/v1/reports", json=trade(client_ref="B-1", quantity="8000")).json()["control_number"]
    csv_in = ("action,client_ref,original_control_number,reporting_mpid\n"
              f"CANCEL,B-1,{other},DLRA\nCANCEL,B-2,{other},DLRA\n")
    lines = c.post("/api/v1/bulk", content=csv_in.encode(), headers={"content-type": "text/csv"}).text.splitlines()
    assert "CLIENT_REF_REUSED,client_ref" in lines[1] and "ACCEPTED" in lines[2], lines


def test_a_client_ref_holding_control_characters_is_refused(world):
    """A NUL in a client_ref failed the engine's whole batch on PostgreSQL (text cannot hold
    it): every report in the batch was lost. It and other control characters are FIELD_INVALID."""
    c = api_client(world, world.trader)
    for ref in ("N\x00UL", "tab\there", "esc\x1b[2J"):
        r = c.post("/api/v1/reports", json=trade(client_ref=ref, quantity="7000"))
        assert r.status_code == 422, r.text
        reject = r.json()["reject"]
        assert (reject["code"], reject["field"]) == ("FIELD_INVALID", "client_ref"), reject
        assert "printable" in reject["message"] and "\x00" not in reject["message"]
    good = trade(client_ref="B-1", quantity="8000")
    batch = c.post("/api/v1/reports", json={"reports": [good, trade(client_ref="B-\x00", quantity="9000")]}).json()
    assert [x["status"] for x in batch["results"]] == ["ACCEPTED", "REJECTED"]  # the good one is not failed with it
    csv_in = ("client_ref,reporting_mpid,cusip,side,capacity,contra,quantity,price,execution_time\n"
              f"F-\x00,DLRA,{HY},B,P,C,100000,98.5,{EXEC}\n")
    lines = c.post("/api/v1/bulk", content=csv_in.encode(), headers={"content-type": "text/csv"}).text.splitlines()
    assert "FIELD_INVALID,client_ref" in lines[1], lines
    listed = c.get("/api/v1/reports", params={"client_ref": "B-\x00"})  # was HTTP 500 on PostgreSQL
    assert listed.status_code == 400 and (listed.json()["code"], listed.json()["field"]) == ("FILTER_INVALID", "client_ref")
    assert [x["client_ref"] for x in c.get("/api/v1/reports", params={"client_ref": "B-1"}).json()["reports"]] == ["B-1"]


def test_access(world):
    c = api_client(world, world.trader)
    cn = c.post("/api/v1/reports", json=trade()).json()["control_number"]
    other = api_client(world, world.other)
    assert other.get(f"/api/v1/reports/{cn}").status_code == 404
    assert other.post(f"/api/v1/reports/{cn}/cancel").status_code == 404
    assert other.get("/api/v1/reports").json()["reports"] == []
    sub = api_client(world, world.sub)
    assert sub.post("/api/v1/reports", json=trade()).status_code == 403
    nocert = api_client(world, world.trader)
    nocert.app.pem = None
    r = nocert.post("/api/v1/reports", json=trade())
    assert r.status_code == 403 and r.json()["code"] == "CERT_NO_CERTIFICATE"
    wrong = api_client(world, world.trader)
    wrong.auth = (world.trader.username, "not the password")
    assert wrong.get("/api/v1/reports").json()["code"] == "LOGIN_FAILED"


def test_public_time_and_sales_and_reference_data(world):
    c = api_client(world, world.trader)
    big = c.post("/api/v1/reports", json=trade(quantity="7500000")).json()  # investment grade: capped at 5MM+
    assert big["status"] == "ACCEPTED"
    publisher = world.app.state.services.publisher
    assert publisher.wait_for(big["seq"])
    anonymous = api_client(world, world.sub)
    anonymous.auth = None
    anonymous.app.pem = None
    tas = anonymous.get("/api/v1/time-and-sales", params={"cusip": IG})
    assert tas.status_code == 200, tas.text
    [t] = tas.json()["trades"]
    assert t["quantity"] == "5MM+" and t["price"] == "101.25" and "reporting_mpid" not in t
    assert anonymous.get("/api/v1/time-and-sales", params={"cusip": "000000000"}).status_code == 404
    assert anonymous.get("/api/v1/time-and-sales").status_code == 400
    secs = c.get("/api/v1/securities").json()["securities"]
    assert {s["cusip"] for s in secs} >= {IG, HY, AGCY}
    spec = anonymous.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.") and "/api/v1/reports" in spec["paths"]

"""The REST API as a dealer's order-management system meets it: bodies that are JSON but
not Unicode text, the body of a cancel/correct/reverse, fields the API does not take, and
the OpenAPI description against what the server accepts and answers."""
from __future__ import annotations

import pytest

from tests.api_support import api_client, api_world, with_certificate
from tests.conftest import IG, et

NOW = et(2026, 6, 1, 10, 0, 0)
EXEC = "2026-06-01T09:58:00-04:00"
JSON = {"content-type": "application/json"}


@pytest.fixture
def world(market, tmp_path):
    w = api_world(market, tmp_path, NOW)
    a = w.org("Dealer A", "FIRM", mpid="DLRA")
    w.trader = w.user("a-trader", a, "trader")
    with_certificate(w, w.trader)
    yield w
    svc = getattr(w.app.state, "services", None)
    if svc is not None:
        svc.close()


def trade(**kw):
    t = {"cusip": IG, "side": "S", "capacity": "P", "contra": "C", "quantity": "250000", "price": "101.25",
         "execution_time": EXEC}
    t.update(kw)
    return t


def test_a_lone_surrogate_escape_is_json_invalid_not_a_server_error(world):
    """"\\ud800" is valid JSON grammar, but half a surrogate pair is no Unicode character:
    echoed in the answer (client_ref, or the field name of FIELD_UNKNOWN) it could not be
    encoded as UTF-8 and the server answered 500 text/plain (and closed the connection)."""
    c = api_client(world, world.trader)
    c.raise_server_exceptions = False
    bodies = {
        '{"client_ref": "A-\\ud800", "cusip": "%s"}' % IG: "client_ref",
        '{"\\udc00colour": "red"}': None,
        '{"reports": [{"client_ref": "B-\\udfff"}]}': "client_ref",
        '{"price": ["\\ud800"]}': "price",
    }
    for body, field in bodies.items():
        r = c.post("/api/v1/reports", content=body.encode(), headers=JSON)
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert (r.json()["code"], r.json()["field"]) == ("JSON_INVALID", field), r.text
        assert "surrogate" in r.json()["message"]
    cn = c.post("/api/v1/reports", json=trade(client_ref="A-1")).json()["control_number"]
    r = c.post(f"/api/v1/reports/{cn}/cancel", content=b'{"client_ref": "\\ud83d"}', headers=JSON)
    assert r.status_code == 400 and r.json()["code"] == "JSON_INVALID", r.text
    # a whole surrogate pair is one character (an emoji), read as any other
    r = c.post("/api/v1/reports", content=b'{"client_ref": "\\ud83d\\ude00", "cusip": "nope"}', headers=JSON)
    assert r.status_code == 422 and r.json()["client_ref"] == "\U0001F600"


def test_acting_on_a_report_never_silently_swaps_the_report_acted_on(world):
    """The path names the report: an original_control_number in the body naming another one
    was dropped without a word and the path's report was corrected or cancelled."""
    c = api_client(world, world.trader)
    first = c.post("/api/v1/reports", json=trade(client_ref="A-1")).json()["control_number"]
    second = c.post("/api/v1/reports", json=trade(client_ref="A-2", quantity="5000")).json()["control_number"]
    for call, body in (("correct", trade(price="99", original_control_number=second)),
                       ("cancel", {"original_control_number": second}),
                       ("reverse", {"original_control_number": "1"})):
        r = c.post(f"/api/v1/reports/{first}/{call}", json=body)
        assert r.status_code == 400, (call, r.text)
        assert (r.json()["code"], r.json()["field"]) == ("FIELD_INVALID", "original_control_number"), r.text
        assert first in r.json()["message"]
    assert c.get(f"/api/v1/reports/{first}").json()["report"]["status"] == "ACTIVE"
    r = c.post(f"/api/v1/reports/{first}/cancel", json={"original_control_number": first, "action": "cancel"})
    assert r.status_code == 200 and r.json()["control_number"] == first  # the same report: as if left out


def test_report_time_is_refused_not_silently_ignored(world):
    """The time of receipt is the service's: a report_time in a JSON report was accepted and
    dropped (the report was timed on receipt while the caller believed it back-dated)."""
    c = api_client(world, world.trader)
    r = c.post("/api/v1/reports", json=trade(report_time="2026-06-01T09:59:00-04:00"))
    assert r.status_code == 400 and (r.json()["code"], r.json()["field"]) == ("FIELD_UNKNOWN", "report_time"), r.text
    r = c.post("/api/v1/reports", json={"colour": "red"})
    assert r.json()["code"] == "FIELD_UNKNOWN" and "report_time" not in r.json()["message"]

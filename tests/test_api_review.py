"""The REST API as a dealer's order-management system meets it: bodies that are JSON but
not Unicode text, the body of a cancel/correct/reverse, fields the API does not take, and
the OpenAPI description against what the server accepts and answers."""
from __future__ import annotations

import pytest

from tests.api_support import api_client, api_world, trade, with_certificate
from tests.conftest import IG, et

NOW = et(2026, 6, 1, 10, 0, 0)
JSON = {"content-type": "application/json"}


@pytest.fixture
def world(market, tmp_path):
    w = api_world(market, tmp_path, NOW)
    a = w.org("Dealer A", "FIRM", mpid="DLRA")
    w.trader = w.user("a-trader", a, "trader")
    with_certificate(w, w.trader)
    yield w
    w.close()


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


def _validator(schema):
    jsonschema_rs = pytest.importorskip("jsonschema_rs", reason="jsonschema_rs comes with schemathesis (dev extras)")
    return jsonschema_rs.Draft202012Validator(schema, validate_formats=True)


def test_openapi_describes_what_the_server_answers(world):
    """/openapi.json against real answers: the answers' shapes (before: {"type": "object"}
    and nothing more, so a generated client knew no field), the statuses every firm's call
    can give (429 THROTTLED and 503 ENGINE_UNAVAILABLE were missing), the certificate AND
    password requirement (described as HTTP Basic alone), the CUSIP query parameters'
    pattern (any string was schema-valid, and refused 400), and the act bodies' fields."""
    c = api_client(world, world.trader)
    spec = c.get("/openapi.json").json()
    paths = spec["paths"]
    schemes = spec["components"]["securitySchemes"]
    for path, ops in paths.items():
        for method, op in ops.items():
            if path == "/api/v1/time-and-sales":
                continue
            [requirement] = op["security"]
            assert {schemes[name]["type"] for name in requirement} == {"mutualTLS", "http"}, (path, method)
            assert {"400", "401", "403", "413", "415", "429", "503"} <= set(op["responses"]), (path, method)

    def answer(path, method, status, response):
        schema = paths[path][method]["responses"][str(status)]["content"]["application/json"]["schema"]
        assert response.status_code == status, response.text
        errors = [e.message for e in _validator(schema).iter_errors(response.json())]
        assert not errors, (path, errors)
        return response.json()

    body = answer("/api/v1/reports", "post", 200, c.post("/api/v1/reports", json=trade(client_ref="A-1", commission="12.5")))
    cn = body["control_number"]
    answer("/api/v1/reports", "post", 422, c.post("/api/v1/reports", json=trade(cusip="nope")))
    listed = answer("/api/v1/reports", "get", 200, c.get("/api/v1/reports", params={"limit": 1}))
    assert listed["reports"][0]["control_number"] == cn and listed["next"] is None  # the only report
    one = answer("/api/v1/reports/{control_number}", "get", 200, c.get(f"/api/v1/reports/{cn}"))
    assert one["report"]["commission"] == "12.5"
    answer("/api/v1/securities", "get", 200, c.get("/api/v1/securities", params={"cusip": IG.lower()}))
    answer("/api/v1/reports", "get", 400, c.get("/api/v1/reports", params={"cusip": "Ö"}))
    required = {p: paths[p]["post"]["responses"]["200"]["content"]["application/json"]["schema"].get("required")
                for p in ("/api/v1/reports/{control_number}/cancel",)}
    assert "reject" in required["/api/v1/reports/{control_number}/cancel"]

    cusip_schema = next(p["schema"] for p in paths["/api/v1/reports"]["get"]["parameters"] if p["name"] == "cusip")
    assert _validator(cusip_schema).is_valid(IG.lower()) and not _validator(cusip_schema).is_valid("Ö")
    assert _validator(cusip_schema).is_valid("") and c.get("/api/v1/reports", params={"cusip": ""}).status_code == 200
    tas_cusip = next(p["schema"] for p in paths["/api/v1/time-and-sales"]["get"]["parameters"] if p["name"] == "cusip")
    assert not _validator(tas_cusip).is_valid("") and c.get("/api/v1/time-and-sales?cusip=").status_code == 400
    date_schema = next(p["schema"] for p in paths["/api/v1/reports"]["get"]["parameters"] if p["name"] == "date_to")
    assert _validator(date_schema).is_valid("") and not _validator(date_schema).is_valid("2024-1-2")
    assert c.get("/api/v1/reports", params={"date_to": ""}).status_code == 200  # empty: as if not given
    for param in paths["/api/v1/reports"]["get"]["parameters"]:  # every filter but limit, given empty
        empty_ok = c.get("/api/v1/reports", params={param["name"]: ""}).status_code == 200
        assert _validator(param["schema"]).is_valid("") == empty_ok, param
    cancel_body = paths["/api/v1/reports/{control_number}/cancel"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    assert _validator(cancel_body).is_valid({"action": "CANCEL", "original_control_number": cn, "client_ref": "C-1"})
    assert _validator(cancel_body).is_valid({"when_issued": 1}) and not _validator(cancel_body).is_valid({"test": 0.5})
    bulk = paths["/api/v1/bulk"]["post"]["requestBody"]["content"]["text/csv"]["schema"]
    assert not _validator(bulk).is_valid("")  # refused 400 FILE_INVALID


def test_a_certificate_holder_learns_nothing_of_other_logins(world):
    """With its own certificate, a caller sends other logins and wrong passwords: an existing
    user of another firm and a name no one has must get the same answers, and the existing
    user must not be locked out by someone else's certificate."""
    b = world.org("Dealer B", "FIRM", mpid="DLRB")
    other = world.user("b-trader", b, "trader")
    with_certificate(world, other)
    answers = {}
    for login in ("b-trader", "no-such-user"):
        c = api_client(world, world.trader)
        c.auth = (login, "not the password")
        answers[login] = [(r.status_code, r.json()["code"]) for r in (c.get("/api/v1/reports") for _ in range(7))]
    assert answers["b-trader"] == answers["no-such-user"], answers
    assert api_client(world, other).get("/api/v1/reports").status_code == 200  # not locked out by another's certificate


def test_another_login_is_refused_alike_whatever_its_password_or_lock(world):
    """Another user's right password gave CERT_USER_MISMATCH where a wrong one gave
    LOGIN_FAILED (a password oracle), a locked user LOCKED: now every other login, existing
    or not, locked or not, right password or wrong, is CERT_USER_MISMATCH, nothing is counted
    against that user, and the failures count against the certificate's own user."""
    from bondtape.access import accounts

    b = world.org("Dealer B", "FIRM", mpid="DLRB")
    other = world.user("b-trader", b, "trader")
    locked = world.user("b-locked", b, "trader")
    with_certificate(world, other)
    with world.db.begin() as conn:  # b-locked: locked by its own wrong passwords
        row = accounts.user_by_id(conn, locked.id)
        for _ in range(world.settings.lockout.max_failures):
            accounts.register_failure(conn, row, now_us=world.clock.t, lockout=world.settings.lockout,
                                      source="elsewhere", action="api.login.failed", reason="bad_password")
    c = api_client(world, world.trader)
    seen = set()
    for login, password in (("b-trader", other.password), ("b-trader", "wrong"), (" B-Trader ", other.password),
                            ("b-locked", locked.password), ("no-such-user", "wrong"), ("", "")):
        c.auth = (login, password)
        r = c.get("/api/v1/reports")
        seen.add((r.status_code, r.json()["code"], r.json()["message"]))
    assert seen == {(403, "CERT_USER_MISMATCH", "the client certificate belongs to another user")}, seen
    with world.db.connect() as conn:
        assert not accounts.is_locked(conn, other.id, world.clock.t)
        failed = {row.user_id: row.failed_count for row in conn.execute(accounts.login_state.select())}
    assert failed.get(other.id, 0) == 0
    # six mismatches from a-trader's certificate: a-trader is locked (five), b-trader never was
    with world.db.connect() as conn:
        assert accounts.is_locked(conn, world.trader.id, world.clock.t)
    assert api_client(world, other).get("/api/v1/reports").status_code == 200
    c.auth = (world.trader.username, world.trader.password)
    assert c.get("/api/v1/reports").json()["code"] == "LOCKED"


def test_paging_back_ends_on_the_last_page(world):
    """next is null on the last page: a last page that was exactly full named a next page,
    which came back empty (one more request for every listing whose size divides by limit)."""
    c = api_client(world, world.trader)
    made = [c.post("/api/v1/reports", json=trade(client_ref=f"P-{i}", quantity=str(1000 * (i + 1)))).json()["control_number"]
            for i in range(4)]
    pages, after = [], None
    while True:
        body = c.get("/api/v1/reports", params={"limit": 2, **({"after": after} if after else {})}).json()
        pages.append([r["control_number"] for r in body["reports"]])
        after = body["next"]
        if after is None:
            break
    assert pages == [made[::-1][:2], made[::-1][2:]], pages
    assert c.get("/api/v1/reports", params={"limit": 5}).json()["next"] is None
    three = c.get("/api/v1/reports", params={"limit": 3}).json()
    assert three["next"] == made[1] and len(three["reports"]) == 3


def test_a_misspelt_or_repeated_query_parameter_is_refused(world):
    """A filter the call does not take was ignored: GET /api/v1/reports?stauts=CANCELLED listed
    every report, as if they were all cancelled; a repeated one silently took the last value."""
    c = api_client(world, world.trader)
    c.post("/api/v1/reports", json=trade(client_ref="A-1"))
    for path, params, field in (("/api/v1/reports", "stauts=CANCELLED", "stauts"),
                                ("/api/v1/reports", "limit=1&limit=1000", "limit"),
                                ("/api/v1/securities", "day=2026-06-01", "day"),
                                ("/api/v1/time-and-sales", f"cusip={IG}&from=2026-06-01", "from")):
        r = c.get(f"{path}?{params}")
        assert r.status_code == 400, (path, params, r.text)
        assert (r.json()["code"], r.json()["field"]) == ("FILTER_INVALID", field), r.text
    assert c.get("/api/v1/reports?status=CANCELLED").json()["reports"] == []


def test_a_query_parameter_on_a_post_is_refused(world):
    """POST /api/v1/reports?test=Y journaled a production report: the query was not read."""
    c = api_client(world, world.trader)
    r = c.post("/api/v1/reports?test=Y", json=trade(client_ref="A-1"))
    assert r.status_code == 400 and (r.json()["code"], r.json()["field"]) == ("FILTER_INVALID", "test"), r.text
    assert "body" in r.json()["message"] and c.get("/api/v1/reports").json()["reports"] == []
    cn = c.post("/api/v1/reports", json=trade(client_ref="A-1")).json()["control_number"]
    r = c.post(f"/api/v1/reports/{cn}/cancel?client_ref=C-1")
    assert r.status_code == 400 and r.json()["field"] == "client_ref", r.text
    r = c.post("/api/v1/bulk?test=Y", content=b"client_ref\n", headers={"content-type": "text/csv"})
    assert r.status_code == 400 and r.json()["field"] == "test", r.text


def test_a_field_of_the_wrong_json_type_is_refused_naming_it(world):
    """true was read as "Y" in any field: {"client_ref": true} journaled a report under the
    reference "Y", {"quantity": true} was rejected as quantity 'Y'. Text fields given as JSON
    numbers were taken as their digits. Now each field takes the JSON types the OpenAPI names."""
    c = api_client(world, world.trader)
    for fields in ({"client_ref": True}, {"quantity": True}, {"cusip": False}, {"side": 1}, {"client_ref": 12345}):
        r = c.post("/api/v1/reports", json=trade(**fields))
        [key] = fields
        assert r.status_code == 400 and (r.json()["code"], r.json()["field"]) == ("FIELD_INVALID", key), (fields, r.text)
    assert c.get("/api/v1/reports").json()["reports"] == []
    ok = c.post("/api/v1/reports", json=trade(client_ref="A-1", quantity=250000, price=101.25, when_issued=False,
                                              test=1, allow_duplicate=True))
    assert ok.status_code == 200, ok.text
    cn = ok.json()["control_number"]
    r = c.post(f"/api/v1/reports/{cn}/cancel", json={"original_control_number": int(cn), "client_ref": "C-1", "test": "Y"})
    assert r.status_code == 200 and r.json()["control_number"] == cn, r.text


def _request_rows(world):
    from bondtape.access import audit

    with world.db.connect() as conn:
        rows = audit.search(conn, action="request", limit=50)
    return [(e.target, e.detail["method"], e.detail["status"]) for e in reversed(rows) if e.action == "request"]


def test_the_audit_trail_records_the_status_the_client_got(world):
    """The API's POST calls answer after the commit (AfterCommit): their "request" row was
    written before the answer was made and said 200 for every one, a 400 and a 422 too."""
    c = api_client(world, world.trader)
    got = [c.post("/api/v1/reports", json={"colour": "red"}).status_code,              # 400 FIELD_UNKNOWN
           c.post("/api/v1/reports", json=trade(cusip="nope")).status_code,              # 422 rejected
           c.post("/api/v1/reports", json=trade(client_ref="A-1")).status_code,          # 200 accepted
           c.post("/api/v1/reports", content=b"{", headers=JSON).status_code,            # 400 JSON_INVALID
           c.post("/api/v1/bulk", content=b"x", headers={"content-type": "text/csv"}).status_code]  # 400, not after
    assert got == [400, 422, 200, 400, 400], got
    recorded = _request_rows(world)
    assert [status for _t, _m, status in recorded] == got, recorded
    assert {(t, m) for t, m, _s in recorded} == {("/api/v1/reports", "POST"), ("/api/v1/bulk", "POST")}


def test_a_request_whose_work_fails_is_recorded_500_and_an_unwritable_row_keeps_the_answer(world, monkeypatch):
    from bondtape.access import audit
    from bondtape.web import api

    from starlette.testclient import TestClient

    from tests.api_support import WithCertificate

    c = TestClient(WithCertificate(world.app, world.pems[world.trader.username]), base_url="https://testserver",
                   raise_server_exceptions=False)
    c.auth = (world.trader.username, world.trader.password)

    def broken(*_a, **_k):
        raise RuntimeError("engine fell over")

    monkeypatch.setattr(api, "submit", broken)
    assert c.post("/api/v1/reports", json=trade(client_ref="A-1")).status_code == 500
    assert [s for _t, _m, s in _request_rows(world)] == [500]
    monkeypatch.undo()

    def no_audit(*_a, **_k):
        raise RuntimeError("audit database gone")

    monkeypatch.setattr(audit, "record_now", no_audit)
    r = c.post("/api/v1/reports", json=trade(client_ref="A-2"))
    assert r.status_code == 200 and r.json()["control_number"], r.text  # journaled: said so, not a 5xx


def test_throttled_answers_say_when_to_try_again(world):
    """429 THROTTLED had no Retry-After: a client could only guess when its address would be
    let in again. It is the seconds until the address's failures in the window fall below
    the limit, and the address is let in then, not before."""
    from bondtape.access import audit

    lockout = world.settings.lockout
    window = lockout.source_window_minutes * 60
    start = world.clock.t - (window - 60) * 1_000_000   # 14 minutes ago, one failure a second
    with world.db.begin() as conn:
        for i in range(lockout.max_failures_per_source + 2):
            audit.record(conn, "api.login.failed", at_us=start + i * 1_000_000, outcome="failed",
                         actor="someone", source="testclient", detail={"reason": "unknown_user"})
    # the 50th latest failure is the third (start + 2 s): out of the window after start + 2 s + 15 min
    wait = 60 + 2 + 1  # seconds, rounded up past that microsecond
    c = api_client(world, world.trader)
    for login in (world.trader.username, "b-trader"):  # the same for any login
        c.auth = (login, world.trader.password)
        r = c.get("/api/v1/reports")
        assert (r.status_code, r.json()["code"], r.headers.get("retry-after")) == (429, "THROTTLED", str(wait)), r.text
    c.auth = (world.trader.username, world.trader.password)
    world.clock.advance(wait - 1)
    r = c.get("/api/v1/reports")
    assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
    world.clock.advance(1)
    assert c.get("/api/v1/reports").status_code == 200


def test_the_website_sign_in_says_when_a_throttled_address_may_try_again(world):
    """The sign-in page's 429 had no Retry-After and said only "try again later"; it gives the
    same wait as the API (one rule: accounts.source_retry_after_s)."""
    from bondtape.access import audit

    lockout = world.settings.lockout
    start = world.clock.t - (lockout.source_window_minutes * 60 - 60) * 1_000_000
    with world.db.begin() as conn:
        for i in range(lockout.max_failures_per_source + 2):
            audit.record(conn, "login.failed", at_us=start + i * 1_000_000, outcome="failed",
                         actor="someone", source="testclient", detail={"reason": "unknown_user"})
    page = world.client().login(world.trader)
    assert page.status_code == 429 and page.headers.get("retry-after") == "63", page.headers
    assert "try again in 63 s" in page.text


def test_a_method_not_allowed_names_every_method_of_the_path(world):
    """GET and POST /api/v1/reports are two routes: OPTIONS or PUT answered 405 "allowed: POST"
    (Allow: POST), from the first route only, though GET works too."""
    c = api_client(world, world.trader)
    for method in ("OPTIONS", "PUT", "DELETE", "PATCH"):
        r = c.request(method, "/api/v1/reports")
        assert r.status_code == 405 and r.json()["code"] == "METHOD_NOT_ALLOWED", (method, r.text)
        assert r.headers["allow"] == "GET, HEAD, POST", (method, r.headers)
        assert "(allowed: GET, HEAD, POST)" in r.json()["message"], r.text
    r = c.get("/api/v1/bulk")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "(allowed: POST)" in r.json()["message"]
    r = c.put("/api/v1/reports/12")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD", r.headers

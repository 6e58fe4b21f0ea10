"""The OpenAPI description against the running app (schemathesis): for inputs generated
from /openapi.json, no answer is a server error, and each answer's status code, content type
and body match the description. Bounded: a few examples per operation.

Requests go in-process through the ASGI app with the trader's client certificate in the
TLS scope (as uvicorn puts it) and HTTP Basic login and password, so the firm's calls get
past the access checks and reach validation and the engine."""
from __future__ import annotations

import base64
import os

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (dev extras)")
from hypothesis import HealthCheck, settings  # noqa: E402

from bondtape.engine import Engine  # noqa: E402
from tests.api_support import WithCertificate, api_world, with_certificate  # noqa: E402
from tests.conftest import et  # noqa: E402
from tests.helpers import new  # noqa: E402

NOW = et(2026, 6, 1, 10, 0, 0)
# no server error; and every answer's status code, content type and body are as described
CHECKS = [schemathesis.checks.not_a_server_error, schemathesis.checks.status_code_conformance,
          schemathesis.checks.content_type_conformance, schemathesis.checks.response_schema_conformance]
EXAMPLES = int(os.environ.get("BONDTAPE_CONTRACT_EXAMPLES", "12"))  # more for a deeper local run


@pytest.fixture
def api_schema(market, tmp_path):
    w = api_world(market, tmp_path, NOW)
    firm = w.org("Dealer A", "FIRM", mpid="DLRA")
    trader = w.user("a-trader", firm, "trader")
    with_certificate(w, trader)
    Engine(market).submit([new(mpid="DLRA", ref=f"c{i}") for i in range(3)])  # reports to act on: 1000000001..3
    app = WithCertificate(w.app, w.pems[trader.username])
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.auth_header = "Basic " + base64.b64encode(f"{trader.username}:{trader.password}".encode()).decode()
    yield schema
    w.close()


def test_no_server_error_for_generated_input(api_schema):
    from hypothesis import given

    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) == len([m for p in api_schema.raw_schema["paths"].values() for m in p]) == 9
    seen = []
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def no_server_error(case):
            response = case.call_and_validate(headers={"Authorization": api_schema.auth_header}, checks=CHECKS)
            assert response.status_code < 500, (case.method, case.formatted_path, case.body, response.text[:500])
            seen.append(response.status_code)

        no_server_error()
    assert any(code < 300 for code in seen) and any(code in (400, 404, 422) for code in seen)

"""Every reject code is reachable from an input, through the bulk channel, and documented."""
import re
from pathlib import Path

import pytest
import sqlalchemy as sa

from bondtape.engine import Engine
from bondtape.journal.schema import CONTROL_BASE
from bondtape.reporting.codes import REJECT_CODES
from tests.conftest import HY, IG, make_cusip
from tests.helpers import bulk_results

ROOT = Path(__file__).resolve().parents[1]
HEADER = ["action", "client_ref", "reporting_mpid", "cusip", "side", "capacity", "contra", "quantity", "price",
          "yield", "commission", "execution_time", "settlement_date", "report_time", "original_control_number",
          "test", "trading_market"]
GOOD = dict(action="NEW", reporting_mpid="DLRA", cusip=IG, side="S", capacity="P", contra="C", quantity="100000",
            price="99.5", execution_time="2024-03-04T10:00:00-05:00", report_time="2024-03-04T10:01:00-05:00")
FIRST = str(CONTROL_BASE + 1)  # the setup row below

CASES = {
    "FIELD_REQUIRED": dict(side=""),
    "FIELD_INVALID": dict(capacity="X"),
    "ACTION_INVALID": dict(action="AMEND"),
    "CUSIP_MALFORMED": dict(cusip="12345"),
    "CUSIP_CHECK_DIGIT": dict(cusip=IG[:8] + str((int(IG[8]) + 1) % 10)),
    "SECURITY_UNKNOWN": dict(cusip=make_cusip("99999999")),
    "SECURITY_NOT_ELIGIBLE": dict(execution_time="2036-01-02T10:00:00-05:00", report_time="2036-01-02T10:01:00-05:00"),
    "FIRM_UNKNOWN": dict(reporting_mpid="ZZZZ"),
    "FIRM_NOT_MEMBER": dict(reporting_mpid="NMBR"),
    "CONTRA_UNKNOWN": dict(contra="ZZZZ"),
    "CONTRA_NOT_MEMBER": dict(contra="NMBR"),
    "CONTRA_IS_REPORTER": dict(contra="DLRA"),
    "PRICE_INVALID": dict(price="0"),
    "PRICE_IMPLAUSIBLE": dict(price="10000.5"),
    "QUANTITY_INVALID": dict(quantity="-100"),
    "QUANTITY_IMPLAUSIBLE": dict(quantity="100.001"),
    "YIELD_INVALID": dict(**{"yield": "5000"}),
    "COMMISSION_INVALID": dict(commission="-1"),
    "TIME_INVALID": dict(execution_time="yesterday"),
    "DATE_INVALID": dict(settlement_date="03/06/2024"),
    "EXECUTION_IN_FUTURE": dict(execution_time="2024-03-04T10:05:00-05:00"),
    "EXECUTION_BEFORE_TRACE": dict(execution_time="2002-06-28T10:00:00-04:00"),
    "SETTLEMENT_BEFORE_EXECUTION": dict(settlement_date="2024-03-01"),
    "REPORT_UNKNOWN": dict(action="CANCEL", original_control_number="1999999999"),
    "TIME_AMBIGUOUS": dict(execution_time="2023-11-05T01:30:00"),
    "REPORT_NOT_ACTIVE": None,  # second cancel, below
    "WINDOW_CLOSED": dict(action="CORRECT", original_control_number=FIRST, report_time="2024-05-01T10:00:00-04:00", price="98"),
    "WINDOW_OPEN": dict(action="REVERSE", original_control_number=FIRST),
    "DUPLICATE_TRADE": dict(),
    "TEST_MISMATCH": dict(action="CANCEL", original_control_number=FIRST, test="Y"),
    "CLIENT_REF_REUSED": dict(action="CANCEL", original_control_number=FIRST, client_ref="setup"),
}


def _row(**over):
    row = dict(GOOD)
    row.update(over)
    return row


def test_every_code_has_a_case():
    # NOT_OWN_REPORT is FIX's alone (a reporting party of another firm: test_fix_quickfix)
    assert set(CASES) | {"SYSTEM_CLOSED", "NOT_OWN_REPORT"} == set(REJECT_CODES)


@pytest.fixture
def results(market):
    rows = [_row(client_ref="setup", price="99.25")]
    expected = {}
    for i, (code, over) in enumerate(CASES.items()):
        if over is None:
            continue
        fields = {"price": "99.25"} if code == "DUPLICATE_TRADE" else {}  # the setup row's terms
        fields.update(over)
        rows.append(_row(**{"client_ref": f"case{i}", **fields}))
        expected[len(rows) + 1] = code
    # REPORT_NOT_ACTIVE: a new report, cancelled, then cancelled again
    second = str(CONTROL_BASE + 2)
    rows += [_row(client_ref="n2", quantity="7777"),
             _row(client_ref="c1", action="CANCEL", original_control_number=second),
             _row(client_ref="c2", action="CANCEL", original_control_number=second)]
    expected[len(rows) + 1] = "REPORT_NOT_ACTIVE"
    got = bulk_results(market, HEADER, rows)
    return got, expected


def test_every_reject_code_is_reachable(results):
    got, expected = results
    assert got[2]["status"] == "ACCEPTED" and got[2]["control_number"] == str(CONTROL_BASE + 1)
    for line, code in expected.items():
        assert got[line]["reject_code"] == code, (line, code, got[line])
        assert got[line]["field"] and got[line]["message"]


def test_system_closed_when_the_rulebook_enforces_hours(market):
    import dataclasses
    import datetime as dt

    from bondtape.rulebook import Rulebook, load_versions
    from tests.conftest import et
    from tests.helpers import new

    rb = Rulebook(load_versions())
    strict = dataclasses.replace(rb.at(dt.date(2024, 3, 4)), reject_outside_system_hours=True)
    rb.at = lambda d: strict
    [r] = Engine(market, rb).submit([new(execution_us=et(2024, 3, 4, 18, 40), report_us=et(2024, 3, 4, 18, 45))])
    assert r.reject.code == "SYSTEM_CLOSED" and r.reject.field == "report_time"


def test_every_code_is_documented():
    text = (ROOT / "docs" / "reject-codes.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", text, re.M))
    assert documented == set(REJECT_CODES)


def test_commission_above_the_rulebook_maximum_is_refused(market):
    import dataclasses
    import datetime as dt

    from tests.conftest import et
    from tests.helpers import new

    cmd = new(execution_us=et(2024, 3, 4, 10, 0), report_us=et(2024, 3, 4, 10, 1))
    engine = Engine(market)
    top = engine.rulebook.at(dt.date(2024, 3, 4)).max_commission
    over = dataclasses.replace(cmd, client_ref="over", terms=dataclasses.replace(cmd.terms, commission=top + 1))
    at = dataclasses.replace(cmd, client_ref="at", terms=dataclasses.replace(
        cmd.terms, commission=top, quantity=cmd.terms.quantity + 1000))  # other terms: not a duplicate
    r_over, r_at = engine.submit([over, at])
    assert r_over.reject.code == "COMMISSION_INVALID" and "above" in r_over.reject.message
    assert r_at.accepted


def test_scaling_is_exact_whatever_the_number_of_digits():
    """Under the default 28-digit context scaleb rounded silently: 99.999...9 (32 digits) became
    price 100.000000, and 1E-999999999 became 0. Every channel's parser bounds digits, but the
    validation that stores the scaled integer must not depend on it."""
    from decimal import Decimal

    from bondtape.reporting.codes import Rejected
    from bondtape.reporting.validation import scaled

    assert scaled(Decimal("101.253"), 6, "price", "PRICE_IMPLAUSIBLE", "percent of par") == 101_253_000
    assert scaled(Decimal("100.000000000"), 6, "price", "PRICE_IMPLAUSIBLE", "percent of par") == 100_000_000
    for text in ("99.99999999999999999999999999999", "1E-999999999", "100.0000001"):
        with pytest.raises(Rejected) as info:
            scaled(Decimal(text), 6, "price", "PRICE_IMPLAUSIBLE", "percent of par")
        assert info.value.reject.code == "PRICE_IMPLAUSIBLE" and info.value.reject.field == "price"

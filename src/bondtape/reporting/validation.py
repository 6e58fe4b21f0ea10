"""Validation of a report's terms against reference data and the rulebook. Pure."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
import decimal
from decimal import Decimal
from functools import lru_cache
from typing import Any, Mapping

from bondtape.clock import MARKET_TZ, from_us, market_date
from bondtape.dissemination.rules import withheld_reason
from bondtape.reference.cusip import cusip_problem
from bondtape.reference.model import Firm, Security
from bondtape.reporting.codes import Rejected
from bondtape.reporting.commands import Terms
from bondtape.rulebook import Rulebook, Timeliness, timeliness


@dataclass(slots=True)  # read-only by convention (a frozen dataclass is slow to build)
class Checked:
    """What validation derives from a report's terms, stored with it in the journal."""

    security: Security
    timeliness: Timeliness
    execution_date: dt.date
    report_date: dt.date
    settlement_date: dt.date
    quantity_c: int
    price_u: int
    yield_u: int | None
    commission_c: int | None
    withheld: str | None
    rulebook_version: str


# exact: scaleb under the default context (28 digits) would round a long value silently,
# e.g. 99.99999999999999999999999999999 to 100.000000
_EXACT = decimal.Context(prec=60, traps=[decimal.Inexact, decimal.Rounded, decimal.InvalidOperation])


def scaled(value: Decimal, decimals: int, field: str, code: str, what: str) -> int:
    try:
        shifted = value.scaleb(decimals, _EXACT)
    except decimal.DecimalException:
        shifted = None
    if shifted is None or shifted != shifted.to_integral_value():
        raise Rejected(code, field, f"{field} {value} has more than {decimals} decimals ({what})")
    return int(shifted)


@lru_cache(maxsize=65_536)
def _regular_settlement(calendar: Any, execution_date: dt.date, days: int) -> dt.date:
    return calendar.add_business_days(execution_date, days)


def check_firm(mpid: str, firms: Mapping[str, Firm]) -> Firm:
    firm = firms.get(mpid)
    if firm is None:
        raise Rejected("FIRM_UNKNOWN", "reporting_mpid", f"reporting_mpid {mpid!r} is not a known firm")
    if not firm.finra_member:
        raise Rejected("FIRM_NOT_MEMBER", "reporting_mpid", f"{mpid} is not a FINRA member; only members report")
    return firm


def check_terms(
    terms: Terms,
    mpid: str,
    report_us: int,
    is_test: bool,
    securities: Mapping[str, Security],
    firms: Mapping[str, Firm],
    rulebook: Rulebook,
) -> Checked:
    """Raise :class:`Rejected` for the first problem, else return the derived facts."""
    security = securities.get(terms.cusip)
    if security is None:  # reference data holds only valid CUSIPs: check the unknown ones
        problem = cusip_problem(terms.cusip)
        if problem:
            code = "CUSIP_CHECK_DIGIT" if problem.startswith("check digit") else "CUSIP_MALFORMED"
            raise Rejected(code, "cusip", f"cusip {terms.cusip!r}: {problem}")
        raise Rejected("SECURITY_UNKNOWN", "cusip", f"cusip {terms.cusip} is not in reference data")
    report_date = market_date(report_us)
    rules = rulebook.at(report_date)
    if terms.contra not in ("C", "A"):
        contra = firms.get(terms.contra)
        if contra is None:
            raise Rejected("CONTRA_UNKNOWN", "contra", f"contra {terms.contra!r} is not a known MPID; use C for a customer, A for a non-member affiliate")
        if not contra.finra_member:
            raise Rejected("CONTRA_NOT_MEMBER", "contra", f"{terms.contra} is not a FINRA member: report it as C (customer)")
        if terms.contra == mpid:
            raise Rejected("CONTRA_IS_REPORTER", "contra", "contra is the reporting firm itself")
    if terms.price <= 0:
        raise Rejected("PRICE_INVALID", "price", f"price {terms.price} must be positive (percent of par)")
    if terms.price > rules.max_price:
        raise Rejected("PRICE_IMPLAUSIBLE", "price", f"price {terms.price} is above {rules.max_price} (percent of par)")
    price_u = scaled(terms.price, rules.price_decimals, "price", "PRICE_IMPLAUSIBLE", "percent of par")
    if terms.quantity <= 0:
        raise Rejected("QUANTITY_INVALID", "quantity", f"quantity {terms.quantity} must be a positive par amount")
    if terms.quantity > rules.max_quantity:
        raise Rejected("QUANTITY_IMPLAUSIBLE", "quantity", f"quantity {terms.quantity} is above {rules.max_quantity} par")
    quantity_c = scaled(terms.quantity, rules.quantity_decimals, "quantity", "QUANTITY_IMPLAUSIBLE", "dollars of par")
    yield_u = None
    if terms.yield_ is not None:
        if abs(terms.yield_) > rules.max_abs_yield:
            raise Rejected("YIELD_INVALID", "yield", f"yield {terms.yield_} is outside ±{rules.max_abs_yield}")
        yield_u = scaled(terms.yield_, rules.yield_decimals, "yield", "YIELD_INVALID", "percent")
    commission_c = None
    if terms.commission is not None:
        if terms.commission < 0:
            raise Rejected("COMMISSION_INVALID", "commission", f"commission {terms.commission} is negative")
        if terms.commission > rules.max_commission:
            raise Rejected("COMMISSION_INVALID", "commission", f"commission {terms.commission} is above {rules.max_commission} dollars")
        commission_c = scaled(terms.commission, rules.commission_decimals, "commission", "COMMISSION_INVALID", "dollars")
    if terms.execution_us > report_us:
        raise Rejected("EXECUTION_IN_FUTURE", "execution_time", "execution_time is after the report was received")
    execution_date = market_date(terms.execution_us)
    if execution_date < rules.first_trace_date:
        raise Rejected("EXECUTION_BEFORE_TRACE", "execution_time", f"execution date {execution_date} is before TRACE began ({rules.first_trace_date})")
    if not security.eligible_on(execution_date):
        raise Rejected("SECURITY_NOT_ELIGIBLE", "cusip", f"{terms.cusip} is not TRACE-eligible on {execution_date}")
    settlement = terms.settlement_date
    if settlement is None:
        settlement = _regular_settlement(rules.calendar, execution_date, rules.regular_settlement_days)
    elif settlement < execution_date:
        raise Rejected("SETTLEMENT_BEFORE_EXECUTION", "settlement_date", f"settlement_date {settlement} is before the execution date {execution_date}")
    timely = timeliness(terms.execution_us, report_us, rulebook.at(execution_date), primary_market=terms.trading_market == "P1")
    if rules.reject_outside_system_hours:
        local = from_us(report_us).astimezone(MARKET_TZ)
        if not (rules.calendar.is_business_day(local.date()) and rules.system_open <= local.time() < rules.system_close):  # rare path
            raise Rejected("SYSTEM_CLOSED", "report_time", f"reports are taken {rules.system_open}-{rules.system_close} ET on business days")
    withheld = withheld_reason(
        is_test=is_test, rule_144a=security.rule_144a, merger_transfer=terms.merger_transfer,
        trading_market=terms.trading_market, contra_type=terms.contra_type, side=terms.side,
        capacity=terms.capacity, rules=rules,
    )
    # positional, in field order (security, timeliness, execution_date, report_date,
    # settlement_date, quantity_c, price_u, yield_u, commission_c, withheld, rulebook_version)
    return Checked(security, timely, execution_date, report_date, settlement, quantity_c, price_u, yield_u,
                   commission_c, withheld, rules.versions[-1])

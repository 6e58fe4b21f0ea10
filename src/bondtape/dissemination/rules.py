"""Whether a report is disseminated, and how its quantity is shown. Pure functions."""
from __future__ import annotations

from decimal import Decimal

from bondtape.rulebook import Rules, volume_cap


def withheld_reason(
    *,
    is_test: bool,
    rule_144a: bool,
    merger_transfer: bool,
    trading_market: str,
    contra_type: str,
    side: str,
    capacity: str,
    rules: Rules,
) -> str | None:
    """None if the report is disseminated, else why not (a stable reason code)."""
    if is_test:
        return "TEST_REPORT"
    if rule_144a and not rules.disseminate_rule_144a:
        return "RULE_144A"
    if merger_transfer and not rules.disseminate_merger_transfer:
        return "MERGER_TRANSFER_6750B"
    if trading_market == "P1" and not rules.disseminate_primary_market_p1:
        return "PRIMARY_MARKET_P1"
    if contra_type == "D" and side != rules.inter_dealer_side:
        return "INTER_DEALER_BUY_SIDE"
    if contra_type == "A" and capacity == "P" and not rules.disseminate_affiliate_principal:
        return "AFFILIATE_PRINCIPAL_6750D"
    return None


def disseminated_quantity(quantity: Decimal, grade: str | None, rules: Rules) -> str:
    """The quantity as the public sees it: exact up to the cap, else 5MM+ or 1MM+."""
    cap = volume_cap(grade, rules)
    if quantity > cap:
        return f"{cap / 1_000_000:f}".rstrip("0").rstrip(".") + "MM+"
    return format(quantity, "f")

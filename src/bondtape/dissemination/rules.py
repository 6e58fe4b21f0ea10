"""What the public sees of a report, and how. Pure functions: no I/O, no clock.

``withheld_reason`` decides (at intake, stored on the journal event as ``withheld``)
whether a report is disseminated; ``disseminated_quantity`` applies the volume cap; the
rest build the public trade block and the end-of-day figures from facts passed in. Only
fields named here reach a public message: never an MPID, a client reference or a control
number.
"""
from __future__ import annotations

import json
from decimal import Decimal
from json.encoder import encode_basestring_ascii
from typing import Any, Callable, Iterable, Mapping

from bondtape.clock import iso_market
from bondtape.rulebook import Rules, volume_cap

# Reasons that are not a secret of one trade: the buy side of an inter-dealer trade is the
# same trade as the disseminated sell side, so it is counted once in aggregates.
INTER_DEALER_BUY_SIDE = "INTER_DEALER_BUY_SIDE"
TEST_REPORT = "TEST_REPORT"


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
        return TEST_REPORT
    if rule_144a and not rules.disseminate_rule_144a:
        return "RULE_144A"
    if merger_transfer and not rules.disseminate_merger_transfer:
        return "MERGER_TRANSFER_6750B"
    if trading_market == "P1" and not rules.disseminate_primary_market_p1:
        return "PRIMARY_MARKET_P1"
    if contra_type == "D" and side != rules.inter_dealer_side:
        return INTER_DEALER_BUY_SIDE
    if contra_type == "A" and capacity == "P" and not rules.disseminate_affiliate_principal:
        return "AFFILIATE_PRINCIPAL_6750D"
    return None


def disseminated_quantity(quantity: Decimal, grade: str | None, rules: Rules) -> str:
    """The quantity as the public sees it: exact up to the cap, else 5MM+ or 1MM+."""
    cap = volume_cap(grade, rules)
    if quantity > cap:
        return f"{cap / 1_000_000:f}".rstrip("0").rstrip(".") + "MM+"
    return plain(quantity)


def plain(value: Decimal) -> str:
    """A decimal without exponent or trailing zeros: 250000, 101.125."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def scaled_text(value: int | None, places: int) -> str | None:
    """A scaled integer (cents, millionths) as exact decimal text."""
    return None if value is None else plain(Decimal(value).scaleb(-places))


def counts_in_aggregates(withheld: str | None) -> bool:
    """Market aggregates include non-disseminated trades (R19), each trade once, no tests."""
    return withheld not in (INTER_DEALER_BUY_SIDE, TEST_REPORT)


def sets_last_sale(payload: Mapping[str, Any]) -> bool:
    """Whether a disseminated trade may set the day's high, low and last sale.

    As-of trades (executed on an earlier day), special-price and weighted-average trades
    are disseminated but do not set the day's prices.
    """
    return not (payload.get("as_of") or payload.get("special_price") or payload.get("weighted_average"))


def trade_block(payload: Mapping[str, Any], reported_us: int, rules: Rules) -> dict[str, Any]:
    """The public fields of a report (new or corrected terms), from its journal payload.

    ``rules`` are those of the report date (the cap in force when it was reported).
    """
    quantity = Decimal(payload["quantity_c"]).scaleb(-2)
    shown = disseminated_quantity(quantity, payload.get("grade"), rules)
    return {
        "cusip": payload["cusip"],
        "symbol": payload["symbol"],
        "quantity": shown,
        "quantity_indicator": "E" if shown.endswith("+") else "A",
        "price": scaled_text(payload["price_u"], 6),
        "yield": scaled_text(payload.get("yield_u"), 6),
        "side": payload["side"],
        "reporting_party_type": "D",
        "contra_party_type": payload["contra_type"],  # C customer, D dealer, A affiliate
        "as_of": "A" if payload.get("as_of") else None,
        "execution_time": iso_market(payload["execution_us"]),
        "settlement_date": payload["settlement_date"],
        "modifier3": payload.get("modifier3"),
        "modifier4": "W" if payload.get("weighted_average") else None,
        "special_price": bool(payload.get("special_price")),
        "when_issued": bool(payload.get("when_issued")),
        "remuneration": payload.get("remuneration"),
        "reported_at": iso_market(reported_us),
    }


def reversal_block(original_block: Mapping[str, Any], reversed_us: int) -> dict[str, Any]:
    """A reversal carries the original trade with the as-of indicator R."""
    return {**original_block, "as_of": "R", "reported_at": iso_market(reversed_us)}


class Encoded(str):
    """A value already serialised by :func:`encode` (a trade block): :func:`encode` puts
    its text into a message as it is instead of serialising the value again."""

    __slots__ = ()


_dumps = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=True).encode


def _value(v: Any) -> str:
    t = type(v)
    if t is Encoded:
        return v
    if t is str:
        return encode_basestring_ascii(v)
    if t is int:
        return int.__repr__(v)
    if v is None:
        return "null"
    if t is bool:
        return "true" if v else "false"
    return _dumps(v)


def encode(message: Mapping[str, Any]) -> str:
    """The one serialisation of a message: the bytes every transport and replay carry
    (``json.dumps`` with keys sorted, no spaces, ASCII). A top-level :class:`Encoded` value
    is put in as its text: the result is the text of the message with the value decoded."""
    return "{" + ",".join([encode_basestring_ascii(k) + ":" + _value(message[k]) for k in sorted(message)]) + "}"


# --- end of day ---------------------------------------------------------------------------


def daily_summaries(trades: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """High, low and last price (and yields) per security from the day's active, disseminated
    trades that may set the last sale. ``trades`` carry cusip, symbol, price_u, yield_u,
    execution_us and journal_seq; the last sale is the latest execution (then the latest report).
    """
    by_cusip: dict[str, list[Mapping[str, Any]]] = {}
    for t in trades:
        by_cusip.setdefault(t["cusip"], []).append(t)
    out = []
    for cusip in sorted(by_cusip):
        rows = by_cusip[cusip]
        high = max(rows, key=lambda r: (r["price_u"], r["journal_seq"]))
        low = min(rows, key=lambda r: (r["price_u"], -r["journal_seq"]))
        last = max(rows, key=lambda r: (r["execution_us"], r["journal_seq"]))
        out.append({
            "cusip": cusip,
            "symbol": last["symbol"],
            "trades": len(rows),
            "high": scaled_text(high["price_u"], 6), "high_yield": scaled_text(high["yield_u"], 6),
            "low": scaled_text(low["price_u"], 6), "low_yield": scaled_text(low["yield_u"], 6),
            "last": scaled_text(last["price_u"], 6), "last_yield": scaled_text(last["yield_u"], 6),
            "last_price_u": last["price_u"],
        })
    return out


# R19: aggregates include non-disseminated trades "without revealing any one of them". A
# par total that holds exactly one or two trades whose size is not public (capped or not
# disseminated) would give that size back (total minus the public sizes), and so would one
# whose largest hidden trade dominates the others (one of 50MM beside two of 1MM: the total
# gives it within 2MM): such a total is withheld. With none, or with at least this many of
# which the largest is at most half their sum, it is published. These figures are
# published once, at the end of the day: a total shown again as the day goes on would give
# each new hidden trade away as the difference (the live /market page shows the public tape
# only until the day is closed).
DISCLOSURE_MIN_HIDDEN = 3


def size_public(t: Mapping[str, Any]) -> bool:
    """Whether a counted trade's exact size is on the public tape: disseminated, not capped.

    ``t`` carries ``withheld`` and, when disseminated, its trade ``block`` (as published)."""
    if t["withheld"] is not None:
        return False
    block = t.get("block")
    if block is None:
        return False
    if isinstance(block, str):
        block = json.loads(block)
    return block.get("quantity_indicator") == "A"


def par_disclosable(hidden: list[int]) -> bool:
    """A par total may be published when it holds no trade of non-public size (``hidden``:
    their sizes), or at least DISCLOSURE_MIN_HIDDEN of them, none more than half their sum."""
    return not hidden or (len(hidden) >= DISCLOSURE_MIN_HIDDEN and 2 * max(hidden) <= sum(hidden))


def market_aggregates(
    counted: Iterable[Mapping[str, Any]],
    summaries: Iterable[Mapping[str, Any]],
    previous_last: Mapping[str, int],
    is_public: Callable[[Mapping[str, Any]], bool] = size_public,
) -> dict[str, Any]:
    """End-of-day market aggregates of one data set.

    ``counted``: every active trade of the day that counts (disseminated or not, R19), with
    grade, quantity_c, withheld and block; totals are uncapped, but a par total is published
    only under the disclosure rule (:func:`par_disclosable`), else it is null with
    ``par_withheld`` (``total_par_withheld``) true; if any grade's par is withheld the total
    is withheld too. ``summaries``: the day's
    :func:`daily_summaries`; ``previous_last``: each security's last sale at its previous
    close, for advances and declines. ``is_public``: whether a trade's size is on the public
    tape (the live page passes trades at their published size only).
    """
    total_c = 0
    trades = disseminated = 0
    by_grade: dict[str, list] = {"IG": [0, 0, []], "HY": [0, 0, []]}  # trades, par, sizes not public
    for t in counted:
        trades += 1
        total_c += t["quantity_c"]
        if t["withheld"] is None:
            disseminated += 1
        g = by_grade.setdefault(t["grade"], [0, 0, []])
        g[0] += 1
        g[1] += t["quantity_c"]
        if not is_public(t):
            g[2].append(t["quantity_c"])
    withheld = {g: not par_disclosable(v[2]) for g, v in by_grade.items()}
    total_withheld = any(withheld.values())  # else total minus the other buckets gives it back
    advances = declines = unchanged = 0
    summaries = list(summaries)
    for s in summaries:
        before = previous_last.get(s["cusip"])
        if before is None:
            continue
        if s["last_price_u"] > before:
            advances += 1
        elif s["last_price_u"] < before:
            declines += 1
        else:
            unchanged += 1
    return {
        "total_trades": trades,
        "total_par": None if total_withheld else scaled_text(total_c, 2),
        "total_par_withheld": total_withheld,
        "disseminated_trades": disseminated,
        "securities_traded": len(summaries),
        "advances": advances,
        "declines": declines,
        "unchanged": unchanged,
        "by_grade": {g: {"trades": v[0], "par": None if withheld[g] else scaled_text(v[1], 2),
                         "par_withheld": withheld[g]} for g, v in sorted(by_grade.items())},
    }

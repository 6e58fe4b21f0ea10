"""Public market data pages, read from the disseminated feed only (capped quantities, no
MPIDs): a security's time and sales with a price and volume chart, the most active
securities, and the day's market aggregates. The pages refresh themselves from the feed
(``/static/market.js`` asks for the page's live part again every few seconds and swaps it
in when the feed has moved on).
"""
from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from starlette.responses import Response

from bondtape.access.model import AccessError
from bondtape.dissemination import rules as R
from bondtape.dissemination.schema import feed_days, feed_last_sale, feed_reports
from bondtape.reference.schema import securities as securities_table
from bondtape.web.routing import Ctx, route

DATA_SETS = {"CORP": "Corporate bonds", "AGCY": "Agency debt"}
TAS_LIMIT = 200


def _feed_version(ctx: Ctx) -> str:
    rows = ctx.conn.execute(sa.select(feed_days.c.data_set, sa.func.max(feed_days.c.feed_date),
                                      sa.func.sum(feed_days.c.last_seq)).group_by(feed_days.c.data_set)).all()
    return ";".join(f"{r[0]}:{r[1]}:{r[2]}" for r in sorted(rows))


def _latest_day(ctx: Ctx, data_set: str) -> str | None:
    return ctx.conn.execute(sa.select(sa.func.max(feed_reports.c.feed_date))
                            .where(feed_reports.c.data_set == data_set)).scalar()


def _date_param(ctx: Ctx) -> str | None:
    text = ctx.request.query_params.get("date")
    if not text:
        return None
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise AccessError("DATE_INVALID", f"date must be YYYY-MM-DD; got {text[:20]!r}", "date") from None


def _data_set_param(ctx: Ctx) -> str:
    ds = (ctx.request.query_params.get("data_set") or "CORP").upper()
    if ds not in DATA_SETS:
        raise AccessError("DATA_SET_INVALID", f"data_set is one of {', '.join(DATA_SETS)}", "data_set")
    return ds


def _render(ctx: Ctx, template: str, **values):
    """The whole page, or (``?fragment=1``, for the live refresh) only its live part."""
    if ctx.request.query_params.get("fragment") == "1":
        template = template.replace(".html", "_live.html")
    return ctx.render(template, version=_feed_version(ctx), **values)


def day_activity(ctx: Ctx, data_set: str, day: str) -> dict[str, Any]:
    """Most active securities and the market aggregates of one feed day, so far."""
    fr = feed_reports.c
    rows = [dict(r._mapping) for r in ctx.conn.execute(
        sa.select(feed_reports).where(fr.data_set == data_set, fr.feed_date == day, fr.status == "ACTIVE")
        .order_by(fr.journal_seq))]
    summaries = R.daily_summaries(r for r in rows if r["sets_last_sale"])
    previous = {r.cusip: r.price_u for r in ctx.conn.execute(
        sa.select(feed_last_sale).where(feed_last_sale.c.data_set == data_set, feed_last_sale.c.feed_date < day))}
    tape = _public_tape(rows)
    closed = ctx.conn.execute(sa.select(feed_days.c.closed).where(
        feed_days.c.data_set == data_set, feed_days.c.feed_date == day)).scalar()
    if closed:  # the end-of-day market aggregates, as the feed published them
        aggregates = R.market_aggregates([r for r in rows if r["counted"]], summaries, previous)
    else:  # the day so far: the public tape only (shown again at each refresh, see rules.R19 note)
        aggregates = _public_aggregates(tape, summaries, previous)
    # A security's par is read from the public tape only: withheld trades (144A, merger
    # transfers) and exact sizes above the cap stay out.
    par: dict[str, int] = {}
    capped: set[str] = set()
    for r in tape:
        par[r["cusip"]] = par.get(r["cusip"], 0) + r["quantity_c"]
        if r["capped"]:
            capped.add(r["cusip"])
    active = []
    for s in summaries:
        before = previous.get(s["cusip"])
        change = None if before is None else R.scaled_text(s["last_price_u"] - before, 6)
        par_c = par.get(s["cusip"], 0)
        active.append({**s, "par": R.scaled_text(par_c, 2) + ("+" if s["cusip"] in capped else ""), "par_c": par_c,
                       "change": change})
    by_trades = sorted(active, key=lambda s: (-s["trades"], -s["par_c"], s["cusip"]))[:10]
    by_par = sorted(active, key=lambda s: (-s["par_c"], -s["trades"], s["cusip"]))[:10]
    return {"aggregates": aggregates, "by_trades": by_trades, "by_par": by_par}


def _public_tape(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The day's disseminated trades at the quantity published: one above the cap (5MM+)
    counted at the cap and marked ``capped`` (its total is then shown with "+")."""
    tape = []
    for r in rows:
        if r["withheld"] is None and r["block"] is not None:
            shown = json.loads(r["block"])["quantity"]
            tape.append({**r, "quantity_c": int(quantity_number(shown) * 100), "capped": shown.endswith("+")})
    return tape


def _public_aggregates(tape: list[dict[str, Any]], summaries: list, previous: dict) -> dict[str, Any]:
    """The market aggregates of an open day from the public tape only (:func:`_public_tape`).
    Uncapped totals with withheld trades wait for the end of the day: shown at every
    refresh, their difference would give each new hidden trade's size."""
    public = [r for r in tape if r["counted"]]
    aggregates = R.market_aggregates(public, summaries, previous, is_public=lambda t: True)
    capped = {r["grade"] for r in public if r["capped"]}
    for grade in capped:
        aggregates["by_grade"][grade]["par"] += "+"
    if capped:
        aggregates["total_par"] += "+"
    return aggregates


def _unchanged(ctx: Ctx) -> Response | None:
    """The live refresh sends the version it shows: nothing to send while the feed has not moved."""
    since = ctx.request.query_params.get("since")
    if ctx.request.query_params.get("fragment") == "1" and since and since == _feed_version(ctx):
        return Response(status_code=204)
    return None


def market_page(ctx: Ctx):
    unchanged = _unchanged(ctx)
    if unchanged is not None:
        return unchanged
    ds = _data_set_param(ctx)
    day = _date_param(ctx) or _latest_day(ctx, ds)
    activity = day_activity(ctx, ds, day) if day else None
    days = [r[0] for r in ctx.conn.execute(
        sa.select(feed_days.c.feed_date).where(feed_days.c.data_set == ds).order_by(feed_days.c.feed_date.desc())
        .limit(30))]
    return _render(ctx, "market.html", data_set=ds, data_sets=DATA_SETS, day=day, days=days, activity=activity,
                   search=ctx.request.query_params.get("q", ""))


def _find_security(ctx: Ctx, text: str):
    s = securities_table.c
    text = text.strip().upper()[:20]
    if not text:
        return None
    return ctx.conn.execute(sa.select(securities_table).where(sa.or_(s.cusip == text, s.symbol == text))).first()


def quantity_number(shown: str) -> Decimal:
    """A disseminated quantity as a number for the chart: ``5MM+`` is drawn as 5,000,000."""
    text = shown.rstrip("+")
    if text.endswith("MM"):
        return Decimal(text[:-2]) * 1_000_000
    return Decimal(text)


def chart_svg(trades: list[dict[str, Any]], width: int = 720, height: int = 260) -> dict[str, Any]:
    """Points of the price line and the volume bars, oldest left (server-drawn SVG)."""
    pts = list(reversed(trades))
    if not pts:
        return {"points": "", "bars": [], "width": width, "height": height}
    pad_l, pad_r, top, price_h, gap, vol_h = 52, 10, 10, 150, 18, 60
    prices = [Decimal(t["price"]) for t in pts]
    vols = [quantity_number(t["quantity"]) for t in pts]
    lo, hi = min(prices), max(prices)
    span = (hi - lo) or Decimal(1)
    vmax = max(vols) or Decimal(1)
    n = len(pts)
    step = Decimal(width - pad_l - pad_r) / max(n, 1)

    def x(i: int) -> float:
        return float(pad_l + step * i + step / 2)

    line = " ".join(f"{x(i):.1f},{float(top + price_h - (p - lo) / span * price_h):.1f}" for i, p in enumerate(prices))
    base = top + price_h + gap + vol_h
    bars = [{"x": round(x(i) - float(step) * 0.35, 1), "w": round(max(float(step) * 0.7, 1.0), 1),
             "y": round(base - float(v / vmax * vol_h), 1), "h": round(float(v / vmax * vol_h), 1)}
            for i, v in enumerate(vols)]
    return {"points": line, "bars": bars, "width": width, "height": base + 22, "hi": R.plain(hi), "lo": R.plain(lo),
            "vmax": R.plain(vmax), "first": pts[0]["execution_time"][:16].replace("T", " "),
            "last": pts[-1]["execution_time"][:16].replace("T", " "), "price_top": top, "price_bottom": top + price_h,
            "vol_top": base - vol_h, "base": base, "left": pad_l, "right": width - pad_r}


def halted_cusips(conn, cusips: list[str] | None = None) -> set[str]:
    """Securities halted now: their latest HALT/RESUME action (as the publisher applied them)."""
    from bondtape.dissemination.schema import feed_operator_actions, feed_position

    a = feed_operator_actions.c
    applied = conn.execute(sa.select(feed_position.c.action_id).where(feed_position.c.id == 1)).scalar() or 0
    stmt = sa.select(a.cusip, a.action).where(a.action.in_(("HALT", "RESUME")), a.id <= applied).order_by(a.id)
    if cusips is not None:
        stmt = stmt.where(a.cusip.in_(cusips))
    state: dict[str, str] = {}
    for cusip, action in conn.execute(stmt):
        state[cusip] = action
    return {c for c, action in state.items() if action == "HALT"}


def security_page(ctx: Ctx):
    unchanged = _unchanged(ctx)
    if unchanged is not None:
        return unchanged
    q = ctx.request.query_params
    text = q.get("cusip") or q.get("q") or ""
    sec = _find_security(ctx, text)
    if sec is None:
        return ctx.render("market_security.html", status=404 if text else 200, sec=None, query=text, version="")
    fr = feed_reports.c
    rows = ctx.conn.execute(sa.select(fr.block, fr.msg_date, fr.msg_seq).where(
        fr.cusip == sec.cusip, fr.withheld.is_(None), fr.status == "ACTIVE")
        .order_by(fr.execution_us.desc(), fr.journal_seq.desc()).limit(TAS_LIMIT)).all()
    trades = [json.loads(r.block) for r in rows]
    halted = sec.cusip in halted_cusips(ctx.conn, [sec.cusip])
    return _render(ctx, "market_security.html", sec=sec, trades=trades, chart=chart_svg(trades), halted=halted,
                   query=text, limit=TAS_LIMIT)


ROUTES = [
    route("/market", market_page, rule="public"),
    route("/market/security", security_page, rule="public"),
]

"""A firm's trading pages: trade entry, the firm's journal (search, filters, CSV), one
report's whole history, and the cancel, correct and reverse actions.

Every report goes the way of every channel: text fields -> ``parse_command(fields,
channel="web")`` -> the shared :class:`bondtape.engine.Sequencer`; the same reject codes
come back, shown beside the field they name. The engine is called after the route's own
transaction has committed (:class:`AfterCommit`), so the page's access check and audit
rows never hold the database while the engine writes.
"""
from __future__ import annotations

import csv
import datetime as dt
import io
from decimal import Decimal
from typing import Any, Callable

import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from bondtape.access.model import AccessError
from bondtape.clock import MARKET_TZ, iso_market, market_date, market_time
from bondtape.engine import EngineUnavailable, Result
from bondtape.journal.schema import trade_reports
from bondtape.reporting.codes import Rejected
from bondtape.reporting.commands import CAPACITIES, INDICATORS, REMUNERATION, SIDES, TRADING_MARKETS, parse_command
from bondtape.web.routing import Ctx, NotFound, route

TERM_FIELDS = ("cusip", "side", "capacity", "contra", "quantity", "price", "yield", "execution_time",
               "settlement_date", "commission", "trading_market", "remuneration")
FLAG_FIELDS = (*INDICATORS, "test", "allow_duplicate")
STATUSES = ("ACTIVE", "CANCELLED", "CORRECTED", "REVERSED")
JOURNAL_LIMIT = 500


class AfterCommit(Response):
    """A response whose work (``work() -> Response``) runs in a thread once the route's
    transaction has committed; cookies the guard set on it are carried over."""

    def __init__(self, work: Callable[[], Response]):
        super().__init__(b"")
        self.work = work

    async def __call__(self, scope, receive, send) -> None:
        final = await run_in_threadpool(self.work)
        for key, value in self.raw_headers:
            if key == b"set-cookie":
                final.raw_headers.append((key, value))
        await final(scope, receive, send)


def submit(state: Any, commands: list) -> list[Result]:
    """Submit commands through the app's shared sequencer and wait for their results."""
    from bondtape.serve import services

    sequencer = services(state).sequencer
    futures = [sequencer.submit(c) for c in commands]
    return [f.result(60) for f in futures]


# --- fields -------------------------------------------------------------------------------


def _plain(value: Decimal) -> str:
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def scaled(value: int | None, places: int) -> str:
    return "" if value is None else _plain(Decimal(value).scaleb(-places))


def form_fields(form: dict[str, str]) -> dict[str, str]:
    """The report fields of a submitted form (check boxes become Y/N)."""
    fields = {name: form.get(name, "") for name in TERM_FIELDS}
    fields["client_ref"] = form.get("client_ref", "")
    for name in FLAG_FIELDS:
        fields[name] = "Y" if form.get(name) in ("on", "Y", "y", "1", "true") else "N"
    return fields


def form_time(us: int) -> str:
    """An instant as the form shows it: market time (New York) without an offset, with its
    microseconds only when there are any, and with its offset only in the hour the clocks
    repeat in November, where the wall time alone names two instants (the form refuses it
    as TIME_AMBIGUOUS): sent back unchanged, it names the same instant."""
    local = market_time(us)
    wall = local.replace(tzinfo=None)
    if wall.replace(tzinfo=MARKET_TZ, fold=0).utcoffset() != wall.replace(tzinfo=MARKET_TZ, fold=1).utcoffset():
        return local.isoformat()
    return wall.isoformat()


def report_fields(row: Any) -> dict[str, str]:
    """A stored report as the form's fields (to correct it)."""
    out = {
        "cusip": row.cusip, "side": row.side, "capacity": row.capacity, "contra": row.contra,
        "quantity": scaled(row.quantity_c, 2), "price": scaled(row.price_u, 6), "yield": scaled(row.yield_u, 6),
        "execution_time": form_time(row.execution_us), "settlement_date": row.settlement_date or "",
        "commission": scaled(row.commission_c, 2), "trading_market": row.trading_market or "S1",
        "remuneration": row.remuneration or "", "client_ref": "",
    }
    for name in INDICATORS:
        out[name] = "Y" if getattr(row, name) else "N"
    out["test"] = "Y" if row.is_test else "N"
    out["allow_duplicate"] = "N"
    return out


def _form_context(**extra) -> dict:
    return dict(sides=SIDES, capacities=CAPACITIES, markets=TRADING_MARKETS, remunerations=REMUNERATION,
                indicators=INDICATORS, **extra)


# --- trade entry --------------------------------------------------------------------------


def entry_page(ctx: Ctx):
    now = form_time(ctx.now_us - ctx.now_us % 1_000_000)  # to the second
    values = {"execution_time": now, "trading_market": "S1", "side": "B", "capacity": "P"}
    return ctx.render("trade_entry.html", **_form_context(values=values, reject=None, mode="new", report=None))


def _result_page(ctx: Ctx, result: Result, *, template_on_reject: str, values: dict, report=None) -> Response:
    if result.accepted:
        return ctx.render("trade_result.html", result=result)
    mode = {"NEW": "new", "CORRECT": "correct"}.get(result.action, "act")
    if mode == "act":
        return ctx.render("trade_result.html", status=400, result=result)
    return ctx.render(template_on_reject, status=400, **_form_context(values=values, reject=result.reject, mode=mode,
                                                                        report=report))


def _engine_call(ctx: Ctx, command, *, values: dict, report=None) -> Response:
    def work() -> Response:
        try:
            [result] = submit(ctx.state, [command])
        except EngineUnavailable as exc:
            return ctx.render("error.html", status=503, error=AccessError("ENGINE_UNAVAILABLE", str(exc)))
        return _result_page(ctx, result, template_on_reject="trade_entry.html", values=values, report=report)

    return AfterCommit(work)


def entry_submit(ctx: Ctx):
    fields = form_fields(ctx.form)
    fields.update(action="NEW", reporting_mpid=ctx.actor.mpid)
    try:
        command = parse_command(fields, channel="web")
    except Rejected as exc:
        return ctx.render("trade_entry.html", status=400,
                          **_form_context(values=fields, reject=exc.reject, mode="new", report=None))
    return _engine_call(ctx, command, values=fields)


# --- the firm's journal -------------------------------------------------------------------


def _day(text: str | None, name: str) -> str | None:
    if not text:
        return None
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise AccessError("FILTER_INVALID", f"{name} must be a date YYYY-MM-DD; got {text!r}", name) from None


def check_date_range(date_from: str | None, date_to: str | None) -> None:
    """Refuse ``date_to`` before ``date_from`` (both ISO dates, either may be absent): a search
    that can find nothing is a mistake to say so, not an empty page. The REST API's check too."""
    if date_from and date_to and date_to < date_from:
        raise AccessError("FILTER_INVALID", f"date_to {date_to} is before date_from {date_from}; "
                          "date_to is on or after date_from", "date_to")


def journal_filters(ctx: Ctx) -> dict[str, str]:
    q = ctx.request.query_params
    f = {k: (q.get(k) or "").strip() for k in ("date_from", "date_to", "cusip", "status", "late", "as_of", "mpid")}
    check_date_range(_day(f["date_from"], "date_from"), _day(f["date_to"], "date_to"))
    f["cusip"] = f["cusip"].upper()[:9]
    f["status"] = f["status"].upper()
    if f["status"] and f["status"] not in STATUSES:
        raise AccessError("FILTER_INVALID", f"status is one of {', '.join(STATUSES)}", "status")
    for flag in ("late", "as_of"):
        f[flag] = f[flag].upper()[:1]
        if f[flag] not in ("", "Y", "N"):
            raise AccessError("FILTER_INVALID", f"{flag} is Y, N or empty", flag)
    return f


def journal_query(ctx: Ctx, f: dict[str, str], limit: int = JOURNAL_LIMIT) -> list:
    t = trade_reports.c
    stmt = sa.select(trade_reports)
    if ctx.actor.is_operator and not ctx.actor.mpid:
        if f.get("mpid"):
            stmt = stmt.where(t.reporting_mpid == f["mpid"].upper())
    else:
        stmt = stmt.where(t.reporting_mpid == ctx.actor.mpid)
    if f["date_from"]:
        stmt = stmt.where(t.execution_date >= f["date_from"])
    if f["date_to"]:
        stmt = stmt.where(t.execution_date <= f["date_to"])
    if f["cusip"]:
        stmt = stmt.where(t.cusip == f["cusip"])
    if f["status"]:
        stmt = stmt.where(t.status == f["status"])
    if f["late"]:
        stmt = stmt.where(t.late.is_(f["late"] == "Y"))
    if f["as_of"]:
        stmt = stmt.where(t.as_of.is_(f["as_of"] == "Y"))
    return ctx.conn.execute(stmt.order_by(t.control_number.desc()).limit(limit)).all()


def journal_page(ctx: Ctx):
    f = journal_filters(ctx)
    rows = journal_query(ctx, f)
    query = "&".join(f"{k}={v}" for k, v in f.items() if v)
    return ctx.render("journal.html", rows=rows, f=f, statuses=STATUSES, limit=JOURNAL_LIMIT, query=query,
                      price=lambda u: scaled(u, 6), par=lambda c: scaled(c, 2))


CSV_COLUMNS = ("control_number", "status", "reporting_mpid", "cusip", "symbol", "side", "capacity", "contra",
               "quantity", "price", "yield", "execution_time", "report_time", "settlement_date", "late", "as_of",
               "modifier3", "first_control_number", "prior_control_number", "channel", "client_ref")


def journal_csv(ctx: Ctx):
    f = journal_filters(ctx)
    rows = journal_query(ctx, f, limit=100_000)
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        w.writerow([r.control_number, r.status, r.reporting_mpid, r.cusip, r.symbol, r.side, r.capacity, r.contra,
                    scaled(r.quantity_c, 2), scaled(r.price_u, 6), scaled(r.yield_u, 6), iso_market(r.execution_us),
                    iso_market(r.report_us), r.settlement_date or "", "Y" if r.late else "N", "Y" if r.as_of else "N",
                    r.modifier3 or "", r.first_control_number, r.prior_control_number or "", r.channel,
                    r.client_ref or ""])
    name = f"journal-{ctx.actor.mpid or 'all'}-{market_date(ctx.now_us).isoformat()}.csv"
    body = out.getvalue().encode()
    ctx.audit("download", target=f"journal/{name}", detail={"bytes": len(body), "rows": len(rows)})
    return Response(body, media_type="text/csv", headers={"content-disposition": f'attachment; filename="{name}"'})


# --- one report: history and actions ------------------------------------------------------


def report_mpid(ctx: Ctx):
    number = ctx.request.path_params["control_number"]
    if number >= 2**63:
        raise NotFound("no such trade report")
    row = ctx.conn.execute(sa.select(trade_reports).where(trade_reports.c.control_number == number)).first()
    if row is None:
        raise NotFound("no such trade report")
    ctx.report = row
    return row.reporting_mpid


def history_page(ctx: Ctx):
    from bondtape.access.authz import decide

    row = ctx.report
    t = trade_reports.c
    chain = ctx.conn.execute(sa.select(trade_reports).where(t.first_control_number == row.first_control_number)
                             .order_by(t.seq)).all()
    may_act = decide(ctx.conn, ctx.actor, "trade.act", row.reporting_mpid, now_us=ctx.now_us).allowed
    ctx.audit("report.view", target=f"report:{row.control_number}")
    return ctx.render("report_history.html", report=row, chain=chain, may_act=may_act,
                      price=lambda u: scaled(u, 6), par=lambda c: scaled(c, 2))


def _act(ctx: Ctx, action: str):
    row = ctx.report
    command = parse_command({"action": action, "reporting_mpid": ctx.actor.mpid,
                             "original_control_number": str(row.control_number),
                             "client_ref": ctx.form.get("client_ref", "")}, channel="web")
    return _engine_call(ctx, command, values={})


def cancel(ctx: Ctx):
    return _act(ctx, "CANCEL")


def reverse(ctx: Ctx):
    return _act(ctx, "REVERSE")


def correct_page(ctx: Ctx):
    return ctx.render("trade_entry.html", **_form_context(values=report_fields(ctx.report), reject=None,
                                                          mode="correct", report=ctx.report))


def correct_submit(ctx: Ctx):
    fields = form_fields(ctx.form)
    fields.update(action="CORRECT", reporting_mpid=ctx.actor.mpid,
                  original_control_number=str(ctx.report.control_number))
    try:
        command = parse_command(fields, channel="web")
    except Rejected as exc:
        return ctx.render("trade_entry.html", status=400,
                          **_form_context(values=fields, reject=exc.reject, mode="correct", report=ctx.report))
    return _engine_call(ctx, command, values=fields, report=ctx.report)


ROUTES = [
    route("/trade/new", entry_page, rule="trade.report"),
    route("/trade/new", entry_submit, rule="trade.report", methods=["POST"], name="trade_submit"),
    route("/journal", journal_page, rule="trade.view"),
    route("/journal.csv", journal_csv, rule="trade.view"),
    route("/reports/{control_number:int}/history", history_page, rule="trade.view", resource=report_mpid),
    route("/reports/{control_number:int}/cancel", cancel, rule="trade.act", methods=["POST"], resource=report_mpid),
    route("/reports/{control_number:int}/reverse", reverse, rule="trade.act", methods=["POST"], resource=report_mpid),
    route("/reports/{control_number:int}/correct", correct_page, rule="trade.act", resource=report_mpid),
    route("/reports/{control_number:int}/correct", correct_submit, rule="trade.act", methods=["POST"],
          resource=report_mpid, name="correct_submit"),
]


"""Historic TRACE Data on the website, a Non-Professional's ad-hoc request, and invoices.

- ``/data``: the Historic data sets and years on this server, what the user's organisation
  is entitled to, and where to download (the download service: client certificate, login
  and password, seed R8).
- ``/data/requests``: a Non-Professional names securities and dates; the operator fulfils
  the request from the aged data (``/operator/requests``); the requester downloads the
  extract; it is billed at the cost of media and delivery only (fees product ``AD_HOC``).
- ``/invoices``: the organisation's Rule 7730 invoices for a month (by default the last
  closed one; an open month is marked preliminary).
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import re

import sqlalchemy as sa
from starlette.responses import RedirectResponse, Response

from bondtape.access import entitlements
from bondtape.access.authz import HistoricSet, decide, historic_year_aged, historic_year_available_from
from bondtape.access.model import AccessError
from bondtape.access.schema import organisations
from bondtape.clock import iso_market, market_date
from bondtape.journal.schema import trade_reports
from bondtape.reference.cusip import cusip_check_digit
from bondtape.reference.schema import securities
from bondtape.rulebook import default_rulebook
from bondtape.web.routes_trading import scaled
from bondtape.web.routing import Ctx, NotFound, route
from bondtape.web.schema import historic_requests

HISTORIC_SETS = {"corporate": "CORP", "agency": "AGCY"}
MAX_CUSIPS = 10
MAX_EXTRACT_ROWS = 100_000
_CUSIP = re.compile(r"^[0-9A-Z*@#]{8}[0-9]$")


# --- Historic data sets ---------------------------------------------------------------------


def _files(folder) -> list[str]:
    out = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and len(path.relative_to(folder).parts) <= 3:
            out.append(path.relative_to(folder).as_posix())
    return out[:200]


def historic_page(ctx: Ctx):
    base = ctx.settings.historic_dir
    sets = []
    for name, code in HISTORIC_SETS.items():
        folder = base / name if base else None
        years = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) \
            if folder and folder.is_dir() else []
        for year in years:
            decision = decide(ctx.conn, ctx.actor, "download.historic", HistoricSet(code, year), now_us=ctx.now_us)
            sets.append({"name": name, "code": code, "year": year, "allowed": decision.allowed,
                         "reason": decision.reason, "available_from": historic_year_available_from(year),
                         "files": _files(folder / str(year)) if decision.allowed else []})
    held = [e for e in entitlements.list_for(ctx.conn, ctx.actor.org_id)
            if e.start_us <= ctx.now_us and (e.end_us is None or ctx.now_us < e.end_us)]
    return ctx.render("data.html", sets=sets, held=held, download_base=ctx.settings.download_base_url,
                      nonpro=ctx.actor.org_kind == "NON_PROFESSIONAL")


# --- ad-hoc requests --------------------------------------------------------------------------


def _parse_request(ctx: Ctx) -> dict:
    raw = [c.strip().upper() for c in re.split(r"[\s,;]+", ctx.form.get("cusips", "")) if c.strip()]
    if not raw:
        raise AccessError("FIELD_REQUIRED", "name at least one CUSIP (9 characters)", "cusips")
    if len(raw) > MAX_CUSIPS:
        raise AccessError("FIELD_INVALID", f"at most {MAX_CUSIPS} CUSIPs in one request", "cusips")
    for c in raw:
        if not _CUSIP.match(c) or cusip_check_digit(c[:8]) != int(c[8]):
            raise AccessError("CUSIP_MALFORMED", f"{c[:12]!r} is not a CUSIP (8 characters and a check digit)", "cusips")
    known = set(ctx.conn.execute(sa.select(securities.c.cusip).where(securities.c.cusip.in_(raw))).scalars())
    unknown = [c for c in raw if c not in known]
    if unknown:
        raise AccessError("SECURITY_UNKNOWN", f"no security {unknown[0]} in reference data", "cusips")
    days = {}
    for name in ("date_from", "date_to"):
        text = ctx.form.get(name, "").strip()
        try:
            days[name] = dt.date.fromisoformat(text)
        except ValueError:
            raise AccessError("DATE_INVALID", f"{name} must be a date YYYY-MM-DD", name) from None
    check_request_dates(days["date_from"], days["date_to"], ctx.now_us)
    return {"cusips": ",".join(dict.fromkeys(raw)), "date_from": days["date_from"].isoformat(),
            "date_to": days["date_to"].isoformat(), "note": ctx.form.get("note", "").strip()[:500] or None}


def check_request_dates(date_from: dt.date, date_to: dt.date, now_us: int) -> None:
    """An ad-hoc request's dates: from the day TRACE began (the rulebook's ``first_trace_date``),
    in order, and all in years already aged into Historic TRACE Data. Checked when the request
    is submitted and again when the operator fulfils it."""
    rules = default_rulebook().at(market_date(now_us))
    first = rules.first_trace_date
    if date_from < first:
        raise AccessError("DATE_INVALID", f"date_from {date_from} is before TRACE began: the first date is {first}",
                          "date_from")
    if date_to < date_from:
        raise AccessError("DATE_INVALID", "date_to is before date_from", "date_to")
    if not historic_year_aged(date_to.year, now_us):
        available = historic_year_available_from(date_to.year)
        when = f"from {available}" if available < dt.date.max else "after 9999-12-31"
        raise AccessError("NOT_AGED", f"{date_to.year} is Historic TRACE Data only {when} "
                          f"({rules.aging_months} months after the year)", "date_to")


def _own_requests(ctx: Ctx):
    h = historic_requests.c
    return ctx.conn.execute(sa.select(historic_requests).where(h.org_id == ctx.actor.org_id)
                            .order_by(h.id.desc())).all()


def requests_page(ctx: Ctx, error: AccessError | None = None, values: dict | None = None, status: int = 200):
    nonpro = ctx.actor.org_kind == "NON_PROFESSIONAL"
    attested = entitlements.has_attested(ctx.conn, ctx.actor.user_id) if nonpro else False
    return ctx.render("data_requests.html", status=status, requests=_own_requests(ctx), nonpro=nonpro,
                      attested=attested, error=error, values=values or {}, max_cusips=MAX_CUSIPS)


def request_submit(ctx: Ctx):
    if ctx.actor.org_kind != "NON_PROFESSIONAL":
        raise AccessError("FORBIDDEN_ROLE", "ad-hoc requests are for Non-Professionals; a professional subscriber "
                          "buys the Historic data sets", "org")
    if not entitlements.has_attested(ctx.conn, ctx.actor.user_id):
        raise AccessError("FORBIDDEN_NO_ATTESTATION", "attest to the Non-Professional conditions first "
                          "(Your account -> attestation)", "attestation")
    try:
        values = _parse_request(ctx)
    except AccessError as exc:
        return requests_page(ctx, exc, dict(ctx.form), status=400)
    new_id = ctx.conn.execute(historic_requests.insert().values(
        org_id=ctx.actor.org_id, user_id=ctx.actor.user_id, status="REQUESTED", requested_us=ctx.now_us,
        **values)).inserted_primary_key[0]
    ctx.audit("historic.request", target=f"historic_request:{new_id}", detail=values)
    return RedirectResponse(f"/data/requests?submitted={new_id}", status_code=303)


def _request_row(ctx: Ctx, text: str | None):
    if not text or not text.isdigit() or len(text) > 9:
        raise AccessError("FIELD_REQUIRED", "id is the request number", "id")
    row = ctx.conn.execute(sa.select(historic_requests).where(historic_requests.c.id == int(text))).first()
    if row is None or (row.org_id != ctx.actor.org_id and not ctx.actor.is_operator):
        raise NotFound("no such request")
    return row


def extract_download(ctx: Ctx):
    row = _request_row(ctx, ctx.request.query_params.get("id"))
    if row.status != "FULFILLED":
        raise AccessError("NOT_FULFILLED", f"request {row.id} is {row.status.lower()}, not fulfilled", "id")
    name = f"historic-request-{row.id}.csv"
    ctx.audit("download", target=f"historic_request:{row.id}", detail={"rows": row.extract_rows})
    return Response(row.extract.encode(), media_type="text/csv",
                    headers={"content-disposition": f'attachment; filename="{name}"'})


EXTRACT_COLUMNS = ("cusip", "symbol", "data_set", "execution_date", "execution_time", "quantity", "price", "yield",
                   "side", "contra_party_type", "as_of", "modifier3", "when_issued", "special_price",
                   "weighted_average", "settlement_date")


def build_extract(conn, cusips: list[str], date_from: str, date_to: str) -> tuple[str, int]:
    """The standing trades (the final view: cancelled, corrected-away and reversed trades
    left out) of these securities between the dates, uncapped, without firm identities."""
    t = trade_reports.c
    rows = conn.execute(sa.select(trade_reports).where(
        t.cusip.in_(cusips), t.execution_date >= date_from, t.execution_date <= date_to, t.status == "ACTIVE",
        t.is_test.is_(False), t.rule_144a.is_(False)).order_by(t.execution_us, t.control_number)
        .limit(MAX_EXTRACT_ROWS + 1)).all()
    if len(rows) > MAX_EXTRACT_ROWS:
        raise AccessError("EXTRACT_TOO_LARGE", f"more than {MAX_EXTRACT_ROWS} trades: ask for fewer dates", "date_to")
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(EXTRACT_COLUMNS)
    for r in rows:
        w.writerow([r.cusip, r.symbol, r.data_set, r.execution_date, iso_market(r.execution_us)[11:19],
                    scaled(r.quantity_c, 2), scaled(r.price_u, 6), scaled(r.yield_u, 6), r.side, r.contra_type,
                    "Y" if r.as_of else "", r.modifier3 or "", "Y" if r.when_issued else "",
                    "Y" if r.special_price else "", "Y" if r.weighted_average else "", r.settlement_date or ""])
    return out.getvalue(), len(rows)


def operator_requests(ctx: Ctx):
    h, o = historic_requests.c, organisations.c
    rows = ctx.conn.execute(sa.select(historic_requests, o.name.label("org_name"))
                            .select_from(historic_requests.join(organisations, o.id == h.org_id))
                            .order_by(h.status != "REQUESTED", h.id.desc()).limit(300)).all()
    return ctx.render("operator_requests.html", rows=rows, message=ctx.request.query_params.get("done"))


def operator_decide(ctx: Ctx):
    from bondtape.fees.records import record_historic_order
    from bondtape.fees.schedule import FeeError

    action = ctx.request.path_params["action"]
    if action not in ("fulfil", "reject"):
        raise AccessError("ACTION_INVALID", "the action is fulfil or reject", "action")
    row = _request_row(ctx, ctx.form.get("id"))
    if row.status != "REQUESTED":
        raise AccessError("ALREADY_DECIDED", f"request {row.id} is already {row.status.lower()}", "id")
    note = ctx.form.get("note", "").strip()[:500] or None
    values = {"decided_us": ctx.now_us, "decided_by": ctx.actor.user_id, "decision_note": note}
    if action == "reject":
        values["status"] = "REJECTED"
    else:
        # never before the data is aged, nor a request the form would refuse today
        check_request_dates(dt.date.fromisoformat(row.date_from), dt.date.fromisoformat(row.date_to), ctx.now_us)
        extract, n = build_extract(ctx.conn, row.cusips.split(","), row.date_from, row.date_to)
        try:
            with ctx.conn.begin_nested():
                order_id = record_historic_order(
                    ctx.conn, row.org_id, "AD_HOC", order_date=market_date(ctx.now_us).isoformat(), now_us=ctx.now_us,
                    media_cost=ctx.form.get("media_cost", "0"), delivery_cost=ctx.form.get("delivery_cost", "0"),
                    description=f"ad-hoc request {row.id}: {row.cusips} {row.date_from} to {row.date_to}")
        except FeeError as exc:
            raise AccessError(exc.code, exc.message, exc.field) from None
        values.update(status="FULFILLED", extract=extract, extract_rows=n, fee_order_id=order_id)
    ctx.conn.execute(historic_requests.update().where(historic_requests.c.id == row.id).values(**values))
    ctx.audit(f"historic.request.{action}", target=f"historic_request:{row.id}",
              detail={"rows": values.get("extract_rows"), "fee_order": values.get("fee_order_id")})
    return RedirectResponse(f"/operator/requests?done={action}", status_code=303)


# --- invoices -------------------------------------------------------------------------------


def last_closed_month(now_us: int) -> str:
    """The latest month (YYYY-MM) that has ended in market time: the month before today's."""
    first = market_date(now_us).replace(day=1)
    return (first - dt.timedelta(days=1)).strftime("%Y-%m")


def month_state(month: str, now_us: int) -> str:
    """``closed`` (ended in market time: its invoice is a bill), ``open`` (under way: the
    figures are preliminary, to date) or ``future`` (not begun)."""
    from bondtape.fees.invoice import month_us

    start_us, end_us = month_us(month)
    return "closed" if end_us <= now_us else "open" if start_us <= now_us else "future"


def invoices_page(ctx: Ctx):
    """The Rule 7730 invoices of a month: the viewer's own organisation's (built alone, so
    another organisation's data is neither read nor able to fail this page); the operator's,
    every organisation's; and the month's reports that bill no organisation (by MPID, with the
    reason), so that none is missed silently. Without ``month``, the last closed month; an
    open month is marked preliminary."""
    from bondtape.fees.invoice import build_invoices
    from bondtape.fees.schedule import FeeError, month_bounds, parse_month

    asked = (ctx.request.query_params.get("month") or "").strip()
    month = asked or last_closed_month(ctx.now_us)
    org_id = None if ctx.actor.is_operator else ctx.actor.org_id
    try:
        parse_month(month)  # the fees' own check: MONTH_INVALID, with the accepted range
        invoices, unbilled, schedule = build_invoices(ctx.conn, month, org_id=org_id)
    except FeeError as exc:
        raise AccessError(exc.code, exc.message, exc.field) from None
    # build_invoices(org_id=...) returns that organisation's invoice only, and the reports of
    # its MPID (no other's) that bill nobody: e.g. a month in which the MPID changed hands
    return ctx.render("invoices.html", invoices=invoices, unbilled=unbilled, month=month, schedule=schedule,
                      state=month_state(month, ctx.now_us), last_day=month_bounds(month)[1].isoformat(),
                      defaulted=not asked, current=market_date(ctx.now_us).strftime("%Y-%m"))


ROUTES = [
    route("/data", historic_page, rule="account"),
    route("/data/requests", requests_page, rule="account"),
    route("/data/requests", request_submit, rule="account", methods=["POST"], name="request_submit"),
    route("/data/requests/extract.csv", extract_download, rule="account"),
    route("/operator/requests", operator_requests, rule="operator"),
    route("/operator/requests/{action}", operator_decide, rule="operator", methods=["POST"]),
    route("/invoices", invoices_page, rule="org.admin"),
]

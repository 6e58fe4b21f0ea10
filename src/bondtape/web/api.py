"""The REST API under ``/api/v1``, described by OpenAPI at ``/openapi.json``.

Firms' calls (report, cancel, correct, reverse, their own reports, bulk files, reference
data) need TLS with the user's client certificate AND the login and password (HTTP Basic),
like the download service. The public time and sales needs nothing.

Every report goes the way of every channel: JSON fields -> ``parse_command(fields,
channel="api")`` -> the shared :class:`bondtape.engine.Sequencer` (after the request's
access check has committed), so the answers and reject codes are those of the bulk files,
the website and FIX. Numbers may be JSON strings or numbers; they are read exactly
(never as binary floating point).
"""
from __future__ import annotations

import datetime as dt
import io
import json
from decimal import Decimal
from typing import Any

import anyio.from_thread
import sqlalchemy as sa
from starlette.responses import JSONResponse, Response

from bondtape.access.model import AccessError
from bondtape.clock import iso_market, market_date
from bondtape.engine import EngineUnavailable, Result
from bondtape.journal.schema import trade_reports
from bondtape.reporting.codes import REJECT_CODES, Reject, Rejected
from bondtape.reporting.commands import FIELDS, INDICATORS, client_ref_problem, parse_command
from bondtape.web.routes_trading import AfterCommit, check_date_range, report_mpid, scaled, submit
from bondtape.web.routing import Ctx, route

MAX_BATCH = 500
# the report fields a request may carry: report_time (the time of receipt) is the service's own
# over the API (bulk files take it only for an operator's back-filling, --use-report-time)
API_FIELDS = tuple(f for f in FIELDS if f != "report_time")
# the JSON types each field is given as: Y/N fields also as true/false (and 1/0), amounts also as
# JSON numbers (read exactly), a control number also as a JSON integer; the rest as strings
FLAG_FIELDS = (*INDICATORS, "test", "allow_duplicate")
NUMBER_FIELDS = ("quantity", "price", "yield", "commission", "original_control_number")
TEXT_FIELDS = tuple(f for f in API_FIELDS if f not in FLAG_FIELDS + NUMBER_FIELDS)
_JSON_TYPES = {**{f: "Y/N, true/false or 1/0" for f in FLAG_FIELDS}, **{f: "a string or a number" for f in NUMBER_FIELDS},
               **{f: "a string" for f in TEXT_FIELDS}}
_CUSIP_CHARS = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ*@#")
STATUSES = ("ACTIVE", "CANCELLED", "CORRECTED", "REVERSED")


class ApiError(AccessError):
    """A refused request: HTTP status, a stable code, the field and what is accepted."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(code, message, field)
        self.status = status


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse({"code": exc.code, "field": exc.field, "message": exc.message}, status_code=exc.status)


def _body(ctx: Ctx) -> bytes:
    try:
        return anyio.from_thread.run(ctx.request.body)
    except RuntimeError:  # the body was already read as a form
        raise ApiError(415, "CONTENT_TYPE", "send the request body as application/json (or text/csv for /bulk)") from None


def _raw_json(ctx: Ctx) -> tuple[str, bytes]:
    return ctx.request.headers.get("content-type", "").split(";")[0].strip().lower(), _body(ctx)


def _json(ctx: Ctx, *, required: bool = True) -> Any:
    ctype, raw = _raw_json(ctx)
    return _decode(ctype, raw, required=required)


def _decode(ctype: str, raw: bytes, *, required: bool) -> Any:
    if not raw.strip():
        if required:
            raise ApiError(400, "BODY_REQUIRED", "a JSON object is required")
        return {}
    if ctype not in ("application/json", ""):
        raise ApiError(415, "CONTENT_TYPE", f"send application/json, not {ctype}")
    try:
        # a lone surrogate can only come from a \u escape (raw, it is not UTF-8): look for one only then
        hook = _unicode_pairs if b"\\u" in raw else _no_repeats
        return json.loads(raw, parse_float=Decimal, parse_int=Decimal, object_pairs_hook=hook)
    except _RepeatedKey as exc:
        raise ApiError(400, "FIELD_REPEATED", f"field {exc.key[:64]!r} appears twice in one object; send it once",
                       exc.key[:64]) from None
    except _LoneSurrogate as exc:
        where = "a field name" if exc.key is None else f"field {exc.key[:64]!r}"
        raise ApiError(400, "JSON_INVALID", f"{where} holds a \\u escape of half a UTF-16 surrogate pair, which is not "
                       "a Unicode character: the body is not valid JSON (UTF-8) text", exc.key and exc.key[:64]) from None
    except (ValueError, RecursionError):  # UnicodeDecodeError too: not UTF-8
        raise ApiError(400, "JSON_INVALID", "the body is not valid JSON (UTF-8)") from None


class _RepeatedKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


class _LoneSurrogate(ValueError):
    def __init__(self, key: str | None):
        super().__init__(key)
        self.key = key


def _unicode_text(value: Any) -> bool:
    """False for a string holding a lone surrogate (json.loads makes one of "\\ud800"): it
    cannot be written as UTF-8, so echoing it in an answer failed with a server error."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
    elif isinstance(value, list):
        return all(_unicode_text(v) for v in value)
    return True


def _unicode_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """:func:`_no_repeats`, after refusing a lone surrogate in a key or a value (not Unicode text)."""
    for key, value in pairs:
        if not _unicode_text(key):
            raise _LoneSurrogate(None)
        if not _unicode_text(value):
            raise _LoneSurrogate(key)
    return _no_repeats(pairs)


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads keeps the last of repeated keys without a word: refuse them instead."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _RepeatedKey(key)
            seen.add(key)
    return out


def _number_text(value: Decimal) -> str:
    """A JSON number as plain digits; one whose exponent is absurd stays as written (e.g.
    1E+999999999, which parse_command refuses) rather than becoming a billion digits."""
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and -40 <= exponent <= 40:
        return format(value, "f")
    return str(value)


def _text_fields(item: Any, where: str) -> dict[str, str]:
    if not isinstance(item, dict):
        raise ApiError(400, "JSON_INVALID", f"{where} must be a JSON object of report fields")
    out: dict[str, str] = {}
    for key, value in item.items():
        if key == "report_time":
            raise ApiError(400, "FIELD_UNKNOWN", f"{where}: report_time is the time of receipt, which the service "
                           "sets; leave it out", key)
        if key not in API_FIELDS:
            raise ApiError(400, "FIELD_UNKNOWN", f"{where}: unknown field {str(key)[:64]!r}; the fields are: "
                           f"{', '.join(API_FIELDS)}", str(key)[:64])
        if value is None:
            continue
        if isinstance(value, bool):
            if key not in FLAG_FIELDS:  # true was read as "Y": a client_ref "Y", a quantity 'Y'
                raise ApiError(400, "FIELD_INVALID", f"{where}: {key} must be {_JSON_TYPES[key]}, not "
                               f"{'true' if value else 'false'}", key)
            value = "Y" if value else "N"
        elif isinstance(value, Decimal) and key in TEXT_FIELDS:
            raise ApiError(400, "FIELD_INVALID", f"{where}: {key} must be a string (in quotes), not a number", key)
        if isinstance(value, (dict, list)):
            raise ApiError(400, "FIELD_INVALID", f"{where}: {key} must be {_JSON_TYPES[key]}", key)
        out[key] = _number_text(value) if isinstance(value, Decimal) else str(value)
    return out


def _rejected(action: str, client_ref: str | None, reject: Reject) -> Result:
    return Result(action=action, client_ref=client_ref, status="REJECTED", reject=reject)


def _command_or_reject(ctx: Ctx, fields: dict[str, str]):
    action = (fields.get("action") or "NEW").strip().upper()
    mpid = (fields.get("reporting_mpid") or "").strip().upper()
    if mpid and mpid != ctx.actor.mpid:
        return _rejected(action, fields.get("client_ref"), Reject(
            "FIELD_INVALID", "reporting_mpid", f"reporting_mpid must be your firm's MPID {ctx.actor.mpid}"))
    fields["reporting_mpid"] = ctx.actor.mpid
    try:
        return parse_command(fields, channel="api")
    except Rejected as exc:
        return _rejected(action, fields.get("client_ref"), exc.reject)


def _run(ctx: Ctx, prepare, *, single: bool | None = None) -> AfterCommit:
    """Parse and submit after the request's access check has committed: ``prepare()``
    returns the commands (or ready rejects), or (commands, single); nothing here holds
    the database."""
    def work() -> Response:
        is_single = single
        try:
            prepared = prepare()
            if is_single is None:
                prepared, is_single = prepared
        except ApiError as exc:
            return _error(exc)
        commands = [p for p in prepared if not isinstance(p, Result)]
        try:
            results = iter(submit(ctx.state, commands)) if commands else iter(())
        except EngineUnavailable as exc:
            return JSONResponse({"code": "ENGINE_UNAVAILABLE", "field": None, "message": str(exc)}, status_code=503)
        out = [p if isinstance(p, Result) else next(results) for p in prepared]
        if is_single:
            return JSONResponse(out[0].as_dict(), status_code=200 if out[0].accepted else 422)
        return JSONResponse({"accepted": sum(r.accepted for r in out), "rejected": sum(not r.accepted for r in out),
                             "results": [r.as_dict() for r in out]})

    return AfterCommit(work)


def _guarded(fn):
    def endpoint(ctx: Ctx):
        try:
            return fn(ctx)
        except ApiError as exc:
            return _error(exc)

    endpoint.__name__ = fn.__name__
    endpoint.__doc__ = fn.__doc__
    return endpoint


# --- reports ------------------------------------------------------------------------------


@_guarded
def post_reports(ctx: Ctx):
    """One report (an object of fields) or many (``{"reports": [...]}``, at most 500)."""
    _params(ctx, ())
    ctype, raw = _raw_json(ctx)

    def prepare():
        body = _decode(ctype, raw, required=True)
        if isinstance(body, dict) and "reports" in body:
            items = body["reports"]
            if set(body) != {"reports"} or not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
                raise ApiError(400, "BATCH_INVALID", f"reports is a list of 1 to {MAX_BATCH} report objects", "reports")
            return [_command_or_reject(ctx, _text_fields(item, f"reports[{i}]")) for i, item in enumerate(items)], False
        return [_command_or_reject(ctx, _text_fields(body, "the body"))], True

    return _run(ctx, prepare)


def _act(ctx: Ctx, action: str):
    _params(ctx, ())
    body = _json(ctx, required=action == "CORRECT")
    fields = _text_fields(body, "the body")
    if fields.get("action", action).strip().upper() != action:
        raise ApiError(400, "FIELD_INVALID", f"this call is a {action}; leave action out", "action")
    cn = str(ctx.report.control_number)
    given = fields.get("original_control_number", cn).strip()
    if not (_digits(given) and given.lstrip("0") == cn):  # not silently replaced by the path's
        raise ApiError(400, "FIELD_INVALID", f"this call acts on report {cn} (the path); leave "
                       "original_control_number out", "original_control_number")
    fields.update(action=action, original_control_number=cn)
    return _run(ctx, lambda: [_command_or_reject(ctx, fields)], single=True)


@_guarded
def post_cancel(ctx: Ctx):
    return _act(ctx, "CANCEL")


@_guarded
def post_reverse(ctx: Ctx):
    return _act(ctx, "REVERSE")


@_guarded
def post_correct(ctx: Ctx):
    return _act(ctx, "CORRECT")


def report_json(r: Any) -> dict[str, Any]:
    out = {
        "control_number": str(r.control_number), "status": r.status, "reporting_mpid": r.reporting_mpid,
        "cusip": r.cusip, "symbol": r.symbol, "data_set": r.data_set, "side": r.side, "capacity": r.capacity,
        "contra": r.contra, "quantity": scaled(r.quantity_c, 2), "price": scaled(r.price_u, 6),
        "yield": scaled(r.yield_u, 6) or None, "execution_time": iso_market(r.execution_us),
        "report_time": iso_market(r.report_us), "settlement_date": r.settlement_date,
        "commission": scaled(r.commission_c, 2) or None, "trading_market": r.trading_market,
        "remuneration": r.remuneration, "late": bool(r.late), "as_of": bool(r.as_of), "modifier3": r.modifier3,
        "test": bool(r.is_test), "disseminated": bool(r.disseminated), "channel": r.channel, "client_ref": r.client_ref,
        "first_control_number": str(r.first_control_number),
        "prior_control_number": None if r.prior_control_number is None else str(r.prior_control_number),
        "successor_control_number": None if r.successor_control_number is None else str(r.successor_control_number),
        "closed_time": iso_market(r.closed_us) if r.closed_us else None,
    }
    for name in INDICATORS:
        out[name] = bool(getattr(r, name))
    return out


def _date_param(ctx: Ctx, name: str) -> str | None:
    text = ctx.request.query_params.get(name)
    if not text:
        return None
    try:
        if len(text) != 10 or not text.isascii():
            raise ValueError(text)
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise ApiError(400, "DATE_INVALID", f"{name} must be a date, YYYY-MM-DD", name) from None


def _date_range(ctx: Ctx) -> tuple[str | None, str | None]:
    d0, d1 = _date_param(ctx, "date_from"), _date_param(ctx, "date_to")
    try:
        check_date_range(d0, d1)  # the website's journal search makes the same check
    except AccessError as exc:
        raise ApiError(400, exc.code, exc.message, exc.field) from None
    return d0, d1


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _limit(ctx: Ctx) -> int:
    limit = ctx.request.query_params.get("limit", "100")
    if not _digits(limit) or len(limit) > 4 or not 1 <= int(limit) <= 1000:
        raise ApiError(400, "LIMIT_INVALID", "limit is a whole number from 1 to 1000", "limit")
    return int(limit)


def _cusip_param(ctx: Ctx, *, required: bool) -> str:
    cusip = (ctx.request.query_params.get("cusip") or "").strip().upper()
    if not cusip:
        if required:
            raise ApiError(400, "FIELD_REQUIRED", "cusip is required: a 9-character CUSIP", "cusip")
        return ""
    if len(cusip) != 9 or not set(cusip) <= _CUSIP_CHARS:
        raise ApiError(400, "CUSIP_MALFORMED", "cusip is 9 characters: 8 of A-Z, 0-9, *, @, # and a check digit", "cusip")
    return cusip


def _params(ctx: Ctx, names: tuple[str, ...]) -> None:
    """Refuse a query parameter the call does not take, or one given twice: a misspelt filter
    (``stauts=ACTIVE``) would otherwise be dropped and every report listed."""
    seen: set[str] = set()
    for name, _ in ctx.request.query_params.multi_items():
        if name not in names:
            takes = f"this call takes: {', '.join(names)}" if names else "this call takes none: report fields go in the body"
            raise ApiError(400, "FILTER_INVALID", f"unknown query parameter {name[:64]!r}; {takes}", name[:64])
        if name in seen:
            raise ApiError(400, "FILTER_INVALID", f"query parameter {name!r} is given twice; give it once", name)
        seen.add(name)


REPORT_PARAMS = ("date_from", "date_to", "cusip", "client_ref", "status", "late", "as_of", "limit", "after")


@_guarded
def get_reports(ctx: Ctx):
    """The caller's firm's reports, newest first; ``after`` pages back by control number."""
    _params(ctx, REPORT_PARAMS)
    q = ctx.request.query_params
    t = trade_reports.c
    stmt = sa.select(trade_reports)
    if ctx.actor.mpid:
        stmt = stmt.where(t.reporting_mpid == ctx.actor.mpid)
    d0, d1 = _date_range(ctx)
    if d0:
        stmt = stmt.where(t.execution_date >= d0)
    if d1:
        stmt = stmt.where(t.execution_date <= d1)
    cusip = _cusip_param(ctx, required=False)
    if cusip:
        stmt = stmt.where(t.cusip == cusip)
    if q.get("client_ref"):
        problem = client_ref_problem(q["client_ref"])
        if problem is not None:  # a NUL would fail PostgreSQL's query (HTTP 500); no report has one
            raise ApiError(400, "FILTER_INVALID", problem, "client_ref")
        stmt = stmt.where(t.client_ref == q["client_ref"])
    status = (q.get("status") or "").upper()
    if status:
        if status not in STATUSES:
            raise ApiError(400, "FILTER_INVALID", f"status is one of {', '.join(STATUSES)}", "status")
        stmt = stmt.where(t.status == status)
    for flag in ("late", "as_of"):
        value = (q.get(flag) or "").lower()
        if value:
            if value not in ("true", "false"):
                raise ApiError(400, "FILTER_INVALID", f"{flag} is true or false", flag)
            stmt = stmt.where(getattr(t, flag).is_(value == "true"))
    limit = _limit(ctx)
    after = q.get("after")
    if after:
        if not _digits(after) or len(after) > 18:
            raise ApiError(400, "FILTER_INVALID", "after is a control number (digits), the next of the previous page", "after")
        stmt = stmt.where(t.control_number < int(after))
    rows = ctx.conn.execute(stmt.order_by(t.control_number.desc()).limit(limit + 1)).all()
    more = len(rows) > limit  # one row past the page: next only when there is another page
    rows = rows[:limit]
    return JSONResponse({"reports": [report_json(r) for r in rows],
                         "next": str(rows[-1].control_number) if more else None})


@_guarded
def get_report(ctx: Ctx):
    """One report with its whole history (the new report and every correction)."""
    r = ctx.report
    t = trade_reports.c
    chain = ctx.conn.execute(sa.select(trade_reports).where(t.first_control_number == r.first_control_number)
                             .order_by(t.seq)).all()
    return JSONResponse({"report": report_json(r), "history": [report_json(x) for x in chain]})


# --- bulk files ---------------------------------------------------------------------------


@_guarded
def post_bulk(ctx: Ctx):
    """A bulk file (CSV, the columns of docs/reporting.md) in; its results file out."""
    from bondtape.intake.bulk import BulkFileError, check_file, run_bulk
    from bondtape.serve import services

    _params(ctx, ())
    ctype = ctx.request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("text/csv", "text/plain"):
        raise ApiError(415, "CONTENT_TYPE", "send the bulk file as text/csv")
    try:
        text = _body(ctx).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ApiError(400, "FILE_INVALID", "the bulk file must be UTF-8 text", "file") from None
    try:  # the whole file, and every line the caller's firm's (reporting_mpid read as run_bulk reads it)
        check_file(io.StringIO(text, newline=""), only_mpid=ctx.actor.mpid)
    except BulkFileError as exc:
        raise ApiError(400, exc.code, exc.message, exc.field) from None
    ctx.audit("report.bulk", target=f"mpid:{ctx.actor.mpid}", detail={"bytes": len(text)})

    def work() -> Response:
        out = io.StringIO()
        try:
            run_bulk(services(ctx.state).engine, io.StringIO(text, newline=""), out)
        except EngineUnavailable as exc:
            return JSONResponse({"code": "ENGINE_UNAVAILABLE", "field": None, "message": str(exc)}, status_code=503)
        name = f"results-{market_date(ctx.now_us).isoformat()}.csv"
        return Response(out.getvalue(), media_type="text/csv",
                        headers={"content-disposition": f'attachment; filename="{name}"'})

    return AfterCommit(work)


# --- public time and sales, reference data ------------------------------------------------


@_guarded
def get_time_and_sales(ctx: Ctx):
    """The disseminated trades of a security, capped as disseminated, newest first."""
    from bondtape.dissemination.publisher import FeedError
    from bondtape.dissemination.query import time_and_sales

    _params(ctx, ("cusip", "date_from", "date_to", "limit"))
    cusip = _cusip_param(ctx, required=True)
    limit = _limit(ctx)
    d0, d1 = _date_range(ctx)

    def work() -> Response:  # the query opens its own connection: after the route's transaction
        try:
            data = time_and_sales(ctx.state.db, cusip, d0, d1, limit)
        except FeedError as exc:
            return _error(ApiError(404 if exc.code == "SECURITY_UNKNOWN" else 400, exc.code, exc.message, exc.field))
        if data["data_set"] not in ("CORP", "AGCY"):
            return _error(ApiError(404, "SECURITY_UNKNOWN", f"cusip {cusip} is not disseminated", "cusip"))
        return JSONResponse(data)

    return AfterCommit(work)


@_guarded
def get_securities(ctx: Ctx):
    """Reference data: the TRACE-eligible securities on a date (default today)."""
    from bondtape.reference.store import load_securities

    _params(ctx, ("date", "cusip"))
    day = _date_param(ctx, "date") or market_date(ctx.now_us).isoformat()
    cusip = _cusip_param(ctx, required=False)
    day_d = dt.date.fromisoformat(day)
    out = []
    for s in load_securities(ctx.conn).values():
        if (cusip and s.cusip != cusip) or not s.eligible_on(day_d):
            continue
        out.append({"cusip": s.cusip, "symbol": s.symbol, "issuer": s.issuer,
                    "coupon": None if s.coupon is None else str(s.coupon),
                    "maturity": s.maturity.isoformat() if s.maturity else None, "data_set": s.data_set,
                    "grade": s.grade, "rule_144a": bool(s.rule_144a)})
    return JSONResponse({"date": day, "securities": out})


def openapi(ctx: Ctx):
    return JSONResponse(OPENAPI)


# --- the OpenAPI description --------------------------------------------------------------

_STR = {"type": "string"}
_NSTR = {"type": ["string", "null"]}
_FLAG = {"anyOf": [{"type": "string"}, {"type": "boolean"}, {"enum": [0, 1]}],
         "description": "Y/N, true/false or 1/0 (blank or null: N)"}
_CUSIP_PATTERN = "^[0-9A-Za-z*@#]{9}$"
_REPORT_FIELDS = {
    "action": {"type": "string", "enum": ["NEW", "CANCEL", "CORRECT", "REVERSE"], "default": "NEW"},
    "client_ref": {"type": "string", "maxLength": 64, "description": "your reference; a repeat returns the first answer"},
    "reporting_mpid": {"type": "string", "description": "your firm's MPID (default)"},
    "cusip": {"type": "string", "example": "001957AV1"},
    "side": {"type": "string", "enum": ["B", "S"]},
    "capacity": {"type": "string", "enum": ["P", "A"]},
    "contra": {"type": "string", "description": "an MPID, C (customer) or A (non-member affiliate)"},
    "quantity": {"type": ["string", "number"], "description": "par value, dollars"},
    "price": {"type": ["string", "number"], "description": "percent of par"},
    "yield": {"type": ["string", "number"]},
    "execution_time": {"type": "string", "description": "ISO 8601; without an offset, New York time"},
    "settlement_date": {"type": "string", "description": "YYYY-MM-DD"},
    "commission": {"type": ["string", "number"]},
    **{name: _FLAG for name in INDICATORS},
    "trading_market": {"type": "string", "enum": ["S1", "P1"]},
    "remuneration": {"type": "string", "enum": ["C", "M", "N", ""]},
    "test": _FLAG,
    "allow_duplicate": _FLAG,
    "original_control_number": {"type": ["string", "integer"], "description": "CANCEL, CORRECT, REVERSE: the report acted on"},
}
_ERROR = {"type": "object", "properties": {"code": _STR, "field": {"type": ["string", "null"]}, "message": _STR},
          "required": ["code", "field", "message"]}
_RESULT = {"type": "object", "properties": {
    "action": _STR, "client_ref": {"type": ["string", "null"]}, "status": {"type": "string", "enum": ["ACCEPTED", "REJECTED"]},
    "control_number": {"type": ["string", "null"], "pattern": "^[0-9]+$"}, "seq": {"type": ["integer", "null"]},
    "timeliness": {"type": ["string", "null"]}, "modifier3": {"type": ["string", "null"]},
    "warning": {"type": ["string", "null"]}, "repeated": {"type": "boolean"},
    "reject": {"oneOf": [{"type": "null"}, {"type": "object", "properties": {
        "code": {"type": "string", "enum": sorted(REJECT_CODES)}, "field": _STR, "message": _STR},
        "required": ["code", "field", "message"]}]}},
    "required": ["action", "client_ref", "status", "control_number", "seq", "timeliness", "modifier3", "warning",
                 "repeated", "reject"]}
_CN_TEXT = {"type": "string", "pattern": "^[0-9]+$", "description": "a control number (a string: it passes 2^53)"}
_DECIMAL = {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?$", "description": "a decimal number, exactly"}
_TIME = {"type": "string", "format": "date-time", "description": "ISO 8601 with New York's offset"}
_DATE = {"type": "string", "format": "date"}
_REPORT = {"type": "object", "properties": {
    "control_number": _CN_TEXT, "status": {"type": "string", "enum": list(STATUSES)}, "reporting_mpid": _STR,
    "cusip": _STR, "symbol": _NSTR, "data_set": _NSTR, "side": {"type": "string", "enum": ["B", "S"]},
    "capacity": {"type": "string", "enum": ["P", "A"]}, "contra": _STR, "quantity": _DECIMAL, "price": _DECIMAL,
    "yield": {"oneOf": [{"type": "null"}, _DECIMAL]}, "execution_time": _TIME, "report_time": _TIME,
    "settlement_date": {"oneOf": [{"type": "null"}, _DATE]}, "commission": {"oneOf": [{"type": "null"}, _DECIMAL]},
    "trading_market": _NSTR, "remuneration": _NSTR, "late": {"type": "boolean"}, "as_of": {"type": "boolean"},
    "modifier3": _NSTR, "test": {"type": "boolean"}, "disseminated": {"type": "boolean"}, "channel": _NSTR,
    "client_ref": _NSTR, "first_control_number": _CN_TEXT,
    "prior_control_number": {"oneOf": [{"type": "null"}, _CN_TEXT]},
    "successor_control_number": {"oneOf": [{"type": "null"}, _CN_TEXT]},
    "closed_time": {"oneOf": [{"type": "null"}, _TIME]},
    **{name: {"type": "boolean"} for name in INDICATORS}},
    "required": ["control_number", "status", "reporting_mpid", "cusip", "side", "quantity", "price", "execution_time",
                 "report_time", "first_control_number"]}
_TRADE = {"type": "object", "description": "a trade as disseminated (docs/dissemination.md): quantity capped "
          "(e.g. 5MM+), no firm identities", "properties": {
              "cusip": _STR, "execution_time": _TIME, "price": _STR, "quantity": _STR, "side": _NSTR,
              "message": {"type": "object", "properties": {"date": _DATE, "seq": {"type": "integer"}}}},
          "required": ["cusip", "execution_time", "price", "quantity"]}
_SECURITY = {"type": "object", "properties": {
    "cusip": _STR, "symbol": _NSTR, "issuer": _NSTR, "coupon": _NSTR,
    "maturity": {"oneOf": [{"type": "null"}, _DATE]}, "data_set": _STR, "grade": _NSTR, "rule_144a": {"type": "boolean"}},
    "required": ["cusip", "data_set", "rule_144a"]}


def _resp(description: str, schema: dict | None = None, media: str = "application/json", headers=None) -> dict:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {media: {"schema": schema}}
    if headers:
        out["headers"] = headers
    return out


_AUTH_ERRORS = {
    "401": _resp("login and password missing or not accepted (LOGIN_REQUIRED, LOGIN_FAILED, LOCKED)", _ERROR),
    "403": _resp("no usable client certificate (CERT_*), or not allowed (FORBIDDEN_*)", _ERROR),
    "404": _resp("no such record (or another firm's)", _ERROR),
    "400": _resp("malformed request", _ERROR),
    "413": _resp("the body is larger than 64 KiB (BODY_TOO_LARGE)", _ERROR),
    "415": _resp("wrong content type (CONTENT_TYPE)", _ERROR),
    "429": _resp("too many failed logins from your address (THROTTLED)", _ERROR),
    "503": _resp("the database is unavailable (ENGINE_UNAVAILABLE): nothing was journaled, send again", _ERROR),
}
_CN = {"name": "control_number", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}
_SECURED = [{"client_certificate": [], "password": []}]  # both: the certificate AND the password


def _or_empty(schema: dict) -> dict:
    """A query parameter's schema: an optional filter given empty is as if not given."""
    return {"anyOf": [schema, {"type": "string", "maxLength": 0}], "description": "empty: not given"}


_DATE_QUERY = {"anyOf": [_DATE, {"type": "string", "maxLength": 0}], "description": "YYYY-MM-DD (empty: not given)"}
_CUSIP_QUERY = {"type": "string", "pattern": _CUSIP_PATTERN, "description": "9 CUSIP characters (any case)"}
_CUSIP_FILTER = {"anyOf": [_CUSIP_QUERY, {"type": "string", "maxLength": 0}],
                 "description": "9 CUSIP characters, any case (empty: not given)"}


def _act_op(action: str, body_required: bool) -> dict:
    fields = {k: v for k, v in _REPORT_FIELDS.items() if k not in ("action", "original_control_number")}
    fields["action"] = {"type": "string", "enum": [action], "description": "may be left out: the call says it"}
    fields["original_control_number"] = {"type": ["string", "integer"], "pattern": "^[0-9]+$",
                                         "description": "may be left out: the path's control number if given"}
    return {"post": {
        "summary": f"{action.capitalize()} one of your firm's reports", "operationId": action.lower(),
        "security": _SECURED, "parameters": [_CN],
        "requestBody": {"required": body_required, "content": {"application/json": {"schema": {
            "type": "object", "properties": fields, "additionalProperties": False}}}},
        "responses": {"200": _resp("accepted", _RESULT), "422": _resp("rejected: see reject.code", _RESULT),
                      **_AUTH_ERRORS}}}


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "bondtape REST API", "version": "1",
             "description": "Trade reporting and public time and sales. Firms' calls need TLS with the user's client "
                            "certificate and the login and password (HTTP Basic). Reject codes: docs/reject-codes.md."},
    "components": {"securitySchemes": {
        "client_certificate": {"type": "mutualTLS", "description": "the user's TLS client certificate (bondtape certs "
                               "issue); an expired one, or one of another CA, fails the TLS handshake"},
        "password": {"type": "http", "scheme": "basic", "description": "the login and password of the certificate's user"},
    }},
    "paths": {
        "/api/v1/reports": {
            "post": {
                "summary": "Report trades (or cancel/correct/reverse by action)", "operationId": "report",
                "security": _SECURED,
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
                    {"type": "object", "properties": _REPORT_FIELDS, "additionalProperties": False},
                    {"type": "object", "properties": {"reports": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH,
                                                                  "items": {"type": "object", "properties": _REPORT_FIELDS,
                                                                            "additionalProperties": False}}},
                     "required": ["reports"], "additionalProperties": False}]}}}},
                "responses": {"200": _resp("accepted (one report), or the results of a batch (200 whatever each "
                                           "report's outcome)", {"oneOf": [
                                               _RESULT, {"type": "object", "properties": {
                                                   "accepted": {"type": "integer"}, "rejected": {"type": "integer"},
                                                   "results": {"type": "array", "items": _RESULT}},
                                                   "required": ["accepted", "rejected", "results"]}]}),
                              "422": _resp("rejected (one report): see reject.code", _RESULT), **_AUTH_ERRORS},
            },
            "get": {
                "summary": "Your firm's reports, newest first", "operationId": "list_reports",
                "security": _SECURED,
                "parameters": [
                    {"name": "date_from", "in": "query", "schema": _DATE_QUERY},
                    {"name": "date_to", "in": "query", "schema": _DATE_QUERY},
                    {"name": "cusip", "in": "query", "schema": _CUSIP_FILTER},
                    {"name": "client_ref", "in": "query", "schema": {
                        "type": "string", "maxLength": 64, "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$",
                        "description": "printable characters, as client_ref itself (empty: not given)"}},
                    {"name": "status", "in": "query", "schema": _or_empty({"type": "string", "enum": list(STATUSES)})},
                    {"name": "late", "in": "query", "schema": _or_empty({"type": "string", "enum": ["true", "false"]})},
                    {"name": "as_of", "in": "query", "schema": _or_empty({"type": "string", "enum": ["true", "false"]})},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                    {"name": "after", "in": "query", "schema": _or_empty({"type": "string", "pattern": "^[0-9]{1,18}$"}),
                     "description": "next from the previous page"},
                ],
                "responses": {"200": _resp("reports, newest first; next is null on the last page", {
                    "type": "object", "properties": {"reports": {"type": "array", "items": _REPORT},
                                                     "next": {"oneOf": [{"type": "null"}, _CN_TEXT]}},
                    "required": ["reports", "next"]}), **_AUTH_ERRORS},
            },
        },
        "/api/v1/reports/{control_number}": {"get": {
            "summary": "One of your firm's reports, with its history", "operationId": "get_report",
            "security": _SECURED, "parameters": [_CN],
            "responses": {"200": _resp("the report and its history (the first report and each correction)", {
                "type": "object", "properties": {"report": _REPORT, "history": {"type": "array", "items": _REPORT}},
                "required": ["report", "history"]}), **_AUTH_ERRORS}}},
        "/api/v1/reports/{control_number}/cancel": _act_op("CANCEL", False),
        "/api/v1/reports/{control_number}/reverse": _act_op("REVERSE", False),
        "/api/v1/reports/{control_number}/correct": _act_op("CORRECT", True),
        "/api/v1/bulk": {"post": {
            "summary": "A bulk file in, its results file out", "operationId": "bulk",
            "security": _SECURED,
            "requestBody": {"required": True, "content": {"text/csv": {"schema": {"type": "string", "minLength": 1}}}},
            "responses": {"200": _resp("the results file: each line's control number or reject", {"type": "string"},
                                       "text/csv"), **_AUTH_ERRORS}}},
        "/api/v1/time-and-sales": {"get": {
            "summary": "Public time and sales of a security (capped as disseminated)", "operationId": "time_and_sales",
            "security": [{}],
            "parameters": [
                {"name": "cusip", "in": "query", "required": True, "schema": _CUSIP_QUERY},
                {"name": "date_from", "in": "query", "schema": _DATE_QUERY},
                {"name": "date_to", "in": "query", "schema": _DATE_QUERY},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
            ],
            "responses": {"200": _resp("trades, newest first", {
                "type": "object", "properties": {"cusip": _STR, "symbol": _NSTR, "issuer": _NSTR, "data_set": _STR,
                                                 "trades": {"type": "array", "items": _TRADE}},
                "required": ["cusip", "data_set", "trades"]}),
                "400": _resp("malformed request", _ERROR), "404": _resp("unknown security", _ERROR)}}},
        "/api/v1/securities": {"get": {
            "summary": "Reference data: TRACE-eligible securities on a date", "operationId": "securities",
            "security": _SECURED,
            "parameters": [{"name": "date", "in": "query", "schema": _DATE_QUERY},
                           {"name": "cusip", "in": "query", "schema": _CUSIP_FILTER}],
            "responses": {"200": _resp("securities", {
                "type": "object", "properties": {"date": _DATE, "securities": {"type": "array", "items": _SECURITY}},
                "required": ["date", "securities"]}), **_AUTH_ERRORS}}},
    },
}

ROUTES = [
    route("/openapi.json", openapi, rule="public"),
    route("/api/v1/reports", post_reports, rule="trade.report", methods=["POST"], auth="certificate"),
    route("/api/v1/reports", get_reports, rule="trade.view", auth="certificate"),
    route("/api/v1/reports/{control_number:int}", get_report, rule="trade.view", resource=report_mpid,
          auth="certificate"),
    route("/api/v1/reports/{control_number:int}/cancel", post_cancel, rule="trade.act", methods=["POST"],
          resource=report_mpid, auth="certificate"),
    route("/api/v1/reports/{control_number:int}/reverse", post_reverse, rule="trade.act", methods=["POST"],
          resource=report_mpid, auth="certificate"),
    route("/api/v1/reports/{control_number:int}/correct", post_correct, rule="trade.act", methods=["POST"],
          resource=report_mpid, auth="certificate"),
    route("/api/v1/bulk", post_bulk, rule="trade.report", methods=["POST"], auth="certificate"),
    route("/api/v1/time-and-sales", get_time_and_sales, rule="public"),
    route("/api/v1/securities", get_securities, rule="download.reference", auth="certificate"),
]

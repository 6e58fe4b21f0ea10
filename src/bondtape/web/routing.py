"""How a route declares who may use it, and the guard that enforces it.

Every route of the application is a :class:`GuardedRoute`, made with :func:`route`::

    from bondtape.web.routing import route

    def show_report(ctx): ...
    ROUTES = [
        route("/reports/{control_number:int}", show_report, rule="trade.view",
              resource=lambda ctx: report_mpid(ctx)),   # "may this actor do this to that"
    ]

- ``rule`` is an action of :mod:`bondtape.access.authz` (``public``, ``account``,
  ``operator``, ``trade.view``, ...). A route without one cannot be built, and the
  authorization-matrix test fails for any route it has no expectation for.
- ``resource(ctx)`` returns the "that" (an MPID, an org id, a ``HistoricSet``); raise
  :class:`NotFound` for a missing one.
- ``auth="session"`` (the website: cookie session, CSRF token on every POST form) or
  ``auth="certificate"`` (REST API and downloads: TLS client certificate of the user AND
  HTTP Basic login and password, on every request).

Endpoints are plain functions ``endpoint(ctx: Ctx) -> Response`` run in a thread, inside
one database transaction (``ctx.conn``); an :class:`AccessError` they raise becomes a page
with its code and message, and the transaction (with its audit rows) commits.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import quote

import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from bondtape.access import accounts, audit
from bondtape.access.authz import ACTIONS, decide
from bondtape.access.ca import check_client_certificate
from bondtape.access.crypto import constant_equal, new_token, verify_password
from bondtape.access.model import AccessError, AuthenticatedUser
from bondtape.access.schema import audit_log
from bondtape.access.settings import MINUTE_US
from bondtape.web import sessions
from bondtape.web.tls import client_certificate_der

AUTH_MODES = ("session", "certificate")
log = logging.getLogger("bondtape.web")

# Paths that carry a secret (a one-time enrollment link token): the audit trail records
# them with the secret replaced. Every audited path goes through :func:`audited_path`.
_SECRET_PATHS = (re.compile(r"^(/enroll/)[^/]+"),)
REDACTED = "[redacted]"


def audited_path(path: str) -> str:
    """A request path as the audit trail records it: secrets redacted, at most 200 characters."""
    for pattern in _SECRET_PATHS:
        path = pattern.sub(lambda m: m.group(1) + REDACTED, path)
    return path[:200]
MAX_FORM_BYTES = 64 * 1024


class NotFound(Exception):
    pass


@dataclass
class Ctx:
    request: Request
    form: dict[str, str]
    actor: AuthenticatedUser | None
    session: sessions.Session | None
    conn: Any
    now_us: int
    source: str
    csrf_token: str
    state: Any  # app.state: db, settings, policy, mailer, templates, clock, ca_cert
    resource: Any = None
    cookies_to_set: list[tuple[str, str, dict]] = field(default_factory=list)

    @property
    def settings(self):
        return self.state.settings

    def render(self, template: str, status: int = 200, **values) -> HTMLResponse:
        html = self.state.templates.get_template(template).render(
            actor=self.actor, csrf_token=self.csrf_token, request=self.request, **values)
        return HTMLResponse(html, status_code=status)

    def audit(self, action: str, *, outcome: str = "ok", target: str | None = None, detail: dict | None = None,
              actor: AuthenticatedUser | None = None) -> None:
        who = actor or self.actor
        audit.record(self.conn, action, at_us=self.now_us, outcome=outcome, actor_user_id=who and who.user_id,
                     actor=who and who.username, org_id=who and who.org_id, target=target, source=self.source,
                     detail=detail)


class GuardedRoute(Route):
    def __init__(self, path: str, endpoint: Callable[[Ctx], Response], *, rule: str, methods: list[str],
                 resource: Callable[[Ctx], Any] | None, auth: str, name: str | None):
        if rule not in ACTIONS:
            raise ValueError(f"route {path}: unknown rule {rule!r}; known: {', '.join(ACTIONS)}")
        if auth not in AUTH_MODES:
            raise ValueError(f"route {path}: auth must be one of {AUTH_MODES}")
        self.rule, self.auth, self.resource, self.handler = rule, auth, resource, endpoint

        async def asgi_endpoint(request: Request) -> Response:
            return await _handle(request, self)

        super().__init__(path, asgi_endpoint, methods=methods, name=name or endpoint.__name__)


def route(path: str, endpoint: Callable[[Ctx], Response], *, rule: str, methods=("GET",),
          resource: Callable[[Ctx], Any] | None = None, auth: str = "session", name: str | None = None) -> GuardedRoute:
    return GuardedRoute(path, endpoint, rule=rule, methods=list(methods), resource=resource, auth=auth, name=name)


def _source(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def _read_body(request: Request) -> bytes | None:
    """The request body, or None when it is larger than MAX_FORM_BYTES: counted as it
    arrives, so a body sent without a content-length (chunked) is bounded too. Kept on the
    request, where request.body() and request.form() find it."""
    declared = request.headers.get("content-length") or "0"
    if not declared.isdigit() or int(declared) > MAX_FORM_BYTES:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            return None
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # noqa: SLF001 - Starlette's own cache of the body
    return body


async def _handle(request: Request, r: GuardedRoute) -> Response:
    form: dict[str, str] = {}
    if request.method == "POST":
        if await _read_body(request) is None:
            if r.auth == "certificate":
                return _error_response(r, 413, "BODY_TOO_LARGE", f"a request body may carry at most {MAX_FORM_BYTES} "
                                       "bytes (64 KiB): send fewer reports per request, or a bulk file in parts")
            return _error_response(r, 413, "FORM_TOO_LARGE", f"a form may carry at most {MAX_FORM_BYTES} bytes")
        try:
            data = await request.form()
        except Exception:  # noqa: BLE001 - malformed body from a client
            return _error_response(r, 400, "FORM_INVALID", "the form could not be read")
        form = {k: v for k, v in data.items() if isinstance(v, str)}
    return await run_in_threadpool(_handle_sync, request, r, form)


def _error_response(r: GuardedRoute, status: int, code: str, message: str) -> Response:
    if r.auth == "certificate":
        return JSONResponse({"code": code, "field": None, "message": message}, status_code=status,
                            headers={"WWW-Authenticate": 'Basic realm="bondtape"'} if status == 401 else None)
    return HTMLResponse(f"<!doctype html><title>{status}</title><h1>{code}</h1><p>{message}</p>", status_code=status)


def _basic_credentials(request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return None
    try:
        username, _, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, ValueError, UnicodeDecodeError):  # not base64, not ASCII, not UTF-8
        return None
    return username, password


def _recalled_user(ctx: Ctx, serial: str, creds: tuple[str, str]):
    """The user row, when this exact (certificate, login, password) was verified moments ago
    and nothing about the user has changed since (see access.credential_cache)."""
    hit = ctx.state.credential_cache.recall(serial, creds[0], creds[1], now_us=ctx.now_us)
    if hit is None:
        return None
    user = accounts.user_by_id(ctx.conn, hit[0])
    if (user is None or user.status != "ACTIVE" or user.password_hash != hit[1]
            or accounts.is_locked(ctx.conn, user.id, ctx.now_us)
            or accounts.source_throttled(ctx.conn, ctx.source, now_us=ctx.now_us, lockout=ctx.settings.lockout)):
        return None
    return user


def _throttled_response(ctx: Ctx, r: GuardedRoute) -> Response:
    wait = accounts.source_retry_after_s(ctx.conn, ctx.source, now_us=ctx.now_us, lockout=ctx.settings.lockout)
    response = _error_response(r, 429, "THROTTLED", f"too many failed logins from your address; try again in {wait} s")
    response.headers["Retry-After"] = str(wait)
    return response


def _certificate_actor(ctx: Ctx, r: GuardedRoute) -> tuple[AuthenticatedUser | None, Response | None]:
    """Certificate AND login AND password: both must name the same active user.

    A login other than the certificate's user is answered CERT_USER_MISMATCH without
    looking it up: the answer (and its cost, one password hash) is the same whether that
    login exists, is locked, or its password is right, and the failure counts against the
    certificate's user, never the other one (a holder of one certificate can neither learn
    of nor lock out other users)."""
    state = ctx.state
    if state.ca_cert is None:
        return None, _error_response(r, 503, "CA_NOT_CONFIGURED", "this service has no certificate authority configured")
    check = check_client_certificate(ctx.conn, client_certificate_der(ctx.request.scope), state.ca_cert, now_us=ctx.now_us)
    if check.reason != "ok":
        audit.record(ctx.conn, "cert.refused", at_us=ctx.now_us, outcome="denied", actor_user_id=check.user_id,
                     target=check.serial and f"cert:{check.serial}", source=ctx.source,
                     detail={"reason": check.reason, "path": audited_path(ctx.request.url.path)})
        messages = {
            "no_certificate": "a client certificate is required (TLS), with your login and password",
            "not_ours": "the client certificate was not issued by this service",
            "unknown": "the client certificate is not on record",
            "revoked": "the client certificate has been revoked",
            "expired": "the client certificate is not valid at this time",
            "user_not_active": "the certificate's user is not active",
        }
        return None, _error_response(r, 403, "CERT_" + check.reason.upper(), messages[check.reason])
    creds = _basic_credentials(ctx.request)
    if creds is None:
        audit.record(ctx.conn, "api.login.failed", at_us=ctx.now_us, outcome="denied", actor_user_id=check.user_id,
                     target=f"cert:{check.serial}", source=ctx.source, detail={"reason": "no_password"})
        return None, _error_response(r, 401, "LOGIN_REQUIRED", "send your login and password (HTTP Basic) with the certificate")
    user = _recalled_user(ctx, check.serial, creds)  # this certificate's own login, seen before: no query
    if user is None:
        if accounts.source_throttled(ctx.conn, ctx.source, now_us=ctx.now_us, lockout=state.settings.lockout):
            audit.record(ctx.conn, "api.login.failed", at_us=ctx.now_us, outcome="denied", actor_user_id=check.user_id,
                         target=f"cert:{check.serial}", source=ctx.source, detail={"reason": "source_throttled"})
            return None, _throttled_response(ctx, r)
        cert_user = accounts.user_by_id(ctx.conn, check.user_id) if check.user_id is not None else None
        if cert_user is None or creds[0].strip().lower() != cert_user.username:
            verify_password(None, creds[1])  # the cost of a real check, whatever the login
            audit.record(ctx.conn, "cert.user_mismatch", at_us=ctx.now_us, outcome="denied", actor_user_id=check.user_id,
                         actor=cert_user and cert_user.username, org_id=cert_user and cert_user.org_id,
                         target=f"cert:{check.serial}", source=ctx.source,
                         detail={"login": creds[0][:64], "path": audited_path(ctx.request.url.path)})
            if cert_user is not None:
                accounts.register_failure(ctx.conn, cert_user, now_us=ctx.now_us, lockout=state.settings.lockout,
                                          source=ctx.source, action="api.login.failed", reason="certificate_of_another_user")
            return None, _error_response(r, 403, "CERT_USER_MISMATCH", "the client certificate belongs to another user")
        pw = accounts.password_step(ctx.conn, creds[0], creds[1], now_us=ctx.now_us, source=ctx.source,
                                    lockout=state.settings.lockout, action="api.login")
        if pw.user is None:
            if pw.reason == "throttled":
                return None, _throttled_response(ctx, r)
            code = "LOCKED" if pw.reason == "locked" else "LOGIN_FAILED"
            return None, _error_response(r, 401, code, "too many failed attempts; try later" if code == "LOCKED"
                                         else "login or password not accepted")
        user = pw.user
        if user.id == check.user_id:
            state.credential_cache.remember(check.serial, creds[0], creds[1], user_id=user.id,
                                            password_hash=user.password_hash, now_us=ctx.now_us)
    if user.id != check.user_id:  # not reached: the login was the certificate user's (above)
        return None, _error_response(r, 403, "CERT_USER_MISMATCH", "the client certificate belongs to another user")
    accounts.register_success(ctx.conn, user.id)
    actor = accounts.authenticated(ctx.conn, user.id, "certificate+password")
    audit.record(ctx.conn, "cert.use", at_us=ctx.now_us, actor_user_id=actor.user_id, actor=actor.username,
                 org_id=actor.org_id, target=f"cert:{check.serial}", source=ctx.source,
                 detail={"path": audited_path(ctx.request.url.path)})
    return actor, None


def _audited_after_commit(work: Callable[[], Response], ctx: Ctx, target: str, detail: dict) -> Callable[[], Response]:
    """``work`` of an AfterCommit, followed by the request's audit row with the status of the
    answer it made (500 when it raised), in a transaction of its own: the route's has
    committed by then. A failure to write that row is logged and does not change the
    answer: the work is done (a report journaled), and a 5xx would invite sending it again."""
    actor = ctx.actor

    def audited() -> Response:
        status: int = 500
        try:
            final = work()
            status = final.status_code
            return final
        finally:
            try:
                audit.record_now(ctx.state.db, "request", at_us=ctx.now_us, actor_user_id=actor.user_id,
                                 actor=actor.username, org_id=actor.org_id, target=target, source=ctx.source,
                                 detail={**detail, "status": status})
            except Exception:  # noqa: BLE001 - logged; the answer stands
                log.exception("the audit row of %s %s (status %s) could not be written", detail.get("method"),
                              target, status)

    return audited


def _handle_sync(request: Request, r: GuardedRoute, form: dict[str, str]) -> Response:
    state = request.app.state
    now = state.clock()
    source = _source(request)
    pre_csrf = request.cookies.get(sessions.PRE_CSRF_COOKIE)
    new_pre_csrf = None
    if not pre_csrf or len(pre_csrf) > 100:
        pre_csrf = new_pre_csrf = new_token()
    with state.db.begin() as conn:
        ctx = Ctx(request, form, None, None, conn, now, source, pre_csrf, state)
        if r.auth == "session":
            ctx.session = sessions.resume(conn, request.cookies.get(sessions.SESSION_COOKIE), now_us=now,
                                          settings=state.settings)
            if ctx.session is not None:
                ctx.actor = accounts.authenticated(conn, ctx.session.user_id, ctx.session.method)
                ctx.csrf_token = ctx.session.csrf_token
            if request.method == "POST":
                sent = form.get("csrf_token", "")
                if not sent or not constant_equal(sent, ctx.csrf_token):
                    ctx.audit("csrf.refused", outcome="denied", target=audited_path(request.url.path))
                    return _error_response(r, 403, "CSRF", "the form's security token is missing or stale: "
                                           "reload the page and submit again")
        else:
            actor, refusal = _certificate_actor(ctx, r)
            if refusal is not None:
                return refusal
            ctx.actor = actor
        try:
            if r.resource is not None:
                ctx.resource = r.resource(ctx)
            decision = decide(conn, ctx.actor, r.rule, ctx.resource, now_us=now)
            if not decision.allowed:
                ctx.audit("access.denied", outcome="denied", target=audited_path(request.url.path),
                          detail={"rule": r.rule, "reason": decision.reason})
                if ctx.actor is None and r.auth == "session" and request.method == "GET":
                    return RedirectResponse("/login?next=" + quote(request.url.path), status_code=303)
                if decision.reason == "other_firm":  # do not confirm that another firm's record exists
                    return _error_response(r, 404, "NOT_FOUND", "no such record")
                return _error_response(r, 403, "FORBIDDEN_" + decision.reason.upper(),
                                       f"not allowed: {decision.reason.replace('_', ' ')}")
            response = r.handler(ctx)
            if request.method != "GET" and ctx.actor is not None and r.rule != "public":
                # every state-changing request of a signed-in user: who, what, when, from where,
                # and the status the client got
                detail = {"method": request.method, "route": r.path}
                work = getattr(response, "work", None)
                if callable(work):  # an AfterCommit: its status is known once its work has run
                    response.work = _audited_after_commit(work, ctx, audited_path(request.url.path), detail)
                else:
                    ctx.audit("request", target=audited_path(request.url.path),
                              detail={**detail, "status": response.status_code})
        except NotFound as exc:
            return _error_response(r, 404, "NOT_FOUND", str(exc) or "no such record")
        except AccessError as exc:
            if r.auth == "certificate":
                response = JSONResponse({"code": exc.code, "field": exc.field, "message": exc.message}, status_code=400)
            else:
                response = ctx.render("error.html", status=400, error=exc)
    for name, value, options in ctx.cookies_to_set:
        response.set_cookie(name, value, **options)
    if new_pre_csrf and r.auth == "session":
        response.set_cookie(sessions.PRE_CSRF_COOKIE, new_pre_csrf, httponly=True, samesite="strict",
                            secure=state.settings.cookie_secure, path="/")
    return response


def json_response(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, sort_keys=True, default=str), status_code=status, media_type="application/json")

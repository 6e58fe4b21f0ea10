"""The application factory: ``create_app(db, settings)``.

Routes come from every module ``bondtape.web.routes_*`` (its ``ROUTES`` list of
``routing.route(...)``), so a new capability adds a module and nothing else.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Callable

from cryptography import x509
from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from bondtape.access.ca import CA_CERT
from bondtape.access.credential_cache import CredentialCache
from bondtape.access.mail import mailer_for
from bondtape.access.policy import AccessPolicy, load_policy
from bondtape.access.settings import AccessSettings
from bondtape.clock import iso_market, now_us
from bondtape.db import connect

STATIC_DIR = Path(__file__).parent / "static"

SECURITY_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # enrollment links carry a token
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; style-src 'self'; form-action 'self'; "
                                 b"frame-ancestors 'none'"),
    (b"cache-control", b"no-store"),
]


class SecurityHeaders:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                if scope.get("scheme") == "https":
                    extra.append((b"strict-transport-security", b"max-age=31536000"))
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def allowed_methods(request) -> list[str]:
    """Every method of every route whose path matches the request's (several routes may
    share a path, one per method: GET and POST /api/v1/reports)."""
    from starlette.routing import Match

    methods: set[str] = set()
    scope = {**request.scope, "type": "http"}
    for r in request.app.routes:
        if getattr(r, "methods", None) and r.matches(scope)[0] != Match.NONE:
            methods |= set(r.methods)
    return sorted(methods)


async def _api_http_error(request, exc):
    """A path or method the REST API does not have answers JSON with a stable code, like
    every other API refusal (the website keeps Starlette's plain pages). A 405's Allow
    header names the methods of every route on the path (Starlette's names only those of
    the first route it met)."""
    from starlette.responses import JSONResponse, PlainTextResponse

    status = exc.status_code
    headers = dict(exc.headers or {})
    if status == 405:
        allowed = allowed_methods(request)
        if allowed:
            headers["Allow"] = ", ".join(allowed)
    if not request.url.path.startswith("/api/"):  # Starlette's own answer
        return PlainTextResponse(str(exc.detail), status_code=status, headers=headers or None)
    if status == 404:
        body = {"code": "NOT_FOUND", "field": None, "message": "no such API path; a report is "
                "/api/v1/reports/{control_number} with a control number of digits (docs/api.md)"}
    elif status == 405:
        body = {"code": "METHOD_NOT_ALLOWED", "field": None, "message": f"{request.method} is not accepted here "
                f"(allowed: {headers.get('Allow', 'see docs/api.md')})"}
    else:
        body = {"code": f"HTTP_{status}", "field": None, "message": str(exc.detail)}
    return JSONResponse(body, status_code=status, headers=headers or None)


def route_modules() -> list[str]:
    import bondtape.web as package

    return sorted(f"bondtape.web.{m.name}" for m in pkgutil.iter_modules(package.__path__) if m.name.startswith("routes_"))


def all_routes() -> list:
    routes = []
    for module in route_modules():
        routes.extend(importlib.import_module(module).ROUTES)
    return routes


def templates() -> Environment:
    env = Environment(loader=PackageLoader("bondtape.web", "templates"), autoescape=select_autoescape(["html"]))
    env.filters["market_time"] = lambda us: iso_market(us)[:19].replace("T", " ") if us else ""
    return env


def create_app(
    db: Engine | str | None,
    settings: AccessSettings,
    *,
    clock: Callable[[], int] = now_us,
    policy: AccessPolicy | None = None,
    mailer=None,
) -> Starlette:
    engine = db if isinstance(db, Engine) else connect(db)
    app = Starlette(
        routes=all_routes() + [Mount("/static", StaticFiles(directory=STATIC_DIR), name="static")],
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers={404: _api_http_error, 405: _api_http_error},
    )
    app.state.db = engine
    app.state.settings = settings
    app.state.clock = clock
    app.state.policy = policy or load_policy(settings.policy_file)
    app.state.templates = templates()
    app.state.credential_cache = CredentialCache()
    app.state.mailer = mailer if mailer is not None else (
        mailer_for(settings) if (settings.smtp_host or settings.outbox_dir) else None)
    ca_path = settings.ca_dir / CA_CERT if settings.ca_dir else None
    app.state.ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes()) if ca_path and ca_path.exists() else None
    return app

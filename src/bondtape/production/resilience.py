"""Database outages answered as a retryable HTTP error, and metrics of the intake.

While PostgreSQL is down or restarting, any request that needs it gets **HTTP 503** with
the stable code ``SERVICE_UNAVAILABLE`` (``ENGINE_UNAVAILABLE`` from the REST API's own
handler) and ``Retry-After: 1``; nothing of that request was recorded, and the same
request (same ``client_ref``) may be sent again. The connection pool reconnects by itself
(``pool_pre_ping``): no restart of bondtape is needed once the database answers.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import JSONResponse

from bondtape.engine import EngineUnavailable
from bondtape.observability import record_results

log = logging.getLogger("bondtape.production")

RETRY_AFTER_SECONDS = 1
UNAVAILABLE_CODE = "SERVICE_UNAVAILABLE"
_UNAVAILABLE = (EngineUnavailable, sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)


def is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, _UNAVAILABLE) or (isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated)


def unavailable_response(message: str) -> JSONResponse:
    return JSONResponse({"code": UNAVAILABLE_CODE, "field": None,
                         "message": f"the database is unavailable ({message}); nothing was recorded: "
                                    f"send the same request again in a moment"},
                        status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


async def _handler(request: Request, exc: Exception) -> JSONResponse:
    orig = getattr(exc, "orig", None) or exc
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0][:200]
    log.warning("request refused, database unavailable: %s", first, extra={"path": request.url.path})
    return unavailable_response(first)


class RetryAfterOn503:
    """ASGI middleware: every 503 answer carries ``Retry-After`` (the REST API's own
    ``ENGINE_UNAVAILABLE`` answers included)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_retry(message):
            if message["type"] == "http.response.start" and message.get("status") == 503:
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"retry-after" for k, _ in headers):
                    headers.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_retry)


def install(app) -> None:
    """Add the 503 handling to a Starlette app before it serves its first request."""
    for cls in (EngineUnavailable, sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError,
                sa.exc.DBAPIError):
        app.add_exception_handler(cls, _dbapi_handler if cls is sa.exc.DBAPIError else _handler)
    app.add_middleware(RetryAfterOn503)


async def _dbapi_handler(request: Request, exc: Exception):
    if is_unavailable(exc):
        return await _handler(request, exc)
    raise exc


def instrument(sequencer: Any) -> Any:
    """Count every answer of ``sequencer`` (accepted, rejected by code, unavailable) and its
    latency, by channel, in the process's Prometheus registry."""
    from bondtape.observability import INTAKE_UNAVAILABLE

    submit = sequencer.submit

    def metered_submit(command):
        started = time.perf_counter()
        channel = getattr(command, "channel", "") or ""
        try:
            future = submit(command)
        except EngineUnavailable:
            INTAKE_UNAVAILABLE.labels(channel).inc()
            raise

        def done(f) -> None:
            exc = f.exception()
            if exc is None:
                record_results([f.result()], channel, started)
            elif isinstance(exc, EngineUnavailable):
                INTAKE_UNAVAILABLE.labels(channel).inc()

        future.add_done_callback(done)
        return future

    submit_many = sequencer.submit_many

    def metered_submit_many(commands):
        started = time.perf_counter()
        channel = (getattr(commands[0], "channel", "") or "") if commands else ""
        try:
            future = submit_many(commands)
        except EngineUnavailable:
            INTAKE_UNAVAILABLE.labels(channel).inc(len(commands))
            raise

        def done(f) -> None:
            exc = f.exception()
            if exc is None:
                record_results(f.result(), channel, started)
            elif isinstance(exc, EngineUnavailable):
                INTAKE_UNAVAILABLE.labels(channel).inc(len(commands))

        future.add_done_callback(done)
        return future

    sequencer.submit = metered_submit
    sequencer.submit_many = metered_submit_many
    return sequencer

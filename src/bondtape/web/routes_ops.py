"""Operations endpoints: liveness, readiness and Prometheus metrics.

| route | rule | answers |
| --- | --- | --- |
| ``GET /healthz`` | ``public`` | 200 while the process serves requests (never touches the database) |
| ``GET /readyz`` | ``public`` | 200 when the database answers, else 503; the bus's status is shown, and a bus that is down does not make the worker unready (intake and journal go on without it) |
| ``GET /metrics`` | ``operator`` | Prometheus text; also to a scraper sending ``Authorization: Bearer <metrics_token>`` when a token is configured (``BONDTAPE_METRICS_TOKEN``) |

The two health routes and a scrape with the token are answered without opening a
database transaction (they must answer while PostgreSQL is down); an operator's scrape
with a website session goes through the usual guard (docs/deploy.md).
"""
from __future__ import annotations

import asyncio
import hmac
from typing import Any, Callable

import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bondtape.db import reading
from bondtape.web.routing import Ctx, GuardedRoute, _handle

CHECK_TIMEOUT_SECONDS = 2.0


class OpsRoute(GuardedRoute):
    """A guarded route answered without the database when the rule is ``public`` or the
    request carries the configured scrape token; otherwise the usual guard applies."""

    def __init__(self, path: str, endpoint: Callable[[Request], Any], *, rule: str, token_setting: bool = False,
                 guarded: Callable[[Ctx], Response] | None = None):
        super().__init__(path, guarded or (lambda ctx: Response(status_code=404)), rule=rule, methods=["GET"],
                         resource=None, auth="session", name=endpoint.__name__)
        self.direct = endpoint

        async def asgi_endpoint(request: Request) -> Response:
            if rule == "public" or (token_setting and _token_ok(request)):
                return await endpoint(request)
            return await _handle(request, self)

        Route.__init__(self, path, asgi_endpoint, methods=["GET"], name=endpoint.__name__)


def _token_ok(request: Request) -> bool:
    token = getattr(request.app.state, "metrics_token", None)
    header = request.headers.get("authorization", "")
    if not token or not header.lower().startswith("bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode(), token.encode())


def _database_check(state) -> tuple[bool, int | None, str]:
    from bondtape.journal.schema import journal_head

    try:
        with reading(state.db) as conn:
            head = conn.execute(sa.select(journal_head.c.last_seq).where(journal_head.c.id == 1)).scalar_one()
        return True, head, "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        orig = getattr(exc, "orig", None) or exc
        return False, None, (str(orig).strip().splitlines() or [type(orig).__name__])[0][:200]


async def _check_database(state) -> tuple[bool, int | None, str]:
    try:
        return await asyncio.wait_for(run_in_threadpool(_database_check, state), CHECK_TIMEOUT_SECONDS)
    except asyncio.TimeoutError:
        return False, None, f"no answer within {CHECK_TIMEOUT_SECONDS} s"


def _bus_status(state) -> dict[str, Any]:
    bus = getattr(state, "bus", None)
    if bus is None:
        return {"status": "not_configured"}
    return bus.status()


def _publisher(state):
    svc = getattr(state, "services", None)
    pub = getattr(svc, "publisher", None)
    return pub if pub is not None and getattr(pub, "_thread", None) is not None else None


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"}, headers={"cache-control": "no-store"})


async def readyz(request: Request) -> Response:
    state = request.app.state
    db_ok, head, detail = await _check_database(state)
    bus = _bus_status(state)
    body = {"status": "ready" if db_ok else "unavailable",
            "database": {"status": "up" if db_ok else "down", "detail": detail, "journal_sequence": head},
            "bus": bus}
    pub = _publisher(state)
    if pub is not None:
        body["feed"] = {"journal_sequence_published": pub.position}
    if getattr(state, "draining", False):
        body["status"] = "draining"
    ready = db_ok and not getattr(state, "draining", False)
    return JSONResponse(body, status_code=200 if ready else 503,
                        headers={"cache-control": "no-store", **({} if ready else {"Retry-After": "1"})})


async def refresh_gauges(state) -> None:
    """Set the gauges read at scrape time: dependencies, journal sequence, feed lag."""
    db_ok, head, _ = await _check_database(state)
    _set_gauges(state, db_ok, head)


def _set_gauges(state, db_ok: bool, head: int | None) -> None:
    from bondtape.observability import DEPENDENCY_UP, FEED_LAG, JOURNAL_SEQ

    DEPENDENCY_UP.labels("database").set(1 if db_ok else 0)
    if head is not None:
        JOURNAL_SEQ.set(head)
    bus = getattr(state, "bus", None)
    if bus is not None:
        status = bus.status()
        DEPENDENCY_UP.labels("nats").set(1 if status["status"] == "up" else 0)
        FEED_LAG.labels("nats").set(status.get("lag_messages", 0))
    pub = _publisher(state)
    if pub is not None and head is not None:
        FEED_LAG.labels("publisher").set(max(0, head - pub.position))  # journal events not yet on the feed
    if pub is not None:
        _subscriber_lags(state, pub)


def subscriber_lag(pub, sub) -> int:
    """Feed messages a subscriber (WebSocket, SSE) has not yet been sent: those published
    after the last one handed to it, plus those waiting in its connection's queue."""
    latest: dict[str, tuple[str, int]] = {}
    for (ds, date), (last_seq, _closed) in list(pub.days.items()):
        if ds not in latest or date > latest[ds][0]:
            latest[ds] = (date, last_seq)
    lag = 0
    for ds, pos in list(sub.last.items()):
        if ds not in latest or pos is None:
            continue
        date, last_seq = latest[ds]
        lag += max(0, last_seq - pos[1]) if pos[0] == date else (last_seq if pos[0] < date else 0)
    queue = getattr(getattr(sub.deliver, "__self__", None), "_items", None)
    return lag + (len(queue) if queue is not None else 0)


def _subscriber_lags(state, pub) -> None:
    """One gauge series per connected subscriber (``subscriber-N``, N in order of
    connection); a series is removed when its subscriber goes."""
    from bondtape.observability import FEED_LAG

    known: dict[int, tuple[str, Any]] = state.__dict__.setdefault("_feed_subscriber_labels", {})
    counter = state.__dict__.setdefault("_feed_subscriber_counter", [0])
    live = {id(sub): sub for sub in list(pub._subscriptions) if not sub.closed}
    for key in [k for k in known if k not in live or known[k][1] is not live[k]]:
        FEED_LAG.remove(known.pop(key)[0])
    bus = getattr(state, "bus", None)
    bus_sub = getattr(getattr(bus, "js", None), "_sub", None)
    for key, sub in live.items():
        if sub is bus_sub:
            continue  # the bus has its own series ("nats")
        if key not in known:
            counter[0] += 1
            known[key] = (f"subscriber-{counter[0]}", sub)
        FEED_LAG.labels(known[key][0]).set(subscriber_lag(pub, sub))


async def _metrics_response(state) -> Response:
    from bondtape.observability import CONTENT_TYPE_LATEST, metrics_text

    await refresh_gauges(state)
    return Response(metrics_text(), media_type=CONTENT_TYPE_LATEST, headers={"cache-control": "no-store"})


async def metrics(request: Request) -> Response:
    return await _metrics_response(request.app.state)


def metrics_for_operator(ctx: Ctx) -> Response:
    """An operator's scrape with a website session (in the guard's transaction)."""
    from bondtape.journal.schema import journal_head
    from bondtape.observability import CONTENT_TYPE_LATEST, metrics_text

    head = ctx.conn.execute(sa.select(journal_head.c.last_seq).where(journal_head.c.id == 1)).scalar_one()
    _set_gauges(ctx.state, True, head)
    return Response(metrics_text(), media_type=CONTENT_TYPE_LATEST, headers={"cache-control": "no-store"})


ROUTES = [
    OpsRoute("/healthz", healthz, rule="public"),
    OpsRoute("/readyz", readyz, rule="public"),
    OpsRoute("/metrics", metrics, rule="operator", token_setting=True, guarded=metrics_for_operator),
]

"""The feed over HTTP: WebSocket, server-sent events, retransmission, time and sales.

:func:`feed_routes` returns Starlette routes the main website mounts; :func:`create_app`
wraps them in an app of their own (``bondtape feed serve``). Every message is sent as the
exact JSON text stored in ``feed_messages``.

Positions are written ``DATA_SET:DATE:SEQ`` (``CORP:2024-03-04:17``; an empty date,
``CORP::1``, means the data set's first day), several joined by commas; a malformed or
impossible one (future day, seq beyond the day's next) is refused (POSITION_INVALID). ``from`` names the first message to send per data set; an SSE client's
``Last-Event-ID`` names the last one it received. A data set without a position starts at
the feed's current end (live from now).

Entitlements are not decided here: ``entitled(connection)`` returns the data sets the
caller may receive (the access capability plugs in there); asking for another one is
refused (HTTP 403, or WebSocket close code 4403, with ``NOT_ENTITLED``; a malformed request
closes with 4400), and a subscription carries only entitled data sets.

A live WebSocket or SSE stream checks again while it runs (``recheck``, by default
``entitled``): at most every ``recheck_seconds`` (5 s), and before delivering any message
once a check is due, also while no message flows. When the caller may no longer receive
every data set it subscribed to (signed out, session ended, idle or past its absolute
limit, user disabled, entitlement ended), the stream ends: the WebSocket closes with 4403
``ACCESS_ENDED``, an SSE stream sends an ``ACCESS_ENDED`` event and ends.

When the database fails a re-check (unavailable: locked beyond its timeout, connection
lost), nothing is delivered while the check is tried once more ``RECHECK_RETRY_SECONDS``
later (1 s); a second failure ends the stream, as does the database failing while the
stream reads stored messages or opens: the WebSocket closes with 1013 (try again later)
``SERVICE_UNAVAILABLE``, an SSE stream sends a ``SERVICE_UNAVAILABLE`` event and ends (at
the opening: HTTP 503). Any other failure ends it with 1011 ``INTERNAL_ERROR`` (an SSE
``INTERNAL_ERROR`` event). The subscriber gets no traceback; the server logs one line
(``bondtape.feed``; the traceback only for an internal error).

Nothing here reads the database on the event loop: the access checks (``entitled`` at a
stream's opening and for status, time and sales, snapshots and stored messages; the
re-checks) and every query run in a worker thread (``run_in_threadpool``), so a request
waiting for a locked or slow database holds up no other stream or request. Each check
uses a connection of its own (``entitled`` must not share one between calls).
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from typing import Callable, Iterable

import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from bondtape.clock import market_date
from bondtape.db import reading
from bondtape.dissemination.handoff import LoopHandoff
from bondtape.dissemination.publisher import DATA_SETS, FeedError, FeedMessage, Publisher, read_messages
from bondtape.dissemination.schema import feed_days
from bondtape.dissemination.query import feed_status, snapshot_lines, time_and_sales
from bondtape.production.resilience import RETRY_AFTER_SECONDS, UNAVAILABLE_CODE, is_unavailable

__all__ = ["feed_routes", "create_app", "parse_positions", "format_positions"]

log = logging.getLogger("bondtape.feed")

Entitled = Callable[[HTTPConnection], Iterable[str]]
RECHECK_SECONDS = 5.0  # a live stream checks the caller's access again at most this often
RECHECK_RETRY_SECONDS = 1.0  # a re-check the database failed is tried once more this much later
QUEUE_LIMIT = 50_000  # messages held for one slow subscriber before it is disconnected
REPLAY_CHUNK = 1000


def parse_positions(text: str | None, *, min_seq: int = 1) -> dict[str, tuple[str, int]]:
    """``CORP:2024-03-04:17,AGCY:2024-03-04:5`` -> {data set: (date, seq)}."""
    out: dict[str, tuple[str, int]] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        bits = part.split(":")
        if (len(bits) != 3 or bits[0].upper() not in DATA_SETS or not bits[2].isdigit() or int(bits[2]) < min_seq
                or not _valid_date(bits[1], empty_ok=True)):
            raise FeedError("POSITION_INVALID", "from", f"position {part[:40]!r} is not DATA_SET:YYYY-MM-DD:SEQ with "
                            f"DATA_SET one of {', '.join(DATA_SETS)}, a real date (or none) and SEQ 1 or more")
        out[bits[0].upper()] = (bits[1], int(bits[2]))
    return out


def _valid_date(text: str, *, empty_ok: bool) -> bool:
    if not text:
        return empty_ok
    if len(text) != 10:
        return False
    try:
        return dt.date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False


def resolve_positions(db, start: dict[str, tuple[str, int]], field: str, today: str) -> dict[str, tuple[str, int]]:
    """Start positions checked against the stored feed: a position without a date means
    the data set's first day; a day after the feed's current day (and after today), or a
    number beyond the day's next one, is refused with POSITION_INVALID."""
    fd = feed_days.c
    out: dict[str, tuple[str, int]] = {}
    with reading(db) as conn:
        for ds, (date, seq) in start.items():
            days = dict(conn.execute(sa.select(fd.feed_date, fd.last_seq).where(fd.data_set == ds)).all())
            if not date and days:
                date = min(days)
            if date in days:
                next_seq = days[date] + 1
            else:  # a day with no message (yet): only its start
                next_seq = 1
            latest = max([*days, today])
            if (date and date > latest) or seq > next_seq:
                where = f"{ds} {date or 'first day'}"
                raise FeedError("POSITION_INVALID", field,
                                f"{where} seq {seq} is beyond the feed: the next message of that day is seq {next_seq} "
                                f"and the latest day is {latest}")
            out[ds] = (date, seq)
    return out


def format_positions(positions: dict[str, tuple[str, int]]) -> str:
    return ",".join(f"{ds}:{d}:{s}" for ds, (d, s) in sorted(positions.items()))


def _error(exc: FeedError, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": exc.as_dict()}, status_code=status)


def _all(_: HTTPConnection) -> Iterable[str]:
    return DATA_SETS


async def _entitled(entitled: Entitled, conn: HTTPConnection) -> set[str]:
    """The caller's data sets, decided in a worker thread: the check reads the database
    (the website's touches the session), which may wait for a lock or a slow server, and
    must not hold up the event loop (every other stream and request) meanwhile. Each call
    uses a connection of its own (the website's callable: ``with db.begin()``), never one shared
    with the loop or another thread; the result is collected there too, so an iterable
    that reads lazily reads in the thread."""
    return await run_in_threadpool(lambda: set(entitled(conn)))


class _Request:
    """What a subscription asks for, checked against the caller's entitlements (``allowed``:
    the data sets :func:`_entitled` returned)."""

    def __init__(self, conn: HTTPConnection, allowed: set[str], last_event_id: str | None = None):
        q = conn.query_params
        wanted_text = q.get("data_sets") or q.get("data_set")
        if wanted_text:
            wanted = [w.strip().upper() for w in wanted_text.split(",") if w.strip()]
            bad = [w for w in wanted if w not in DATA_SETS]
            if bad:
                raise FeedError("DATA_SET_INVALID", "data_sets", f"data set {bad[0]!r} is not one of {', '.join(DATA_SETS)}")
            refused = [w for w in wanted if w not in allowed]
            if refused:
                raise _NotEntitled(FeedError("NOT_ENTITLED", "data_sets", f"this subscriber is not entitled to the {refused[0]} data set"))
        else:
            wanted = [ds for ds in DATA_SETS if ds in allowed]
        if not wanted:
            raise _NotEntitled(FeedError("NOT_ENTITLED", "data_sets", "this subscriber is entitled to no data set"))
        self.data_sets = wanted
        start = parse_positions(q.get("from"))
        if last_event_id:
            # an SSE id names the last message received (seq 0: none yet of that day)
            start.update({ds: (d, s + 1) for ds, (d, s) in parse_positions(last_event_id, min_seq=0).items()})
        if q.get("from_seq"):
            if not q["from_seq"].isdigit():
                raise FeedError("POSITION_INVALID", "from_seq", "from_seq is a message sequence number (1 or more)")
            date = q.get("date", "")
            if not _valid_date(date, empty_ok=True):
                raise FeedError("POSITION_INVALID", "date", f"date {date[:20]!r} is not a date (YYYY-MM-DD)")
            if int(q["from_seq"]) < 1:
                raise FeedError("POSITION_INVALID", "from_seq", "from_seq is a message sequence number (1 or more)")
            for ds in wanted:
                start.setdefault(ds, (date, int(q["from_seq"])))
        self.start = {ds: pos for ds, pos in start.items() if ds in wanted}


class _NotEntitled(Exception):
    def __init__(self, error: FeedError):
        self.error = error


class _Stream:
    """Stored messages from the start positions (read in chunks, with back-pressure), then
    live from the publisher with no gap and no repeat."""

    def __init__(self, publisher: Publisher, data_sets: list[str], start: dict[str, tuple[str, int]],
                 allowed: Callable[[], Iterable[str]] | None = None, recheck_seconds: float = RECHECK_SECONDS,
                 label: str = "feed stream"):
        self.publisher = publisher
        self.label = label  # for the operator's log: transport, client address, data sets
        self.data_sets = data_sets
        self.start = dict(start)
        self.sub = None
        self.overflow = False
        self.revoked = False  # the caller's access ended while streaming
        self._allowed = allowed
        self._recheck = recheck_seconds
        self._checked = 0.0
        self.ended = False  # the server stops (Publisher.end_streams): the client resumes elsewhere
        self.failure: FeedError | None = None  # SERVICE_UNAVAILABLE or INTERNAL_ERROR: the stream could not go on
        self._retry = min(RECHECK_RETRY_SECONDS, recheck_seconds)
        self._retried = False
        self._filled = False

    async def _fill_start(self) -> None:
        # a data set without a position starts after the last stored message
        if self._filled:
            return
        self._filled = True
        missing = [ds for ds in self.data_sets if ds not in self.start]
        if missing:
            status = await run_in_threadpool(feed_status, self.publisher.db)
            for ds in missing:
                s = status.get(ds)
                self.start[ds] = (s["date"], s["last_seq"] + 1) if s else ("", 1)

    def _due_in(self) -> float | None:
        if self._allowed is None:
            return None
        return max(0.0, self._checked + self._recheck - asyncio.get_running_loop().time())

    async def _still_allowed(self) -> bool:
        """False once the caller may no longer receive every data set of the stream (checked
        at most every ``recheck_seconds``)."""
        if self._allowed is None or self._due_in() > 0:
            return not self.revoked
        self._checked = asyncio.get_running_loop().time()
        allowed = await self._check()
        if not set(self.data_sets) <= allowed:
            self.revoked = True
        return not self.revoked

    async def _check(self) -> set[str]:
        """The caller's data sets. A database failure (unavailable) is tried once more
        ``RECHECK_RETRY_SECONDS`` later, nothing delivered meanwhile; a second one, or any
        other failure, is raised (and ends the stream: :meth:`_fail`)."""
        try:
            return set(await run_in_threadpool(self._allowed))
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            first = _reason(exc)
        await asyncio.sleep(self._retry)
        self._retried = True
        allowed = set(await run_in_threadpool(self._allowed))
        self._retried = False
        log.info("%s: access re-check failed (database unavailable: %s) and passed when tried again %.1f s later",
                 self.label, first, self._retry, extra={"feed_stream": self.label})
        return allowed

    def _fail(self, exc: Exception) -> None:
        """The stream cannot go on: the subscriber is told (SERVICE_UNAVAILABLE or
        INTERNAL_ERROR, no traceback) and the operator gets one log line."""
        if is_unavailable(exc):
            self.failure = SERVICE_UNAVAILABLE
            what = "the access re-check failed twice" if self._retried else "the stream's read failed"
            log.warning("%s ended with %s: %s, database unavailable: %s", self.label, UNAVAILABLE_CODE, what,
                        _reason(exc), extra={"feed_stream": self.label})
        else:
            self.failure = INTERNAL_ERROR
            log.error("%s ended with INTERNAL_ERROR: %s: %s", self.label, type(exc).__name__, _reason(exc),
                      exc_info=exc, extra={"feed_stream": self.label})

    async def __aiter__(self):
        try:
            async with contextlib.aclosing(self._messages()) as messages:
                async for m in messages:
                    yield m
        except Exception as exc:  # the database, or a bug: a clean end, never a traceback to the client
            self._fail(exc)
        finally:
            self.close()

    async def _messages(self):
        await self._fill_start()
        self._checked = asyncio.get_running_loop().time()  # the request was just checked
        positions = dict(self.start)
        for ds in self.data_sets:  # the stored part: paced by the client
            while True:
                if self.publisher.shutting_down:
                    self.ended = True
                    return
                def read(ds=ds) -> list[FeedMessage]:
                    with reading(self.publisher.db) as conn:
                        return read_messages(conn, ds, positions[ds], limit=REPLAY_CHUNK)
                batch = await run_in_threadpool(read)
                for m in batch:
                    if not await self._still_allowed():
                        return
                    yield m
                if batch:
                    positions[ds] = (batch[-1].date, batch[-1].seq + 1)
                if len(batch) < REPLAY_CHUNK:
                    break
        handoff = LoopHandoff(asyncio.get_running_loop(), limit=QUEUE_LIMIT)
        self.sub = await run_in_threadpool(lambda: self.publisher.subscribe(handoff.put, self.data_sets, positions,
                                                                            on_shutdown=handoff.end))
        try:
            while True:
                wait = self._due_in()
                try:  # get_batch takes nothing before it returns: safe to cancel on timeout
                    batch = await (handoff.get_batch() if wait is None else asyncio.wait_for(handoff.get_batch(), wait))
                except asyncio.TimeoutError:
                    if not await self._still_allowed():
                        return
                    continue
                if not batch:
                    # too slow, or the server stops: the client reconnects from its last position
                    self.overflow, self.ended = handoff.overflow, not handoff.overflow
                    return
                for m in batch:
                    if not await self._still_allowed():
                        return
                    yield m
        finally:
            self.close()

    def close(self) -> None:
        if self.sub is not None:
            self.sub.close()
            self.sub = None


ACCESS_ENDED = FeedError("ACCESS_ENDED", "data_sets",
                         "access to this stream ended (signed out, session expired, user disabled or entitlement "
                         "ended): sign in and reconnect from your last position")
SERVICE_UNAVAILABLE = FeedError(UNAVAILABLE_CODE, None,  # type: ignore[arg-type]
                                "the database is unavailable: reconnect from your last position in a few seconds")
INTERNAL_ERROR = FeedError("INTERNAL_ERROR", None,  # type: ignore[arg-type]
                           "the server failed: reconnect from your last position")
# WebSocket close codes of a stream that could not go on (RFC 6455 / IANA): try again later, internal error
_CLOSE_CODES = {UNAVAILABLE_CODE: 1013, "INTERNAL_ERROR": 1011}


def _reason(exc: BaseException) -> str:
    """The first line of a database error, for one log line (SQLAlchemy's SQL and background
    link left out)."""
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0][:200]


def _label(transport: str, conn: HTTPConnection, data_sets: Iterable[str]) -> str:
    client = f"{conn.client.host}:{conn.client.port}" if conn.client else "unknown client"
    names = ",".join(data_sets)
    return f"feed {transport} stream of {client}" + (f" ({names})" if names else "")


def feed_routes(publisher: Publisher, *, entitled: Entitled | None = None, recheck: Entitled | None = None,
                recheck_seconds: float = RECHECK_SECONDS) -> list[BaseRoute]:
    """The feed's routes, for the main website to mount (e.g. under ``/``). ``recheck``
    (default ``entitled``) decides again while a stream runs, every ``recheck_seconds``."""
    entitled = entitled or _all
    recheck = recheck or entitled

    async def _resolve(want: _Request) -> None:
        today = market_date(publisher.clock()).isoformat()
        want.start = await run_in_threadpool(resolve_positions, publisher.db, want.start, "from", today)

    def _stream(conn: HTTPConnection, want: _Request, transport: str) -> _Stream:
        return _Stream(publisher, want.data_sets, want.start, allowed=lambda: set(recheck(conn)),
                       recheck_seconds=recheck_seconds, label=_label(transport, conn, want.data_sets))

    def _unavailable_at_opening(transport: str, conn: HTTPConnection, exc: Exception) -> None:
        if not is_unavailable(exc):
            raise exc
        log.warning("%s refused with %s: database unavailable: %s", _label(transport, conn, ()), UNAVAILABLE_CODE,
                    _reason(exc))

    async def ws(websocket: WebSocket) -> None:
        try:
            want = _Request(websocket, await _entitled(entitled, websocket))
            await _resolve(want)
            stream = _stream(websocket, want, "websocket")
            await stream._fill_start()  # "live from now" means from the accepted handshake
        except _NotEntitled as exc:  # accepted, then closed with a code the client can act on
            await websocket.accept()
            await websocket.close(code=4403, reason=f"{exc.error.code}: {exc.error.message}"[:120])
            return
        except FeedError as exc:
            await websocket.accept()
            await websocket.close(code=4400, reason=f"{exc.code}: {exc.message}"[:120])
            return
        except Exception as exc:  # the database failed: try again later (1013), not HTTP 500 and a traceback
            _unavailable_at_opening("websocket", websocket, exc)
            await websocket.accept()
            await websocket.close(code=_CLOSE_CODES[UNAVAILABLE_CODE],
                                  reason=f"{UNAVAILABLE_CODE}: {SERVICE_UNAVAILABLE.message}"[:120])
            return
        await websocket.accept()

        async def pump() -> None:
            async for m in stream:
                await websocket.send_text(m.body)
            if stream.failure is not None:  # SERVICE_UNAVAILABLE (1013) or INTERNAL_ERROR (1011)
                await websocket.close(code=_CLOSE_CODES[stream.failure.code],
                                      reason=f"{stream.failure.code}: {stream.failure.message}"[:120])
            elif stream.revoked:
                await websocket.close(code=4403, reason=f"{ACCESS_ENDED.code}: signed out, expired or no longer entitled")
            elif stream.overflow:
                await websocket.close(code=4008)  # the subscriber fell too far behind
            else:  # the server stops (1012: service restart): reconnect, to this server or another
                await websocket.close(code=1012, reason="the server is stopping: reconnect from your last position")

        async def watch() -> None:
            while True:
                msg = await websocket.receive()
                if msg["type"] == "websocket.disconnect":
                    return

        tasks = [asyncio.create_task(pump()), asyncio.create_task(watch())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            for t in tasks:
                t.cancel()
            stream.close()

    async def sse(request: Request) -> Response:
        try:
            want = _Request(request, await _entitled(entitled, request), request.headers.get("last-event-id"))
            await _resolve(want)
            stream = _stream(request, want, "SSE")
            await stream._fill_start()
        except _NotEntitled as exc:
            return _error(exc.error, 403)
        except FeedError as exc:
            return _error(exc)
        except Exception as exc:  # the database failed: 503, try again later
            _unavailable_at_opening("SSE", request, exc)
            response = _error(SERVICE_UNAVAILABLE, 503)
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
            return response

        async def events():
            # the id names every subscribed data set: one not carried yet at the position
            # before its start, so resuming with Last-Event-ID has no gap on any of them
            last: dict[str, tuple[str, int]] = {ds: (d, seq - 1) for ds, (d, seq) in stream.start.items()}
            yield ": bondtape feed\n\n"
            try:
                async for m in stream:
                    last[m.data_set] = m.position
                    yield f"id: {format_positions(last)}\nevent: {m.type}\ndata: {m.body}\n\n"
                if stream.failure is not None:  # SERVICE_UNAVAILABLE or INTERNAL_ERROR, then the end
                    yield f"event: {stream.failure.code}\ndata: {json.dumps({'error': stream.failure.as_dict()})}\n\n"
                elif stream.revoked:
                    yield f"event: ACCESS_ENDED\ndata: {json.dumps({'error': ACCESS_ENDED.as_dict()})}\n\n"
            finally:
                stream.close()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def messages(request: Request) -> Response:
        """Retransmission: stored messages of one data set from (date, from_seq), as JSON lines."""
        q = request.query_params
        try:
            want = _Request(request, await _entitled(entitled, request))
            if len(want.data_sets) != 1:
                raise FeedError("DATA_SET_REQUIRED", "data_set", f"name one data set: {', '.join(DATA_SETS)}")
            ds = want.data_sets[0]
            limit = q.get("limit", "1000")
            if not limit.isdigit() or not 1 <= int(limit) <= 100_000:
                raise FeedError("LIMIT_INVALID", "limit", "limit is 1 to 100000")
            await _resolve(want)
        except _NotEntitled as exc:
            return _error(exc.error, 403)
        except FeedError as exc:
            return _error(exc)
        start = want.start.get(ds, ("", 1))

        def read() -> list[FeedMessage]:
            with reading(publisher.db) as conn:
                return read_messages(conn, ds, start, limit=int(limit))
        rows = await run_in_threadpool(read)
        return Response("".join(m.body + "\n" for m in rows), media_type="application/x-ndjson")

    async def status(request: Request) -> Response:
        allowed = await _entitled(entitled, request)
        data = await run_in_threadpool(feed_status, publisher.db)
        return JSONResponse({"data_sets": {ds: v for ds, v in data.items() if ds in allowed}})

    async def tas(request: Request) -> Response:
        cusip = request.path_params["cusip"].upper()
        q = request.query_params
        try:
            result = await run_in_threadpool(time_and_sales, publisher.db, cusip, q.get("date_from"), q.get("date_to"),
                                             int(q["limit"]) if q.get("limit", "").isdigit() else 500)
        except FeedError as exc:
            return _error(exc, 404 if exc.code == "SECURITY_UNKNOWN" else 400)
        if result["data_set"] not in await _entitled(entitled, request):
            return _error(FeedError("NOT_ENTITLED", "cusip", f"this subscriber is not entitled to the {result['data_set']} data set"), 403)
        return JSONResponse(result)

    async def snapshot(request: Request) -> Response:
        ds = request.path_params["data_set"].upper()
        date = request.path_params["date"]
        if ds not in DATA_SETS:
            return _error(FeedError("DATA_SET_INVALID", "data_set", f"data set is one of {', '.join(DATA_SETS)}"), 404)
        if ds not in await _entitled(entitled, request):
            return _error(FeedError("NOT_ENTITLED", "data_set", f"this subscriber is not entitled to the {ds} data set"), 403)
        try:
            lines = await run_in_threadpool(snapshot_lines, publisher.db, ds, date)
        except FeedError as exc:  # DATE_INVALID: not YYYY-MM-DD
            return _error(exc)
        return Response("".join(line + "\n" for line in lines), media_type="application/x-ndjson",
                        headers={"Content-Disposition": f'attachment; filename="bondtape-feed-{ds}-{date}.jsonl"'})

    return [
        WebSocketRoute("/feed/ws", ws),
        Route("/feed/sse", sse),
        Route("/feed/messages", messages),
        Route("/feed/status", status),
        Route("/feed/snapshot/{data_set}/{date}", snapshot),
        Route("/time-and-sales/{cusip}", tas),
    ]


def create_app(publisher: Publisher, *, entitled: Entitled | None = None, recheck: Entitled | None = None,
               recheck_seconds: float = RECHECK_SECONDS) -> Starlette:
    """A stand-alone app serving the feed (the main website mounts :func:`feed_routes`)."""
    return Starlette(routes=feed_routes(publisher, entitled=entitled, recheck=recheck,
                                        recheck_seconds=recheck_seconds))

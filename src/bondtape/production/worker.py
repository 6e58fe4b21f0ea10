"""One web worker process of a deployment.

Each worker has its own Engine and Sequencer on the shared database (the journal head row,
locked ``FOR UPDATE`` on PostgreSQL, keeps one gapless sequence across workers). The
*primary* worker (index 0) also runs the feed publisher, which follows the journal of
every worker (its own engine live, the others' by reading the journal every
``feed_poll_interval`` seconds), the NATS JetStream bridge, the feed's WebSocket/SSE
routes and the FIX gateway. See docs/deploy.md.

Graceful shutdown (SIGTERM or SIGINT): ``/readyz`` answers 503 ``draining``; the HTTP
servers stop accepting connections and finish the requests they hold; the FIX gateway
closes its sessions (each report read before is answered); the sequencer journals what
it has queued; the feed publishes what was journaled; the bus is flushed; then exit.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Callable

from bondtape.production.config import ServeConfig

log = logging.getLogger("bondtape.production.worker")

__all__ = ["Bus", "run_worker", "listening_socket", "main"]


class Bus:
    """The NATS JetStream bridge of the feed, connected in the background: a bus that is
    down at start or later never stops intake; the bridge resumes from the last message
    the stream holds (no gap, and JetStream drops repeats by message id)."""

    def __init__(self, publisher: Any, url: str):
        self.publisher, self.url = publisher, url
        self.js = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._connect, name="bondtape-bus-connect", daemon=True)
        self._thread.start()

    def _connect(self) -> None:
        from bondtape.dissemination.jetstream import JetStreamPublisher

        delay = 0.2
        while not self._stop.is_set():
            js = JetStreamPublisher(self.publisher, self.url)
            try:
                self.js = js.start(timeout=5)
                log.info("feed bridged to NATS JetStream at %s", self.url)
                return
            except Exception as exc:  # noqa: BLE001 - NATS not there yet: keep trying
                log.warning("NATS JetStream at %s not reachable (%s); retrying", self.url, exc)
                try:
                    js.stop(timeout=2)
                except Exception:  # noqa: BLE001
                    pass
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)

    def status(self) -> dict[str, Any]:
        js = self.js
        if js is None:
            return {"status": "down", "detail": "connecting"}
        nc = js._nc
        up = bool(nc is not None and nc.is_connected)
        return {"status": "up" if up else "down", "lag_messages": max(0, js.enqueued - js.published),
                "published": js.published}

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self.js is not None:
            self.js.flush(timeout)
            self.js.stop(timeout)


FEED_PATHS = ("/feed/", "/time-and-sales/")


class FeedElsewhere:
    """ASGI wrapper for the shared ports of a multi-worker deployment: the feed's routes
    live in the primary worker, on ``feed_port``; here they answer 421 with a pointer."""

    def __init__(self, app, feed_port: int | None):
        self.app, self.feed_port = app, feed_port

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] in ("http", "websocket") else ""
        if not path.startswith(FEED_PATHS):
            return await self.app(scope, receive, send)
        where = (f"port {self.feed_port} of this host" if self.feed_port is not None
                 else "the primary worker only: configure feed_port")
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 4421, "reason": f"the feed is served on {where}"[:120]})
            return
        body = json.dumps({"code": "FEED_ON_FEED_PORT", "field": None,
                           "message": f"with several workers the feed is served on {where}"}).encode()
        await send({"type": "http.response.start", "status": 421,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket the workers share (inherited by each child process)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _settings(cfg: ServeConfig):
    from bondtape.access.settings import AccessSettings

    overrides: dict[str, Any] = {}
    if not os.environ.get("BONDTAPE_COOKIE_SECURE"):  # the website on plain HTTP `port` needs plain cookies
        overrides["cookie_secure"] = cfg.port is None
    if cfg.ca_dir is not None:
        overrides["ca_dir"] = cfg.ca_dir
    return AccessSettings.from_env(**overrides)


async def _watch_parent(parent: int, done: asyncio.Event, interval: float = 0.5) -> None:
    """Set ``done`` once this process's parent is no longer ``parent`` (it died and this
    worker was handed to init): a worker never outlives its supervisor, holding its ports."""
    while not done.is_set():
        if os.getppid() != parent:
            log.error("the supervisor (pid %d) is gone; stopping", parent)
            done.set()
            return
        await asyncio.sleep(interval)


def run_worker(cfg: ServeConfig, *, index: int = 0, sockets: dict[str, socket.socket] | None = None,
               ready: Callable[[dict], None] | None = None, stop: threading.Event | None = None,
               parent: int | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``, or the process ``parent`` is gone).
    ``sockets`` ("http", "https") are shared listening sockets from the supervisor; without
    them the worker binds its own."""
    import uvicorn

    from bondtape.db import connect
    from bondtape.observability import configure_logging
    from bondtape.production import resilience
    from bondtape.serve import (_uvicorn_config, build_app, end_servers, force_servers, own_signals, signals_held,
                                stop_signal, wait_started)

    configure_logging(cfg.log_level, cfg.log_format == "json")
    primary = index == 0
    settings = _settings(cfg)
    db = connect(cfg.database_url, migrate_schema=primary and sockets is None)
    multi = cfg.workers > 1
    app = build_app(db, settings, feed=primary, follow_journal=primary,
                    feed_poll_interval=cfg.feed_poll_interval if (primary and multi) else None)
    svc = app.state.services
    resilience.instrument(svc.sequencer)
    resilience.install(app)
    app.state.metrics_token = cfg.metrics_token
    app.state.draining = False
    bus = Bus(svc.publisher, cfg.nats_url) if (primary and cfg.nats_url) else None
    app.state.bus = bus

    sockets = dict(sockets or {})
    if primary and multi and cfg.feed_port is not None:  # the primary's own port: the feed
        sockets["feed"] = listening_socket(cfg.host, cfg.feed_port)
    if "http" not in sockets and cfg.port is not None:
        sockets["http"] = listening_socket(cfg.host, cfg.port)
    if "https" not in sockets and cfg.tls_port is not None:
        sockets["https"] = listening_socket(cfg.host, cfg.tls_port)
    servers: list[tuple[str, Any, socket.socket]] = []
    for name, sock in sockets.items():
        tls = None
        if name == "https":
            from bondtape.access.ca import CA_CERT

            if not (cfg.tls_cert and cfg.tls_key and settings.ca_dir and (settings.ca_dir / CA_CERT).exists()):
                raise ValueError("HTTPS needs tls_cert, tls_key and a certificate authority (bondtape certs init)")
            tls = {"cert": cfg.tls_cert, "key": cfg.tls_key, "ca": settings.ca_dir / CA_CERT}
        served = FeedElsewhere(app, cfg.feed_port) if (multi and name != "feed") else app
        config = _uvicorn_config(served, cfg.host, 0, tls)
        config.timeout_graceful_shutdown = cfg.shutdown_timeout
        server = own_signals(uvicorn.Server(config))
        servers.append((name, server, sock))

    async def main() -> None:
        from bondtape.fix.server import start_fix_server

        done = stop_signal(stop, again=lambda: force_servers([s for _, s, _ in servers]))
        if parent is not None:  # the supervisor died (SIGKILL, OOM): stop as if it had sent SIGTERM
            asyncio.create_task(_watch_parent(parent, done))
        tasks = [asyncio.create_task(s.serve(sockets=[sock])) for _, s, sock in servers]
        fix = None
        if primary and cfg.fix_port is not None:
            fix = await start_fix_server(db, cfg.host, cfg.fix_port, sequencer=svc.sequencer)
        await wait_started([s for _, s, _ in servers], tasks)
        addresses = {name: f"{'http' if name == 'feed' else name}://{cfg.host}:{sock.getsockname()[1]}"
                     for name, _, sock in servers}
        if fix is not None:
            addresses["fix"] = f"{cfg.host}:{fix.port}"
        log.info("worker %d serving", index, extra={"worker": index, **addresses})
        if ready is not None:
            ready(addresses)
        await done.wait()
        log.info("worker %d stopping: no new input; finishing what was accepted", index, extra={"worker": index})
        app.state.draining = True
        end_servers([s for _, s, _ in servers], svc.publisher if primary else None)
        if fix is not None:
            await fix.close()
        await asyncio.gather(*tasks, return_exceptions=True)

    started = time.monotonic()
    try:
        asyncio.run(main())
    finally:
        with signals_held():
            svc.close()  # the sequencer journals what it queued; the publisher stops after it
            if bus is not None:
                try:  # what was journaled goes on the bus before it closes
                    if svc.publisher is not None:
                        svc.publisher.catch_up()
                except Exception:  # noqa: BLE001 - the next start catches up from the journal
                    log.exception("feed catch-up at shutdown failed")
                bus.close(cfg.shutdown_timeout)
            db.dispose()
            log.info("worker %d stopped", index, extra={"worker": index, "uptime_s": round(time.monotonic() - started, 1)})


def main(argv: list[str] | None = None) -> None:
    """``python -m bondtape.production.worker CONFIG_JSON INDEX [name=fd ...]``: a worker
    started by the supervisor; it prints one JSON line of its addresses when ready."""
    from bondtape.batching import configure_gc

    configure_gc()
    # the supervisor, whose death stops this worker (named by it: it may die before this runs)
    parent = int(os.environ.get("BONDTAPE_SUPERVISOR_PID") or os.getppid())
    argv = sys.argv[1:] if argv is None else argv
    cfg = ServeConfig.from_dict(json.loads(argv[0]))
    index = int(argv[1])
    sockets = {}
    for item in argv[2:]:
        name, fd = item.split("=")
        sockets[name] = socket.socket(fileno=int(fd))

    def ready(addresses: dict) -> None:
        from bondtape.batching import freeze_after_startup

        freeze_after_startup()
        print(json.dumps({"ready": index, **addresses}), flush=True)

    run_worker(cfg, index=index, sockets=sockets, ready=ready, parent=parent)


if __name__ == "__main__":
    main()

"""``bondtape serve``: the website, the REST API, the public feed and the FIX gateway in one
process, around one engine.

One :class:`bondtape.engine.Engine` and one :class:`~bondtape.engine.Sequencer` take the
reports of every channel (website, REST, FIX); the engine's listeners drive the
dissemination :class:`~bondtape.dissemination.publisher.Publisher`, whose feed the
website's market pages and the WebSocket/SSE routes read.

    app = build_app(db, settings)          # a Starlette app with app.state.services
    run_serve(db, settings, host=..., port=..., fix_port=...)   # blocks until Ctrl-C
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from sqlalchemy.engine import Engine as SAEngine

from bondtape.clock import now_us

log = logging.getLogger("bondtape.serve")

__all__ = ["Services", "services", "build_app", "run_serve", "feed_entitlements"]


@dataclass
class Services:
    """The parts every route shares: the engine, its sequencer and the feed publisher."""

    db: SAEngine
    engine: Any
    sequencer: Any
    publisher: Any

    def close(self) -> None:
        self.sequencer.close()
        self.engine.close()  # a last WAL checkpoint on SQLite, now rather than at exit
        if self.publisher is not None:
            self.publisher.stop()


_LOCK = threading.Lock()


def services(state: Any) -> Services:
    """The app's services, made on first use (an app from ``create_app`` alone, in tests)."""
    found = getattr(state, "services", None)
    if found is not None:
        return found
    with _LOCK:
        found = getattr(state, "services", None)
        if found is None:
            found = start_services(state.db, clock=state.clock)
            state.services = found
    return found


def start_services(db: SAEngine, *, clock: Callable[[], int] = now_us, follow: bool = True,
                   poll_interval: float | None = None) -> Services:
    """``follow=False``: the publisher is not started (another process of the deployment
    runs the feed); ``poll_interval``: it also reads the journal that often (other writers)."""
    from bondtape.dissemination.publisher import Publisher
    from bondtape.engine import Engine, Sequencer

    engine = Engine(db, clock=clock)
    publisher = Publisher(db, clock=clock)
    if follow:
        publisher.start(engine, poll_interval=poll_interval)
    return Services(db, engine, Sequencer(engine), publisher)


STREAM_TOUCH_US = 60_000_000  # a live stream keeps its session from going idle, one write a minute


def feed_entitlements(app, *, touch_every_us: int = 0) -> Callable[[Any], Iterable[str]]:
    """The data sets the caller of a feed route may receive: the operator all; a subscriber
    those its organisation holds REALTIME for (a Non-Professional once attested). The
    caller is the website session (cookie) of the WebSocket or SSE request, touched as
    activity: a subscriber watching the live feed is not signed out at the idle limit (the
    absolute limit still ends the session). ``touch_every_us``: a live stream's re-checks,
    every few seconds, touch it at most that often."""
    from bondtape.access import accounts
    from bondtape.access.authz import decide
    from bondtape.dissemination.publisher import DATA_SETS
    from bondtape.web import sessions

    def entitled(conn_http) -> list[str]:
        state = app.state
        now = state.clock()
        with state.db.begin() as conn:
            session = sessions.resume(conn, conn_http.cookies.get(sessions.SESSION_COOKIE), now_us=now,
                                      settings=state.settings, touch_every_us=touch_every_us)
            if session is None:
                return []
            actor = accounts.authenticated(conn, session.user_id, session.method)
            return [ds for ds in DATA_SETS if decide(conn, actor, "feed.realtime", ds, now_us=now).allowed]

    return entitled


def build_app(db: SAEngine | str | None, settings, *, clock: Callable[[], int] = now_us, policy=None, mailer=None,
              feed: bool = True, follow_journal: bool = True, feed_poll_interval: float | None = None):
    """The website and REST API (``create_app``), with the shared services attached and
    the feed's WebSocket/SSE routes mounted (their entitlement from the session).
    ``follow_journal``/``feed_poll_interval``: see :func:`start_services` (bondtape.production)."""
    from bondtape.dissemination.web import feed_routes
    from bondtape.web.app import create_app

    app = create_app(db, settings, clock=clock, policy=policy, mailer=mailer)
    if not follow_journal or feed_poll_interval is not None:
        app.state.services = start_services(app.state.db, clock=clock, follow=follow_journal,
                                            poll_interval=feed_poll_interval)
    svc = services(app.state)
    if feed:
        app.router.routes[0:0] = feed_routes(svc.publisher, entitled=feed_entitlements(app),
                                             recheck=feed_entitlements(app, touch_every_us=STREAM_TOUCH_US))
    return app


def _uvicorn_config(app, host: str, port: int, tls: dict | None):
    import uvicorn

    from bondtape.web.tls import server_config

    if tls:
        config = server_config(app, host=host, port=port, certfile=tls["cert"], keyfile=tls["key"],
                               ca_certs=tls["ca"], log_level="warning")
    else:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off", access_log=False)
    # a stalled client (a download it stopped reading) cannot hold a stopping server for ever
    config.timeout_graceful_shutdown = SHUTDOWN_TIMEOUT
    return config


def own_signals(server: Any) -> Any:
    """A uvicorn server that leaves SIGINT and SIGTERM to us (:func:`stop_signal`). Left to
    itself, uvicorn (0.29 and later) takes them over while it serves and raises each again
    once it has stopped: a SIGTERM then killed the process before the sequencer and the
    feed were closed, and a stop looked like a second Ctrl-C."""
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    return server


def stop_signal(stop: threading.Event | None, again: Callable[[], None] | None = None) -> asyncio.Event:
    """In the running loop: an event set on SIGINT or SIGTERM, or once ``stop`` is set (a
    server run from a thread, where signal handlers cannot be installed). They are installed
    even where SIGINT came in ignored (a shell's background job). ``again``: called on each
    later signal (a second Ctrl-C: stop at once)."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def on_signal() -> None:
        if done.is_set() and again is not None:
            again()
        done.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
    if stop is not None:
        loop.run_in_executor(None, lambda: (stop.wait(), loop.call_soon_threadsafe(done.set)))
    return done


@contextlib.contextmanager
def signals_held():
    """While a stopped server finishes (the sequencer journals what it queued, the feed and
    the bus are flushed): SIGINT and SIGTERM are noted, not acted on, so a second Ctrl-C or
    a supervisor's SIGTERM cannot cut that short with a traceback or a kill. Each step has
    its own time limit; SIGKILL still ends the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = (signal.SIGINT, signal.SIGTERM)
    old = {sig: signal.signal(sig, lambda signum, _frame: log.warning(
        "%s while finishing the shutdown: still finishing", signal.Signals(signum).name)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


SHUTDOWN_TIMEOUT = 30.0  # seconds a stopping HTTP server waits for its requests before it cancels them


def end_servers(servers: list[Any], publisher: Any) -> None:
    """The first stop signal: the feed's WebSocket and SSE clients are ended (they resume
    from their last position), the HTTP servers stop accepting and finish their requests."""
    if publisher is not None:
        publisher.end_streams()
    for s in servers:
        s.should_exit = True


def force_servers(servers: list[Any]) -> None:
    """A second stop signal: the HTTP servers stop at once (requests still running are
    cancelled; reports a client has not been answered for are not lost: the engine
    answers only after its commit, and a client resends by its client_ref)."""
    log.warning("second stop signal: stopping at once")
    for s in servers:
        s.force_exit = True


async def serving(server: Any, **kwargs: Any) -> None:
    """``server.serve(...)``; uvicorn exits the process (SystemExit) when it cannot listen,
    having logged why: that becomes an OSError, so the caller closes what it started and
    says so in one line, instead of a traceback from the task."""
    try:
        await server.serve(**kwargs)
    except SystemExit as exc:
        raise OSError(f"the server could not start (uvicorn exit status {exc.code}; its error is above)") from None


async def wait_started(servers: list[Any], tasks: list[asyncio.Task]) -> None:
    """Until every uvicorn server listens; one whose task ended meanwhile raises its error."""
    while not all(s.started for s in servers):
        for t in tasks:
            if t.done():
                raise t.exception() or RuntimeError("a server stopped while starting")
        await asyncio.sleep(0.02)


def run_serve(db: SAEngine, settings, *, host: str = "127.0.0.1", port: int = 8000, tls_port: int | None = None,
              tls_cert: Path | None = None, tls_key: Path | None = None, fix_port: int | None = None,
              ready: Callable[[dict], None] | None = None, stop: threading.Event | None = None,
              feed: bool = True) -> None:
    """Serve until Ctrl-C or SIGTERM (or ``stop`` is set): HTTP on ``port`` (the website;
    None = none, 0 = any free port), HTTPS with client certificates on ``tls_port`` (website,
    REST API, downloads), and the FIX gateway on ``fix_port``. ``ready`` gets the addresses
    once all listen. ``feed=False``: without the feed's WebSocket/SSE routes (``bondtape web
    serve``); the publisher still runs."""
    import uvicorn

    from bondtape.access.ca import CA_CERT

    app = build_app(db, settings, feed=feed)
    svc: Services = app.state.services
    servers: list[tuple[str, uvicorn.Server]] = []
    if port is not None:
        servers.append(("http", uvicorn.Server(_uvicorn_config(app, host, port, None))))
    if tls_port is not None:
        if not (tls_cert and tls_key and settings.ca_dir and (settings.ca_dir / CA_CERT).exists()):
            raise ValueError("HTTPS needs --tls-cert, --tls-key and a certificate authority (bondtape certs init)")
        tls = {"cert": tls_cert, "key": tls_key, "ca": settings.ca_dir / CA_CERT}
        servers.append(("https", uvicorn.Server(_uvicorn_config(app, host, tls_port, tls))))
    for _, server in servers:
        own_signals(server)

    async def main() -> None:
        from bondtape.fix.server import start_fix_server

        done = stop_signal(stop, again=lambda: force_servers([s for _, s in servers]))
        tasks = [asyncio.create_task(serving(s)) for _, s in servers]
        fix = None
        if fix_port is not None:
            fix = await start_fix_server(db, host, fix_port, sequencer=svc.sequencer)
        await wait_started([s for _, s in servers], tasks)
        addresses = {name: f"{name}://{host}:{s.servers[0].sockets[0].getsockname()[1]}" for name, s in servers}
        if fix is not None:
            addresses["fix"] = f"{host}:{fix.port}"
        if ready is not None:
            ready(addresses)
        await done.wait()
        end_servers([s for _, s in servers], svc.publisher)
        if fix is not None:
            await fix.close()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run(main())
    finally:
        with signals_held():
            svc.close()



# --- the command ---------------------------------------------------------------------------

import click  # noqa: E402

from bondtape.db import ENV_VAR  # noqa: E402


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="HTTP port of the website (0: any free port).")
@click.option("--tls-port", type=click.IntRange(0, 65535), default=None,
              help="Also serve HTTPS with client certificates here (REST API, downloads).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--ca-dir", type=click.Path(file_okay=False, path_type=Path), envvar="BONDTAPE_CA_DIR", default=None,
              help="The certificate authority of client certificates (bondtape certs init).")
@click.option("--fix-port", type=click.IntRange(0, 65535), default=None, help="Also run the FIX 4.4 gateway here.")
@click.option("--db", "db_url", envvar=ENV_VAR, default=None, metavar="URL",
              help=f"Database URL (SQLite or PostgreSQL). Default: ${ENV_VAR}, else sqlite:///bondtape.db")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              envvar="BONDTAPE_CONFIG", default=None, help="Production settings, TOML (docs/deploy.md).")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Web worker processes sharing one PostgreSQL database (docs/deploy.md).")
@click.option("--nats-url", default=None, metavar="URL", help="Also publish the feed to NATS JetStream here.")
@click.pass_context
def serve_command(ctx, host, port, tls_port, tls_cert, tls_key, ca_dir, fix_port, db_url, config_file, workers,
                  nats_url) -> None:
    """Run the website, REST API, feed and FIX gateway in one process.

    SQLite by default, PostgreSQL by --db URL. Needs BONDTAPE_SECRET_KEY (it encrypts the
    users' TOTP secrets). The website is served over HTTP on --port for one machine;
    --tls-port adds HTTPS with client certificates, which the REST API and the download
    service require.
    """
    from bondtape.access.settings import AccessSettings
    from bondtape.cli import open_db  # not at import: bondtape.cli imports this module

    if config_file or workers or nats_url:  # production: config file, workers, metrics, JSON logs
        from bondtape.production.cli import serve_production

        return serve_production(ctx, config_file)
    overrides = {"cookie_secure": False}  # the website is served over plain HTTP on --port too
    if ca_dir is not None:
        overrides["ca_dir"] = ca_dir
    try:
        settings = AccessSettings.from_env(**overrides)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    db = open_db(db_url)

    def ready(addresses: dict) -> None:
        from bondtape.batching import freeze_after_startup

        freeze_after_startup()
        for name, address in addresses.items():
            click.echo(f"{name}: {address}", err=True)
        click.echo("Ctrl-C or SIGTERM stops the server (a second one: at once)", err=True)

    try:
        run_serve(db, settings, host=host, port=port, tls_port=tls_port, tls_cert=tls_cert, tls_key=tls_key,
                  fix_port=fix_port, ready=ready)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("stopped", err=True)


COMMANDS = [serve_command]

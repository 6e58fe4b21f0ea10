"""``bondtape feed ...``: publish, replay and serve the public feed; operator actions."""
from __future__ import annotations

import datetime as dt
import heapq
import json
import sys
from pathlib import Path

import click

from bondtape.cli import db_option, open_db
from bondtape.db import reading

DATA_SET = click.Choice(["CORP", "AGCY"], case_sensitive=False)


def _publisher(db_url: str | None, catch_up: bool = True):
    from bondtape.dissemination.publisher import Publisher

    pub = Publisher(open_db(db_url, must_exist=True))
    if catch_up:
        try:
            pub.catch_up()
        except Exception as exc:  # e.g. a live publisher in another process moved first
            click.echo(f"note: the feed was not brought up to date ({exc}); showing what is stored", err=True)
    return pub


def _fail(exc) -> None:
    raise click.ClickException(f"{exc.code} ({exc.field}): {exc.message}")


@click.group()
def feed() -> None:
    """The public real-time feed (TRACE Market Data): replay, operator actions, serving.

    The feed is published from the journal; commands that read it first bring it up to
    date (the same messages a live publisher sends), unless --no-catch-up is given.
    """


@feed.command("publish")
@db_option
def feed_publish(db_url: str | None) -> None:
    """Publish every journal event not yet on the feed."""
    from bondtape.dissemination.publisher import Publisher

    pub = Publisher(open_db(db_url, must_exist=True))
    before = pub.position
    messages = pub.catch_up()
    click.echo(f"applied journal events {before + 1}..{pub.position}: {len(messages)} messages published")


@feed.command("replay")
@click.option("--from-seq", type=click.IntRange(1), default=1, show_default=True, help="First message sequence number.")
@click.option("--to-seq", type=click.IntRange(1), default=None, help="Last message sequence number (same day).")
@click.option("--data-set", type=DATA_SET, default=None, help="CORP or AGCY (default: both, in publication order).")
@click.option("--date", "date", default=None, metavar="YYYY-MM-DD",
              help="Feed day of --from-seq (default: the first day); later days follow unless --to-seq is given.")
@click.option("--catch-up/--no-catch-up", default=True, show_default=True, help="Publish pending journal events first.")
@db_option
def feed_replay(from_seq: int, to_seq: int | None, data_set: str | None, date: str | None, catch_up: bool,
                db_url: str | None) -> None:
    """Print published messages as JSON lines, exactly as the live feed carries them."""
    from bondtape.dissemination.publisher import DATA_SETS

    if date is not None:
        try:
            date = dt.date.fromisoformat(date).isoformat()
        except ValueError:
            raise click.BadParameter(f"{date!r} is not a date (YYYY-MM-DD)", param_hint="--date") from None
    pub = _publisher(db_url, catch_up)
    sets = [data_set.upper()] if data_set else list(DATA_SETS)
    streams = []
    with reading(pub.db) as conn:
        for ds in sets:
            start = (date or "", from_seq)
            until = (date or _first_day(conn, ds), to_seq) if to_seq is not None else None
            streams.append(_iter(pub.db, ds, start, until))
    out = sys.stdout
    for m in heapq.merge(*streams, key=lambda m: m.pub_order):
        out.write(m.body + "\n")


def _first_day(conn, ds: str) -> str:
    import sqlalchemy as sa

    from bondtape.dissemination.schema import feed_days

    return conn.execute(sa.select(sa.func.min(feed_days.c.feed_date)).where(feed_days.c.data_set == ds)).scalar() or ""


def _iter(db, ds, start, until):
    from bondtape.dissemination.publisher import read_messages

    pos = start
    while True:
        with reading(db) as conn:
            batch = read_messages(conn, ds, pos, until=until, limit=5000)
        yield from batch
        if len(batch) < 5000:
            return
        pos = (batch[-1].date, batch[-1].seq + 1)


@feed.command("status")
@click.option("--catch-up/--no-catch-up", default=True, show_default=True)
@db_option
def feed_status_cmd(catch_up: bool, db_url: str | None) -> None:
    """Each data set's current feed day and last message number, and the halted securities."""
    from bondtape.dissemination.query import feed_status

    pub = _publisher(db_url, catch_up)
    click.echo(json.dumps({"journal_seq": pub.position, "data_sets": feed_status(pub.db),
                           "halted": sorted(pub.halted)}, indent=1))


@feed.command("halt")
@click.argument("cusip")
@click.option("--reason", required=True, help="Halt reason code, 1-4 letters or digits (e.g. T1).")
@click.option("--operator", default=None, help="Who halts (recorded with the action).")
@db_option
def feed_halt(cusip: str, reason: str, operator: str | None, db_url: str | None) -> None:
    """Halt trading in CUSIP: an operator action, published as a HALT message."""
    from bondtape.dissemination.publisher import FeedError

    pub = _publisher(db_url)
    try:
        m = pub.halt(cusip, reason, operator=operator)
    except FeedError as exc:
        _fail(exc)
    click.echo(m.body)


@feed.command("resume")
@click.argument("cusip")
@click.option("--reason", default="R", show_default=True, help="Resumption reason code, 1-4 letters or digits.")
@click.option("--operator", default=None)
@db_option
def feed_resume(cusip: str, reason: str, operator: str | None, db_url: str | None) -> None:
    """Resume trading in a halted CUSIP, published as a RESUME message."""
    from bondtape.dissemination.publisher import FeedError

    pub = _publisher(db_url)
    try:
        m = pub.resume(cusip, reason, operator=operator)
    except FeedError as exc:
        _fail(exc)
    click.echo(m.body)


@feed.command("end-of-day")
@click.option("--date", "date", default=None, metavar="YYYY-MM-DD", help="Market day to close, today or an earlier day not yet closed (default: today).")
@click.option("--operator", default=None)
@db_option
def feed_end_of_day(date: str | None, operator: str | None, db_url: str | None) -> None:
    """Close a market day: daily summaries, market aggregates and END_OF_DAY on every data set."""
    from bondtape.dissemination.publisher import FeedError

    pub = _publisher(db_url)
    try:
        messages = pub.end_of_day(date, operator=operator)
    except FeedError as exc:
        _fail(exc)
    for m in messages:
        click.echo(m.body)


@feed.command("snapshot")
@click.option("--date", "date", required=True, metavar="YYYY-MM-DD")
@click.option("--data-set", type=DATA_SET, default=None, help="Default: both.")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True)
@db_option
def feed_snapshot(date: str, data_set: str | None, directory: Path, db_url: str | None) -> None:
    """Write the day's snapshot file per data set (bondtape-feed-DATASET-DATE.jsonl and .sha256)."""
    from bondtape.dissemination.publisher import FeedError
    from bondtape.dissemination.query import write_snapshot

    pub = _publisher(db_url)
    for ds in ([data_set.upper()] if data_set else ["CORP", "AGCY"]):
        try:
            path, n, closed = write_snapshot(pub.db, ds, date, directory)
        except FeedError as exc:
            _fail(exc)
        click.echo(f"{path}: {n} messages" + ("" if closed else " (the day is not closed yet)"))


@feed.command("time-and-sales")
@click.argument("cusip")
@click.option("--date-from", default=None, metavar="YYYY-MM-DD")
@click.option("--date-to", default=None, metavar="YYYY-MM-DD")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@db_option
def feed_time_and_sales(cusip: str, date_from: str | None, date_to: str | None, limit: int, db_url: str | None) -> None:
    """The disseminated trades of CUSIP (capped quantities, no dealer identities), as JSON."""
    from bondtape.dissemination.publisher import FeedError
    from bondtape.dissemination.query import time_and_sales

    pub = _publisher(db_url)
    try:
        click.echo(json.dumps(time_and_sales(pub.db, cusip, date_from, date_to, limit), indent=1))
    except FeedError as exc:
        _fail(exc)


@feed.command("rebuild")
@db_option
def feed_rebuild(db_url: str | None) -> None:
    """Drop the published feed and publish it again from the journal and operator actions."""
    from bondtape.dissemination.publisher import Publisher

    n = Publisher(open_db(db_url, must_exist=True)).rebuild()
    click.echo(f"rebuilt the feed: {n} messages")


@feed.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port.")
@click.option("--poll-interval", default=0.05, show_default=True, help="Seconds between reads of the journal.")
@click.option("--nats", "nats_url", default=None, metavar="URL", help="Also publish to NATS JetStream here.")
@db_option
def feed_serve(host: str, port: int, poll_interval: float, nats_url: str | None, db_url: str | None) -> None:
    """Serve the feed over WebSocket and SSE (and publish to NATS), following the journal.

    Ctrl-C or SIGTERM stops it gracefully (also when started in the background): the
    WebSocket and SSE clients are ended (they resume from their last position), what was
    handed to NATS is sent, and it exits 0. A second signal stops it at once.
    """
    import asyncio

    import uvicorn

    from bondtape.dissemination.publisher import Publisher
    from bondtape.dissemination.web import create_app
    from bondtape.serve import (SHUTDOWN_TIMEOUT, end_servers, force_servers, own_signals, serving, signals_held,
                                stop_signal, wait_started)

    pub = Publisher(open_db(db_url)).start(poll_interval=poll_interval)
    js = None
    try:
        if nats_url:
            from bondtape.dissemination.jetstream import JetStreamPublisher

            try:
                js = JetStreamPublisher(pub, nats_url).start()
            except Exception as exc:  # noqa: BLE001 - e.g. NATS not there: say so, no traceback
                raise click.ClickException(f"cannot publish to NATS JetStream at {nats_url}: {exc}") from None
        config = uvicorn.Config(create_app(pub), host=host, port=port, log_level="warning", lifespan="off",
                                access_log=False, timeout_graceful_shutdown=SHUTDOWN_TIMEOUT)
        server = own_signals(uvicorn.Server(config))

        async def main() -> None:
            done = stop_signal(None, again=lambda: force_servers([server]))
            task = asyncio.create_task(serving(server))
            await wait_started([server], [task])  # could not listen: its OSError says why
            bound = server.servers[0].sockets[0].getsockname()[1]
            click.echo(f"feed: http://{host}:{bound}/feed/ws (WebSocket), /feed/sse (SSE)"
                       + (f"; NATS JetStream at {nats_url}" if js else ""), err=True)
            click.echo("Ctrl-C or SIGTERM stops it (a second one: at once)", err=True)
            stopping = asyncio.create_task(done.wait())
            await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
            end_servers([server], pub)
            await task
            stopping.cancel()

        try:
            asyncio.run(main())
        except OSError as exc:  # it could not listen (serving)
            raise click.ClickException(f"cannot serve on {host}:{port}: {exc}") from None
    finally:
        with signals_held():
            if js is not None:
                js.stop()
            pub.stop()
    click.echo("stopped", err=True)


COMMANDS = [feed]

"""``bondtape fix serve``: run the FIX 4.4 acceptor."""
from __future__ import annotations

import asyncio
import logging

import click

from bondtape.cli import db_option, open_db


@click.group("fix")
def fix_group() -> None:
    """The FIX 4.4 gateway for trade reporting (docs/fix.md)."""


@fix_group.command("serve")
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=9878, show_default=True, type=click.IntRange(0, 65535), help="TCP port (0: any free port).")
@click.option("--comp-id", default="BONDTAPE", show_default=True, help="Our CompID: the firms' TargetCompID (56).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None, help="PEM certificate: serve TLS.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None, help="PEM private key (if not in --tls-cert).")
@click.option("--verbose", "-v", is_flag=True, help="Log every logon, logout, gap and reject.")
def serve(db_url: str | None, host: str, port: int, comp_id: str, tls_cert: str | None, tls_key: str | None,
          verbose: bool) -> None:
    """Accept FIX sessions; logons use the same users and passwords as the website."""
    from bondtape.fix.server import start_fix_server, tls_context

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if tls_key and not tls_cert:
        raise click.UsageError("--tls-key needs --tls-cert")
    try:
        ssl = tls_context(tls_cert, tls_key) if tls_cert else None
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot load the TLS certificate: {exc}") from exc
    db = open_db(db_url)

    async def main() -> None:
        try:
            server = await start_fix_server(db, host, port, comp_id=comp_id, ssl=ssl)
        except OSError as exc:
            raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from exc
        from bondtape.batching import freeze_after_startup

        from bondtape.serve import stop_signal

        # SIGINT or SIGTERM stops it gracefully, even where SIGINT came in ignored (a
        # process started in the background by a shell)
        stop = stop_signal(None)
        freeze_after_startup()
        click.echo(f"FIX 4.4 acceptor {comp_id} on {host}:{server.port}{' (TLS)' if ssl else ''}; "
                   "Ctrl-C or SIGTERM stops it")
        serving = asyncio.ensure_future(server.serve_forever())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
            if serving.done():
                serving.result()  # the listener failed: say why
        finally:
            serving.cancel()
            stopping.cancel()
            await server.close()
        click.echo("stopped")

    asyncio.run(main())


COMMANDS = [fix_group]

"""``bondtape serve --config FILE`` (or ``--workers N``, ``--nats-url URL``): the production
path of the serve command. Options given on the command line win over the environment and
the file (docs/deploy.md)."""
from __future__ import annotations

import sys
from pathlib import Path

import click
from click.core import ParameterSource

# serve option -> configuration key
_OPTIONS = {"host": "host", "port": "port", "tls_port": "tls_port", "tls_cert": "tls_cert", "tls_key": "tls_key",
            "ca_dir": "ca_dir", "fix_port": "fix_port", "db_url": "database_url", "workers": "workers",
            "nats_url": "nats_url"}


def serve_production(ctx: click.Context, config_file: Path | None) -> None:
    from bondtape.production.config import ConfigError, load_config
    from bondtape.production.supervisor import serve

    given = {key: ctx.params[opt] for opt, key in _OPTIONS.items()
             if ctx.get_parameter_source(opt) == ParameterSource.COMMANDLINE and ctx.params[opt] is not None}
    try:
        cfg = load_config(config_file, **given)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None

    def ready(addresses: dict) -> None:
        for name, address in addresses.items():
            click.echo(f"{name}: {address}", err=True)
        click.echo("SIGTERM or Ctrl-C stops the service gracefully", err=True)

    try:
        code = serve(cfg, ready)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    if code:
        sys.exit(code)

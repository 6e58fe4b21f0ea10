"""Commands: ``bondtape orgs``, ``users``, ``certs``, ``entitlements``, ``audit``, ``web``."""
from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
from pathlib import Path

import click
import sqlalchemy as sa

from bondtape.cli import db_option, open_db
from bondtape.clock import MARKET_TZ, iso_market, now_us, to_us
from bondtape.db import reading


def _fail(exc) -> None:
    raise click.ClickException(str(exc))


# a database id: a positive 64-bit integer (a larger number is no row, not a crash)
ID = click.IntRange(1, 2**63 - 1)
_HOST_RE = re.compile(r"(?=.{1,253}$)(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _load_ca(ca_dir: Path):
    """The certificate authority of CA_DIR, or a clear error when its files cannot be read."""
    from bondtape.access.ca import CertificateAuthority

    try:
        return CertificateAuthority.load(ca_dir)
    except (ValueError, TypeError, OSError) as exc:  # not PEM, not a key, unreadable
        _fail(f"CA_INVALID (ca_dir): the certificate authority in {ca_dir} cannot be read ({type(exc).__name__}: "
              f"{str(exc)[:120]}); it needs ca-cert.pem and ca-key.pem as `bondtape certs init` writes them")


def _operator_source() -> str:
    return "cli"


def _day_us(text: str | None) -> int | None:
    if not text:
        return None
    try:
        return to_us(dt.datetime.combine(dt.date.fromisoformat(text), dt.time(), tzinfo=MARKET_TZ))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a date (YYYY-MM-DD)") from None


def _table(columns, rows, fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps([dict(zip(columns, r)) for r in rows], indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns)
    for r in rows:
        table.add_row(*["" if v is None else str(v) for v in r])
    Console().print(table)


fmt_option = click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
ca_option = click.option("--ca-dir", type=click.Path(file_okay=False, path_type=Path), envvar="BONDTAPE_CA_DIR",
                         required=True, help="The certificate authority's folder. Default: $BONDTAPE_CA_DIR")


def _settings(**overrides):
    from bondtape.access.settings import AccessSettings

    try:
        return AccessSettings.from_env(**overrides)
    except ValueError as exc:
        _fail(exc)


# --- organisations ---------------------------------------------------------------------


@click.group()
def orgs() -> None:
    """Organisations: the operator, reporting firms and data subscribers."""


@orgs.command("create")
@click.argument("name")
@click.option("--kind", required=True, type=click.Choice(["OPERATOR", "FIRM", "VENDOR", "PROFESSIONAL", "NON_PROFESSIONAL", "TAX_EXEMPT"], case_sensitive=False))
@click.option("--mpid", help="A reporting firm's MPID (four letters)")
@click.option("--email", help="Administrative and billing contact")
@db_option
def orgs_create(name, kind, mpid, email, db_url) -> None:
    """Create an organisation."""
    from bondtape.access import accounts
    from bondtape.access.model import AccessError

    try:
        with open_db(db_url).begin() as conn:
            org_id = accounts.create_organisation(conn, name, kind, mpid=mpid, email=email, at_us=now_us(),
                                                  source=_operator_source())
    except AccessError as exc:
        _fail(exc)
    click.echo(f"organisation {org_id} created: {name} ({kind.upper()})")


@orgs.command("list")
@fmt_option
@db_option
def orgs_list(fmt, db_url) -> None:
    """List organisations."""
    from bondtape.access.schema import organisations as t

    with reading(open_db(db_url)) as conn:
        rows = conn.execute(sa.select(t.c.id, t.c.name, t.c.kind, t.c.mpid, t.c.email).order_by(t.c.id)).all()
    _table(["id", "name", "kind", "mpid", "email"], rows, fmt)


# --- users -----------------------------------------------------------------------------


@click.group()
def users() -> None:
    """Users: invitation, listing, disabling, unlocking."""


def _send_invitation(settings, row, token: str, print_link: bool) -> None:
    from bondtape.access.mail import MailError, invitation_email, mailer_for

    subject, body = invitation_email(settings, full_name=row.full_name, username=row.username, token=token,
                                     hours=settings.invitation_hours)
    if print_link:
        click.echo(f"{settings.base_url.rstrip('/')}/enroll/{token}")
        return
    try:
        mailer_for(settings).send(row.email, subject, body)
    except MailError as exc:
        _fail(exc)
    click.echo(f"invitation sent to {row.email}")


@users.command("add")
@click.option("--org", "org_id", type=ID, required=True)
@click.option("--username", required=True)
@click.option("--email", required=True)
@click.option("--full-name", required=True)
@click.option("--roles", required=True, help="Comma-separated: operator_admin, org_admin, trader, viewer, subscriber")
@click.option("--print-link", is_flag=True, help="Print the enrollment link instead of emailing it (bootstrap)")
@db_option
def users_add(org_id, username, email, full_name, roles, print_link, db_url) -> None:
    """The operator's order form and approval in one step: create the user and invite them.

    The invitation (a one-time, expiring link) is emailed (BONDTAPE_SMTP_HOST or
    BONDTAPE_OUTBOX), or printed with --print-link, e.g. for the first operator.
    """
    from bondtape.access import accounts
    from bondtape.access.model import AccessError, AuthenticatedUser

    settings = _settings(secret_key=b"\0" * 32)  # no secret is needed to invite
    now = now_us()
    cli_operator = AuthenticatedUser(0, "cli", 0, "OPERATOR", None, ("operator_admin",), "cli")
    try:
        with open_db(db_url).begin() as conn:
            order_id = accounts.request_user(conn, actor=cli_operator, org_id=org_id, username=username, email=email,
                                             full_name=full_name, roles=roles, now_us=now, source="cli")
            token = accounts.decide_order(conn, order_id, approve=True, actor=cli_operator, now_us=now, source="cli",
                                          invitation_hours=settings.invitation_hours)
            row = accounts.user_by_name(conn, username)
            _send_invitation(settings, row, token, print_link)
    except AccessError as exc:
        _fail(exc)


@users.command("invite")
@click.argument("username")
@click.option("--print-link", is_flag=True)
@db_option
def users_invite(username, print_link, db_url) -> None:
    """Send a fresh invitation (the earlier link stops working)."""
    from bondtape.access import accounts
    from bondtape.access.model import AccessError

    settings = _settings(secret_key=b"\0" * 32)
    try:
        with open_db(db_url).begin() as conn:
            row = accounts.user_by_name(conn, username)
            if row is None:
                _fail(f"no user {username!r}")
            token = accounts.issue_invitation(conn, row.id, actor=None, now_us=now_us(), source="cli",
                                              hours=settings.invitation_hours)
            _send_invitation(settings, accounts.user_by_id(conn, row.id), token, print_link)
    except AccessError as exc:
        _fail(exc)


@users.command("invite-mfa")
@db_option
def users_invite_mfa(db_url) -> None:
    """Email every active user without an authenticator an enrollment invitation (seed R5)."""
    from bondtape.access import accounts

    settings = _settings(secret_key=b"\0" * 32)
    sent = 0
    with open_db(db_url).begin() as conn:
        for row in accounts.users_needing_mfa(conn):
            token = accounts.issue_invitation(conn, row.id, actor=None, now_us=now_us(), source="cli",
                                              hours=settings.invitation_hours)
            _send_invitation(settings, row, token, False)
            sent += 1
    click.echo(f"{sent} invitations sent")


@users.command("list")
@click.option("--org", "org_id", type=ID)
@fmt_option
@db_option
def users_list(org_id, fmt, db_url) -> None:
    """List users (never their secrets)."""
    from bondtape.access.schema import login_state as ls, users as u

    q = (sa.select(u.c.id, u.c.username, u.c.org_id, u.c.full_name, u.c.email, u.c.roles, u.c.status,
                   ls.c.mfa_enrolled_us.is_not(None).label("mfa"), ls.c.locked_until_us)
         .outerjoin(ls, ls.c.user_id == u.c.id).order_by(u.c.id))
    if org_id is not None:
        q = q.where(u.c.org_id == org_id)
    with reading(open_db(db_url)) as conn:
        rows = [(*r[:8], iso_market(r[8]) if r[8] else None) for r in conn.execute(q)]
    _table(["id", "username", "org", "name", "email", "roles", "status", "mfa", "locked_until"], rows, fmt)


def _user_id(conn, username: str) -> int:
    from bondtape.access import accounts

    row = accounts.user_by_name(conn, username)
    if row is None:
        from bondtape.access.model import AccessError

        _fail(AccessError("USER_UNKNOWN", f"no user {username[:64]!r}; accepted: a user name (bondtape users list)",
                          "username"))
    return row.id


@users.command("disable")
@click.argument("username")
@db_option
def users_disable(username, db_url) -> None:
    """Disable a user and end their sessions (their period of service ends now)."""
    from bondtape.access import accounts
    from bondtape.access.model import AccessError

    try:
        with open_db(db_url).begin() as conn:
            accounts.set_user_status(conn, _user_id(conn, username), "DISABLED", actor=None, at_us=now_us(),
                                     source="cli")
    except AccessError as exc:
        _fail(exc)
    click.echo(f"{username} disabled")


@users.command("enable")
@click.argument("username")
@db_option
def users_enable(username, db_url) -> None:
    """Enable a disabled user (a new period of service starts now; earlier ones are kept)."""
    from bondtape.access import accounts
    from bondtape.access.model import AccessError

    try:
        with open_db(db_url).begin() as conn:
            accounts.set_user_status(conn, _user_id(conn, username), "ACTIVE", actor=None, at_us=now_us(), source="cli")
    except AccessError as exc:
        _fail(exc)
    click.echo(f"{username} enabled")


@users.command("history")
@click.argument("username")
@fmt_option
@db_option
def users_history(username, fmt, db_url) -> None:
    """A user's periods of service (what the monthly fees bill), oldest first; an open one has no end."""
    from bondtape.access import accounts

    with reading(open_db(db_url)) as conn:
        periods = accounts.service_history(conn, _user_id(conn, username))
    rows = [(username, n, iso_market(p.start_us), iso_market(p.end_us) if p.end_us is not None else None)
            for n, p in enumerate(periods, 1)]
    _table(["user", "period", "start", "end"], rows, fmt)


@users.command("unlock")
@click.argument("username")
@db_option
def users_unlock(username, db_url) -> None:
    """Lift a lockout after failed sign-ins."""
    from bondtape.access import accounts

    with open_db(db_url).begin() as conn:
        accounts.unlock(conn, _user_id(conn, username), actor=None, at_us=now_us(), source="cli")
    click.echo(f"{username} unlocked")


# --- certificates ----------------------------------------------------------------------


@click.group()
def certs() -> None:
    """The certificate authority: client certificates for the REST API and downloads."""


@certs.command("init")
@ca_option
@click.option("--name", default="bondtape certificate authority", show_default=True)
def certs_init(ca_dir, name) -> None:
    """Create the certificate authority (key and self-signed certificate) in CA_DIR."""
    from bondtape.access.ca import CertificateAuthority
    from bondtape.access.model import AccessError

    try:
        ca = CertificateAuthority.create(ca_dir, name=name, now_us=now_us())
    except AccessError as exc:
        _fail(exc)
    click.echo(f"certificate authority created: {ca.cert_path} (its key: {ca_dir / 'ca-key.pem'}, mode 0600)")


@certs.command("server")
@ca_option
@click.option("--host", "hosts", multiple=True, default=["127.0.0.1", "localhost"], show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def certs_server(ca_dir, hosts, out) -> None:
    """Issue the TLS server certificate for the website, REST API and download service."""
    from bondtape.access.model import AccessError

    for host in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not _HOST_RE.fullmatch(host):
                raise click.BadParameter(f"{host[:80]!r} is neither an IP address nor a DNS name (letters, digits, "
                                         "hyphens and dots)", param_hint="'--host'") from None
    ca = _load_ca(ca_dir)
    try:
        cert, key = ca.issue_server(list(hosts), out, now_us=now_us())
    except AccessError as exc:
        _fail(exc)
    click.echo(f"server certificate {cert}, key {key}")


@certs.command("issue")
@click.argument("username")
@ca_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for USERNAME.crt and USERNAME.key (give both to the user; the service keeps no key)")
@click.option("--days", type=click.IntRange(1, 825), default=365, show_default=True,
              help="How long the certificate is valid (1 to 825 days).")
@db_option
def certs_issue(username, ca_dir, out, days, db_url) -> None:
    """Issue a client certificate to a user."""
    import os

    from bondtape.access.model import AccessError

    ca = _load_ca(ca_dir)
    try:
        with open_db(db_url).begin() as conn:
            cert_pem, key_pem, serial = ca.issue_client(conn, _user_id(conn, username), now_us=now_us(), days=days)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{username}.crt").write_bytes(cert_pem)
            fd = os.open(out / f"{username}.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(key_pem)
    except AccessError as exc:
        _fail(exc)
    click.echo(f"certificate {serial} issued to {username}: {out / (username + '.crt')}, key {out / (username + '.key')}")


@certs.command("list")
@click.option("--user", "username")
@fmt_option
@db_option
def certs_list(username, fmt, db_url) -> None:
    """List client certificates."""
    from bondtape.access.ca import list_certificates

    with reading(open_db(db_url)) as conn:
        rows = list_certificates(conn, _user_id(conn, username) if username else None)
    _table(["serial", "user", "not_before", "not_after", "status"],
           [(r.serial, r.username, iso_market(r.not_before_us), iso_market(r.not_after_us),
             f"revoked {iso_market(r.revoked_us)}: {r.revoked_reason}" if r.revoked_us else "valid") for r in rows], fmt)


@certs.command("revoke")
@click.argument("serial")
@click.option("--reason", required=True)
@click.option("--ca-dir", type=click.Path(file_okay=False, path_type=Path), envvar="BONDTAPE_CA_DIR",
              help="Also rewrite crl.pem in this folder")
@db_option
def certs_revoke(serial, reason, ca_dir, db_url) -> None:
    """Revoke a client certificate: refused from the next request on."""
    from bondtape.access.ca import revoke
    from bondtape.access.model import AccessError

    try:
        with open_db(db_url).begin() as conn:
            revoke(conn, serial, now_us=now_us(), reason=reason, source="cli")
            if ca_dir:
                _load_ca(ca_dir).write_crl(conn, now_us=now_us())
    except AccessError as exc:
        _fail(exc)
    click.echo(f"certificate {serial} revoked")


# --- entitlements ----------------------------------------------------------------------


@click.group("entitlements")
def entitlements_group() -> None:
    """Entitlements: real-time data sets, Historic data sets and years, reference files."""


@entitlements_group.command("grant")
@click.option("--org", "org_id", type=ID, required=True)
@click.option("--product", required=True, type=click.Choice(["REALTIME", "HISTORIC", "REFERENCE"], case_sensitive=False))
@click.option("--data-set", default="", help="CORP, AGCY or 144A (none for REFERENCE)")
@click.option("--year", type=click.IntRange(1900, 9999), help="HISTORIC: the calendar year purchased")
@click.option("--from", "start", help="YYYY-MM-DD (default: now)")
@click.option("--to", "end", help="YYYY-MM-DD, exclusive (default: open)")
@click.option("--note")
@db_option
def ent_grant(org_id, product, data_set, year, start, end, note, db_url) -> None:
    """Grant an entitlement to an organisation."""
    from bondtape.access import entitlements
    from bondtape.access.model import AccessError

    now = now_us()
    try:
        with open_db(db_url).begin() as conn:
            new_id = entitlements.grant(conn, org_id=org_id, product=product, data_set=data_set, year=year,
                                        start_us=_day_us(start) or now, end_us=_day_us(end), actor=None, at_us=now,
                                        source="cli", note=note)
    except AccessError as exc:
        _fail(exc)
    click.echo(f"entitlement {new_id} granted")


@entitlements_group.command("end")
@click.argument("entitlement_id", type=ID)
@click.option("--at", help="YYYY-MM-DD (default: now)")
@db_option
def ent_end(entitlement_id, at, db_url) -> None:
    """End an entitlement."""
    from bondtape.access import entitlements
    from bondtape.access.model import AccessError

    try:
        with open_db(db_url).begin() as conn:
            entitlements.end(conn, entitlement_id, end_us=_day_us(at) or now_us(), actor=None, at_us=now_us(), source="cli")
    except AccessError as exc:
        _fail(exc)
    click.echo(f"entitlement {entitlement_id} ended")


@entitlements_group.command("list")
@click.option("--org", "org_id", type=ID)
@fmt_option
@db_option
def ent_list(org_id, fmt, db_url) -> None:
    """List entitlements."""
    from bondtape.access import entitlements

    with reading(open_db(db_url)) as conn:
        rows = entitlements.list_for(conn, org_id)
    _table(["id", "org", "product", "data_set", "year", "from", "to", "note"],
           [(e.id, e.org_id, e.product, e.data_set, e.year, iso_market(e.start_us), iso_market(e.end_us) if e.end_us else None,
             e.note) for e in rows], fmt)


# --- audit trail -----------------------------------------------------------------------


@click.group("audit")
def audit_group() -> None:
    """The audit trail (append-only)."""


@audit_group.command("search")
@click.option("--actor")
@click.option("--action", help="A prefix: login finds login, login.failed, login.lockout")
@click.option("--outcome", type=click.Choice(["ok", "denied", "failed"]))
@click.option("--target")
@click.option("--since", help="YYYY-MM-DD (market date)")
@click.option("--until", help="YYYY-MM-DD inclusive")
@click.option("--limit", type=click.IntRange(1, 100_000), default=200, show_default=True)
@fmt_option
@db_option
def audit_search(actor, action, outcome, target, since, until, limit, fmt, db_url) -> None:
    """Search the audit trail, newest first."""
    from bondtape.access import audit

    until_us = _day_us(until)
    if since and until and until < since:
        raise click.BadParameter(f"--until {until} is before --since {since}", param_hint="'--until'")
    with reading(open_db(db_url)) as conn:
        rows = audit.search(conn, actor=actor, action=action, outcome=outcome, target=target, since_us=_day_us(since),
                            until_us=until_us + 86_400_000_000 if until_us else None, limit=limit)
    _table(["id", "time", "action", "outcome", "actor", "target", "source", "detail"],
           [(e.id, iso_market(e.at_us), e.action, e.outcome, e.actor, e.target, e.source,
             json.dumps(e.detail) if e.detail else None) for e in rows], fmt)


# --- the web server --------------------------------------------------------------------


@click.group()
def web() -> None:
    """The website, REST API and download service."""


@web.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8443, show_default=True)
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@ca_option
@db_option
def web_serve(host, port, tls_cert, tls_key, ca_dir, db_url) -> None:
    """Serve over HTTPS; client certificates (from this CA) are requested, and required by
    the REST API and the download service. Needs BONDTAPE_SECRET_KEY.

    Ctrl-C or SIGTERM stops it gracefully (also when started in the background): the
    requests under way are finished, the reports queued are journaled, it prints `stopped`
    and exits 0. A second signal stops the requests at once."""
    from bondtape.access.ca import CA_CERT
    from bondtape.serve import run_serve

    settings = _settings(ca_dir=ca_dir)
    if not (ca_dir / CA_CERT).exists():
        _fail(f"no certificate authority in {ca_dir}: run `bondtape certs init --ca-dir {ca_dir}`")

    def ready(addresses: dict) -> None:
        from bondtape.batching import freeze_after_startup

        freeze_after_startup()
        click.echo(f"serving {addresses['https']}/", err=True)
        click.echo("Ctrl-C or SIGTERM stops the server (a second one: at once)", err=True)

    try:  # the one serving loop of bondtape serve: HTTPS only, without the feed's routes
        run_serve(open_db(db_url), settings, host=host, port=None, tls_port=port, tls_cert=tls_cert,
                  tls_key=tls_key, ready=ready, feed=False)
    except (ValueError, OSError) as exc:
        _fail(exc)
    click.echo("stopped", err=True)


COMMANDS = [orgs, users, certs, entitlements_group, audit_group, web]

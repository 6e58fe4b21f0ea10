"""``bondtape demo``: a demo market on SQLite, users to sign in as, and the website on it.

It simulates a market (``simulate``), sets up access (a secret key, a certificate
authority, organisations) with ``bondtape.access.demo``, adds one active user per role with
a known password and TOTP secret, builds the Historic data set of the simulated year when it
is aged, and starts ``bondtape serve``: the website, REST API, feed and FIX gateway.
``--no-serve`` stops after printing the address and credentials (for scripts and tests).
"""
from __future__ import annotations

import datetime as dt
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from rich.console import Console

from bondtape.access.settings import AccessSettings
from bondtape.db import connect
from bondtape.journal.schema import journal, trade_reports


DEMO_PASSWORD = "bondtape demo password 1"


@dataclass
class DemoUser:
    username: str
    role: str
    organisation: str
    totp_secret: str
    certificate: Path | None = None
    key: Path | None = None


def run_demo(directory: Path, *, days: int, trades_per_day: int, console: Console, serve: bool = False,
             host: str = "127.0.0.1", port: int = 8000, tls_port: int | None = 8443,
             fix_port: int | None = 9878) -> str:
    """Create (or reuse) the demo database in ``directory``; return its URL. With
    ``serve``, run the website, REST API, feed and FIX gateway until Ctrl-C."""
    from bondtape.cli_core import progress_bar
    from bondtape.intake.bulk import run_bulk
    from bondtape.engine import Engine
    from bondtape.journal.verify import verify
    from bondtape.simulate.market import simulate_market

    directory.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{(directory / 'bondtape.db').resolve()}"
    db = connect(url)
    with db.connect() as conn:
        existing = conn.execute(sa.select(sa.func.count()).select_from(journal)).scalar_one()
    start = dt.date(2024, 1, 2)
    if not existing:
        console.print(f"[bold]Building a demo market[/] in {directory}/: {days} days from {start}, {trades_per_day} trades a day")
        with progress_bar() as bar:
            task = bar.add_task("simulating", total=days, rate="")
            summary = simulate_market(db, start, days, trades_per_day, seed=2010,
                                      progress=lambda d, n: bar.update(task, advance=1, rate=f"{d}: {n} reports"))
        console.print(summary.text())
    sample = directory / "sample-reports.csv"
    with db.connect() as conn:
        row = conn.execute(sa.select(trade_reports).where(trade_reports.c.contra_type == "C",
                                                          trade_reports.c.is_test.is_(False)).limit(1)).one()
    exec_time = "2024-03-04T10:15:00-05:00"
    sample.write_text(
        "action,client_ref,reporting_mpid,cusip,side,capacity,contra,quantity,price,execution_time,report_time,original_control_number\n"
        f"NEW,DEMO-1,{row.reporting_mpid},{row.cusip},S,P,C,250000,101.25,{exec_time},2024-03-04T10:16:00-05:00,\n"
        f"NEW,DEMO-2,{row.reporting_mpid},{row.cusip[:8]}{(int(row.cusip[8]) + 1) % 10},S,P,C,250000,101.25,{exec_time},2024-03-04T10:17:00-05:00,\n"
        f"NEW,DEMO-3,{row.reporting_mpid},{row.cusip},B,P,C,-5,101.25,{exec_time},2024-03-04T10:18:00-05:00,\n"
        f"NEW,DEMO-4,{row.reporting_mpid},{row.cusip},S,P,C,7500000,99.5,{exec_time},2024-03-04T10:40:00-05:00,\n"
    )
    results = directory / "sample-reports.results.csv"
    with open(sample, newline="") as src, open(results, "w", newline="") as out:
        run_bulk(Engine(db), src, out, use_report_time=True)
    check = verify(db)
    console.print()
    console.print("[bold]bondtape demo[/]: the database is " + url)
    console.print(f"journal: {check.lines()[0]}")
    console.print(f"\nA bulk file and its results ({sample.name} -> {results.name}):")
    console.print(results.read_text(), markup=False, highlight=False)
    console.print("Try:")
    for cmd in (
        f"bondtape --help",
        f"bondtape securities list --db {url}",
        f"bondtape report {sample.resolve()} --use-report-time --db {url}",
        f"bondtape journal show --from-seq 1 --limit 5 --db {url}",
        f"bondtape journal verify --db {url}",
    ):
        console.print(f"  {_bondtape_command()}{cmd[len('bondtape'):]}", markup=False, highlight=False)
    def say(*args, **kw) -> None:
        console.print(*args, soft_wrap=True, **kw)

    users, settings, access = demo_users(db, directory, host=host, port=port)
    historic = build_demo_historic(db, directory, start.year, console)
    settings = AccessSettings(**{**settings.__dict__, "historic_dir": historic})
    web = f"http://{host}:{port}/"
    say()
    say(f"[bold]The website[/]: {web}" + ("" if serve else "  (start it with: bondtape demo, without --no-serve)"))
    if tls_port is not None:
        say(f"REST API and downloads (client certificate + login + password): https://{host}:{tls_port}/api/v1 "
                      f"(OpenAPI: {web}openapi.json)")
    if fix_port is not None:
        say(f"FIX 4.4 gateway: {host}:{fix_port} (TargetCompID BONDTAPE; logon with a trader's login and password)")
    say(f"\nSign in with the password [bold]{DEMO_PASSWORD}[/] and the 6-digit code of an authenticator app "
                  "holding the TOTP secret (or: python -c \"import pyotp; print(pyotp.TOTP('SECRET').now())\"):")
    for u in users:
        say(f"  {u.username:<16} {u.role:<44} TOTP secret {u.totp_secret}", markup=False, highlight=False)
    trader = next(u for u in users if u.certificate)
    if tls_port is not None:
        say("\nA report over the REST API:", markup=False)
        say(f"  curl --cacert {access.ca_dir / 'ca-cert.pem'} --cert {trader.certificate} --key {trader.key} "
                      f"-u '{trader.username}:{DEMO_PASSWORD}' https://{host}:{tls_port}/api/v1/reports?limit=5",
                      markup=False, highlight=False)
    if serve:
        from bondtape.serve import run_serve

        def ready(addresses: dict) -> None:
            say("\n[bold]Serving[/] " + ", ".join(f"{k} {v}" for k, v in addresses.items())
                          + ". Ctrl-C or SIGTERM stops it.")

        run_serve(db, settings, host=host, port=port, tls_port=tls_port, tls_cert=access.tls_cert,
                  tls_key=access.tls_key, fix_port=fix_port, ready=ready)
        say("stopped")  # as `bondtape serve` says once it has finished
    return url


def demo_users(db, directory: Path, *, host: str, port: int):
    """Access for the demo (``bondtape.access.demo``) and one ACTIVE user per role with the
    demo password and a TOTP secret; idempotent. Returns (users, settings, access)."""
    import sqlalchemy as sa

    from bondtape.access import accounts, entitlements
    from bondtape.access.ca import CertificateAuthority
    from bondtape.access.demo import DEMO_OPERATOR, setup_demo_access
    from bondtape.access.schema import organisations, users as users_table
    from bondtape.clock import now_us

    now = now_us()
    access = setup_demo_access(db, directory, now_us=now, base_url=f"http://{host}:{port}")
    key = bytes.fromhex(access.secret_key_file.read_text().strip())
    settings = AccessSettings(secret_key=key, base_url=f"http://{host}:{port}", ca_dir=access.ca_dir,
                              outbox_dir=access.outbox, cookie_secure=False,
                              download_base_url=f"https://{host}:8443/download")
    ca = CertificateAuthority.load(access.ca_dir)
    o = organisations.c
    wanted = [
        ("operator", "operator_admin", "OPERATOR", None),
        ("trader", "org_admin,trader", "FIRM", None),
        ("subscriber", "subscriber", "VENDOR", None),
        ("investor", "subscriber", "NON_PROFESSIONAL", "Pat Investor"),
    ]
    out = []
    with db.begin() as conn:
        for username, roles, kind, org_name in wanted:
            name = f"demo-{username}"
            org = conn.execute(sa.select(organisations).where(o.kind == kind).order_by(o.id)).first()
            if org is None:
                org_id = accounts.create_organisation(conn, org_name, kind, at_us=now, source="demo")
                if kind == "NON_PROFESSIONAL":
                    for data_set in ("CORP", "AGCY"):
                        entitlements.grant(conn, org_id=org_id, product="REALTIME", data_set=data_set, start_us=now,
                                           actor=DEMO_OPERATOR, at_us=now, source="demo")
                org = conn.execute(sa.select(organisations).where(o.id == org_id)).one()
            row = conn.execute(sa.select(users_table).where(users_table.c.username == name)).first()
            if row is None:
                user_id, secret = accounts.create_active_user(
                    conn, org_id=org.id, username=name, password=DEMO_PASSWORD, roles=roles, at_us=now,
                    full_name=f"Demo {username}", master_key=key)
                if kind == "VENDOR":  # the data vendor buys the simulated year's Historic data
                    entitlements.grant(conn, org_id=org.id, product="HISTORIC", data_set="CORP", year=2024,
                                       start_us=now, actor=DEMO_OPERATOR, at_us=now, source="demo")
            else:
                user_id, secret = row.id, accounts.totp_for(key, row).secret
            user = DemoUser(name, f"{roles} of {org.name}" + (f" ({org.mpid})" if org.mpid else ""), org.name, secret)
            if kind in ("FIRM", "VENDOR"):
                cert_dir = directory / "certs"
                user.certificate, user.key = cert_dir / f"{name}.crt", cert_dir / f"{name}.key"
                if not user.certificate.exists():
                    cert_pem, key_pem, _serial = ca.issue_client(conn, user_id, now_us=now)
                    cert_dir.mkdir(parents=True, exist_ok=True)
                    user.key.write_bytes(key_pem)
                    user.key.chmod(0o600)
                    user.certificate.write_bytes(cert_pem)
            out.append(user)
    return out, settings, access


def build_demo_historic(db, directory: Path, year: int, console: Console) -> Path:
    """The simulated year's Historic Corporate data set, once it is aged (18 months)."""
    from bondtape.clock import market_date, now_us
    from bondtape.historic.builder import HistoricError, build_data_set

    folder = directory / "historic"
    out = folder / "corporate" / str(year)
    if not (out / "manifest.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            build_data_set(db, "corporate", year, market_date(now_us()), out)
            console.print(f"Historic data: corporate {year} built in {out}")
        except HistoricError as exc:
            console.print(f"Historic data: corporate {year} not built ({exc.code}: {exc.message})")
    return folder


def _bondtape_command() -> str:
    """The ``bondtape`` command of this installation, by its full path when it is not on
    PATH (a virtualenv not activated), so that the commands shown work from any folder."""
    script = Path(sys.executable).with_name("bondtape")
    if script.exists() and shutil.which("bondtape") != str(script):
        return str(script)
    return "bondtape"

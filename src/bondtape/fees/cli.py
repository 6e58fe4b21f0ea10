"""``bondtape fees``: record billable services and write monthly Rule 7730 invoices."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from bondtape.cli import db_option, interrupted, interrupts_kept, open_db
from bondtape.clock import now_us
from bondtape.db import reading
from bondtape.fees.schedule import FeeError
from bondtape.fees.schema import HISTORIC_PRODUCTS, SUBSCRIPTION_PRODUCTS


def _fail(exc: FeeError) -> None:
    click.echo(f"error {exc.code} ({exc.field}): {exc.message}", err=True)
    sys.exit(2)


@click.group()
def fees() -> None:
    """Rule 7730 fees: subscriptions, Historic orders and monthly invoices."""


@fees.command("invoice")
@click.option("--month", required=True, metavar="YYYY-MM", help="The billing month (market time).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),  # a file: OUT_NOT_EMPTY
              help="Directory for the invoice files and summary.json: new, empty, or an earlier run of "
                   "MONTH (replaced whole).")
@click.option("--format", "formats", default="json,csv,html", show_default=True,
              help="Comma-separated formats: json, csv, html.")
@db_option
def invoice_cmd(month: str, out_dir: Path, formats: str, db_url: str | None) -> None:
    """Write one invoice per organisation billed in MONTH, in each format, and summary.json.

    Reporting fees go to the organisation whose MPID reported; reports of an MPID with no
    (or more than one) organisation are listed under "unbilled" and warned about.

    OUT is written beside itself under a hidden name and renamed into place when complete.
    It may be new, empty, or an earlier run of MONTH (replaced whole). Ctrl-C or SIGTERM
    leaves OUT as it was and exits 130 (SIGTERM: 143).
    """
    from bondtape.fees.invoice import build_invoices
    from bondtape.fees.schedule import default_schedules
    from bondtape.fees.writers import FORMATS, check_out, write_invoices

    chosen = [f.strip().lower() for f in formats.split(",") if f.strip()]
    bad = [f for f in chosen if f not in FORMATS]
    if bad or not chosen:
        _fail(FeeError("FORMAT_INVALID", "format", f"choose from {', '.join(FORMATS)}; got {formats!r}"))
    month = month.strip()
    try:
        default_schedules().for_month(month)  # MONTH_INVALID, NO_SCHEDULE
        check_out(out_dir, month)  # refused before the month is read
    except FeeError as exc:
        _fail(exc)
    except OSError as exc:
        raise click.ClickException(f"cannot use {out_dir}: {exc}") from None
    db = open_db(db_url, must_exist=True)
    try:
        with interrupts_kept():
            invoices, unbilled, schedule = build_invoices(db, month)
            path = write_invoices(out_dir, month, schedule.name, invoices, unbilled, chosen)
    except FeeError as exc:
        _fail(exc)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the hidden folder was removed
        interrupted(f"{out_dir} was not written (it is as it was; nothing half-written is left); "
                    "run the same command again to write it", exc)
    except OSError as exc:
        raise click.ClickException(f"cannot write {out_dir}: {exc}") from None
    total = sum((i.total for i in invoices), start=__import__("decimal").Decimal("0.00"))
    click.echo(f"{len(invoices)} invoices for {month} (schedule {schedule.name}), total ${total:,}: {path}")
    for u in unbilled:
        click.echo(f"warning: MPID {u.mpid} not billed ({u.reason}): {u.reports} reports, {u.actions} "
                   f"cancel/correct/reversal events", err=True)


@fees.command("subscribe")
@click.option("--org", "organisation", required=True, help="Organisation id, MPID or name.")
@click.option("--product", required=True, help=f"One of {', '.join(SUBSCRIPTION_PRODUCTS)}.")
@click.option("--data-set", help="CORP or AGCY (all products but CTCI).")
@click.option("--start", "start_date", required=True, metavar="YYYY-MM-DD", help="First day of service.")
@click.option("--end", "end_date", metavar="YYYY-MM-DD", help="Last day of service (inclusive).")
@click.option("--quantity", default="1", show_default=True, help="Terminals, 1 to 1,000,000 (BTDS_TERMINAL only).")
@click.option("--reference", help="Terminal ids, circuit id or contract number.")
@db_option
def subscribe_cmd(organisation: str, product: str, data_set: str | None, start_date: str, end_date: str | None,
                  quantity: str, reference: str | None, db_url: str | None) -> None:
    """Record a monthly service: CTCI, BTDS terminals or unlimited use, vendor feeds."""
    from bondtape.fees.records import record_subscription

    try:
        sid = record_subscription(open_db(db_url), organisation, product, data_set=data_set, start_date=start_date,
                                  end_date=end_date, quantity=quantity, reference=reference, now_us=now_us())
    except FeeError as exc:
        _fail(exc)
    click.echo(f"subscription {sid} recorded")


@fees.command("unsubscribe")
@click.option("--subscription", "subscription_id", required=True, help="The subscription id.")
@click.option("--end", "end_date", required=True, metavar="YYYY-MM-DD", help="Last day of service (inclusive).")
@db_option
def unsubscribe_cmd(subscription_id: str, end_date: str, db_url: str | None) -> None:
    """End a subscription on its last day of service."""
    from bondtape.fees.records import end_subscription

    try:
        end_subscription(open_db(db_url), subscription_id, end_date)
    except FeeError as exc:
        _fail(exc)
    click.echo(f"subscription {subscription_id} ends {end_date}")


@fees.command("void")
@click.option("--subscription", "subscription_id", help="The id of the subscription to void.")
@click.option("--order", "order_id", help="The id of the Historic order to void.")
@click.option("--reason", help="Why it is void, e.g. \"keyed 9000 CUSIPs, not 900\" (required).")
@db_option
def void_cmd(subscription_id: str | None, order_id: str | None, reason: str | None, db_url: str | None) -> None:
    """Void a subscription or Historic order keyed wrong: kept in the records, billed in no
    month (run the month again). Record the correct one anew."""
    from bondtape.fees.records import void_record

    try:
        void_record(open_db(db_url, must_exist=True), subscription_id=subscription_id, order_id=order_id,
                    reason=reason, now_us=now_us())
    except FeeError as exc:
        _fail(exc)
    click.echo(f"subscription {subscription_id} voided" if subscription_id else f"historic order {order_id} voided")


@fees.command("historic-order")
@click.option("--org", "organisation", required=True, help="Organisation id, MPID or name.")
@click.option("--product", required=True, help=f"One of {', '.join(HISTORIC_PRODUCTS)}.")
@click.option("--date", "order_date", required=True, metavar="YYYY-MM-DD", help="Billed in this date's month.")
@click.option("--data-set", help="CORP or AGCY (DATA, REDISTRIBUTION).")
@click.option("--year", help="Calendar year of the data (DATA, REDISTRIBUTION), from 2002.")
@click.option("--recipient", help="REDISTRIBUTION: who receives the data.")
@click.option("--cusips", help="REDISTRIBUTION: CUSIPs delivered to the recipient, 1 to 1,000,000,000.")
@click.option("--media-cost", help="AD_HOC: cost of the media, dollars in plain digits, e.g. 12.50 (a leading $ and 1,000 separators allowed).")
@click.option("--delivery-cost", help="AD_HOC: cost of delivery, dollars in plain digits, e.g. 7.35 (a leading $ and 1,000 separators allowed).")
@click.option("--amount", help="OTHER_REQUEST: the charge, dollars in plain digits, e.g. 150.00 (a leading $ and 1,000 separators allowed).")
@click.option("--description", help="What was supplied (required for OTHER_REQUEST).")
@db_option
def historic_order_cmd(organisation: str, product: str, order_date: str, db_url: str | None, **kw: Any) -> None:
    """Record a Historic TRACE Data order: SETUP, DATA, REDISTRIBUTION, AD_HOC or OTHER_REQUEST."""
    from bondtape.fees.records import record_historic_order

    try:
        oid = record_historic_order(open_db(db_url), organisation, product, order_date=order_date, now_us=now_us(), **kw)
    except FeeError as exc:
        _fail(exc)
    click.echo(f"historic order {oid} recorded")


@fees.command("web-access")
@click.option("--user", "username", required=True, help="The user ID (username).")
@click.option("--level", required=True, help="LEVEL_I, LEVEL_II or NONE.")
@click.option("--data-sets", help="Level II: CORP, AGCY or CORP,AGCY.")
@db_option
def web_access_cmd(username: str, level: str, data_sets: str | None, db_url: str | None) -> None:
    """Set a user ID's web access level, billed as a Rule 7730 system fee from its activation."""
    from bondtape.fees.records import set_web_access

    try:
        set_web_access(open_db(db_url), username, level, data_sets)
    except FeeError as exc:
        _fail(exc)
    click.echo(f"{username}: {level.upper()}{' ' + data_sets.upper() if data_sets else ''}")


@fees.command("records")
@click.option("--org", "organisation", help="Organisation id, MPID or name (default: all).")
@db_option
def records_cmd(organisation: str | None, db_url: str | None) -> None:
    """Print subscriptions and Historic orders as JSON."""
    from bondtape.fees.records import find_organisation, list_records

    with reading(open_db(db_url, must_exist=True)) as conn:
        try:
            org_id = find_organisation(conn, organisation).id if organisation else None
        except FeeError as exc:
            _fail(exc)
        click.echo(json.dumps(list_records(conn, org_id), indent=1))


@fees.command("schedule")
@click.option("--date", "on", metavar="YYYY-MM-DD", help="Show the schedule in force on this date (default: latest).")
def schedule_cmd(on: str | None) -> None:
    """Print the fee schedule in force on a date as JSON."""
    import datetime as dt

    from bondtape.fees.schedule import default_schedules

    book = default_schedules()
    try:
        day = dt.date.fromisoformat(on) if on else book.versions[-1].effective
    except ValueError:
        _fail(FeeError("DATE_INVALID", "date", f"a date is YYYY-MM-DD; got {on!r}"))
    try:
        sched = book.at(day)
    except FeeError as exc:
        _fail(exc)
    click.echo(json.dumps({"effective": str(sched.effective), "versions": list(sched.versions), "title": sched.title,
                           **sched.raw}, indent=1, default=str))


COMMANDS = [fees]

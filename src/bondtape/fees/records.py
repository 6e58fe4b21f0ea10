"""Recording what is billable: subscriptions (monthly services) and Historic orders.

Every function checks its input completely before writing, and raises
:class:`~bondtape.fees.schedule.FeeError` (a stable code, the field, what is accepted)
instead of writing a half-valid record. Times are passed in (``now_us``); nothing here reads
the clock.
"""
from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from bondtape.access.schema import organisations
from bondtape.fees.schedule import FeeError, ScheduleBook, default_schedules
from bondtape.fees.schema import HISTORIC_PRODUCTS, SUBSCRIPTION_PRODUCTS, fee_subscriptions, historic_orders
from bondtape.rulebook import default_rulebook, historic_available_from

__all__ = [
    "FEE_ERROR_CODES", "PRODUCT_KINDS", "end_subscription", "find_organisation", "list_records",
    "parse_money_c", "record_historic_order", "record_subscription", "set_web_access", "void_record",
]

PROFESSIONAL_KINDS = ("FIRM", "VENDOR", "PROFESSIONAL", "TAX_EXEMPT")
PRODUCT_KINDS: dict[str, tuple[str, ...]] = {
    "CTCI": ("FIRM",),
    "BTDS_TERMINAL": PROFESSIONAL_KINDS,
    "BTDS_UNLIMITED": PROFESSIONAL_KINDS,
    "VENDOR_FEED": PROFESSIONAL_KINDS,
    "VENDOR_SNAPSHOT": PROFESSIONAL_KINDS,
    "BTDS_NON_PROFESSIONAL": ("NON_PROFESSIONAL",),
    "SETUP": PROFESSIONAL_KINDS,
    "DATA": PROFESSIONAL_KINDS,
    "REDISTRIBUTION": PROFESSIONAL_KINDS,
    "AD_HOC": ("NON_PROFESSIONAL",),
    "OTHER_REQUEST": PROFESSIONAL_KINDS + ("NON_PROFESSIONAL",),
}

FEE_ERROR_CODES: dict[str, str] = {
    "ORG_UNKNOWN": "no organisation with this id, MPID or name",
    "PRODUCT_INVALID": "not one of the billable products",
    "PRODUCT_NOT_FOR_KIND": "this kind of organisation cannot take this product",
    "DATA_SET_REQUIRED": "the product is per data set: give CORP or AGCY",
    "DATA_SET_INVALID": "a data set is CORP or AGCY (and none for CTCI, SETUP, AD_HOC, OTHER_REQUEST)",
    "DATE_INVALID": "a date is YYYY-MM-DD",
    "END_BEFORE_START": "the end date (last day of service) is before the start date",
    "QUANTITY_INVALID": "a quantity is a whole number from 1 to 1,000,000 (more than 1 only for BTDS_TERMINAL)",
    "SUBSCRIPTION_UNKNOWN": "no subscription with this id",
    "ORDER_UNKNOWN": "no Historic order with this id",
    "RECORD_REQUIRED": "void names exactly one record: a subscription or a Historic order",
    "REASON_REQUIRED": "a void says why the record is void (at most 200 characters)",
    "ALREADY_VOIDED": "the record is already void",
    "ORDER_IN_USE": "a later order needs this one (a DATA order its SETUP, a REDISTRIBUTION its DATA): void that first",
    "USER_UNKNOWN": "no user ID with this username",
    "WEB_ACCESS_INVALID": "a web access level is LEVEL_I, LEVEL_II or NONE",
    "YEAR_REQUIRED": "DATA and REDISTRIBUTION orders name a calendar year of data",
    "YEAR_INVALID": "the year is before TRACE began",
    "YEAR_INCLUDED": "the 2003 Historic Corporate Bond Data Set includes 2002: order 2003",
    "YEAR_NOT_AVAILABLE": "the year's data is not yet aged for Historic TRACE Data on the order date",
    "SETUP_REQUIRED": "record the one-time SETUP order before DATA",
    "SETUP_ALREADY_RECORDED": "the set-up fee is charged once per organisation",
    "DATA_ALREADY_PURCHASED": "this data set and year was already ordered",
    "DATA_REQUIRED": "re-distribution needs a DATA order for the same data set and year",
    "RECIPIENT_REQUIRED": "a re-distribution order names its recipient",
    "CUSIPS_INVALID": "a re-distribution order counts from 1 to 1,000,000,000 CUSIPs",
    "COST_INVALID": "an amount is dollars in plain digits (thousands separators in groups of three and a leading $ "
                    "allowed) with at most 2 decimals, from 0 to 999,999,999.99: no sign, no exponent (1e3)",
    "DESCRIPTION_REQUIRED": "an OTHER_REQUEST order describes the data supplied",
    "FIELD_NOT_ALLOWED": "the field does not apply to this product",
    "MONTH_INVALID": "a month is YYYY-MM from 0001-01 to 9999-11 (the last month whose end a date can hold)",
    "FORMAT_INVALID": "invoice formats are json, csv and html",
    "NO_SCHEDULE": "no fee schedule is in force in that month",
    "DATA_SETS_NOT_PRICED": "the schedule has no Level II rate for that many data sets",
    "SCHEDULE_INVALID": "a fee schedule file is malformed",
    "OUT_NOT_EMPTY": "--out holds something other than an earlier run of the same month",
}


def _date(text: Any, field: str) -> dt.date:
    try:
        return dt.date.fromisoformat(str(text).strip())
    except ValueError:
        raise FeeError("DATE_INVALID", field, f"a date is YYYY-MM-DD; got {text!r}") from None


# Dollars as people write them: ASCII digits (thousands separators only in groups of three),
# an optional point and at most 2 decimals, an optional leading $. No sign, no exponent (1e3),
# no NaN or Infinity, no other scripts' digits; at most MAX_MONEY (cents fit any database integer).
_MONEY_RE = re.compile(r"\$?([0-9]+|[0-9]{1,3}(?:,[0-9]{3})+)(?:\.([0-9]{1,2}))?")
MAX_MONEY = Decimal("999999999.99")
MONEY_ACCEPTED = (f"dollars in plain digits (a leading $ and thousands separators in groups of three allowed) with "
                  f"at most 2 decimals, from 0 to {MAX_MONEY:,}, e.g. 12.50 or 1,250.00")
MAX_ID = 2**63 - 1  # the largest database id
MAX_QUANTITY = 10**6  # terminals on one subscription (as bondtape fees subscribe --quantity)
MAX_CUSIPS = 10**9  # CUSIPs on one re-distribution order (as bondtape fees historic-order --cusips)


def _echo(value: Any) -> str:
    text = str(value)
    return repr(text if len(text) <= 40 else text[:40] + "...")


def parse_money_c(text: Any, field: str) -> int:
    """Dollars as text (``12.50``, ``1,250``, ``$7``) to cents, exactly; else ``COST_INVALID``.

    The one check of a money amount for the command line and the website."""
    value = str(text).strip()
    match = _MONEY_RE.fullmatch(value)
    if match is None:
        raise FeeError("COST_INVALID", field, f"{MONEY_ACCEPTED}; got {_echo(text)}")
    dollars = Decimal(match.group(1).replace(",", "") + "." + (match.group(2) or "0"))
    if dollars > MAX_MONEY:
        raise FeeError("COST_INVALID", field, f"{MONEY_ACCEPTED}; got {_echo(text)}, above {MAX_MONEY:,}")
    return int(dollars * 100)


def find_organisation(conn: Connection, key: Any) -> Any:
    """An organisation by id, MPID or exact name."""
    text = str(key).strip()
    o = organisations.c
    if text.isascii() and text.isdigit():  # an id; one beyond any database id names nothing
        number = int(text)
        row = conn.execute(sa.select(organisations).where(o.id == number)).first() if number <= MAX_ID else None
    else:
        rows = conn.execute(sa.select(organisations).where(sa.or_(o.mpid == text.upper(), o.name == text))).all()
        row = rows[0] if len(rows) == 1 else None
    if row is None:
        raise FeeError("ORG_UNKNOWN", "organisation", f"no single organisation with id, MPID or name {_echo(text)}")
    return row


def _check_kind(org: Any, product: str) -> None:
    if org.kind not in PRODUCT_KINDS[product]:
        raise FeeError("PRODUCT_NOT_FOR_KIND", "product",
                       f"{product} is for {', '.join(PRODUCT_KINDS[product])} organisations; "
                       f"{org.name} is {org.kind}")


def _check_data_set(data_set: str | None, needed: bool, schedules: ScheduleBook, date: dt.date) -> str | None:
    accepted = schedules.at(date).data_sets
    if not needed:
        if data_set:
            raise FeeError("DATA_SET_INVALID", "data_set", "this product is not per data set: give none")
        return None
    if not data_set:
        raise FeeError("DATA_SET_REQUIRED", "data_set", f"give one of {', '.join(accepted)}")
    ds = data_set.strip().upper()
    if ds not in accepted:
        raise FeeError("DATA_SET_INVALID", "data_set", f"{data_set!r} is not one of {', '.join(accepted)}")
    return ds


def _conn(db: Engine | Connection):
    return db.begin() if isinstance(db, Engine) else _Nested(db)


class _Nested:
    def __init__(self, conn: Connection):
        self.conn = conn

    def __enter__(self) -> Connection:
        return self.conn

    def __exit__(self, *exc: Any) -> None:
        return None


def record_subscription(db: Engine | Connection, organisation: Any, product: str, *, start_date: str,
                        now_us: int, data_set: str | None = None, end_date: str | None = None,
                        quantity: int = 1, reference: str | None = None,
                        schedules: ScheduleBook | None = None) -> int:
    """Record a monthly service; returns its id."""
    schedules = schedules or default_schedules()
    product = (product or "").strip().upper()
    if product not in SUBSCRIPTION_PRODUCTS:
        raise FeeError("PRODUCT_INVALID", "product", f"one of {', '.join(SUBSCRIPTION_PRODUCTS)}")
    start = _date(start_date, "start_date")
    end = _date(end_date, "end_date") if end_date else None
    if end is not None and end < start:
        raise FeeError("END_BEFORE_START", "end_date", f"{end} is before the start date {start}")
    try:
        qty = int(quantity)
    except (TypeError, ValueError):
        raise FeeError("QUANTITY_INVALID", "quantity", f"a whole number; got {quantity!r}") from None
    if qty < 1 or qty > MAX_QUANTITY or (qty > 1 and product != "BTDS_TERMINAL"):
        raise FeeError("QUANTITY_INVALID", "quantity",
                       f"from 1 to {MAX_QUANTITY:,}; more than 1 only for BTDS_TERMINAL; got {_echo(quantity)}")
    with _conn(db) as conn:
        org = find_organisation(conn, organisation)
        _check_kind(org, product)
        ds = _check_data_set(data_set, product != "CTCI", schedules, max(start, schedules.versions[0].effective))
        return int(conn.execute(fee_subscriptions.insert().values(
            org_id=org.id, product=product, data_set=ds, quantity=qty, reference=reference,
            start_date=start.isoformat(), end_date=end.isoformat() if end else None, created_us=now_us,
        )).inserted_primary_key[0])


def _record_id(raw: Any, field: str, code: str, what: str) -> int:
    """A record id as given (text from the command line): a whole number from 1; else ``code``."""
    key = str(raw).strip()
    if not (key.isascii() and key.isdigit()) or not 1 <= int(key) <= MAX_ID:
        raise FeeError(code, field, f"a {what} id is a whole number from 1; got {_echo(raw)}")
    return int(key)


def end_subscription(db: Engine | Connection, subscription_id: Any, end_date: str) -> None:
    """Set the last day of service of a subscription."""
    end = _date(end_date, "end_date")
    sid = _record_id(subscription_id, "subscription", "SUBSCRIPTION_UNKNOWN", "subscription")
    with _conn(db) as conn:
        row = conn.execute(sa.select(fee_subscriptions).where(fee_subscriptions.c.id == sid)).first()
        if row is None:
            raise FeeError("SUBSCRIPTION_UNKNOWN", "subscription", f"no subscription {subscription_id}")
        if row.voided_us is not None:
            raise FeeError("ALREADY_VOIDED", "subscription", f"subscription {row.id} is void ({row.void_reason})")
        if end < dt.date.fromisoformat(row.start_date):
            raise FeeError("END_BEFORE_START", "end_date", f"{end} is before the start date {row.start_date}")
        conn.execute(fee_subscriptions.update().where(fee_subscriptions.c.id == row.id).values(end_date=end.isoformat()))


def record_historic_order(db: Engine | Connection, organisation: Any, product: str, *, order_date: str,
                          now_us: int, data_set: str | None = None, year: int | None = None,
                          recipient: str | None = None, cusips: int | None = None,
                          media_cost: Any = None, delivery_cost: Any = None, amount: Any = None,
                          description: str | None = None, schedules: ScheduleBook | None = None) -> int:
    """Record a Historic TRACE Data order (billed in the month of ``order_date``); returns its id."""
    schedules = schedules or default_schedules()
    product = (product or "").strip().upper()
    if product not in HISTORIC_PRODUCTS:
        raise FeeError("PRODUCT_INVALID", "product", f"one of {', '.join(HISTORIC_PRODUCTS)}")
    day = _date(order_date, "order_date")
    try:
        schedule = schedules.at(day)
    except FeeError as exc:  # before the first schedule: no Historic TRACE Data fees yet
        raise FeeError(exc.code, "order_date", exc.message) from None
    values: dict[str, Any] = {"product": product, "order_date": day.isoformat(), "created_us": now_us,
                              "description": (description or "").strip() or None}
    allowed = {
        "SETUP": set(), "DATA": {"data_set", "year"}, "REDISTRIBUTION": {"data_set", "year", "recipient", "cusips"},
        "AD_HOC": {"media_cost", "delivery_cost"}, "OTHER_REQUEST": {"amount"},
    }[product]
    given = {"data_set": data_set, "year": year, "recipient": recipient, "cusips": cusips,
             "media_cost": media_cost, "delivery_cost": delivery_cost, "amount": amount}
    for name, value in given.items():
        if value not in (None, "") and name not in allowed:
            raise FeeError("FIELD_NOT_ALLOWED", name, f"{name} does not apply to {product}")
    h = historic_orders.c
    live = h.voided_us.is_(None)  # a voided order counts for nothing
    with _conn(db) as conn:
        org = find_organisation(conn, organisation)
        _check_kind(org, product)
        values["org_id"] = org.id
        if product in ("DATA", "REDISTRIBUTION"):
            values["data_set"] = _check_data_set(data_set, True, schedules, day)
            if year in (None, ""):
                raise FeeError("YEAR_REQUIRED", "year", "the calendar year of the data, e.g. 2008")
            try:
                y = int(year)
            except (TypeError, ValueError):
                raise FeeError("YEAR_REQUIRED", "year", f"a calendar year, e.g. 2008; got {year!r}") from None
            rules = default_rulebook().at(day)
            if y < rules.first_trace_date.year:
                raise FeeError("YEAR_INVALID", "year", f"TRACE data begins in {rules.first_trace_date.year}")
            if values["data_set"] == "CORP" and y == schedule.corporate_2002_in - 1:
                raise FeeError("YEAR_INCLUDED", "year",
                               f"the {schedule.corporate_2002_in} Historic Corporate Bond Data Set includes {y}: "
                               f"order {schedule.corporate_2002_in}")
            try:
                available = historic_available_from(y, rules)
            except (ValueError, OverflowError):  # after the end of the calendar (9999-12-31)
                available = None
            if available is None or available > day:
                raise FeeError("YEAR_NOT_AVAILABLE", "year",
                               f"{y} data is Historic TRACE Data only "
                               f"{f'from {available}' if available else 'after 9999-12-31'} "
                               f"(aged {rules.aging_months} months)")
            values["year"] = y
            data_orders = sa.select(h.id, h.order_date).where(
                h.org_id == org.id, h.product == "DATA", h.data_set == values["data_set"], h.year == y, live)
            # bought on or before this order's date (a re-distribution needs it); any DATA
            # order at all, whatever its date, makes another one a duplicate
            bought = conn.execute(data_orders.where(h.order_date <= day.isoformat())).first()
            ordered = bought or conn.execute(data_orders.order_by(h.order_date, h.id)).first()
        if product == "SETUP":
            if conn.execute(sa.select(h.id).where(h.org_id == org.id, h.product == "SETUP", live)).first():
                raise FeeError("SETUP_ALREADY_RECORDED", "product", f"{org.name} already has a set-up order")
        elif product == "DATA":
            if not conn.execute(sa.select(h.id).where(h.org_id == org.id, h.product == "SETUP", live,
                                                      h.order_date <= day.isoformat())).first():
                raise FeeError("SETUP_REQUIRED", "product", f"{org.name} has no SETUP order on or before {day}")
            if ordered:
                raise FeeError("DATA_ALREADY_PURCHASED", "year",
                               f"{org.name} already ordered {values['data_set']} {values['year']} "
                               f"(order {ordered.id} of {ordered.order_date}): the data fee is charged once")
        elif product == "REDISTRIBUTION":
            if not bought:
                raise FeeError("DATA_REQUIRED", "year",
                               f"{org.name} has no DATA order for {values['data_set']} {values['year']} on or before {day}")
            if not (recipient or "").strip():
                raise FeeError("RECIPIENT_REQUIRED", "recipient", "the name of the recipient of the re-distributed data")
            try:
                n = int(cusips)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise FeeError("CUSIPS_INVALID", "cusips", f"a whole number of CUSIPs; got {cusips!r}") from None
            if not 1 <= n <= MAX_CUSIPS:
                raise FeeError("CUSIPS_INVALID", "cusips", f"from 1 to {MAX_CUSIPS:,}; got {_echo(cusips)}")
            values.update(recipient=recipient.strip(), cusips=n)
        elif product == "AD_HOC":
            values["media_cost_c"] = parse_money_c(media_cost if media_cost not in (None, "") else "0", "media_cost")
            values["delivery_cost_c"] = parse_money_c(delivery_cost if delivery_cost not in (None, "") else "0",
                                                      "delivery_cost")
        elif product == "OTHER_REQUEST":
            if not values["description"]:
                raise FeeError("DESCRIPTION_REQUIRED", "description", "what data was supplied")
            values["amount_c"] = parse_money_c(amount if amount not in (None, "") else "", "amount")
        return int(conn.execute(historic_orders.insert().values(**values)).inserted_primary_key[0])


def void_record(db: Engine | Connection, *, reason: Any, now_us: int, subscription_id: Any = None,
                order_id: Any = None) -> None:
    """Void a subscription or a Historic order keyed wrong: it stays in the records, with
    when and why (``voided_us``, ``void_reason``), and is billed in no month, including a
    month run again. Record the correct one anew. An order a later live order needs (the
    SETUP of a DATA order, the DATA of a REDISTRIBUTION) is refused with ``ORDER_IN_USE``."""
    given = [(k, v) for k, v in (("subscription", subscription_id), ("order", order_id)) if v not in (None, "")]
    if len(given) != 1:
        raise FeeError("RECORD_REQUIRED", "record", "give one subscription id or one Historic order id")
    field, raw = given[0]
    text = (reason or "").strip() if isinstance(reason, str) or reason is None else str(reason).strip()
    if not text or len(text) > 200:
        raise FeeError("REASON_REQUIRED", "reason", f"why the record is void, 1 to 200 characters; got {_echo(text)}")
    table = fee_subscriptions if field == "subscription" else historic_orders
    unknown = "SUBSCRIPTION_UNKNOWN" if field == "subscription" else "ORDER_UNKNOWN"
    what = "subscription" if field == "subscription" else "Historic order"
    key = _record_id(raw, field, unknown, what)
    with _conn(db) as conn:
        row = conn.execute(sa.select(table).where(table.c.id == key)).first()
        if row is None:
            raise FeeError(unknown, field, f"no {what} {key}")
        if row.voided_us is not None:
            raise FeeError("ALREADY_VOIDED", field, f"{what} {row.id} is already void ({row.void_reason})")
        if table is historic_orders and row.product in ("SETUP", "DATA"):
            h = historic_orders.c
            needs = (sa.select(h.id).where(h.org_id == row.org_id, h.product == "DATA", h.voided_us.is_(None))
                     if row.product == "SETUP" else
                     sa.select(h.id).where(h.org_id == row.org_id, h.product == "REDISTRIBUTION",
                                           h.data_set == row.data_set, h.year == row.year, h.voided_us.is_(None)))
            users = [str(r.id) for r in conn.execute(needs.order_by(h.id))]
            if users:
                raise FeeError("ORDER_IN_USE", field,
                               f"{row.product} order {row.id} is needed by order(s) {', '.join(users)}: void them first")
        conn.execute(table.update().where(table.c.id == row.id).values(voided_us=now_us, void_reason=text))


WEB_ACCESS_LEVELS = ("LEVEL_I", "LEVEL_II", "NONE")


def set_web_access(db: Engine | Connection, username: str, level: str, data_sets: str | None = None,
                   schedules: ScheduleBook | None = None) -> None:
    """Set a user ID's web access level for the system fees (the shared ``users`` table's
    ``web_access`` and ``web_data_sets``). Level II names one or more data sets; Level I and
    NONE none. Access decides what the user may do; this records what is billed."""
    from bondtape.access.schema import users

    schedules = schedules or default_schedules()
    level = (level or "").strip().upper()
    if level not in WEB_ACCESS_LEVELS:
        raise FeeError("WEB_ACCESS_INVALID", "level", f"one of {', '.join(WEB_ACCESS_LEVELS)}")
    sets = [s.strip().upper() for s in (data_sets or "").split(",") if s.strip()]
    accepted = schedules.at(schedules.versions[-1].effective).data_sets
    if level == "LEVEL_II":
        if not sets:
            raise FeeError("DATA_SET_REQUIRED", "data_sets", f"Level II includes one or more of {', '.join(accepted)}")
        bad = [s for s in sets if s not in accepted]
        if bad or len(set(sets)) != len(sets):
            raise FeeError("DATA_SET_INVALID", "data_sets", f"distinct data sets among {', '.join(accepted)}; got {data_sets!r}")
    elif sets:
        raise FeeError("DATA_SET_INVALID", "data_sets", f"{level} includes no data sets")
    with _conn(db) as conn:
        row = conn.execute(sa.select(users.c.id).where(users.c.username == (username or "").strip())).first()
        if row is None:
            raise FeeError("USER_UNKNOWN", "user", f"no user ID {username!r}")
        conn.execute(users.update().where(users.c.id == row.id).values(web_access=level, web_data_sets=",".join(sets)))


def list_records(conn: Connection, org_id: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """Subscriptions and Historic orders (of one organisation, or all)."""
    subs = sa.select(fee_subscriptions).order_by(fee_subscriptions.c.id)
    orders = sa.select(historic_orders).order_by(historic_orders.c.id)
    if org_id is not None:
        subs = subs.where(fee_subscriptions.c.org_id == org_id)
        orders = orders.where(historic_orders.c.org_id == org_id)
    return {
        "subscriptions": [dict(r._mapping) for r in conn.execute(subs)],
        "historic_orders": [dict(r._mapping) for r in conn.execute(orders)],
    }

"""Monthly invoices under Rule 7730: one per organisation, every line traceable to sources.

Two steps. :func:`collect` reads one month's billable facts from the database (reports,
journal actions, user IDs, subscriptions, Historic orders). :func:`price` is pure: it turns
those facts and a :class:`~bondtape.fees.schedule.Schedule` into :class:`Invoice` objects.
:func:`build_invoices` does both.

Rounding: each line's amount is the exact sum of its charges rounded once to the cent
(half up, the schedule's ``rounding``); the invoice total is the sum of its line amounts.
"""
from __future__ import annotations

import datetime as dt
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from typing import Any, Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from bondtape.access.schema import organisations, user_service_breaks, users
from bondtape.clock import MARKET_TZ, to_us
from bondtape.db import reading
from bondtape.fees.schedule import FeeError, Schedule, ScheduleBook, default_schedules, exact, month_bounds, round_money
from bondtape.fees.schema import fee_subscriptions, fees_report_index, historic_orders
from bondtape.journal.schema import journal, trade_reports

__all__ = ["Invoice", "Line", "MonthInputs", "Organisation", "build_invoices", "collect", "price"]

DATA_SET_NAMES = {"CORP": "Corporate Bonds", "AGCY": "Agency"}
HISTORIC_SET_NAMES = {"CORP": "Historic Corporate Bond Data Set", "AGCY": "Historic Agency Data Set"}
ACTIONS = ("CANCEL", "CORRECT", "REVERSE")


@dataclass(frozen=True)
class Organisation:
    id: int
    name: str
    kind: str
    mpid: str | None = None
    email: str | None = None
    created_us: int | None = None
    closed_us: int | None = None  # closed (left): its MPID may pass to another organisation


@dataclass(frozen=True)
class Line:
    code: str
    description: str
    quantity: Decimal
    unit: str
    rate: Decimal
    amount: Decimal  # rounded to the cent
    exact_amount: Decimal  # before rounding
    data_set: str | None = None
    sources: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code, "description": self.description, "data_set": self.data_set,
            "quantity": plain(self.quantity), "unit": self.unit, "rate": rate_text(self.rate),
            "amount": str(self.amount), "exact_amount": rate_text(self.exact_amount), "sources": self.sources,
        }


@dataclass(frozen=True)
class Invoice:
    number: str
    month: str
    organisation: Organisation
    schedule: str
    lines: tuple[Line, ...]
    rounding: str

    @property
    def total(self) -> Decimal:
        return sum((line.amount for line in self.lines), Decimal("0.00"))

    def as_dict(self) -> dict[str, Any]:
        org = self.organisation
        return {
            "invoice_number": self.number,
            "month": self.month,
            "organisation": {"id": org.id, "mpid": org.mpid, "name": org.name, "kind": org.kind, "email": org.email},
            "schedule": self.schedule,
            "currency": "USD",
            "rounding": self.rounding,
            "lines": [line.as_dict() for line in self.lines],
            "total": str(self.total),
        }


@dataclass
class ReportGroup:
    """Reports of one MPID in one tier with the same correction and late-as-of flags."""

    mpid: str
    tier: int
    correction: bool
    late_as_of: bool
    count: int
    par_c: int
    control_numbers: list[str]


@dataclass(frozen=True)
class Action:
    event_type: str  # CANCEL, CORRECT, REVERSE
    mpid: str
    control_number: str  # the journal event's control number
    seq: int


@dataclass(frozen=True)
class WebUser:
    id: int
    org_id: int
    username: str
    web_access: str
    data_sets: int
    activated_us: int


@dataclass(frozen=True)
class Subscription:
    id: int
    org_id: int
    product: str
    data_set: str | None
    quantity: int
    start_date: str
    end_date: str | None


@dataclass(frozen=True)
class HistoricOrder:
    id: int
    org_id: int
    product: str
    data_set: str | None
    year: int | None
    recipient: str | None
    cusips: int | None
    media_cost_c: int | None
    delivery_cost_c: int | None
    amount_c: int | None
    description: str | None
    order_date: str


@dataclass
class MonthInputs:
    month: str
    organisations: dict[int, Organisation]
    report_groups: list[ReportGroup]
    actions: list[Action]
    web_users: list[WebUser]
    subscriptions: list[Subscription]
    orders: list[HistoricOrder]  # ordered this month
    prior_redistribution: dict[tuple[int, str, str, int], int]  # CUSIPs before this month


@dataclass
class Unbilled:
    mpid: str
    reason: str
    reports: int
    actions: int

    def as_dict(self) -> dict[str, Any]:
        return {"mpid": self.mpid, "reason": self.reason, "reports": self.reports, "actions": self.actions}


# --- collect (database) -----------------------------------------------------------------


def month_us(month: str) -> tuple[int, int]:
    """[start, end) of a month in UTC microseconds, the month taken in market time."""
    first, last = month_bounds(month)
    nxt = last + dt.timedelta(days=1)
    return (to_us(dt.datetime(first.year, first.month, 1, tzinfo=MARKET_TZ)),
            to_us(dt.datetime(nxt.year, nxt.month, 1, tzinfo=MARKET_TZ)))


def _cn_key(cn: str) -> tuple[int, str]:
    return (len(cn), cn)


def _sorted_cns(lists: Iterable[list[str]]) -> list[str]:
    """Control numbers (decimal strings) of several groups, in numeric order."""
    merged = list(chain.from_iterable(lists))
    if len(set(map(len, merged))) <= 1:
        merged.sort()  # all of one length: text order is numeric order
    else:
        merged.sort(key=_cn_key)
    return merged


def _report_rows(conn: Connection, first: dt.date, last: dt.date, schedule: Schedule,
                 mpid: str | None = None) -> list[Any]:
    """Production reports received from ``first`` to ``last``, grouped by MPID, tier and flags,
    with their control numbers (comma-joined). One pass over the covering index
    ix_fees_trade_reports_month (named for SQLite, whose planner may otherwise prefer a
    skip-scan of the firm/date index with a row lookup per report)."""
    t1, t3 = (int(x) for x in schedule.tier_thresholds_c())
    sqlite = conn.dialect.name == "sqlite"
    concat = "group_concat(control_number)" if sqlite else "string_agg(CAST(control_number AS TEXT), ',')"
    hint = f"INDEXED BY {fees_report_index.name}" if sqlite else ""
    sql = sa.text(f"""
        SELECT reporting_mpid,
               CASE WHEN quantity_c <= {t1} THEN 1 WHEN quantity_c >= {t3} THEN 3 ELSE 2 END AS tier,
               CASE WHEN prior_control_number IS NULL THEN 0 ELSE 1 END AS corr,
               CASE WHEN as_of AND late THEN 1 ELSE 0 END AS asl,
               count(*), sum(quantity_c), {concat}
        FROM trade_reports {hint}
        WHERE report_date >= :first AND report_date <= :last AND NOT is_test
              {"AND reporting_mpid = :mpid" if mpid is not None else ""}
        GROUP BY 1, 2, 3, 4""")
    params = {"first": first.isoformat(), "last": last.isoformat()}
    if mpid is not None:
        params["mpid"] = mpid
    return conn.execute(sql, params).all()


def _report_groups(chunks: Iterable[list[Any]]) -> list[ReportGroup]:
    merged: dict[tuple[str, int, bool, bool], ReportGroup] = {}
    for rows in chunks:
        for r in rows:
            key = (r[0], int(r[1]), bool(r[2]), bool(r[3]))
            g = merged.get(key)
            cns = r[6].split(",")
            if g is None:
                merged[key] = ReportGroup(*key, int(r[4]), int(r[5]), cns)
            else:
                g.count += int(r[4])
                g.par_c += int(r[5])
                g.control_numbers.extend(cns)
    return list(merged.values())  # control numbers are sorted per invoice line (_sorted_cns)


def _parallel_report_groups(db: Engine, month: str, schedule: Schedule, workers: int) -> list[ReportGroup] | None:
    """The report groups read by ``workers`` connections, each over a run of days of the month.
    None where the database cannot be shared between connections (SQLite in memory)."""
    if workers < 2 or (db.dialect.name == "sqlite" and db.url.database in (None, "", ":memory:")):
        return None
    first, last = month_bounds(month)
    days = [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]
    size = -(-len(days) // workers)
    spans = [(days[i], days[min(i + size, len(days)) - 1]) for i in range(0, len(days), size)]

    def read(span: tuple[dt.date, dt.date]) -> list[Any]:
        with reading(db) as conn:
            return _report_rows(conn, span[0], span[1], schedule)

    with ThreadPoolExecutor(max_workers=len(spans)) as pool:
        return _report_groups(pool.map(read, spans))


def collect(conn: Connection, month: str, schedule: Schedule,
            report_groups: list[ReportGroup] | None = None, org_id: int | None = None) -> MonthInputs:
    """Read the facts that bill ``month`` (YYYY-MM); ``report_groups`` if already read.
    With ``org_id``, only what bills that organisation."""
    first, last = month_bounds(month)
    start_us, end_us = month_us(month)
    orgs = {r.id: Organisation(r.id, r.name, r.kind, r.mpid, r.email, r.created_us, r.closed_us) for r in conn.execute(
        sa.select(organisations.c.id, organisations.c.name, organisations.c.kind, organisations.c.mpid,
                  organisations.c.email, organisations.c.created_us, organisations.c.closed_us))}

    if org_id is not None:
        if org_id not in orgs:
            raise FeeError("ORG_UNKNOWN", "organisation", f"no organisation {org_id}")
        mpid = orgs[org_id].mpid
        orgs = {k: v for k, v in orgs.items() if k == org_id or (mpid and v.mpid == mpid)}
    only_mpid = (orgs[org_id].mpid or "") if org_id is not None else None
    groups = report_groups if report_groups is not None else _report_groups(
        [_report_rows(conn, first, last, schedule, only_mpid)])
    groups.sort(key=lambda g: (g.mpid, g.tier, g.correction, g.late_as_of))

    # Cancel / correct / reverse: journal events received in the month on production reports.
    j = journal.c
    actions = [Action(r.event_type, r.mpid, str(r.control_number), r.seq) for r in conn.execute(
        sa.select(j.event_type, j.mpid, j.control_number, j.seq)
        .select_from(journal.join(trade_reports, trade_reports.c.control_number == j.ref_control_number))
        .where(sa.text("journal.event_type <> 'NEW'"), j.event_type.in_(ACTIONS),
               j.recorded_us >= start_us, j.recorded_us < end_us, trade_reports.c.is_test == sa.false(),
               *([j.mpid == only_mpid] if only_mpid is not None else []))
        .order_by(j.seq)
    )]

    # Web user IDs in service at some time in the month: activated before its end, not
    # deactivated at or before its first instant (a user ID serves [activated, deactivated)),
    # and not out of service all of that time in one break (access's user_service_breaks,
    # [disabled, enabled): a user disabled and enabled again). Breaks are apart (a disable
    # comes after the enable before it), so an uncovered moment is in service. Billed once a
    # month however many periods fall in it.
    u, b = users.c, user_service_breaks.c
    out_all_month = sa.exists().where(
        b.user_id == u.id,
        sa.or_(b.disabled_us <= start_us, b.disabled_us <= u.activated_us),  # from max(month start, activation)
        sa.or_(b.enabled_us >= end_us, b.enabled_us >= u.deactivated_us))  # to min(month end, deactivation)
    web_users = []
    for r in conn.execute(
        sa.select(u.id, u.org_id, u.username, u.web_access, u.web_data_sets, u.activated_us)
        .where(u.web_access.in_(("LEVEL_I", "LEVEL_II")), u.activated_us.isnot(None), u.activated_us < end_us,
               *([u.org_id == org_id] if org_id is not None else []),
               sa.or_(u.deactivated_us.is_(None), u.deactivated_us > start_us),  # in service [activated, deactivated)
               ~out_all_month)
        .order_by(u.org_id, u.activated_us, u.id)
    ):
        sets = {s.strip().upper() for s in (r.web_data_sets or "").split(",") if s.strip()}
        web_users.append(WebUser(r.id, r.org_id, r.username, r.web_access, max(1, len(sets)), r.activated_us))

    # Subscriptions and Historic orders: never a voided one (keyed wrong, see void_record).
    s = fee_subscriptions.c
    subs = [Subscription(r.id, r.org_id, r.product, r.data_set, r.quantity, r.start_date, r.end_date)
            for r in conn.execute(
                sa.select(fee_subscriptions).where(
                    s.start_date <= last.isoformat(), s.voided_us.is_(None),
                    *([s.org_id == org_id] if org_id is not None else []),
                    sa.or_(s.end_date.is_(None), s.end_date >= first.isoformat()))
                .order_by(s.org_id, s.id))]

    h = historic_orders.c
    orders = [HistoricOrder(r.id, r.org_id, r.product, r.data_set, r.year, r.recipient, r.cusips, r.media_cost_c,
                            r.delivery_cost_c, r.amount_c, r.description, r.order_date)
              for r in conn.execute(sa.select(historic_orders).where(
                  h.order_date >= first.isoformat(), h.order_date <= last.isoformat(), h.voided_us.is_(None),
                  *([h.org_id == org_id] if org_id is not None else [])).order_by(h.org_id, h.id))]
    prior: dict[tuple[int, str, str, int], int] = {}
    keys = {(o.org_id, o.recipient, o.data_set, o.year) for o in orders if o.product == "REDISTRIBUTION"}
    if keys:
        for r in conn.execute(
            sa.select(h.org_id, h.recipient, h.data_set, h.year, sa.func.sum(h.cusips))
            .where(h.product == "REDISTRIBUTION", h.order_date < first.isoformat(), h.voided_us.is_(None),
                   h.org_id.in_(sorted({k[0] for k in keys})))
            .group_by(h.org_id, h.recipient, h.data_set, h.year)
        ):
            key = (r[0], r[1], r[2], r[3])
            if key in keys:
                prior[key] = int(r[4] or 0)
    return MonthInputs(month, orgs, groups, actions, web_users, subs, orders, prior)


# --- price (pure) -----------------------------------------------------------------------


def plain(value: Decimal) -> str:
    """A decimal without trailing zeros after the point, never in exponent form."""
    if value == value.to_integral_value():
        return format(value.quantize(Decimal("1")), "f")
    return format(value.normalize(), "f")


def rate_text(value: Decimal) -> str:
    """A rate or amount: at least 2 decimals, more only where the schedule has them."""
    n = value.normalize()
    return format(value.quantize(Decimal("0.01")), "f") if n.as_tuple().exponent >= -2 else format(n, "f")


def _money_text(value: Decimal) -> str:
    q = value.quantize(Decimal("1")) if value == value.to_integral_value() else value.normalize()
    return f"${q:,}"


class _Lines:
    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.items: list[Line] = []

    def add(self, code: str, description: str, quantity: Decimal | int, unit: str, rate: Decimal,
            sources: dict[str, list[str]] | None = None, data_set: str | None = None,
            exact_amount: Decimal | None = None) -> None:
        quantity = Decimal(quantity)
        with localcontext(exact()):
            amount = quantity * rate if exact_amount is None else exact_amount
        self.items.append(Line(code, description, quantity, unit, rate, round_money(amount, self.schedule.rounding),
                               amount, data_set, sources or {}))


def _reporting_lines(out: _Lines, groups: list[ReportGroup], actions: list[Action], sch: Schedule) -> None:
    by_tier: dict[int, list[ReportGroup]] = defaultdict(list)
    late: list[ReportGroup] = []
    for g in groups:
        if g.correction and not sch.correction_pays_reporting_fee:
            continue
        if g.late_as_of and not g.correction:
            late.append(g)
            if not sch.late_as_of_pays_reporting_fee:
                continue
        by_tier[g.tier].append(g)

    def cns(gs: list[ReportGroup]) -> list[str]:
        return _sorted_cns(g.control_numbers for g in gs)

    t1_par = f"${sch.tier1_max_par:,.0f}"
    t3_par = f"${sch.tier3_min_par:,.0f}"
    if by_tier.get(1):
        gs = by_tier[1]
        out.add("RPT_TIER1", f"Transaction reporting: trades up to and including {t1_par} par value",
                sum(g.count for g in gs), "trade", sch.tier1_fee, {"control_numbers": cns(gs)})
    if by_tier.get(2):
        gs = by_tier[2]
        n, par_c = sum(g.count for g in gs), sum(g.par_c for g in gs)
        with localcontext(exact()):
            thousands = Decimal(par_c) / 100_000
            rate = (sch.tier2_rate * 1000).normalize()
        out.add("RPT_TIER2",
                f"Transaction reporting: {n} trade(s) above {t1_par} and below {t3_par} par value, "
                f"par ${Decimal(par_c) / 100:,.2f} at {_money_text(rate)} per $1,000",
                thousands, "$1,000 of par", rate, {"control_numbers": cns(gs)})
    if by_tier.get(3):
        gs = by_tier[3]
        out.add("RPT_TIER3", f"Transaction reporting: trades of {t3_par} par value or more",
                sum(g.count for g in gs), "trade", sch.tier3_fee, {"control_numbers": cns(gs)})
    if late:
        out.add("RPT_AS_OF_LATE", "\"As/of\" trade late", sum(g.count for g in late), "trade", sch.as_of_late,
                {"control_numbers": cns(late)})
    names = {"CANCEL": ("RPT_CANCEL", "Cancel/Correct: cancellations"),
             "CORRECT": ("RPT_CORRECT", "Cancel/Correct: corrections"),
             "REVERSE": ("RPT_REVERSAL", "Cancel/Correct: reversals")}
    for event_type in ACTIONS:
        if event_type == "REVERSE" and not sch.reversal_pays_cancel_correct:
            continue
        acts = [a for a in actions if a.event_type == event_type]
        if acts:
            code, text = names[event_type]
            out.add(code, text, len(acts), "trade", sch.cancel_correct,
                    {"control_numbers": [a.control_number for a in acts]})


def _system_lines(out: _Lines, web: list[WebUser], subs: list[Subscription], sch: Schedule) -> None:
    level_i = [u for u in web if u.web_access == "LEVEL_I"]
    if level_i:
        out.add("SYS_LEVEL_I", "Level I trade report only web browser access, per user ID", len(level_i),
                "user ID-month", sch.level_i, {"users": [f"{u.id}:{u.username}" for u in level_i]})
    level_ii = sorted((u for u in web if u.web_access == "LEVEL_II"), key=lambda u: (u.activated_us, u.id))
    for first in (True, False):
        chosen = level_ii[:1] if first else level_ii[1:]
        for n in sorted({u.data_sets for u in chosen}):
            us = [u for u in chosen if u.data_sets == n]
            sets = "one data set" if n == 1 else ("two data sets" if n == 2 else f"{n} data sets")
            who = "single or first user ID" if first else "each additional user ID"
            try:
                rate = sch.level_ii_rate(first, n)
            except FeeError as exc:
                raise FeeError(exc.code, exc.field, f"{exc.message} (user IDs {[u.id for u in us]})") from None
            out.add(f"SYS_LEVEL_II_{'FIRST' if first else 'ADDITIONAL'}_{n}",
                    f"Level II full service web browser access, {who} (includes {sets})", len(us),
                    "user ID-month", rate, {"users": [f"{u.id}:{u.username}" for u in us]})
    ctci = [s for s in subs if s.product == "CTCI"]
    if ctci:
        out.add("SYS_CTCI", "CTCI/Third Party, per firm", 1, "firm-month", sch.ctci,
                {"subscriptions": [str(s.id) for s in ctci]})


def _market_data_lines(out: _Lines, org: Organisation, subs: list[Subscription], sch: Schedule) -> None:
    tax_exempt = org.kind == "TAX_EXEMPT"
    for ds in sch.data_sets:
        mine = [s for s in subs if s.data_set == ds]
        name = DATA_SET_NAMES.get(ds, ds)

        def pick(product: str) -> list[Subscription]:
            return [s for s in mine if s.product == product]

        unlimited, terminals = pick("BTDS_UNLIMITED"), pick("BTDS_TERMINAL")
        ids = lambda ss: {"subscriptions": [str(s.id) for s in ss]}  # noqa: E731
        if terminals:
            count = sum(s.quantity for s in terminals)
            if unlimited and sch.unlimited_covers_terminals:
                out.add("MD_BTDS_TERMINAL_COVERED",
                        f"BTDS Professional Real-Time Data Display, {name}: terminals covered by the unlimited-use fee",
                        count, "terminal-month", Decimal("0"), ids(terminals), ds)
            else:
                out.add("MD_BTDS_TERMINAL", f"BTDS Professional Real-Time Data Display, {name}, per terminal",
                        count, "terminal-month", sch.btds_terminal, ids(terminals), ds)
        if unlimited:
            out.add("MD_BTDS_UNLIMITED",
                    f"BTDS Professional Real-Time Data Display, {name}: flat fee for unlimited internal use",
                    1, "data set-month", sch.btds_unlimited, ids(unlimited), ds)
        feeds = pick("VENDOR_FEED")
        if feeds:
            if tax_exempt:
                out.add("MD_VENDOR_FEED_TAX_EXEMPT",
                        f"Vendor Real-Time Data Feed, {name}, qualifying Tax-Exempt Organization",
                        1, "data set-month", sch.vendor_feed_tax_exempt, ids(feeds), ds)
            else:
                out.add("MD_VENDOR_FEED", f"Vendor Real-Time Data Feed, {name}, continuous",
                        1, "data set-month", sch.vendor_feed, ids(feeds), ds)
        snaps = pick("VENDOR_SNAPSHOT")
        if snaps:
            out.add("MD_VENDOR_SNAPSHOT", f"Vendor Real-Time Data Feed, {name}, daily snapshot",
                    1, "data set-month", sch.vendor_snapshot, ids(snaps), ds)
        nonpro = pick("BTDS_NON_PROFESSIONAL")
        if nonpro:
            out.add("MD_BTDS_NON_PROFESSIONAL", f"BTDS Non-Professional Real-Time Data Display, {name}: no charge",
                    1, "data set-month", sch.btds_non_professional, ids(nonpro), ds)


def _historic_set(ds: str, year: int, sch: Schedule) -> str:
    text = f"{HISTORIC_SET_NAMES.get(ds, ds)}, calendar year {year}"
    if ds == "CORP" and year == sch.corporate_2002_in:
        text += f" (includes {year - 1})"
    return text


def _historic_lines(out: _Lines, org: Organisation, orders: list[HistoricOrder],
                    prior: dict[tuple[int, str, str, int], int], sch: Schedule) -> None:
    tax_exempt = org.kind == "TAX_EXEMPT"
    src = lambda os_: {"historic_orders": [str(o.id) for o in os_]}  # noqa: E731
    for o in orders:
        if o.product == "SETUP":
            if tax_exempt:
                out.add("HIS_SETUP_TAX_EXEMPT", "Historic TRACE Data set-up fee, qualifying Tax-Exempt Organization",
                        1, "one-time", sch.historic_setup_tax_exempt, src([o]))
            else:
                out.add("HIS_SETUP", "Historic TRACE Data set-up fee", 1, "one-time", sch.historic_setup, src([o]))
    for o in orders:
        if o.product == "DATA":
            if tax_exempt:
                out.add("HIS_DATA_TAX_EXEMPT",
                        f"Historic TRACE Data and bulk re-distribution, qualifying Tax-Exempt Organization: "
                        f"{_historic_set(o.data_set, o.year, sch)}",
                        1, "data set-year", sch.historic_data_tax_exempt, src([o]), o.data_set)
            else:
                out.add("HIS_DATA", f"Historic TRACE Data: {_historic_set(o.data_set, o.year, sch)}",
                        1, "data set-year", sch.historic_data, src([o]), o.data_set)
    redis: dict[tuple[str, str, int], list[HistoricOrder]] = defaultdict(list)
    for o in orders:
        if o.product == "REDISTRIBUTION":
            redis[(o.recipient, o.data_set, o.year)].append(o)
    for (recipient, ds, year), os_ in sorted(redis.items()):
        cusips = sum(o.cusips or 0 for o in os_)
        what = f"{_historic_set(ds, year, sch)}, to {recipient}"
        if tax_exempt:
            out.add("HIS_REDISTRIBUTION_TAX_EXEMPT",
                    f"Historic TRACE Data bulk re-distribution, {what}: included in the tax-exempt data fee",
                    cusips, "CUSIP", Decimal("0"), src(os_), ds)
            continue
        rate = sch.redistribution_per_cusip
        out.add("HIS_REDISTRIBUTION", f"Historic TRACE Data bulk re-distribution, {what}, per CUSIP",
                cusips, "CUSIP", rate, src(os_), ds)
        before = prior.get((org.id, recipient, ds, year), 0)
        with localcontext(exact()):
            gross = cusips * rate
            owed = min(sch.redistribution_cap, (before + cusips) * rate) - min(sch.redistribution_cap, before * rate)
            credit = owed - gross
        if credit:
            out.add("HIS_REDISTRIBUTION_CAP",
                    f"Cap of {_money_text(sch.redistribution_cap)} per data set per calendar year per recipient "
                    f"({what}; {before} CUSIP(s) billed in earlier months)",
                    1, "adjustment", credit, src(os_), ds)
    for o in orders:
        if o.product == "AD_HOC":
            label = o.description or f"order {o.id}"
            out.add("HIS_AD_HOC_MEDIA", f"Non-Professional ad-hoc Historic TRACE Data request ({label}): media",
                    1, "request", Decimal(o.media_cost_c or 0) / 100, src([o]))
            out.add("HIS_AD_HOC_DELIVERY",
                    f"Non-Professional ad-hoc Historic TRACE Data request ({label}): delivery",
                    1, "request", Decimal(o.delivery_cost_c or 0) / 100, src([o]))
        elif o.product == "OTHER_REQUEST":
            out.add("HIS_OTHER_REQUEST", f"Data supplied on request, Rule 7730(e): {o.description or ''}".rstrip(": "),
                    1, "request", Decimal(o.amount_c or 0) / 100, src([o]))


def price(inputs: MonthInputs, schedule: Schedule) -> tuple[list[Invoice], list[Unbilled]]:
    """Invoices for every organisation with something to bill in the month (pure)."""
    start_us, end_us = month_us(inputs.month)
    by_mpid: dict[str, list[Organisation]] = defaultdict(list)
    for org in inputs.organisations.values():
        if org.mpid:
            by_mpid[org.mpid].append(org)
    for mpid, found in by_mpid.items():
        # Access keeps one open organisation per MPID; one that closed may have passed it on.
        # Where several hold it, the month's reports go to the one open in the month (if
        # both were, the hand-over month, the MPID stays ambiguous).
        if len(found) > 1:
            open_then = [o for o in found if (o.closed_us is None or o.closed_us > start_us)
                         and (o.created_us is None or o.created_us < end_us)]
            if len(open_then) == 1:
                by_mpid[mpid] = open_then
    groups_by_org: dict[int, list[ReportGroup]] = defaultdict(list)
    actions_by_org: dict[int, list[Action]] = defaultdict(list)
    unbilled: dict[str, Unbilled] = {}

    def owner(mpid: str) -> Organisation | None:
        found = by_mpid.get(mpid, [])
        if len(found) == 1 and found[0].kind != "OPERATOR":
            return found[0]
        if mpid not in unbilled:
            reason = ("NO_ORGANISATION" if not found else
                      "MPID_AMBIGUOUS" if len(found) > 1 else "OPERATOR_NOT_BILLED")
            unbilled[mpid] = Unbilled(mpid, reason, 0, 0)
        return None

    for g in inputs.report_groups:
        org = owner(g.mpid)
        if org is None:
            unbilled[g.mpid].reports += g.count
        else:
            groups_by_org[org.id].append(g)
    for a in inputs.actions:
        org = owner(a.mpid)
        if org is None:
            unbilled[a.mpid].actions += 1
        else:
            actions_by_org[org.id].append(a)
    web_by_org: dict[int, list[WebUser]] = defaultdict(list)
    for u in inputs.web_users:
        web_by_org[u.org_id].append(u)
    subs_by_org: dict[int, list[Subscription]] = defaultdict(list)
    for s in inputs.subscriptions:
        subs_by_org[s.org_id].append(s)
    orders_by_org: dict[int, list[HistoricOrder]] = defaultdict(list)
    for o in inputs.orders:
        orders_by_org[o.org_id].append(o)

    ids = set(groups_by_org) | set(actions_by_org) | set(web_by_org) | set(subs_by_org) | set(orders_by_org)
    invoices = []
    for org_id in sorted(ids):
        org = inputs.organisations[org_id]
        if org.kind == "OPERATOR":
            continue
        out = _Lines(schedule)
        _system_lines(out, web_by_org.get(org_id, []), subs_by_org.get(org_id, []), schedule)
        _reporting_lines(out, groups_by_org.get(org_id, []), actions_by_org.get(org_id, []), schedule)
        _market_data_lines(out, org, subs_by_org.get(org_id, []), schedule)
        _historic_lines(out, org, orders_by_org.get(org_id, []), inputs.prior_redistribution, schedule)
        if not out.items:
            continue
        invoices.append(Invoice(
            number=f"{inputs.month}-{org_id:06d}", month=inputs.month, organisation=org, schedule=schedule.name,
            lines=tuple(out.items),
            rounding=f"each line's exact amount rounded to the cent ({schedule.rounding}); total = sum of lines",
        ))
    return invoices, sorted(unbilled.values(), key=lambda u: u.mpid)


def build_invoices(db: Engine | Connection, month: str, schedules: ScheduleBook | None = None,
                   workers: int | None = None, org_id: int | None = None
                   ) -> tuple[list[Invoice], list[Unbilled], Schedule]:
    """Collect and price ``month`` (YYYY-MM): (invoices, unbilled MPIDs, the schedule used).

    Given an Engine, the month's reports are read by ``workers`` connections at once
    (default: up to 4, one per CPU), each over a run of days; bill a month once it has
    closed, so that every connection sees the same reports. With ``org_id``, only that
    organisation's invoice is built (reading only its reports and those of its MPID's other
    holder, to bill each month's reports to the organisation that held the MPID): a list of
    one invoice, or none when it owes nothing that month.
    """
    schedule = (schedules or default_schedules()).for_month(month)
    if isinstance(db, Connection):
        inputs = collect(db, month, schedule, org_id=org_id)
    else:
        workers = min(4, os.cpu_count() or 1) if workers is None else workers
        groups = None if org_id is not None else _parallel_report_groups(db, month, schedule, workers)
        with reading(db) as conn:
            inputs = collect(conn, month, schedule, groups, org_id=org_id)
    invoices, unbilled = price(inputs, schedule)
    if org_id is not None:  # the other holder of its MPID was priced only to decide who held it
        invoices = [invoice for invoice in invoices if invoice.organisation.id == org_id]
    return invoices, unbilled, schedule

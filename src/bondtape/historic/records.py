"""Trade reports -> Historic TRACE records, column-wise in Arrow.

Which records an event gives (post-2012 Enhanced files):

- a new report: T, with its own reference number;
- a cancel: X, repeating the cancelled report's terms and reference number;
- a correction: C (the corrected report's terms and reference number) and R (the new terms,
  with the new report's own reference number);
- a reversal: Y, the reversed report's terms, the reversal's own reference number and
  ``asof_cd`` R.

X, C, R and Y name the report acted on in ``pr_trd_dt``/``orig_msg_seq_nb`` (and its full
number in ``prior_control_number``); every row names its chain's first report.

Two statements read the year: the reports *created* in it, in report-date order (T and R
rows), and the reports *closed* in it, in order of closing (X, C and Y rows). Each batch
they return becomes records with :func:`records` (every code, date, time, reference number
and exact decimal derived column-wise, no Python per row); :func:`day_table` puts one trade
report date's records in file order and numbers them.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles

from bondtape.historic.layout import COLUMNS, RECORD_FORMAT
from bondtape.journal.schema import trade_reports
from bondtape.rulebook.calendar import Calendar

REFERENCE_MODULUS = 10_000_000
MARKET_ZONE = "America/New_York"


def reference_number(control_number: int) -> str:
    """The Historic Reference Number: the last 7 digits of the control number, zero-padded."""
    return f"{control_number % REFERENCE_MODULUS:07d}"


# --- SQL -------------------------------------------------------------------------------
#
# The statements select raw columns only (no CASE: SQLite evaluates them slowly, row by
# row). A driver pays for every value it hands over, so the text columns travel as one
# SEPARATOR-joined string per row and the flags as one integer: 12 values a row instead of
# 33. Never an MPID: reporting_mpid, contra and client_ref stay behind.

t = trade_reports
_prior = trade_reports.alias("prior")
SEPARATOR = "\x1f"  # ASCII unit separator: never in a symbol, CUSIP, date or code
TEXT_FIELDS = ("symbol", "cusip", "side", "capacity", "contra_type", "trading_market", "remuneration",
               "modifier3", "settlement_date", "execution_date", "first_report_date", "prior_report_date", "status")
FLAGS = ("when_issued", "special_price", "weighted_average", "locked_in", "agu", "as_of", "disseminated")
STANDING_BIT = 1 << len(FLAGS)  # created rows: not closed before the end of the data set

# What a statement returns, in select order (both statements: the same columns).
SOURCE_SCHEMA = pa.schema([
    ("event_us", pa.int64()), ("event_seq", pa.int64()), ("control_number", pa.int64()),
    ("other_control_number", pa.int64()),  # created: the predecessor; closed: the successor
    ("first_control_number", pa.int64()), ("quantity_c", pa.int64()), ("price_u", pa.int64()),
    ("yield_u", pa.int64()), ("execution_us", pa.int64()), ("commission_c", pa.int64()),
    ("bits", pa.int64()), ("text", pa.string()),
])


class _Joined(sa.sql.functions.FunctionElement):
    """Text values joined with SEPARATOR, a null as an empty string (the first is never null)."""

    type = sa.String()
    inherit_cache = True
    name = "bondtape_joined"


@compiles(_Joined)
def _joined(element: _Joined, compiler, **kw) -> str:
    parts = list(element.clauses)
    text: sa.ColumnElement = sa.type_coerce(parts[0], sa.String)
    for part in parts[1:]:
        text = text + SEPARATOR + sa.func.coalesce(part, "")
    return compiler.process(text, **kw)


@compiles(_Joined, "sqlite")
def _joined_sqlite(element: _Joined, compiler, **kw) -> str:
    # one printf call (a null %s is empty) instead of a chain of || and coalesce, which
    # SQLite evaluates string by string: about a tenth less time reading the rows
    parts = list(element.clauses)
    return compiler.process(sa.func.printf(sa.literal(SEPARATOR.join(["%s"] * len(parts))), *parts), **kw)


def _text(prior_report_date: sa.ColumnElement, status: sa.ColumnElement) -> sa.ColumnElement:
    return _Joined(*[t.c[name] for name in TEXT_FIELDS[:-2]], prior_report_date, status)


def _bits(standing: sa.ColumnElement | None) -> sa.ColumnElement:
    bits = sa.cast(t.c[FLAGS[0]], sa.Integer)
    for i, name in enumerate(FLAGS[1:], start=1):
        bits = bits + (1 << i) * sa.cast(t.c[name], sa.Integer)
    if standing is not None:
        bits = bits + STANDING_BIT * sa.cast(standing, sa.Integer)
    return bits


def _in_data_set(sub: str) -> sa.ColumnElement:
    return sa.and_(t.c.data_set == sub, t.c.is_test == sa.false(), t.c.rule_144a == sa.false())


def _select(event_us, event_seq, other, standing, prior_report_date, status) -> sa.Select:
    return sa.select(event_us, event_seq, t.c.control_number, other, t.c.first_control_number, t.c.quantity_c,
                     t.c.price_u, t.c.yield_u, t.c.execution_us, t.c.commission_c, _bits(standing),
                     _text(prior_report_date, status))


def created_select(sub: str, first_day: dt.date, last_day: dt.date, end_us: int,
                   control_numbers: tuple[int, int] | None = None) -> sa.Select:
    """Reports created on trade report dates first_day..last_day, by report date: T and R.

    With ``control_numbers`` (low, high), the rows are read from that stretch of the table in
    control-number order, which must then be report-date order too (:func:`plan_runs`); else
    through the report-date index, which SQLite follows row by row into the table (about
    half the reading time on a large year, 2026-11-24).
    """
    standing = sa.or_(t.c.closed_us.is_(None), t.c.closed_us >= end_us)
    stmt = (
        _select(t.c.report_us, t.c.seq, t.c.prior_control_number, standing, _prior.c.report_date, sa.literal(""))
        .select_from(t.outerjoin(_prior, _prior.c.control_number == t.c.prior_control_number))
        .where(t.c.report_date >= first_day.isoformat(), t.c.report_date <= last_day.isoformat(), _in_data_set(sub))
    )
    if control_numbers is None:
        return stmt.order_by(t.c.report_date)
    return stmt.where(t.c.control_number.between(*control_numbers))


# Each trade report date of a range that has reports: its lowest and highest control number
# and its number of reports (every report: the order of the table is what matters).
DAY_SPANS_SCHEMA = pa.schema([("report_date", pa.string()), ("low", pa.int64()), ("high", pa.int64()),
                              ("reports", pa.int64())])


def day_spans_select(first_day: dt.date, last_day: dt.date) -> sa.Select:
    """:data:`DAY_SPANS_SCHEMA` for first_day..last_day, by date (read from an index alone)."""
    return (sa.select(t.c.report_date, sa.func.min(t.c.control_number), sa.func.max(t.c.control_number),
                      sa.func.count())
            .where(t.c.report_date >= first_day.isoformat(), t.c.report_date <= last_day.isoformat())
            .group_by(t.c.report_date).order_by(t.c.report_date))


@dataclasses.dataclass(frozen=True)
class Run:
    """Consecutive trade report dates read with one statement: in control-number order from
    ``control_numbers`` (low, high), or through the report-date index when None."""

    first: dt.date
    last: dt.date
    control_numbers: tuple[int, int] | None


def plan_runs(spans: Iterable[tuple[str, int, int, int]], slack: int = 2) -> list[Run]:
    """How to read the created reports of the days of ``spans`` (date, lowest and highest
    control number, reports; by date) in report-date order.

    Reports are numbered as they arrive, so a day's reports usually follow the day before's:
    then a stretch of days is read in control-number order, one table page after the next.
    A day whose numbers reach into the next day's (reports sent in with an earlier report
    time, ``--use-report-time``) ends its stretch, since control-number order would then mix
    the two days. A stretch whose numbers are mostly other days' reports (more than
    ``slack`` numbers for each of its own) is read through the report-date index instead.
    """
    runs: list[list] = []  # [first, last, low, high, reports]
    for date, low, high, reports in spans:
        day = dt.date.fromisoformat(date)
        if runs and low > runs[-1][3]:
            runs[-1][1], runs[-1][3] = day, high
            runs[-1][4] += reports
        else:
            runs.append([day, day, low, high, reports])
    return [Run(first, last, (low, high) if high - low + 1 <= slack * reports else None)
            for first, last, low, high, reports in runs]


def closed_select(sub: str, lo_us: int, hi_us: int) -> sa.Select:
    """Reports closed in [lo_us, hi_us), in order of closing: X, C and Y records."""
    return (
        _select(t.c.closed_us, t.c.closed_seq, t.c.successor_control_number, None, t.c.report_date, t.c.status)
        .where(t.c.closed_us >= lo_us, t.c.closed_us < hi_us, _in_data_set(sub))
        .order_by(t.c.closed_us, t.c.closed_seq)
    )


# --- Arrow ------------------------------------------------------------------------------

# Arguments to compute functions are Arrow scalars: a Python literal is converted on each
# call, and pyarrow's conversion retries a (failing) numpy import every time.
_STR = {v: pa.scalar(v, pa.string()) for v in ("", "Y", "N", "A", "R", "T", "X", "C", "W", "Z", "U", "@", "-", "D",
                                               "B", "S", "CANCELLED", "CORRECTED", "REVERSED", "2016-07-18")}
_NULL = pa.scalar(None, pa.string())
_INDEX = [pa.scalar(i, pa.int32()) for i in range(len(TEXT_FIELDS))]
_BIT = {name: pa.scalar(1 << i, pa.int64()) for i, name in enumerate(FLAGS)}
_STANDING = pa.scalar(STANDING_BIT, pa.int64())
_ZERO = pa.scalar(0, pa.int64())
_FALSE = pa.scalar(False)
_EPOCH = dt.date(1970, 1, 1)

# Record keys kept beside the layout's columns until a day is put in file order.
DAY, EVENT_US, EVENT_SEQ, ORDER, STANDING = "_day", "_event_us", "_event_seq", "_order", "_standing"
_SORT_KEYS = [(EVENT_US, "ascending"), (EVENT_SEQ, "ascending"), (ORDER, "ascending")]


def _decimal(ints: pa.Array, typ: pa.Decimal128Type) -> pa.Array:
    """Scaled integers (cents, millionths) as exact decimals: the integer is the unscaled value."""
    limit = 10 ** typ.precision
    bounds = pc.min_max(ints)
    if bounds["min"].is_valid and not (-limit < bounds["min"].as_py() and bounds["max"].as_py() < limit):
        raise ValueError(f"a value does not fit {typ}: {bounds['min']}..{bounds['max']} (scaled)")
    unscaled = ints.cast(pa.decimal128(19, 0))  # every int64 fits; same 16-byte layout as typ
    return pa.Array.from_buffers(typ, len(unscaled), unscaled.buffers(), unscaled.null_count, unscaled.offset)


def _local(us: pa.Array) -> pa.Array:
    return pc.local_timestamp(us.view(pa.timestamp("us", tz=MARKET_ZONE)))


def _reference(control_numbers: pa.Array) -> pa.Array:
    # control numbers have at least 10 digits: the last 7 characters are the reference number
    return pc.utf8_slice_codeunits(control_numbers.cast(pa.string()), start=-7)


def _yes(mask: pa.Array, yes: str, no: str | None = None) -> pa.Array:
    return pc.if_else(mask, _STR[yes], _NULL if no is None else _STR[no])


def _is(column: pa.Array, value: str) -> pa.Array:
    return pc.fill_null(pc.equal(column, _STR[value]), _FALSE)


def _none_if_empty(column: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(column, _STR[""]), _NULL, column)


class SettlementDays:
    """Business days after the execution date up to and including the settlement date,
    column-wise: a table of cumulative business days, grown as dates need it."""

    def __init__(self, calendar: Calendar) -> None:
        self.calendar = calendar
        self.first = 0  # day number of cumulative[0]
        self.size = 0
        self._array: pa.Array | None = None

    def _cover(self, lo: int, hi: int) -> None:
        if self.size and self.first <= lo and hi < self.first + self.size:
            return
        if self.size:
            lo, hi = min(lo, self.first), max(hi, self.first + self.size - 1)
        first, last = lo - 31, hi + 31
        count, table = 0, []
        for n in range(first, last + 1):
            count += self.calendar.is_business_day(_EPOCH + dt.timedelta(days=n))
            table.append(count)
        self.first, self.size, self._array = first, len(table), pa.array(table, pa.int32())

    def __call__(self, execution: pa.Array, settlement: pa.Array) -> pa.Array:
        e, s = execution.cast(pa.int32()), settlement.cast(pa.int32())
        lo = pc.min_max(pc.min_element_wise(e, s))["min"].as_py()
        hi = pc.min_max(pc.max_element_wise(e, s))["max"].as_py()
        self._cover(lo, hi)
        assert self._array is not None
        first = pa.scalar(self.first, pa.int32())
        count = pc.subtract(pc.take(self._array, pc.subtract(s, first)), pc.take(self._array, pc.subtract(e, first)))
        return pc.max_element_wise(count, pa.scalar(0, pa.int32()))


def report_day(batch: pa.RecordBatch) -> pa.Array:
    """The trade report date (America/New_York) of each row of a statement's batch: the
    date of its event (the report, or the cancel, correction or reversal)."""
    return _local(batch.column("event_us")).cast(pa.date32())


def records(batch: pa.RecordBatch, created: bool, sub: str, settlement_days: SettlementDays) -> pa.Table:
    """One batch of either statement -> its records: the layout's columns (``rec_ct_nb`` still
    0) and the keys DAY, EVENT_US, EVENT_SEQ, ORDER, STANDING."""
    n = batch.num_rows
    c = dict(zip(SOURCE_SCHEMA.names, batch.columns))
    parts = pc.split_pattern(c["text"], SEPARATOR)
    text = {name: pc.list_element(parts, _INDEX[i]) for i, name in enumerate(TEXT_FIELDS)}
    for name in ("remuneration", "modifier3", "prior_report_date"):  # nullable: empty means none
        text[name] = _none_if_empty(text[name])
    bits = c["bits"]
    flag = {name: pc.not_equal(pc.bit_wise_and(bits, _BIT[name]), _ZERO) for name in FLAGS}
    control = c["control_number"]
    if created:  # T, or R: the new terms of a correction, its predecessor in other_control_number
        prior_cn = c["other_control_number"]
        reversal = pa.repeat(_FALSE, n)
        trc_st = pc.if_else(pc.is_null(prior_cn), _STR["T"], _STR["R"])
        own = control
        standing = pc.not_equal(pc.bit_wise_and(bits, _STANDING), _ZERO)
    else:  # X, C or Y: the closed report's terms; a reversal carries its own number
        status = text["status"]
        prior_cn = control
        reversal = _is(status, "REVERSED")
        trc_st = pc.if_else(_is(status, "CANCELLED"), _STR["X"], pc.if_else(_is(status, "CORRECTED"), _STR["C"], _STR["Y"]))
        own = pc.if_else(reversal, c["other_control_number"], control)
        standing = pa.repeat(_FALSE, n)
    side, capacity, modifier3 = text["side"], text["capacity"], text["modifier3"]
    buy, sell = _is(side, "B"), _is(side, "S")
    commission = pc.fill_null(c["commission_c"], _ZERO)
    yield_ = c["yield_u"]
    weighted = flag["weighted_average"]
    late = pc.or_(_is(modifier3, "Z"), _is(modifier3, "U"))
    after_hours_on_time = _is(modifier3, "T")
    indicator = pc.if_else(pc.less(text["execution_date"], _STR["2016-07-18"]),
                           pc.if_else(pc.not_equal(commission, _ZERO), _STR["Y"], _STR["N"]), _NULL)
    exec_local, report_local = _local(c["execution_us"]), _local(c["event_us"])
    time_s = pa.time32("s")
    settlement = text["settlement_date"].cast(pa.date32())
    report_day = report_local.cast(pa.date32())
    arrays = {
        "rec_ct_nb": pa.repeat(pa.scalar(0, pa.int64()), n),
        "msg_seq_nb": _reference(own),
        "trc_st": trc_st,
        "bond_sym_id": text["symbol"],
        "cusip_id": text["cusip"],
        "bloomberg_identifier": pa.nulls(n, pa.string()),
        "sub_prdct": pa.repeat(pa.scalar(sub, pa.string()), n),
        "wis_fl": _yes(flag["when_issued"], "Y", "N"),
        "cmsn_trd": pc.if_else(pc.is_valid(text["remuneration"]), text["remuneration"], indicator),
        "entrd_vol_qt": _decimal(c["quantity_c"], _TYPE["entrd_vol_qt"]),
        "rptd_pr": _decimal(c["price_u"], _TYPE["rptd_pr"]),
        "yld_sign_cd": pc.if_else(pc.less(yield_, _ZERO), _STR["-"], _NULL),
        "yld_pt": _decimal(pc.abs(yield_), _TYPE["yld_pt"]),
        "asof_cd": pc.if_else(reversal, _STR["R"], _yes(flag["as_of"], "A")),
        "trd_exctn_dt": exec_local.cast(pa.date32()),
        "trd_exctn_tm": exec_local.cast(pa.time64("us")).cast(time_s, safe=False),
        "trd_rpt_dt": report_day,
        "trd_rpt_tm": report_local.cast(pa.time64("us")).cast(time_s, safe=False),
        "stlmnt_dt": settlement,
        "trd_mod_3": modifier3,
        "trd_mod_4": _yes(weighted, "W"),
        "rpt_side_cd": side,
        "buy_cmsn_rt": _decimal(pc.if_else(buy, commission, _ZERO), _TYPE["buy_cmsn_rt"]),
        "buy_cpcty_cd": pc.if_else(buy, capacity, _NULL),
        "sell_cmsn_rt": _decimal(pc.if_else(sell, commission, _ZERO), _TYPE["sell_cmsn_rt"]),
        "sell_cpcty_cd": pc.if_else(sell, capacity, _NULL),
        "rptg_party_type": pa.repeat(_STR["D"], n),
        "cntra_mp_id": pc.if_else(_is(text["contra_type"], "D"), _STR["D"], _STR["C"]),
        "lckd_in_ind": _yes(flag["locked_in"], "Y"),
        "ats_indicator": pa.nulls(n, pa.string()),
        "spcl_trd_fl": _yes(flag["special_price"], "Y"),
        "trdg_mkt_cd": text["trading_market"],
        "dissem_fl": _yes(flag["disseminated"], "Y", "N"),
        "pr_trd_dt": text["prior_report_date"].cast(pa.date32()),
        "orig_msg_seq_nb": _reference(prior_cn),
        "first_trade_ctrl_date": text["first_report_date"].cast(pa.date32()),
        "first_trade_ctrl_num": _reference(c["first_control_number"]),
        "days_to_sttl_ct": settlement_days(text["execution_date"].cast(pa.date32()), settlement),
        "sale_cndtn_cd": pc.if_else(weighted, _STR["W"], pc.if_else(late, _STR["Z"], pc.if_else(
            after_hours_on_time, _STR["A"], _STR["@"]))),
        "sale_cndtn2_cd": pc.if_else(pc.and_(weighted, late), _STR["Z"], pc.if_else(
            pc.and_(weighted, after_hours_on_time), _STR["A"], pc.if_else(_is(modifier3, "U"), _STR["A"], _NULL))),
        "agu_qsr_id": _yes(flag["agu"], "A"),
        "control_number": own,
        "prior_control_number": prior_cn,
        "first_control_number": c["first_control_number"],
        "record_format": pa.repeat(pa.scalar(RECORD_FORMAT, pa.string()), n),
    }
    keys = {DAY: report_day, EVENT_US: c["event_us"], EVENT_SEQ: c["event_seq"],
            ORDER: pa.repeat(pa.scalar(1 if created else 0, pa.int8()), n), STANDING: standing}
    return pa.Table.from_arrays([arrays[col.name] for col in COLUMNS] + list(keys.values()), schema=RECORDS_SCHEMA)


def day_table(pieces: list[pa.Table], schema: pa.Schema) -> tuple[pa.Table, pa.Array, pa.Array]:
    """One trade report date's records in file order, numbered from 1: (the table in the
    layout's ``schema``, which stand in the final view, their journal seqs)."""
    day = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
    day = day.take(pc.sort_indices(day, sort_keys=_SORT_KEYS))
    n = day.num_rows
    columns = [pa.array(range(1, n + 1), pa.int64())] + [day.column(col.name) for col in COLUMNS[1:]]
    table = pa.Table.from_arrays(columns, schema=schema)
    return table, day.column(STANDING), day.column(EVENT_SEQ)


_TYPE = {c.name: c.type for c in COLUMNS}
RECORDS_SCHEMA = pa.schema([pa.field(c.name, c.type) for c in COLUMNS] + [
    pa.field(DAY, pa.date32()), pa.field(EVENT_US, pa.int64()), pa.field(EVENT_SEQ, pa.int64()),
    pa.field(ORDER, pa.int8()), pa.field(STANDING, pa.bool_())])

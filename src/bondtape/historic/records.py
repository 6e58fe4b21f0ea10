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

Two statements read each trade report date: the reports *created* on it (T and R rows) and
the reports *closed* on it (X, C and Y rows), each as one text that :func:`parse` turns into
a table. :func:`records` derives every code, date, time, reference number and exact
decimal column-wise (no Python per row); :func:`day_table` puts the day's records in file
order and numbers them.
"""
from __future__ import annotations

import datetime as dt
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.visitors import InternalTraversal

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
# Every statement returns one text: its rows as lines of SEPARATOR-delimited values, joined
# by the database itself (SQLite: printf and group_concat; PostgreSQL: concat and
# string_agg), which :func:`parse` turns into an Arrow table with pyarrow's CSV reader. A
# driver pays for every value it hands over; this way it hands over one a day, and the
# parsing runs in C++ with the GIL released. A null is an empty field. The statements read
# one trade report date each and select raw columns (no CASE: SQLite evaluates them slowly,
# row by row). Never an MPID: reporting_mpid, contra and client_ref stay behind.

t = trade_reports
_prior = trade_reports.alias("prior")
SEPARATOR = "\x1f"  # ASCII unit separator between values, a line feed between rows
TEXT_FIELDS = ("symbol", "cusip", "side", "capacity", "contra_type", "trading_market", "remuneration", "modifier3")
DATE_FIELDS = ("settlement_date", "execution_date", "first_report_date")
FLAGS = ("when_issued", "special_price", "weighted_average", "locked_in", "agu", "as_of", "disseminated")
STANDING_BIT = 1 << len(FLAGS)  # created rows: not closed before the end of the data set

# What a statement's lines hold, in order (both statements: the same columns).
SOURCE_SCHEMA = pa.schema(
    [("event_us", pa.int64()), ("event_seq", pa.int64()), ("control_number", pa.int64()),
     ("other_control_number", pa.int64()),  # created: the predecessor; closed: the successor
     ("first_control_number", pa.int64()), ("quantity_c", pa.int64()), ("price_u", pa.int64()),
     ("yield_u", pa.int64()), ("execution_us", pa.int64()), ("commission_c", pa.int64()), ("bits", pa.int64())]
    + [(name, pa.string()) for name in TEXT_FIELDS]
    + [(name, pa.date32()) for name in DATE_FIELDS]
    + [("prior_report_date", pa.date32()), ("status", pa.string())])


class _Lines(sa.sql.functions.FunctionElement):
    """The rows' values as one text: SEPARATOR between values, a line feed between rows, an
    empty field for a null; null when there are no rows. An aggregate: the select's rows."""

    type = sa.String()
    inherit_cache = True
    name = "bondtape_lines"


def _line_format(element: _Lines, placeholder: str) -> str:
    return SEPARATOR.join([placeholder] * len(list(element.clauses)))


@compiles(_Lines, "sqlite")
def _lines_sqlite(element: _Lines, compiler, **kw) -> str:
    # one printf a row (a null %s is empty): a chain of || copies the line once per value
    line = sa.func.printf(sa.literal(_line_format(element, "%s")), *element.clauses)
    return compiler.process(sa.func.group_concat(line, sa.literal("\n")), **kw)


@compiles(_Lines, "postgresql")
def _lines_postgresql(element: _Lines, compiler, **kw) -> str:
    # concat() takes a null as an empty string (no format(): its % would meet the driver's)
    parts: list = []
    for clause in element.clauses:
        parts += [clause, sa.literal(SEPARATOR)]
    return compiler.process(sa.func.string_agg(sa.func.concat(*parts[:-1]), sa.literal("\n")), **kw)


def lines_select(columns: list[sa.ColumnElement]) -> sa.Select:
    """``SELECT`` the rows of ``columns`` as one text (add FROM and WHERE): see :func:`parse`."""
    return sa.select(_Lines(*columns))


class _NoIndex(sa.sql.expression.ColumnElement):
    """A column SQLite must not look up through an index (``+column``): the day's reports are
    read from their stretch of control numbers, one table page after the next, and the
    report date only checked."""

    inherit_cache = True
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement)]  # part of the cache key

    def __init__(self, column: sa.ColumnElement) -> None:
        self.column = column
        self.type = column.type


@compiles(_NoIndex)
def _no_index(element: _NoIndex, compiler, **kw) -> str:
    return compiler.process(element.column, **kw)


@compiles(_NoIndex, "sqlite")
def _no_index_sqlite(element: _NoIndex, compiler, **kw) -> str:
    return "+" + compiler.process(element.column, **kw)


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
    return lines_select([event_us, event_seq, t.c.control_number, other, t.c.first_control_number, t.c.quantity_c,
                         t.c.price_u, t.c.yield_u, t.c.execution_us, t.c.commission_c, _bits(standing),
                         *[t.c[name] for name in TEXT_FIELDS + DATE_FIELDS], prior_report_date, status])


def created_select(sub: str, end_us: int, stretch: bool) -> sa.Select:
    """Reports created on the trade report date bound as ``day`` (YYYY-MM-DD): T and R records.

    With ``stretch``, read from the control numbers bound as ``low`` to ``high`` (SQLite:
    one table page after the next), the report date only checked; else through the
    report-date index, which SQLite follows row by row into the table (about half the
    reading time on a large year, 2026-11-24).
    """
    standing = sa.or_(t.c.closed_us.is_(None), t.c.closed_us >= end_us)
    day = sa.bindparam("day", type_=sa.String)
    stmt = (_select(t.c.report_us, t.c.seq, t.c.prior_control_number, standing, _prior.c.report_date, sa.literal(""))
            .select_from(t.outerjoin(_prior, _prior.c.control_number == t.c.prior_control_number))
            .where(_in_data_set(sub)))
    if not stretch:
        return stmt.where(t.c.report_date == day)
    return stmt.where(t.c.control_number.between(sa.bindparam("low", type_=sa.BigInteger),
                                                 sa.bindparam("high", type_=sa.BigInteger)),
                      _NoIndex(t.c.report_date) == day)


# Each trade report date of a range that has reports: its lowest and highest control number
# and its number of reports (every report: the order of the table is what matters).
def day_spans_select(first_day: dt.date, last_day: dt.date) -> sa.Select:
    """Lines of (report date, lowest and highest control number, reports) for
    first_day..last_day (read from an index alone): see :data:`DAY_SPANS_SCHEMA`."""
    spans = (sa.select(t.c.report_date.label("report_date"), sa.func.min(t.c.control_number).label("low"),
                       sa.func.max(t.c.control_number).label("high"), sa.func.count().label("reports"))
             .where(t.c.report_date >= first_day.isoformat(), t.c.report_date <= last_day.isoformat())
             .group_by(t.c.report_date).subquery())
    return lines_select([spans.c.report_date, spans.c.low, spans.c.high, spans.c.reports])


DAY_SPANS_SCHEMA = pa.schema([("report_date", pa.date32()), ("low", pa.int64()), ("high", pa.int64()),
                              ("reports", pa.int64())])


def plan_days(spans: Iterable[tuple[dt.date, int, int, int]], slack: int = 2) -> dict[dt.date, tuple[int, int] | None]:
    """How to read each day of ``spans`` (date, lowest and highest control number, reports):
    from its stretch of control numbers (low, high), or through the report-date index (None).

    Reports are numbered as they arrive, so a day's reports usually fill their stretch. A
    stretch whose numbers are mostly other days' reports (more than ``slack`` numbers for
    each of its own: reports sent in with an earlier report time, ``--use-report-time``)
    is read through the index instead.
    """
    return {day: (low, high) if high - low + 1 <= slack * reports else None for day, low, high, reports in spans}


def closed_select(sub: str) -> sa.Select:
    """Reports closed in [``lo_us``, ``hi_us``) (bound: one trade report date): X, C and Y records."""
    return (_select(t.c.closed_us, t.c.closed_seq, t.c.successor_control_number, None, t.c.report_date, t.c.status)
            .where(t.c.closed_us >= sa.bindparam("lo_us", type_=sa.BigInteger),
                   t.c.closed_us < sa.bindparam("hi_us", type_=sa.BigInteger), _in_data_set(sub)))


_PARSE = pacsv.ParseOptions(delimiter=SEPARATOR, quote_char=False, double_quote=False, escape_char=False,
                            newlines_in_values=False, ignore_empty_lines=False)


class UnreadableText(ValueError):
    """A statement's text does not split into its fields: a stored value holds the separator
    or a line break."""


class UnexpectedValue(ValueError):
    """A stored value is not of its column's type (an integer column holding text, a date
    column holding something else than YYYY-MM-DD)."""


def parse(data: bytes | None, schema: pa.Schema) -> pa.Table:
    """A statement's text (:func:`lines_select`; None: no rows) as a table of ``schema``.
    An empty field is null in a column of numbers or dates, an empty string in a text column
    (the caller decides which text columns take empty for none)."""
    if not data:
        return schema.empty_table()
    try:
        return pacsv.read_csv(
            pa.py_buffer(data),
            read_options=pacsv.ReadOptions(column_names=schema.names, block_size=1 << 20),
            parse_options=_PARSE,
            convert_options=pacsv.ConvertOptions(column_types=schema, null_values=[""], strings_can_be_null=False))
    except pa.ArrowInvalid as exc:
        detail = str(exc)[:300]
        if "Expected" in detail and "columns" in detail:  # a value holding the separator or a line break
            raise UnreadableText(f"a stored value cannot be read back as {len(schema)} fields: {detail}") from exc
        raise UnexpectedValue(f"a stored value is not of its column's type: {detail}") from exc


# --- Arrow ------------------------------------------------------------------------------

# Arguments to compute functions are Arrow scalars: a Python literal is converted on each
# call, and pyarrow's conversion retries a (failing) numpy import every time.
_STR = {v: pa.scalar(v, pa.string()) for v in ("", "Y", "N", "A", "R", "T", "X", "C", "W", "Z", "U", "@", "-", "D",
                                               "B", "S", "CANCELLED", "CORRECTED", "REVERSED")}
_NULL = pa.scalar(None, pa.string())
_REMUNERATION_FROM = pa.scalar(dt.date(2016, 7, 18), pa.date32())  # reported from this execution date
_BIT = {name: pa.scalar(1 << i, pa.int64()) for i, name in enumerate(FLAGS)}
_STANDING = pa.scalar(STANDING_BIT, pa.int64())
_ZERO = pa.scalar(0, pa.int64())
_FALSE = pa.scalar(False)
_EPOCH = dt.date(1970, 1, 1)

# Record keys kept beside the layout's columns until a day is put in file order (the
# control number last: a total order, whatever order the database returned the rows in).
EVENT_US, EVENT_SEQ, ORDER, STANDING = "_event_us", "_event_seq", "_order", "_standing"
_SORT_KEYS = [(EVENT_US, "ascending"), (EVENT_SEQ, "ascending"), (ORDER, "ascending"), ("control_number", "ascending")]


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


def _none_if_empty(column: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(column, _STR[""]), _NULL, column)


def _yes(mask: pa.Array, yes: str, no: str | None = None) -> pa.Array:
    return pc.if_else(mask, _STR[yes], _NULL if no is None else _STR[no])


def _is(column: pa.Array, value: str) -> pa.Array:
    return pc.fill_null(pc.equal(column, _STR[value]), _FALSE)


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


def records(table: pa.Table, created: bool, sub: str, settlement_days: SettlementDays) -> pa.Table:
    """One day's rows of either statement (:data:`SOURCE_SCHEMA`) -> its records: the
    layout's columns (``rec_ct_nb`` still 0) and the keys EVENT_US, EVENT_SEQ, ORDER, STANDING."""
    n = table.num_rows
    c = {name: table.column(name).combine_chunks() for name in SOURCE_SCHEMA.names}
    for name in ("remuneration", "modifier3"):  # nullable: empty means none
        c[name] = _none_if_empty(c[name])
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
        status = c["status"]
        prior_cn = control
        reversal = _is(status, "REVERSED")
        trc_st = pc.if_else(_is(status, "CANCELLED"), _STR["X"], pc.if_else(_is(status, "CORRECTED"), _STR["C"], _STR["Y"]))
        own = pc.if_else(reversal, c["other_control_number"], control)
        standing = pa.repeat(_FALSE, n)
    side, capacity, modifier3 = c["side"], c["capacity"], c["modifier3"]
    buy, sell = _is(side, "B"), _is(side, "S")
    commission = pc.fill_null(c["commission_c"], _ZERO)
    yield_ = c["yield_u"]
    weighted = flag["weighted_average"]
    late = pc.or_(_is(modifier3, "Z"), _is(modifier3, "U"))
    after_hours_on_time = _is(modifier3, "T")
    indicator = pc.if_else(pc.less(c["execution_date"], _REMUNERATION_FROM),
                           pc.if_else(pc.not_equal(commission, _ZERO), _STR["Y"], _STR["N"]), _NULL)
    exec_local, report_local = _local(c["execution_us"]), _local(c["event_us"])
    time_s = pa.time32("s")
    settlement = c["settlement_date"]
    report_day = report_local.cast(pa.date32())
    arrays = {
        "rec_ct_nb": pa.repeat(pa.scalar(0, pa.int64()), n),
        "msg_seq_nb": _reference(own),
        "trc_st": trc_st,
        "bond_sym_id": c["symbol"],
        "cusip_id": c["cusip"],
        "bloomberg_identifier": pa.nulls(n, pa.string()),
        "sub_prdct": pa.repeat(pa.scalar(sub, pa.string()), n),
        "wis_fl": _yes(flag["when_issued"], "Y", "N"),
        "cmsn_trd": pc.if_else(pc.is_valid(c["remuneration"]), c["remuneration"], indicator),
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
        "cntra_mp_id": pc.if_else(_is(c["contra_type"], "D"), _STR["D"], _STR["C"]),
        "lckd_in_ind": _yes(flag["locked_in"], "Y"),
        "ats_indicator": pa.nulls(n, pa.string()),
        "spcl_trd_fl": _yes(flag["special_price"], "Y"),
        "trdg_mkt_cd": c["trading_market"],
        "dissem_fl": _yes(flag["disseminated"], "Y", "N"),
        "pr_trd_dt": c["prior_report_date"],
        "orig_msg_seq_nb": _reference(prior_cn),
        "first_trade_ctrl_date": c["first_report_date"],
        "first_trade_ctrl_num": _reference(c["first_control_number"]),
        "days_to_sttl_ct": settlement_days(c["execution_date"], settlement),
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
    keys = {EVENT_US: c["event_us"], EVENT_SEQ: c["event_seq"],
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
    pa.field(EVENT_US, pa.int64()), pa.field(EVENT_SEQ, pa.int64()),
    pa.field(ORDER, pa.int8()), pa.field(STANDING, pa.bool_())])

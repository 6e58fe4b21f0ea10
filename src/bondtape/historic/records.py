"""Trade reports -> Historic TRACE records.

Which records an event gives (post-2012 Enhanced files):

- a new report: T, with its own reference number;
- a cancel: X, repeating the cancelled report's terms and reference number;
- a correction: C (the corrected report's terms and reference number) and R (the new terms,
  with the new report's own reference number);
- a reversal: Y, the reversed report's terms, the reversal's own reference number and
  ``asof_cd`` R.

X, C, R and Y name the report acted on in ``pr_trd_dt``/``orig_msg_seq_nb`` (and its full
number in ``prior_control_number``); every row names its chain's first report.

The database hands over each report's raw columns; every code, date, time, reference number
and exact decimal is derived column-wise in Arrow. Python touches each row only to sort the
day into file order.
"""
from __future__ import annotations

import datetime as dt
import decimal
from operator import itemgetter
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from bondtape.historic.layout import COLUMNS, RECORD_FORMAT
from bondtape.journal.schema import trade_reports
from bondtape.rulebook.calendar import Calendar

REFERENCE_MODULUS = 10_000_000
MARKET_ZONE = "America/New_York"


def reference_number(control_number: int) -> str:
    """The Historic Reference Number: the last 7 digits of the control number, zero-padded."""
    return f"{control_number % REFERENCE_MODULUS:07d}"


# --- SQL: one row per record ------------------------------------------------------------
#
# The statements select the report's raw columns only (no CASE: SQLite evaluates them
# slowly, row by row); every code is derived column-wise in Arrow. The text columns travel
# as one SEPARATOR-joined string per row and the flags as one integer, so the driver builds
# 19 Python objects per row instead of 40.

t = trade_reports
_prior = trade_reports.alias("prior")
SEPARATOR = "\x1f"  # ASCII unit separator: never in a symbol, CUSIP, date or code
TEXT_FIELDS = ("symbol", "cusip", "data_set", "side", "capacity", "contra_type", "trading_market",
               "remuneration", "modifier3", "settlement_date", "execution_date", "first_report_date")
FLAGS = ("when_issued", "special_price", "weighted_average", "locked_in", "agu", "as_of", "disseminated")
(EVENT_US, EVENT_SEQ, ORDER, CN, SUCCESSOR, PRIOR_CN, PRIOR_DATE, STATUS, CLOSED_US, QTY, PRICE, YIELD, EXEC_US,
 COMMISSION, FIRST_CN, FLAG_BITS, TEXT) = range(17)


def _columns(event_us: Any, event_seq: Any, order: int, successor: Any, prior_cn: Any, prior_date: Any,
             status: Any, closed_us: Any) -> list[Any]:
    """The select list (never an MPID: reporting_mpid, contra and client_ref stay behind)."""
    text = sa.type_coerce(t.c[TEXT_FIELDS[0]], sa.String)
    for name in TEXT_FIELDS[1:]:
        text = text + SEPARATOR + sa.func.coalesce(t.c[name], "")
    bits = sa.cast(t.c[FLAGS[0]], sa.Integer)
    for i, name in enumerate(FLAGS[1:], start=1):
        bits = bits + (1 << i) * sa.cast(t.c[name], sa.Integer)
    return [event_us, event_seq, sa.literal(order, sa.Integer), t.c.control_number, successor, prior_cn, prior_date,
            status, closed_us, t.c.quantity_c, t.c.price_u, t.c.yield_u, t.c.execution_us, t.c.commission_c,
            t.c.first_control_number, bits, text]


def _in_data_set(sub: str) -> Any:
    return sa.and_(t.c.data_set == sub, t.c.is_test == sa.false(), t.c.rule_144a == sa.false())


def created_select(sub: str) -> sa.Select:
    """Reports created on the date bound as ``report_date`` (YYYY-MM-DD): T and R records."""
    none = sa.null()
    return (
        sa.select(*_columns(t.c.report_us, t.c.seq, 1, sa.cast(none, sa.BigInteger), t.c.prior_control_number,
                            _prior.c.report_date, sa.cast(none, sa.String), t.c.closed_us))
        .select_from(t.outerjoin(_prior, _prior.c.control_number == t.c.prior_control_number))
        .where(t.c.report_date == sa.bindparam("report_date", type_=sa.String), _in_data_set(sub))
    )


def closed_select(sub: str, lo_us: int, hi_us: int) -> sa.Select:
    """Reports closed in [lo_us, hi_us), in order of closing: X, C and Y records."""
    return (
        sa.select(*_columns(t.c.closed_us, t.c.closed_seq, 0, t.c.successor_control_number, t.c.control_number,
                            t.c.report_date, t.c.status, sa.cast(sa.null(), sa.BigInteger)))
        .where(t.c.closed_us >= lo_us, t.c.closed_us < hi_us, _in_data_set(sub))
        .order_by(t.c.closed_us, t.c.closed_seq)
    )


# --- Arrow: a day's rows -> the layout's columns ---------------------------------------

_SCALE = {2: pa.scalar(decimal.Decimal("0.01"), pa.decimal128(3, 2)),
          6: pa.scalar(decimal.Decimal("0.000001"), pa.decimal128(7, 6))}
_FILE_ORDER = itemgetter(EVENT_US, EVENT_SEQ, ORDER)


def _decimal(values: Sequence[Any] | pa.Array, typ: pa.Decimal128Type) -> pa.Array:
    ints = values if isinstance(values, pa.Array) else pa.array(values, pa.int64())
    scaled = pc.multiply(ints.cast(pa.decimal128(19, 0)), _SCALE[typ.scale])
    return scaled.cast(typ)


def _local(values: Sequence[Any]) -> pa.Array:
    return pc.local_timestamp(pa.array(values, pa.timestamp("us", tz=MARKET_ZONE)))


def _reference(values: Sequence[Any] | pa.Array) -> pa.Array:
    # control numbers have at least 10 digits: the last 7 characters are the reference number
    ints = values if isinstance(values, pa.Array) else pa.array(values, pa.int64())
    return pc.utf8_slice_codeunits(ints.cast(pa.string()), start=-7)


_EPOCH = dt.date(1970, 1, 1)


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


# Arguments to compute functions are Arrow scalars: a Python literal is converted on each
# call, and pyarrow's conversion retries a (failing) numpy import every time.
_STR = {v: pa.scalar(v, pa.string()) for v in ("", "Y", "N", "A", "R", "T", "X", "C", "W", "Z", "U", "@", "-", "D",
                                               "B", "S", "CANCELLED", "CORRECTED", "REVERSED", "2016-07-18")}
_NULL = pa.scalar(None, pa.string())
_INDEX = [pa.scalar(i, pa.int32()) for i in range(len(TEXT_FIELDS))]
_BIT = {name: pa.scalar(1 << i, pa.int64()) for i, name in enumerate(FLAGS)}
_ZERO = pa.scalar(0, pa.int64())
_FALSE = pa.scalar(False)


def _yes(mask: pa.Array, yes: str, no: str | None = None) -> pa.Array:
    return pc.if_else(mask, _STR[yes], _NULL if no is None else _STR[no])


def _is(column: pa.Array, value: str) -> pa.Array:
    return pc.fill_null(pc.equal(column, _STR[value]), _FALSE)


def _text(values: Sequence[str]) -> dict[str, pa.Array]:
    parts = pc.split_pattern(pa.array(values, pa.string()), SEPARATOR)
    out = {name: pc.list_element(parts, _INDEX[i]) for i, name in enumerate(TEXT_FIELDS)}
    for name in ("remuneration", "modifier3"):  # nullable: empty means none
        out[name] = pc.if_else(pc.equal(out[name], _STR[""]), _NULL, out[name])
    return out


def day_table(rows: list[Sequence[Any]], schema: pa.Schema, settlement_days: "SettlementDays",
              year_end_us: int) -> tuple[pa.Table, pa.Array, list[int]]:
    """(the day's records in file order, which stand in the final view, their journal seqs)."""
    rows.sort(key=_FILE_ORDER)
    c = list(zip(*rows))
    n = len(rows)
    text = _text(c[TEXT])
    bits = pa.array(c[FLAG_BITS], pa.int64())
    flag = {name: pc.not_equal(pc.bit_wise_and(bits, _BIT[name]), _ZERO) for name in FLAGS}
    created = pc.equal(pa.array(c[ORDER], pa.int8()), pa.scalar(1, pa.int8()))
    status = pa.array(c[STATUS], pa.string())
    prior_cn = pa.array(c[PRIOR_CN], pa.int64())
    reversal = _is(status, "REVERSED")
    trc_st = pc.if_else(created, pc.if_else(pc.is_null(prior_cn), _STR["T"], _STR["R"]),
                        pc.if_else(_is(status, "CANCELLED"), _STR["X"],
                                   pc.if_else(_is(status, "CORRECTED"), _STR["C"], _STR["Y"])))
    control = pa.array(c[CN], pa.int64())
    own = pc.if_else(reversal, pa.array(c[SUCCESSOR], pa.int64()), control)
    closed_us = pa.array(c[CLOSED_US], pa.int64())
    standing = pc.and_(created, pc.fill_null(pc.greater_equal(closed_us, pa.scalar(year_end_us, pa.int64())), True))
    side, capacity, modifier3 = text["side"], text["capacity"], text["modifier3"]
    buy, sell = _is(side, "B"), _is(side, "S")
    commission = pc.fill_null(pa.array(c[COMMISSION], pa.int64()), _ZERO)
    yield_ = pa.array(c[YIELD], pa.int64())
    weighted = flag["weighted_average"]
    late = pc.or_(_is(modifier3, "Z"), _is(modifier3, "U"))
    after_hours_on_time = _is(modifier3, "T")
    indicator = pc.if_else(pc.less(text["execution_date"], _STR["2016-07-18"]),
                           pc.if_else(pc.not_equal(commission, _ZERO), _STR["Y"], _STR["N"]), _NULL)
    exec_local, report_local = _local(c[EXEC_US]), _local(c[EVENT_US])
    time_s = pa.time32("s")
    settlement = text["settlement_date"].cast(pa.date32())
    arrays = {
        "rec_ct_nb": pa.array(range(1, n + 1), pa.int64()),
        "msg_seq_nb": _reference(own),
        "trc_st": trc_st,
        "bond_sym_id": text["symbol"],
        "cusip_id": text["cusip"],
        "bloomberg_identifier": pa.nulls(n, pa.string()),
        "sub_prdct": text["data_set"],
        "wis_fl": _yes(flag["when_issued"], "Y", "N"),
        "cmsn_trd": pc.if_else(pc.is_valid(text["remuneration"]), text["remuneration"], indicator),
        "entrd_vol_qt": _decimal(c[QTY], COLUMNS_BY_NAME["entrd_vol_qt"].type),
        "rptd_pr": _decimal(c[PRICE], COLUMNS_BY_NAME["rptd_pr"].type),
        "yld_sign_cd": pc.if_else(pc.less(yield_, _ZERO), _STR["-"], _NULL),
        "yld_pt": _decimal(pc.abs(yield_), COLUMNS_BY_NAME["yld_pt"].type),
        "asof_cd": pc.if_else(reversal, _STR["R"], _yes(flag["as_of"], "A")),
        "trd_exctn_dt": exec_local.cast(pa.date32()),
        "trd_exctn_tm": exec_local.cast(pa.time64("us")).cast(time_s, safe=False),
        "trd_rpt_dt": report_local.cast(pa.date32()),
        "trd_rpt_tm": report_local.cast(pa.time64("us")).cast(time_s, safe=False),
        "stlmnt_dt": settlement,
        "trd_mod_3": modifier3,
        "trd_mod_4": _yes(weighted, "W"),
        "rpt_side_cd": side,
        "buy_cmsn_rt": _decimal(pc.if_else(buy, commission, _ZERO), COLUMNS_BY_NAME["buy_cmsn_rt"].type),
        "buy_cpcty_cd": pc.if_else(buy, capacity, _NULL),
        "sell_cmsn_rt": _decimal(pc.if_else(sell, commission, _ZERO), COLUMNS_BY_NAME["sell_cmsn_rt"].type),
        "sell_cpcty_cd": pc.if_else(sell, capacity, _NULL),
        "rptg_party_type": pa.array(["D"] * n, pa.string()),
        "cntra_mp_id": pc.if_else(_is(text["contra_type"], "D"), _STR["D"], _STR["C"]),
        "lckd_in_ind": _yes(flag["locked_in"], "Y"),
        "ats_indicator": pa.nulls(n, pa.string()),
        "spcl_trd_fl": _yes(flag["special_price"], "Y"),
        "trdg_mkt_cd": text["trading_market"],
        "dissem_fl": _yes(flag["disseminated"], "Y", "N"),
        "pr_trd_dt": pa.array(c[PRIOR_DATE], pa.string()).cast(pa.date32()),
        "orig_msg_seq_nb": _reference(prior_cn),
        "first_trade_ctrl_date": text["first_report_date"].cast(pa.date32()),
        "first_trade_ctrl_num": _reference(c[FIRST_CN]),
        "days_to_sttl_ct": settlement_days(text["execution_date"].cast(pa.date32()), settlement),
        "sale_cndtn_cd": pc.if_else(weighted, _STR["W"], pc.if_else(late, _STR["Z"], pc.if_else(
            after_hours_on_time, _STR["A"], _STR["@"]))),
        "sale_cndtn2_cd": pc.if_else(pc.and_(weighted, late), _STR["Z"], pc.if_else(
            pc.and_(weighted, after_hours_on_time), _STR["A"], pc.if_else(_is(modifier3, "U"), _STR["A"], _NULL))),
        "agu_qsr_id": _yes(flag["agu"], "A"),
        "control_number": own,
        "prior_control_number": prior_cn,
        "first_control_number": pa.array(c[FIRST_CN], pa.int64()),
        "record_format": pa.array([RECORD_FORMAT] * n, pa.string()),
    }
    table = pa.Table.from_arrays([arrays[col.name] for col in COLUMNS], schema=schema)
    return table, standing, list(c[EVENT_SEQ])


COLUMNS_BY_NAME = {c.name: c for c in COLUMNS}

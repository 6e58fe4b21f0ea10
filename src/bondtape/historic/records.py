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

The mapping is done where it is cheapest: the field codes in SQL (the same statement on
SQLite and PostgreSQL), dates, times, reference numbers and exact decimals column-wise in
Arrow. Python touches each row only to sort the day and to count settlement days.
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


# --- SQL: one row per record ----------------------------------------------------------

t = trade_reports
_prior = trade_reports.alias("prior")


def _yes(column: Any, yes: str = "Y", no: str | None = None) -> Any:
    return sa.case((column == sa.true(), yes), else_=sa.null() if no is None else no)


def _terms() -> list[Any]:
    """The record fields that come from the report's own terms (never an MPID)."""
    buy, sell = t.c.side == "B", t.c.side == "S"
    weighted = t.c.weighted_average == sa.true()
    late = sa.or_(t.c.modifier3 == "Z", t.c.modifier3 == "U")
    return [
        t.c.symbol, t.c.cusip, t.c.data_set,
        _yes(t.c.when_issued, "Y", "N"),
        sa.case((t.c.remuneration.is_not(None), t.c.remuneration),
                (t.c.execution_date < "2016-07-18",
                 sa.case((sa.and_(t.c.commission_c.is_not(None), t.c.commission_c != 0), "Y"), else_="N")),
                else_=sa.null()),
        t.c.quantity_c, t.c.price_u,
        sa.case((t.c.yield_u < 0, "-"), else_=sa.null()),
        sa.case((t.c.yield_u < 0, -t.c.yield_u), else_=t.c.yield_u),
        t.c.execution_us, t.c.settlement_date, t.c.modifier3,
        _yes(t.c.weighted_average, "W"),
        t.c.side,
        sa.case((buy, sa.func.coalesce(t.c.commission_c, 0)), else_=0),
        sa.case((buy, t.c.capacity), else_=sa.null()),
        sa.case((sell, sa.func.coalesce(t.c.commission_c, 0)), else_=0),
        sa.case((sell, t.c.capacity), else_=sa.null()),
        sa.case((t.c.contra_type == "D", "D"), else_="C"),
        _yes(t.c.locked_in), _yes(t.c.special_price), t.c.trading_market, _yes(t.c.disseminated, "Y", "N"),
        t.c.first_report_date, t.c.first_control_number, t.c.execution_date,
        sa.case((weighted, "W"), (late, "Z"), (t.c.modifier3 == "T", "A"), else_="@"),
        sa.case((sa.and_(weighted, late), "Z"), (sa.and_(weighted, t.c.modifier3 == "T"), "A"),
                (t.c.modifier3 == "U", "A"), else_=sa.null()),
        _yes(t.c.agu, "A"),
    ]


# positions in a fetched row
EVENT_US, EVENT_SEQ, ORDER, STATUS, OWN_CN, PRIOR_CN, PRIOR_DATE, STANDING, AS_OF = range(9)
(SYMBOL, CUSIP, DATA_SET, WIS, CMSN, QTY, PRICE, YSIGN, YABS, EXEC_US, SETTLE, MOD3, MOD4, SIDE, BUY_C, BUY_CAP,
 SELL_C, SELL_CAP, CONTRA, LOCKED, SPECIAL, MARKET, DISSEM, FIRST_DATE, FIRST_CN, EXEC_DATE, COND1, COND2,
 AGU) = range(9, 38)


def _in_data_set(sub: str) -> Any:
    return sa.and_(t.c.data_set == sub, t.c.is_test == sa.false(), t.c.rule_144a == sa.false())


def created_select(sub: str, year_end_us: int) -> sa.Select:
    """T and R records of the reports created on the date bound as ``report_date``
    (YYYY-MM-DD); STANDING: still standing at the end of the data set's year."""
    return (
        sa.select(
            t.c.report_us, t.c.seq, sa.literal(1),
            sa.case((t.c.prior_control_number.is_(None), "T"), else_="R"),
            t.c.control_number, t.c.prior_control_number, _prior.c.report_date,
            sa.case((sa.or_(t.c.closed_us.is_(None), t.c.closed_us >= year_end_us), 1), else_=0),
            _yes(t.c.as_of, "A"),
            *_terms(),
        )
        .select_from(t.outerjoin(_prior, _prior.c.control_number == t.c.prior_control_number))
        .where(t.c.report_date == sa.bindparam("report_date", type_=sa.String), _in_data_set(sub))
    )


def closed_select(sub: str, lo_us: int, hi_us: int) -> sa.Select:
    """X, C and Y records of the reports closed in [lo_us, hi_us), in order of closing."""
    reversed_ = t.c.status == "REVERSED"
    return (
        sa.select(
            t.c.closed_us, t.c.closed_seq, sa.literal(0),
            sa.case((t.c.status == "CANCELLED", "X"), (t.c.status == "CORRECTED", "C"), else_="Y"),
            sa.case((reversed_, t.c.successor_control_number), else_=t.c.control_number),
            t.c.control_number, t.c.report_date, sa.literal(0),
            sa.case((reversed_, "R"), else_=_yes(t.c.as_of, "A")),
            *_terms(),
        )
        .where(t.c.closed_us >= lo_us, t.c.closed_us < hi_us, _in_data_set(sub))
        .order_by(t.c.closed_us, t.c.closed_seq)
    )


# --- Arrow: a day's rows -> the layout's columns ---------------------------------------

_SCALE = {2: pa.scalar(decimal.Decimal("0.01"), pa.decimal128(3, 2)),
          6: pa.scalar(decimal.Decimal("0.000001"), pa.decimal128(7, 6))}
_FILE_ORDER = itemgetter(EVENT_US, EVENT_SEQ, ORDER)


def _decimal(values: Sequence[Any], typ: pa.Decimal128Type) -> pa.Array:
    scaled = pc.multiply(pa.array(values, pa.int64()).cast(pa.decimal128(19, 0)), _SCALE[typ.scale])
    return scaled.cast(typ)


def _local(values: Sequence[Any]) -> pa.Array:
    return pc.local_timestamp(pa.array(values, pa.timestamp("us", tz=MARKET_ZONE)))


def _date(values: Sequence[Any]) -> pa.Array:
    return pa.array(values, pa.string()).cast(pa.date32())


def _reference(values: Sequence[Any]) -> pa.Array:
    # control numbers have at least 10 digits: the last 7 characters are the reference number
    return pc.utf8_slice_codeunits(pa.array(values, pa.int64()).cast(pa.string()), start=-7)


class SettlementDays:
    """Business days from execution to settlement, per (execution, settlement) date pair."""

    def __init__(self, calendar: Calendar) -> None:
        self.calendar = calendar
        self._cache: dict[tuple[str, str], int] = {}

    def __call__(self, execution_date: str, settlement_date: str) -> int:
        key = (execution_date, settlement_date)
        n = self._cache.get(key)
        if n is None:
            start, end = dt.date.fromisoformat(execution_date), dt.date.fromisoformat(settlement_date)
            # business days after the execution date, up to and including the settlement date
            n = 0 if end <= start else self.calendar.business_day_number(start, end) - 1
            self._cache[key] = n
        return n


def day_table(rows: list[Sequence[Any]], schema: pa.Schema, settlement_days: SettlementDays) -> tuple[pa.Table, pa.Array, list[int]]:
    """(the day's records in file order, which stand in the final view, their journal seqs)."""
    rows.sort(key=_FILE_ORDER)
    c = list(zip(*rows))
    n = len(rows)
    exec_local, report_local = _local(c[EXEC_US]), _local(c[EVENT_US])
    time_s = pa.time32("s")
    own = _reference(c[OWN_CN])
    arrays = {
        "rec_ct_nb": pa.array(range(1, n + 1), pa.int64()),
        "msg_seq_nb": own,
        "trc_st": pa.array(c[STATUS], pa.string()),
        "bond_sym_id": pa.array(c[SYMBOL], pa.string()),
        "cusip_id": pa.array(c[CUSIP], pa.string()),
        "bloomberg_identifier": pa.nulls(n, pa.string()),
        "sub_prdct": pa.array(c[DATA_SET], pa.string()),
        "wis_fl": pa.array(c[WIS], pa.string()),
        "cmsn_trd": pa.array(c[CMSN], pa.string()),
        "entrd_vol_qt": _decimal(c[QTY], COLUMNS_BY_NAME["entrd_vol_qt"].type),
        "rptd_pr": _decimal(c[PRICE], COLUMNS_BY_NAME["rptd_pr"].type),
        "yld_sign_cd": pa.array(c[YSIGN], pa.string()),
        "yld_pt": _decimal(c[YABS], COLUMNS_BY_NAME["yld_pt"].type),
        "asof_cd": pa.array(c[AS_OF], pa.string()),
        "trd_exctn_dt": exec_local.cast(pa.date32()),
        "trd_exctn_tm": exec_local.cast(pa.time64("us")).cast(time_s, safe=False),
        "trd_rpt_dt": report_local.cast(pa.date32()),
        "trd_rpt_tm": report_local.cast(pa.time64("us")).cast(time_s, safe=False),
        "stlmnt_dt": _date(c[SETTLE]),
        "trd_mod_3": pa.array(c[MOD3], pa.string()),
        "trd_mod_4": pa.array(c[MOD4], pa.string()),
        "rpt_side_cd": pa.array(c[SIDE], pa.string()),
        "buy_cmsn_rt": _decimal(c[BUY_C], COLUMNS_BY_NAME["buy_cmsn_rt"].type),
        "buy_cpcty_cd": pa.array(c[BUY_CAP], pa.string()),
        "sell_cmsn_rt": _decimal(c[SELL_C], COLUMNS_BY_NAME["sell_cmsn_rt"].type),
        "sell_cpcty_cd": pa.array(c[SELL_CAP], pa.string()),
        "rptg_party_type": pa.array(["D"] * n, pa.string()),
        "cntra_mp_id": pa.array(c[CONTRA], pa.string()),
        "lckd_in_ind": pa.array(c[LOCKED], pa.string()),
        "ats_indicator": pa.nulls(n, pa.string()),
        "spcl_trd_fl": pa.array(c[SPECIAL], pa.string()),
        "trdg_mkt_cd": pa.array(c[MARKET], pa.string()),
        "dissem_fl": pa.array(c[DISSEM], pa.string()),
        "pr_trd_dt": _date(c[PRIOR_DATE]),
        "orig_msg_seq_nb": _reference(c[PRIOR_CN]),
        "first_trade_ctrl_date": _date(c[FIRST_DATE]),
        "first_trade_ctrl_num": _reference(c[FIRST_CN]),
        "days_to_sttl_ct": pa.array([settlement_days(e, s) for e, s in zip(c[EXEC_DATE], c[SETTLE])], pa.int32()),
        "sale_cndtn_cd": pa.array(c[COND1], pa.string()),
        "sale_cndtn2_cd": pa.array(c[COND2], pa.string()),
        "agu_qsr_id": pa.array(c[AGU], pa.string()),
        "control_number": pa.array(c[OWN_CN], pa.int64()),
        "prior_control_number": pa.array(c[PRIOR_CN], pa.int64()),
        "first_control_number": pa.array(c[FIRST_CN], pa.int64()),
        "record_format": pa.array([RECORD_FORMAT] * n, pa.string()),
    }
    table = pa.Table.from_arrays([arrays[col.name] for col in COLUMNS], schema=schema)
    return table, pa.array(c[STANDING], pa.int8()).cast(pa.bool_()), list(c[EVENT_SEQ])


COLUMNS_BY_NAME = {c.name: c for c in COLUMNS}

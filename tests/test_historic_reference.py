"""The columnar build (texts of delimited lines, Arrow, a writer thread) equals the row-by-row reference.

The reference below is the builder as it was before the columnar reader (verbatim from
src/bondtape/historic, records.py and builder.py: SQLAlchemy's driver cursor, one query per
trade report date plus one stream of closed reports, Python tuples sorted per day, the text
lines joined with ``binary_join_element_wise``). On a simulated market with every kind of
record, across a year end, each data set built by the new path (through the reader process, and through the engine's own
connection) must give exactly the reference's records: the text files byte for byte, the
Parquet and final-view tables value for value with the same schema and metadata, and the
same manifest rows and sequence ranges.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import json
import os
from operator import itemgetter
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from bondtape.historic import HEADER, build_data_set, layout, trailer
from bondtape.historic import source as source_module
from bondtape.historic.builder import _midnight_us, _sub_product, coverage
from bondtape.historic.layout import COLUMNS, FINRA_COLUMNS, RECORD_FORMAT
from bondtape.historic.records import SettlementDays
from bondtape.historic.source import _snapshot
from bondtape.historic.source import open_source
from bondtape.journal.schema import trade_reports
from bondtape.rulebook import default_rulebook

AS_OF = dt.date(2026, 7, 1)


def _read(path, schema):
    # Parquet has no time32[s]: times come back as time32[ms]; a safe cast back checks whole seconds
    return pq.read_table(path).cast(schema)


@pytest.fixture
def simulated(db):
    from bondtape.simulate.market import simulate_market

    simulate_market(db, dt.date(2024, 11, 18), 36, 150, seed=13, n_securities=12)
    return db


def test_the_default_reader_is_a_process_of_its_own_on_sqlite_files(db):
    with open_source(db) as source:
        if db.dialect.name != "sqlite":
            assert source.name == "inline"
            return
        assert source.name == "process"  # never in this process (see the next tests)
        assert source.proc.pid != os.getpid() and source.proc.poll() is None
    assert source.proc.returncode == 0  # closed with the source
    with open_source(db, "inline") as source:
        assert source.name == "inline"


def test_the_sqlite_reader_process_reports_errors(tmp_path):
    from tests.helpers import standard_sqlite

    db = standard_sqlite(tmp_path / "r.db")
    with open_source(db) as source:
        with pytest.raises(RuntimeError, match="SQLite reader process failed.*no such table"):
            list(source.texts([sa.select(sa.column("x")).select_from(sa.table("no_such_table"))]))


def test_the_reader_process_s_error_survives_a_slow_caller(tmp_path):
    """The child's error is read even when the caller, busy with a text, writes its next
    request after the child has exited (the pipe is closed by then). Before: an empty message."""
    import time

    from tests.helpers import standard_sqlite

    db = standard_sqlite(tmp_path / "r.db")
    ok, bad = sa.select(sa.literal("x")), sa.select(sa.column("x")).select_from(sa.table("no_such_table"))
    with open_source(db) as source:
        with pytest.raises(RuntimeError, match="reader process failed.*no such table"):
            for _ in source.texts([ok, bad, ok, ok, ok, ok, ok]):
                time.sleep(0.2)


def test_the_reader_process_is_killed_at_once_when_a_read_is_interrupted(tmp_path):
    """Ctrl-C while the last text in flight is being read: the child, still writing it, is
    killed at once. Before: close() waited 10 s for it."""
    import time

    from tests.helpers import standard_sqlite

    class Interrupting:  # Ctrl-C lands while a large text is read
        def __init__(self, f):
            self.f = f

        def read(self, n):
            if n > 1 << 16:
                self.f.read(1000)
                raise KeyboardInterrupt
            return self.f.read(n)

        def close(self):
            self.f.close()

    db = standard_sqlite(tmp_path / "r.db")
    big = sa.select(sa.literal_column("x")).select_from(sa.text(
        "(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200000) "
        "SELECT group_concat(printf('%08d', i), char(10)) AS x FROM n)"))
    closed_at = None
    with pytest.raises(KeyboardInterrupt):
        with open_source(db) as source:
            source.proc.stdout = Interrupting(source.proc.stdout)
            try:
                list(source.texts([big]))
            finally:
                closed_at = time.monotonic()
    assert time.monotonic() - closed_at < 5 and source.proc.returncode is not None


def test_texts_never_hands_on_another_call_s_answers(tmp_path):
    from tests.helpers import standard_sqlite

    db = standard_sqlite(tmp_path / "r.db")
    q = lambda text: sa.select(sa.literal(text))  # noqa: E731
    for reader in ("auto", "inline"):
        with open_source(db, reader) as source:
            first = source.texts([q("a1"), q("a2"), q("a3")])
            assert next(first) == b"a1"
            first.close()  # stopped with answers in flight
            assert list(source.texts([q("b1"), q("b2")])) == [b"b1", b"b2"]


def test_a_build_leaves_the_process_s_sqlite_connections_working(simulated, tmp_path):
    """A process goes on using the file after a build (bondtape demo serves on it). An earlier
    reader, the ADBC SQLite driver, had its own copy of SQLite in this process: once closed, it
    dropped this process's POSIX locks on the file, and the next write through a new
    connection failed with 'disk I/O error'."""
    from bondtape.db import connect

    build_data_set(simulated, "agency", 2024, AS_OF, tmp_path / "agency")
    other = connect(simulated.url.render_as_string(hide_password=False))
    try:
        for i in range(1, 4):
            with other.begin() as conn:
                conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS probe (x INTEGER)")
                conn.exec_driver_sql("INSERT INTO probe VALUES (1)")
            with simulated.begin() as conn:
                assert conn.exec_driver_sql("SELECT count(*) FROM probe").scalar() == i
    finally:
        other.dispose()


@pytest.mark.parametrize("reader", ["auto", "inline"])
def test_build_equals_the_row_by_row_reference(simulated, tmp_path, monkeypatch, reader):
    monkeypatch.setattr(source_module, "AHEAD", 3)  # the reader process runs ahead across days
    statuses = set()
    for data_set in ("corporate", "agency"):
        out = build_data_set(simulated, data_set, 2024, AS_OF, tmp_path / data_set, reader=reader).out
        manifest = json.loads((out / "manifest.json").read_text())
        entries = {f["path"]: f for f in manifest["files"]}
        expected_paths = {"data_dictionary.json"}
        records = final_records = 0
        for day, table, standing, seqs in reference_days(simulated, data_set, 2024):
            name = day.isoformat()
            text = f"ehts/enhanced-time-and-sales-cusip-{name}.txt"
            assert (out / text).read_bytes() == (HEADER + "\n").encode() + ehts_lines(table) + (
                trailer(day, table.num_rows) + "\n").encode(), text
            parquet = f"parquet/trace_enhanced-{name}.parquet"
            assert _read(out / parquet, table.schema).equals(table, check_metadata=True), parquet
            final = table.filter(standing)
            final = final.replace_schema_metadata({**table.schema.metadata, b"bondtape.view": b"final"})
            expected_paths |= {text, parquet}
            if final.num_rows:
                path = f"final/trace_enhanced_final-{name}.parquet"
                assert _read(out / path, final.schema).equals(final, check_metadata=True), path
                expected_paths.add(path)
                assert entries[path]["rows"] == final.num_rows
            for path in (text, parquet):
                assert (entries[path]["rows"], entries[path]["first_seq"], entries[path]["last_seq"]) == (
                    table.num_rows, min(seqs), max(seqs))
            records += table.num_rows
            final_records += final.num_rows
            statuses |= set(table.column("trc_st").to_pylist())
        assert set(entries) == expected_paths
        assert (manifest["totals"]["records"], manifest["totals"]["final_records"]) == (records, final_records) != (0, 0)
    assert statuses == set("TXCRY")  # every kind of record was compared


# --- the reference (the old path; SettlementDays is the same class as the builder's) ------

MARKET_ZONE = "America/New_York"


class _Query:
    """A statement compiled once for the driver, run with different parameter values."""

    def __init__(self, conn: sa.Connection, stmt: sa.Select):
        self.compiled = stmt.compile(dialect=conn.dialect)
        self.sql = str(self.compiled)

    def args(self, **values: Any) -> tuple[str, Any]:
        params = self.compiled.construct_params(values)
        if self.compiled.positional:
            return self.sql, tuple(params[name] for name in self.compiled.positiontup)  # type: ignore[union-attr]
        return self.sql, params


def _fetch(conn: sa.Connection, query: _Query, **values: Any) -> list[tuple]:
    """Plain tuples, straight from the driver's cursor (no per-row Row objects)."""
    cursor = conn.connection.cursor()
    try:
        cursor.execute(*query.args(**values))
        return cursor.fetchall()
    finally:
        cursor.close()


def _stream(conn: sa.Connection, stmt: sa.Select, size: int = 20_000) -> Iterator[tuple]:
    """Rows in chunks: a server-side cursor on PostgreSQL, SQLite's lazy cursor otherwise."""
    driver = conn.connection.driver_connection
    if conn.dialect.name == "sqlite":
        cursor = conn.connection.cursor()
    else:
        cursor = driver.cursor(name="bondtape_historic_closed")  # type: ignore[union-attr]
    try:
        cursor.execute(*_Query(conn, stmt).args())
        while True:
            chunk = cursor.fetchmany(size)
            if not chunk:
                return
            yield from chunk
    finally:
        cursor.close()



_EMPTY, _NEWLINE, _PIPE = (pa.scalar(v, pa.string()) for v in ("", "\n", "|"))


def _text_field(col: pa.ChunkedArray, typ: pa.DataType) -> pa.ChunkedArray:
    if pa.types.is_date32(typ):  # 2024-03-04 -> 20240304
        col = pc.replace_substring(col.cast(pa.string()), "-", "")
    elif pa.types.is_time32(typ):  # 09:03:20 -> 090320
        col = pc.replace_substring(col.cast(pa.string()), ":", "")
    elif not pa.types.is_string(typ):
        col = col.cast(pa.string())
    return pc.fill_null(col, _EMPTY)


def ehts_lines(table: pa.Table) -> bytes:
    """The data lines of an Enhanced Time and Sales file for ``table`` (header and trailer apart)."""
    if table.num_rows == 0:
        return b""
    fields = [_text_field(table.column(c.name), c.type) for c in FINRA_COLUMNS]
    fields[-1] = pc.binary_join_element_wise(fields[-1], _EMPTY, _NEWLINE)  # each line ends with "\n"
    lines = pc.binary_join_element_wise(*fields, _PIPE).combine_chunks()
    offsets = memoryview(lines.buffers()[1]).cast("q" if lines.type == pa.large_string() else "i")
    start, end = offsets[lines.offset], offsets[lines.offset + len(lines)]
    return memoryview(lines.buffers()[2])[start:end].tobytes()



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


def reference_days(db: sa.Engine, data_set: str, year: int) -> Iterator[tuple[dt.date, pa.Table, pa.Array, list[int]]]:
    """(day, the day's records in file order, which stand in the final view, their seqs)."""
    rulebook = default_rulebook()
    sub = _sub_product(data_set)
    first_day, last_day = coverage(data_set, year, rulebook)
    settlement_days = SettlementDays(rulebook.at(last_day).calendar)
    lo_us, year_end_us = _midnight_us(first_day), _midnight_us(last_day + dt.timedelta(days=1))
    with _snapshot(db) as conn:
        created = _Query(conn, created_select(sub))
        with contextlib.closing(_stream(conn, closed_select(sub, lo_us, year_end_us))) as closed_iter:
            pending = next(closed_iter, None)
            day = first_day
            while day <= last_day:
                next_day = day + dt.timedelta(days=1)
                day_end = _midnight_us(next_day)
                rows = _fetch(conn, created, report_date=day.isoformat())
                while pending is not None and pending[EVENT_US] < day_end:
                    rows.append(pending)
                    pending = next(closed_iter, None)
                n = len(rows)
                if rows:
                    schema = layout.arrow_schema(**{"bondtape.data_set": data_set, "bondtape.year": str(year),
                                                    "bondtape.trd_rpt_dt": day.isoformat()})
                    table, standing, seqs = day_table(rows, schema, settlement_days, year_end_us)
                    yield day, table, standing, seqs
                day = next_day

"""Build a Historic TRACE data set (one data set, one calendar year) from the trade state.

The source is the ``trade_reports`` projection of the journal: every report with its full
terms, its dissemination decision at the time, and the event that closed it (cancel,
correction or reversal: ``closed_us``, ``status``, ``successor_control_number``).

Work is day by day, so memory holds one day's records: for each trade report date, the
reports created that day (T and R rows) and the reports closed that day (X, C and Y rows,
read from one stream ordered by close time) become one ordered set of records, written as

- ``ehts/enhanced-time-and-sales-cusip-YYYY-MM-DD.txt``: FINRA's post-2012 layout;
- ``parquet/trace_enhanced-YYYY-MM-DD.parquet``: the same rows with WRDS names;
- ``final/trace_enhanced_final-YYYY-MM-DD.parquet``: the T and R rows of that day still
  standing at the end of the data set (no cancel, correction or reversal among its rows);

then ``data_dictionary.json`` and ``manifest.json``. The output folder is written beside
its final name and renamed into place only when complete: never a half-written data set.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sqlalchemy as sa

from bondtape import __version__
from bondtape.clock import MARKET_TZ, to_us
from bondtape.historic import layout
from bondtape.historic.layout import COLUMNS, FINRA_COLUMNS, HEADER, LAYOUT, RECORD_FORMAT
from bondtape.historic.records import EVENT_US, SettlementDays, closed_select, created_select, day_table
from bondtape.rulebook import Rulebook, default_rulebook, historic_available_from

__all__ = ["DATA_SETS", "BuildResult", "HistoricError", "build_data_set", "check_available", "check_out", "coverage"]

DATA_SETS = {"corporate": "CORP", "agency": "AGCY"}
TEXT_NAME = "enhanced-time-and-sales-cusip-{date}.txt"
PARQUET_NAME = "trace_enhanced-{date}.parquet"
FINAL_NAME = "trace_enhanced_final-{date}.parquet"
PARQUET_OPTIONS = dict(  # fixed, so that a rebuild is byte-identical
    compression="zstd", compression_level=1, write_statistics=True, version="2.6", data_page_version="1.0",
    data_page_size=1 << 20, write_page_index=False, store_schema=True,
    # dictionary pages only where values repeat (codes, symbols, dates), not on numbers
    use_dictionary=[c.name for c in COLUMNS if pa.types.is_string(c.type)
                    and c.name not in ("msg_seq_nb", "orig_msg_seq_nb", "first_trade_ctrl_num")],
)
ROW_GROUP = 256 * 1024


class HistoricError(Exception):
    """A request that cannot be built: a stable code, the field, and what is accepted."""

    def __init__(self, code: str, field: str, message: str):
        super().__init__(message)
        self.code, self.field, self.message = code, field, message

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "field": self.field, "message": self.message}


@dataclass
class BuildResult:
    out: Path
    records: int
    final_records: int
    days: int
    manifest: dict[str, Any] = field(repr=False)


# --- what a request covers --------------------------------------------------------------


def _sub_product(data_set: str) -> str:
    try:
        return DATA_SETS[data_set.lower()]
    except KeyError:
        raise HistoricError("DATA_SET_INVALID", "data_set",
                            f"data set {data_set!r} is not accepted: corporate or agency") from None


def coverage(data_set: str, year: int, rulebook: Rulebook | None = None) -> tuple[dt.date, dt.date]:
    """First and last trade report date of a data set's year (the 2003 Corporate set holds 2002)."""
    sub = _sub_product(data_set)
    rules = (rulebook or default_rulebook()).at(dt.date(max(year, 1900), 12, 31))
    first_year = rules.first_trace_date.year
    if sub == "CORP" and year == first_year:
        raise HistoricError("YEAR_INCLUDED_IN_NEXT", "year",
                            f"{year} Corporate data is part of the {year + 1} Corporate data set "
                            f"(TRACE began {rules.first_trace_date}): ask for {year + 1}")
    if year < first_year or year > 9998:
        raise HistoricError("YEAR_INVALID", "year", f"year {year} is not accepted: {first_year} to 9998 "
                            f"(TRACE began {rules.first_trace_date})")
    start = dt.date(year, 1, 1)
    if sub == "CORP" and year == first_year + 1:
        start = rules.first_trace_date
    return max(start, rules.first_trace_date), dt.date(year, 12, 31)


def check_available(data_set: str, year: int, as_of: dt.date, rulebook: Rulebook | None = None) -> dt.date:
    """The first date the year is available; raises NOT_YET_AVAILABLE before it."""
    coverage(data_set, year, rulebook)
    rules = (rulebook or default_rulebook()).at(as_of)
    available = historic_available_from(year, rules)
    if as_of < available:
        raise HistoricError(
            "NOT_YET_AVAILABLE", "year",
            f"the {year} {data_set.lower()} data set is not available on {as_of}: trades must be at least "
            f"{rules.aging_months} months old; it becomes available on {available}")
    return available


# --- reading ----------------------------------------------------------------------------

def _midnight_us(day: dt.date) -> int:
    return to_us(dt.datetime.combine(day, dt.time(0), tzinfo=MARKET_TZ))


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


@contextlib.contextmanager
def _snapshot(db: sa.Engine) -> Iterator[sa.Connection]:
    """One read-only connection holding one consistent snapshot for the whole build.

    On SQLite a deferred transaction (the core's connections begin IMMEDIATE, which would
    lock out the engine's writes for the whole build); on PostgreSQL REPEATABLE READ.
    """
    if db.dialect.name == "sqlite" and db.url.database in (None, "", ":memory:"):
        with db.begin() as conn:  # an in-memory database has one connection: read through it
            yield conn
    elif db.dialect.name == "sqlite":
        reader = sa.create_engine(db.url, poolclass=sa.pool.NullPool,
                                  connect_args={"check_same_thread": False, "isolation_level": None})
        try:
            with reader.connect() as conn:
                conn.exec_driver_sql("PRAGMA busy_timeout=30000")
                conn.exec_driver_sql("BEGIN DEFERRED")
                try:
                    yield conn
                finally:
                    conn.exec_driver_sql("ROLLBACK")
        finally:
            reader.dispose()
    else:
        with db.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
            with conn.begin():
                conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                yield conn


# --- writing ----------------------------------------------------------------------------

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


def trailer(day: dt.date, count: int) -> str:
    """Date-time stamp (the file's date, 23:59:59) and the record count, 10 digits zero-filled."""
    if count >= 10 ** 10:
        raise HistoricError("FILE_TOO_LARGE", "records", f"{count} records do not fit the 10-digit trailer count")
    return f"{day:%Y%m%d}235959{count:010d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_parquet(path: Path, table: pa.Table) -> None:
    with pq.ParquetWriter(path, table.schema, **PARQUET_OPTIONS) as writer:
        writer.write_table(table, row_group_size=ROW_GROUP)


# --- the build --------------------------------------------------------------------------


def check_out(out: Path) -> Path:
    """The output folder must not exist, or be empty: a data set is never mixed with another."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HistoricError("OUT_NOT_EMPTY", "out", f"{out} exists and is not an empty folder: choose a new folder")
    return out


def build_data_set(
    db: sa.Engine,
    data_set: str,
    year: int,
    as_of: dt.date,
    out: Path,
    *,
    rulebook: Rulebook | None = None,
    progress: Callable[[dt.date, int], None] | None = None,
) -> BuildResult:
    """Build the data set into folder ``out`` (which must not exist or be empty)."""
    rulebook = rulebook or default_rulebook()
    sub = _sub_product(data_set)
    data_set = data_set.lower()
    available = check_available(data_set, year, as_of, rulebook)
    first_day, last_day = coverage(data_set, year, rulebook)
    out = check_out(Path(out))
    work = out.parent / f".{out.name}.building"
    if work.exists():
        shutil.rmtree(work)  # a build that stopped half-way: ours, never published
    for sub_dir in ("ehts", "parquet", "final"):
        (work / sub_dir).mkdir(parents=True)
    try:
        result = _build(db, sub, data_set, year, as_of, available, first_day, last_day, work, rulebook, progress)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    os.replace(work, out)
    result.out = out
    return result


def _build(db, sub, data_set, year, as_of, available, first_day, last_day, work: Path, rulebook: Rulebook,
           progress) -> BuildResult:
    settlement_days = SettlementDays(rulebook.at(last_day).calendar)
    lo_us, year_end_us = _midnight_us(first_day), _midnight_us(last_day + dt.timedelta(days=1))
    files: list[dict[str, Any]] = []
    totals = {"records": 0, "final_records": 0, "days": 0, "by_status": {s: 0 for s in "TXCRY"}}
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
                    del rows
                    files.extend(_write_day(work, day, table, standing, seqs, totals))
                    totals["days"] += 1
                    del table
                if progress:
                    progress(day, n)
                day = next_day
    dictionary = work / "data_dictionary.json"
    dictionary.write_text(layout.data_dictionary_json(), encoding="utf-8")
    files.append({"path": "data_dictionary.json", "kind": "data_dictionary", "rows": None,
                  "sha256": _sha256(dictionary)})
    rules = rulebook.at(as_of)
    manifest = {
        "product": "Historic TRACE Data",
        "data_set": data_set,
        "sub_product": sub,
        "year": year,
        "first_report_date": first_day.isoformat(),
        "last_report_date": last_day.isoformat(),
        "as_of": as_of.isoformat(),
        "available_from": available.isoformat(),
        "aging_months": rules.aging_months,
        "record_format": RECORD_FORMAT,
        "layout": LAYOUT,
        "header": HEADER,
        "rulebook_version": rules.versions[-1],
        "rulebook_versions": list(rules.versions),
        "bondtape_version": __version__,
        "pyarrow_version": pa.__version__,
        "excluded": ["Rule 144A trades", "test reports", "broker-dealer identities (MPIDs)"],
        "totals": totals,
        "files": files,
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return BuildResult(work, totals["records"], totals["final_records"], totals["days"], manifest)


def _write_day(work: Path, day: dt.date, table: pa.Table, standing: pa.Array, seqs: list[int],
               totals: dict) -> list[dict[str, Any]]:
    schema = table.schema
    for status, count in zip(*pc.value_counts(table.column("trc_st")).flatten()):
        totals["by_status"][status.as_py()] += count.as_py()
    name = day.isoformat()
    out: list[dict[str, Any]] = []
    meta = {"report_date": name, "first_seq": min(seqs), "last_seq": max(seqs)}

    text_path = work / "ehts" / TEXT_NAME.format(date=name)
    with open(text_path, "wb") as fh:
        fh.write(HEADER.encode("ascii") + b"\n")
        fh.write(ehts_lines(table))
        fh.write(trailer(day, table.num_rows).encode("ascii") + b"\n")
    out.append({"path": f"ehts/{text_path.name}", "kind": "ehts", "rows": table.num_rows, **meta,
                "sha256": _sha256(text_path)})

    parquet_path = work / "parquet" / PARQUET_NAME.format(date=name)
    _write_parquet(parquet_path, table)
    out.append({"path": f"parquet/{parquet_path.name}", "kind": "parquet", "rows": table.num_rows, **meta,
                "sha256": _sha256(parquet_path)})
    totals["records"] += table.num_rows

    final = table.filter(standing)
    if final.num_rows:
        final_path = work / "final" / FINAL_NAME.format(date=name)
        _write_parquet(final_path, final.replace_schema_metadata({**schema.metadata, b"bondtape.view": b"final"}))
        out.append({"path": f"final/{final_path.name}", "kind": "final", "rows": final.num_rows, "report_date": name,
                    "sha256": _sha256(final_path)})
        totals["final_records"] += final.num_rows
    return out

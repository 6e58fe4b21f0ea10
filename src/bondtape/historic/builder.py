"""Build a Historic TRACE data set (one data set, one calendar year) from the trade state.

The source is the ``trade_reports`` projection of the journal: every report with its full
terms, its dissemination decision at the time, and the event that closed it (cancel,
correction or reversal: ``closed_us``, ``status``, ``successor_control_number``).

Work is day by day, so memory holds a few days' records: for each trade report date, the
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

import datetime as dt
import functools
import hashlib
import json
import os
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import sqlalchemy as sa

from bondtape import __version__
from bondtape.clock import MARKET_TZ, to_us
from bondtape.historic import layout
from bondtape.historic.layout import COLUMNS, FINRA_COLUMNS, HEADER, LAYOUT, RECORD_FORMAT
from bondtape.historic.records import (DAY_SPANS_SCHEMA, SOURCE_SCHEMA, SettlementDays, closed_select, created_select,
                                       day_spans_select, day_table, plan_runs, records, report_day)
from bondtape.historic.source import Source, open_source
from bondtape.rulebook import Rulebook, default_rulebook, historic_available_from

__all__ = ["DATA_SETS", "BuildResult", "HistoricError", "build_data_set", "check_available", "check_out", "coverage"]

DATA_SETS = {"corporate": "CORP", "agency": "AGCY"}
TEXT_NAME = "enhanced-time-and-sales-cusip-{date}.txt"
PARQUET_NAME = "trace_enhanced-{date}.parquet"
FINAL_NAME = "trace_enhanced_final-{date}.parquet"
_DICTIONARY = [c.name for c in COLUMNS if pa.types.is_string(c.type)
               and c.name not in ("msg_seq_nb", "orig_msg_seq_nb", "first_trade_ctrl_num")]
PARQUET_OPTIONS = dict(  # fixed, so that a rebuild is byte-identical
    # zstd where it pays: numbers, times and reference numbers. Dictionary-encoded columns
    # (codes, symbols, dates: a few distinct values a day) are left uncompressed: zstd saves
    # them little, and a compressor per column chunk is most of a small file's cost.
    compression={c.name: ("none" if c.name in _DICTIONARY else "zstd") for c in COLUMNS},
    compression_level={c.name: 1 for c in COLUMNS if c.name not in _DICTIONARY},
    write_statistics=True, version="2.6", data_page_version="1.0",
    data_page_size=1 << 20, write_page_index=False, store_schema=True,
    use_dictionary=_DICTIONARY,  # dictionary pages only where values repeat, not on numbers
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


Piece = tuple[Future, int, int]  # a batch's records (being derived), and the slice of it: start, length


def _days(batches: Iterator[pa.RecordBatch], created: bool, sub: str, settlement_days: SettlementDays,
          deriver: ThreadPoolExecutor) -> Iterator[tuple[dt.date, list[Piece]]]:
    """A statement's records grouped by trade report date, in date order.

    The statements return their rows in date order, so a day is complete when the next one
    starts: memory holds one day and one batch of each statement. Each batch's records are
    derived in the ``deriver`` thread while this one reads on; only the report date of
    each row (which names its day) is worked out here.
    """
    day, pieces = None, []
    for batch in batches:
        derived = deriver.submit(records, batch, created, sub, settlement_days)
        runs = pc.run_end_encode(report_day(batch))
        start = 0
        for value, end in zip(runs.values.to_pylist(), runs.run_ends.to_pylist()):
            if day is not None and value < day:
                raise HistoricError("JOURNAL_INCONSISTENT", "report_date",
                                    "trade_reports returned report dates out of order: run `bondtape journal verify`")
            if value != day:
                if pieces:
                    yield day, pieces
                day, pieces = value, []
            pieces.append((derived, start, end - start))
            start = end
    if pieces:
        yield day, pieces  # type: ignore[misc]


def _created(source: Source, dialect: str, sub: str, first_day: dt.date, last_day: dt.date,
             end_us: int) -> Iterator[pa.RecordBatch]:
    """The reports created in first_day..last_day, in report-date order. On SQLite in
    stretches of control numbers where that order allows (:func:`records.plan_runs`): the
    table is read page after page instead of row by row through the report-date index."""
    if dialect != "sqlite":
        yield from source.stream(created_select(sub, first_day, last_day, end_us), SOURCE_SCHEMA)
        return
    spans = [tuple(row.values()) for batch in source.stream(day_spans_select(first_day, last_day), DAY_SPANS_SCHEMA)
             for row in batch.to_pylist()]
    for run in plan_runs(spans):  # type: ignore[arg-type]
        yield from source.stream(created_select(sub, run.first, run.last, end_us, run.control_numbers), SOURCE_SCHEMA)


# --- writing ----------------------------------------------------------------------------

_CSV = pacsv.WriteOptions(include_header=False, delimiter="|", quoting_style="none")
_TEN_THOUSAND, _HUNDRED, _SIXTY, _HOUR = (pa.scalar(v, pa.int32()) for v in (10_000, 100, 60, 3600))
_SECONDS_A_DAY = 86_400


def _yyyymmdd_values(days: pa.Array) -> pa.Array:
    dates = pc.add(pc.multiply(pc.year(days).cast(pa.int32()), _TEN_THOUSAND),
                   pc.add(pc.multiply(pc.month(days).cast(pa.int32()), _HUNDRED), pc.day(days).cast(pa.int32())))
    return pc.utf8_lpad(dates.cast(pa.string()), width=8, padding="0")


def _yyyymmdd(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Dates as YYYYMMDD. A day's file holds few distinct dates: each is formatted once
    (dictionary-encoded) and the text taken by index."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    encoded = pc.dictionary_encode(col)
    return pc.take(_yyyymmdd_values(encoded.dictionary), encoded.indices)


def _hhmmss_values(seconds: pa.Array) -> pa.Array:
    s = seconds.cast(pa.int32())
    minutes, hours = pc.divide(s, _SIXTY), pc.divide(s, _HOUR)
    hhmmss = pc.add(pc.add(pc.multiply(hours, _TEN_THOUSAND), pc.multiply(pc.subtract(minutes, pc.multiply(hours, _SIXTY)), _HUNDRED)),
                    pc.subtract(s, pc.multiply(minutes, _SIXTY)))
    return pc.utf8_lpad(hhmmss.cast(pa.string()), width=6, padding="0")


@functools.cache
def _clock() -> pa.Array:
    """HHMMSS of every second of a day, indexed by the second."""
    seconds = pc.subtract(pc.cumulative_sum(pa.repeat(pa.scalar(1, pa.int32()), _SECONDS_A_DAY)), pa.scalar(1, pa.int32()))
    return _hhmmss_values(seconds)


def _hhmmss(col: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Times of day (time32[s], 0 to 86,399 by Arrow's definition) as HHMMSS, looked up."""
    return pc.take(_clock(), col.cast(pa.int32()))


def ehts_lines(table: pa.Table) -> bytes:
    """The data lines of an Enhanced Time and Sales file for ``table`` (header and trailer apart).

    Dates YYYYMMDD, times HHMMSS, decimals with their scale, blank for null; each line ends
    with a newline. A value holding ``|``, a quote or a line break is refused, never written.
    """
    if table.num_rows == 0:
        return b""
    columns = []
    for c in FINRA_COLUMNS:
        col = table.column(c.name)
        if pa.types.is_date32(c.type):
            col = _yyyymmdd(col)
        elif pa.types.is_time32(c.type):
            col = _hhmmss(col)
        columns.append(col)
    out = pa.BufferOutputStream()
    try:
        pacsv.write_csv(pa.Table.from_arrays(columns, names=[c.name for c in FINRA_COLUMNS]), out, _CSV)
    except pa.ArrowInvalid as exc:
        raise HistoricError("TEXT_FIELD_INVALID", "ehts", f"a value cannot be written to the pipe-delimited file: {exc}") from exc
    return out.getvalue().to_pybytes()


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


def _write_file(path: Path, data: bytes | memoryview) -> str:
    """Write ``data`` to ``path``; its SHA-256 (hashed from memory, not read back)."""
    with open(path, "wb") as fh:
        fh.write(data)
    return hashlib.sha256(data).hexdigest()


def _write_parquet(path: Path, table: pa.Table) -> str:
    out = pa.BufferOutputStream()
    with pq.ParquetWriter(out, table.schema, **PARQUET_OPTIONS) as writer:
        writer.write_table(table, row_group_size=ROW_GROUP)
    return _write_file(path, memoryview(out.getvalue()))


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
    reader: str = "auto",
) -> BuildResult:
    """Build the data set into folder ``out`` (which must not exist or be empty).

    ``progress(day, records)`` is called once per calendar day of the coverage, in order.
    ``reader``: ``auto`` (ADBC where it reads the database, else the engine's driver),
    ``adbc`` or ``dbapi`` (see :mod:`bondtape.historic.source`); the files are the same.
    """
    rulebook = rulebook or default_rulebook()
    sub = _sub_product(data_set)
    data_set = data_set.lower()
    available = check_available(data_set, year, as_of, rulebook)
    first_day, last_day = coverage(data_set, year, rulebook)
    out = check_out(Path(out))
    work = out.parent / f".{out.name}.building"
    if work.exists():
        shutil.rmtree(work)  # a build that stopped half-way: ours, never published
    try:  # from the first folder made: an interruption (Ctrl-C, SIGTERM) anywhere leaves nothing
        for sub_dir in ("ehts", "parquet", "final"):
            (work / sub_dir).mkdir(parents=True)
        result = _build(db, sub, data_set, year, as_of, available, first_day, last_day, work, rulebook, progress,
                        reader)
        if out.exists():
            out.rmdir()
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    result.out = out
    return result


_WRITERS = 1  # threads writing days while the main thread reads the next ones
_IN_FLIGHT = 2  # days handed to the writers and not yet written: bounds memory


def _build(db, sub, data_set, year, as_of, available, first_day, last_day, work: Path, rulebook: Rulebook,
           progress, reader: str) -> BuildResult:
    """Read both statements side by side, day by day: the main thread reads, a deriver thread
    turns each batch into records, a writer thread writes each day's files (Arrow and the
    drivers release the GIL)."""
    settlement_days = SettlementDays(rulebook.at(last_day).calendar)
    lo_us, end_us = _midnight_us(first_day), _midnight_us(last_day + dt.timedelta(days=1))
    files: list[dict[str, Any]] = []
    totals = {"records": 0, "final_records": 0, "days": 0, "by_status": {s: 0 for s in "TXCRY"}}
    with open_source(db, reader) as source, \
            ThreadPoolExecutor(_WRITERS, thread_name_prefix="historic-writer") as writer, \
            ThreadPoolExecutor(1, thread_name_prefix="historic-deriver") as deriver:  # one: SettlementDays is not shared
        streams = [_days(_created(source, db.dialect.name, sub, first_day, last_day, end_us), True, sub,
                         settlement_days, deriver),
                   _days(source.stream(closed_select(sub, lo_us, end_us), SOURCE_SCHEMA), False, sub, settlement_days,
                         deriver)]
        heads = [next(stream, None) for stream in streams]
        pending: deque[Future] = deque()
        try:
            day = first_day
            while day <= last_day:
                pieces: list[Piece] = []
                for i, stream in enumerate(streams):
                    head = heads[i]
                    if head is not None and head[0] == day:
                        pieces.extend(head[1])
                        heads[i] = next(stream, None)
                    elif head is not None and head[0] < day:
                        raise HistoricError("JOURNAL_INCONSISTENT", "report_date",
                                            f"trade_reports returned a report dated outside {first_day}..{last_day}")
                n = sum(length for _, _, length in pieces)
                if n:
                    schema = layout.arrow_schema(**{"bondtape.data_set": data_set, "bondtape.year": str(year),
                                                    "bondtape.trd_rpt_dt": day.isoformat()})
                    pending.append(writer.submit(_write_day, work, day, pieces, schema))
                    totals["records"] += n
                    totals["days"] += 1
                    del pieces
                    while len(pending) > _IN_FLIGHT:
                        _collect(pending.popleft().result(), files, totals)
                if progress:
                    progress(day, n)
                day += dt.timedelta(days=1)
            if any(head is not None for head in heads):
                raise HistoricError("JOURNAL_INCONSISTENT", "report_date",
                                    f"trade_reports returned a report dated outside {first_day}..{last_day}")
            while pending:
                _collect(pending.popleft().result(), files, totals)
        except BaseException:
            for future in pending:
                future.cancel()
            deriver.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            for stream in streams:
                stream.close()
    dictionary = work / "data_dictionary.json"
    files.append({"path": "data_dictionary.json", "kind": "data_dictionary", "rows": None,
                  "sha256": _write_file(dictionary, layout.data_dictionary_json().encode("utf-8"))})
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


def _collect(written: tuple[list[dict[str, Any]], dict[str, int]], files: list[dict[str, Any]], totals: dict) -> None:
    entries, by_status = written
    files.extend(entries)
    for status, count in by_status.items():
        totals["by_status"][status] += count
    totals["final_records"] += sum(f["rows"] for f in entries if f["kind"] == "final")


def _write_day(work: Path, day: dt.date, pieces: list[Piece],
               schema: pa.Schema) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """One trade report date's records put in file order, and its three files: their
    manifest entries and the day's count of records by status."""
    table, standing, seqs = day_table([derived.result().slice(start, length) for derived, start, length in pieces],
                                      schema)
    del pieces
    by_status = {s.as_py(): n.as_py() for s, n in zip(*pc.value_counts(table.column("trc_st")).flatten())}
    name = day.isoformat()
    seq_range = pc.min_max(seqs)
    meta = {"report_date": name, "first_seq": seq_range["min"].as_py(), "last_seq": seq_range["max"].as_py()}
    out: list[dict[str, Any]] = []

    text_path = work / "ehts" / TEXT_NAME.format(date=name)
    text = b"".join((HEADER.encode("ascii"), b"\n", ehts_lines(table), trailer(day, table.num_rows).encode("ascii"), b"\n"))
    out.append({"path": f"ehts/{text_path.name}", "kind": "ehts", "rows": table.num_rows, **meta,
                "sha256": _write_file(text_path, text)})
    del text

    parquet_path = work / "parquet" / PARQUET_NAME.format(date=name)
    out.append({"path": f"parquet/{parquet_path.name}", "kind": "parquet", "rows": table.num_rows, **meta,
                "sha256": _write_parquet(parquet_path, table)})

    final = table.filter(standing)
    if final.num_rows:
        final_path = work / "final" / FINAL_NAME.format(date=name)
        sha = _write_parquet(final_path, final.replace_schema_metadata({**schema.metadata, b"bondtape.view": b"final"}))
        out.append({"path": f"final/{final_path.name}", "kind": "final", "rows": final.num_rows, "report_date": name,
                    "sha256": sha})
    return out, by_status

"""Build a Historic TRACE data set (one data set, one calendar year) from the trade state.

The source is the ``trade_reports`` projection of the journal: every report with its full
terms, its dissemination decision at the time, and the event that closed it (cancel,
correction or reversal: ``closed_us``, ``status``, ``successor_control_number``).

Work is day by day, so memory holds a few days' records: for each trade report date, the
reports created that day (T and R rows) and the reports closed that day (X, C and Y rows),
each read as one text (:mod:`bondtape.historic.source`), become one ordered set of records,
written as

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
import fcntl
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
from bondtape.clock import MARKET_TZ, market_date, now_us, to_us
from bondtape.historic import layout
from bondtape.historic.layout import COLUMNS, FINRA_COLUMNS, HEADER, LAYOUT, RECORD_FORMAT
from bondtape.historic.records import (DAY_SPANS_SCHEMA, SOURCE_SCHEMA, SettlementDays, closed_select, created_select,
                                       day_spans_select, day_table, parse, plan_days, records, UnexpectedValue,
                                       UnreadableText)
from bondtape.historic.source import Query, Source, open_source
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
LAST_YEAR = dt.MAXYEAR - 2  # the last year whose availability date (18 months after it) is a date


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
    rules = (rulebook or default_rulebook()).at(dt.date(min(max(year, 1900), LAST_YEAR), 12, 31))
    first_year = rules.first_trace_date.year
    if sub == "CORP" and year == first_year:
        raise HistoricError("YEAR_INCLUDED_IN_NEXT", "year",
                            f"{year} Corporate data is part of the {year + 1} Corporate data set "
                            f"(TRACE began {rules.first_trace_date}): ask for {year + 1}")
    if year < first_year or year > LAST_YEAR:
        raise HistoricError("YEAR_INVALID", "year", f"year {year} is not accepted: {first_year} to {LAST_YEAR} "
                            f"(TRACE began {rules.first_trace_date})")
    start = dt.date(year, 1, 1)
    if sub == "CORP" and year == first_year + 1:
        start = rules.first_trace_date
    return max(start, rules.first_trace_date), dt.date(year, 12, 31)


def check_available(data_set: str, year: int, as_of: dt.date, rulebook: Rulebook | None = None,
                    today: dt.date | None = None) -> dt.date:
    """The first date the year is available; raises NOT_YET_AVAILABLE before it, and
    AS_OF_IN_FUTURE for an as-of date after ``today`` (default: today's market date): the
    aging rule is about the day the data set is published, and a year built before it has
    ended would be sold as whole."""
    coverage(data_set, year, rulebook)
    today = today if today is not None else market_date(now_us())
    if as_of > today:
        raise HistoricError("AS_OF_IN_FUTURE", "as_of",
                            f"as-of date {as_of} is after today ({today}): a data set is published as of today or "
                            "an earlier date")
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


def _plan(source: Source, sqlite: bool, first_day: dt.date, last_day: dt.date) -> dict[dt.date, tuple[int, int] | None]:
    """The trade report dates with reports (of any data set), each with how to read it
    (:func:`records.plan_days`; PostgreSQL reads each day through its report-date index)."""
    (text,) = source.texts([day_spans_select(first_day, last_day)])
    spans = parse(text, DAY_SPANS_SCHEMA).to_pylist()
    if not sqlite:
        return {row["report_date"]: None for row in spans}
    return plan_days(tuple(row.values()) for row in spans)  # type: ignore[misc]


def _statements(sub: str, days: list[dt.date], plan: dict[dt.date, tuple[int, int] | None],
                end_us: int) -> Iterator[Query]:
    """Each day's queries, in order: its created reports (if it has reports), its closed ones."""
    by_stretch, by_index, closed = created_select(sub, end_us, True), created_select(sub, end_us, False), closed_select(sub)
    for day in days:
        if day in plan:
            stretch = plan[day]
            if stretch is None:
                yield by_index, {"day": day.isoformat()}
            else:
                yield by_stretch, {"day": day.isoformat(), "low": stretch[0], "high": stretch[1]}
        yield closed, {"lo_us": _midnight_us(day), "hi_us": _midnight_us(day + dt.timedelta(days=1))}


def _unwritable(exc: Exception) -> HistoricError:
    """A stored value holding ``|``, a line break or the reader's separator."""
    return HistoricError("TEXT_FIELD_INVALID", "ehts", f"a value cannot be written to the pipe-delimited file: {exc}")


def _lines(text: bytes | None) -> int:
    return text.count(b"\n") + 1 if text else 0


def _derive(day: dt.date, created: bytes | None, closed: bytes | None, sub: str,
            settlement_days: SettlementDays) -> pa.Table:
    """One trade report date's texts -> its records (in the deriver thread)."""
    try:
        tables = [records(parse(text, SOURCE_SCHEMA), kind == "created", sub, settlement_days)
                  for kind, text in (("created", created), ("closed", closed)) if text]
    except UnreadableText as exc:
        raise _unwritable(exc) from exc
    except UnexpectedValue as exc:
        raise HistoricError("JOURNAL_INCONSISTENT", "trade_reports",
                            f"{exc} (reports of {day}): run `bondtape journal verify`") from exc
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    dates = pc.unique(table.column("trd_rpt_dt"))
    if len(dates) != 1 or dates[0].as_py() != day:
        raise HistoricError("JOURNAL_INCONSISTENT", "report_date",
                            f"trade_reports holds reports dated {day} whose report time is on another date: "
                            "run `bondtape journal verify`")
    return table


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
        raise _unwritable(exc) from exc
    return out.getvalue().to_pybytes()


def trailer(day: dt.date, count: int) -> str:
    """Date-time stamp (the file's date, 23:59:59) and the record count, 10 digits zero-filled."""
    if count >= 10 ** 10:
        raise HistoricError("FILE_TOO_LARGE", "records", f"{count} records do not fit the 10-digit trailer count")
    return f"{day:%Y%m%d}235959{count:010d}"


def _write_file(path: Path, data: bytes | memoryview) -> str:
    """Write ``data`` to ``path``; its SHA-256 (hashed from memory, not read back)."""
    with open(path, "wb") as fh:
        fh.write(data)
    return hashlib.sha256(data).hexdigest()


def _write_parquet(path: Path, table: pa.Table) -> str:
    """``table`` (:func:`layout.arrow_schema`) as a Parquet file, in the types it declares
    (:func:`layout.parquet_schema`: times in milliseconds); its SHA-256."""
    table = table.cast(layout.parquet_schema(table.schema))
    out = pa.BufferOutputStream()
    with pq.ParquetWriter(out, table.schema, **PARQUET_OPTIONS) as writer:
        writer.write_table(table, row_group_size=ROW_GROUP)
    return _write_file(path, memoryview(out.getvalue()))


# --- the build --------------------------------------------------------------------------


def check_out(out: Path) -> Path:
    """The output folder, resolved (a symbolic link: the folder it names), which must not
    exist or be empty: a data set is never mixed with another. Not the current folder (it
    is replaced when the data set is published)."""
    resolved = Path(out).resolve()
    if resolved.exists() and (not resolved.is_dir() or any(resolved.iterdir())):
        raise HistoricError("OUT_NOT_EMPTY", "out", f"{out} exists and is not an empty folder: choose a new folder")
    try:
        here = Path.cwd().resolve()
    except FileNotFoundError:  # the current folder was removed: it cannot be OUT
        return resolved
    if here.is_relative_to(resolved):
        raise HistoricError("OUT_INVALID", "out", f"{out} is the current folder (or holds it): name a new folder")
    return resolved


@contextlib.contextmanager
def _out_locked(out: Path) -> Iterator[None]:
    """Hold ``.OUT.lock`` beside OUT while building it: a second build of the same folder is
    refused (OUT_BUSY), never run over the first one's half-built folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HistoricError("OUT_BUSY", "out", f"another build is writing {out}: wait for it to end, "
                                "or choose another folder") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the build before removed this lock file as it ended: take a new one
    try:
        yield
    finally:  # removed while still held: a build that opened it meanwhile sees it gone and starts over
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


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
    today: dt.date | None = None,
) -> BuildResult:
    """Build the data set into folder ``out`` (which must not exist or be empty).

    ``progress(day, records)`` is called once per calendar day of the coverage, in order.
    ``reader``: ``auto`` (a process of its own for a SQLite file, else the engine's
    connection), ``process`` or ``inline`` (see :mod:`bondtape.historic.source`); the files
    are the same. ``today``: the date the build runs on (default: today's market date); the
    as-of date may not be after it. A second build of the same ``out`` while one runs is
    refused (``OUT_BUSY``).
    """
    rulebook = rulebook or default_rulebook()
    sub = _sub_product(data_set)
    data_set = data_set.lower()
    available = check_available(data_set, year, as_of, rulebook, today)
    first_day, last_day = coverage(data_set, year, rulebook)
    out = check_out(Path(out))
    with _out_locked(out):
        out = check_out(out)  # again: a build that held the lock may have published it meanwhile
        work = out.parent / f".{out.name}.building"
        if work.exists():
            shutil.rmtree(work)  # a build that stopped half-way (no build holds the lock): never published
        try:  # from the first folder made: an interruption (Ctrl-C, SIGTERM) anywhere leaves nothing
            for sub_dir in ("ehts", "parquet", "final"):
                (work / sub_dir).mkdir(parents=True)
            result = _build(db, sub, data_set, year, as_of, available, first_day, last_day, work, rulebook,
                            progress, reader)
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
    """Read day by day: the source (on SQLite a process of its own) runs each day's two
    statements, the next while this process works on the text before; the main thread hands
    the texts on, a deriver thread turns them into records, a writer thread puts each day
    in file order and writes its Parquet files while a text thread writes its pipe-delimited
    file (Arrow releases the GIL)."""
    settlement_days = SettlementDays(rulebook.at(last_day).calendar)
    end_us = _midnight_us(last_day + dt.timedelta(days=1))
    days = [first_day + dt.timedelta(days=i) for i in range((last_day - first_day).days + 1)]
    files: list[dict[str, Any]] = []
    totals = {"records": 0, "final_records": 0, "days": 0, "by_status": {s: 0 for s in "TXCRY"}}
    with open_source(db, reader) as source, \
            ThreadPoolExecutor(_WRITERS, thread_name_prefix="historic-writer") as writer, \
            ThreadPoolExecutor(1, thread_name_prefix="historic-text") as texter, \
            ThreadPoolExecutor(1, thread_name_prefix="historic-deriver") as deriver:  # one: SettlementDays is not shared
        plan = _plan(source, db.dialect.name == "sqlite", first_day, last_day)
        texts = source.texts(_statements(sub, days, plan, end_us))
        pending: deque[Future] = deque()
        try:
            for day in days:
                created = next(texts) if day in plan else None
                closed = next(texts)
                n = _lines(created) + _lines(closed)
                if n:
                    schema = layout.arrow_schema(**{"bondtape.data_set": data_set, "bondtape.year": str(year),
                                                    "bondtape.trd_rpt_dt": day.isoformat()})
                    derived = deriver.submit(_derive, day, created, closed, sub, settlement_days)
                    pending.append(writer.submit(_write_day, work, day, derived, schema, texter))
                    totals["records"] += n
                    totals["days"] += 1
                    del created, closed
                    while len(pending) > _IN_FLIGHT:
                        _collect(pending.popleft().result(), files, totals)
                if progress:
                    progress(day, n)
            while pending:
                _collect(pending.popleft().result(), files, totals)
        except BaseException:
            for future in pending:
                future.cancel()
            deriver.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            texts.close()
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


def _write_text(path: Path, day: dt.date, table: pa.Table) -> str:
    """The day's Enhanced Time and Sales file (header, records, trailer): its SHA-256."""
    text = b"".join((HEADER.encode("ascii"), b"\n", ehts_lines(table), trailer(day, table.num_rows).encode("ascii"), b"\n"))
    return _write_file(path, text)


def _write_day(work: Path, day: dt.date, derived: Future, schema: pa.Schema,
               texter: ThreadPoolExecutor) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """One trade report date's records put in file order, and its three files: their
    manifest entries and the day's count of records by status. The text file is written
    by ``texter`` while this thread writes the Parquet files."""
    table, standing, seqs = day_table([derived.result()], schema)
    del derived
    name = day.isoformat()
    text_path = work / "ehts" / TEXT_NAME.format(date=name)
    text_sha = texter.submit(_write_text, text_path, day, table)
    try:
        by_status = {s.as_py(): n.as_py() for s, n in zip(*pc.value_counts(table.column("trc_st")).flatten())}
        seq_range = pc.min_max(seqs)
        meta = {"report_date": name, "first_seq": seq_range["min"].as_py(), "last_seq": seq_range["max"].as_py()}
        parquet_path = work / "parquet" / PARQUET_NAME.format(date=name)
        parquet = {"path": f"parquet/{parquet_path.name}", "kind": "parquet", "rows": table.num_rows, **meta,
                   "sha256": _write_parquet(parquet_path, table)}
        final = table.filter(standing)
        finals = []
        if final.num_rows:
            final_path = work / "final" / FINAL_NAME.format(date=name)
            sha = _write_parquet(final_path, final.replace_schema_metadata({**schema.metadata, b"bondtape.view": b"final"}))
            finals.append({"path": f"final/{final_path.name}", "kind": "final", "rows": final.num_rows,
                           "report_date": name, "sha256": sha})
        text = {"path": f"ehts/{text_path.name}", "kind": "ehts", "rows": table.num_rows, **meta,
                "sha256": text_sha.result()}
    finally:
        text_sha.cancel()
    return [text, parquet, *finals], by_status

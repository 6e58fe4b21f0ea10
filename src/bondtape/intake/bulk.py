"""Bulk intake: a CSV file of actions in, a results file out (one row per input line).

Columns are the field names of :mod:`bondtape.reporting.commands` (docs/reporting.md).
Rows are submitted in batches through the engine, so a file is journaled in group commits;
each result row is written only after its batch is durable. From ``bondtape report`` the
batches go through ``Engine.submit_stream``: each is validated while the one before commits.
"""
from __future__ import annotations

import csv
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TextIO

from bondtape.csvlines import CsvLineError, one_record_a_line
from bondtape.engine import Engine, Result
from bondtape.reporting.codes import Reject, Rejected
from bondtape.reporting.commands import FIELDS, Command, parse_command

RESULT_COLUMNS = ("line", "client_ref", "status", "control_number", "reject_code", "field", "message")


@dataclass
class BulkSummary:
    lines: int = 0
    accepted: int = 0
    rejected: int = 0


class BulkFileError(Exception):
    """The file as a whole cannot be taken (nothing of it was submitted): a stable code,
    the field at fault (a column name, or ``file``) and a message saying what is accepted."""

    def __init__(self, code: str, message: str, field: str = "file"):
        super().__init__(message)
        self.code, self.field, self.message = code, field, message

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "field": self.field, "message": self.message}


def header_names(fieldnames: list[str] | None) -> list[str]:
    """The header's column names as every channel reads them (trimmed, lower case); refuses an
    empty file, a column named twice and a column that is not a report field (a misspelt
    ``test`` or ``settlement_date`` column would otherwise be dropped without a word)."""
    if not fieldnames or not any(h.strip() for h in fieldnames):
        raise BulkFileError("FILE_INVALID", "the file is empty: its first line names the columns, e.g. "
                            "action,client_ref,reporting_mpid,cusip,side,capacity,contra,quantity,price,execution_time")
    names = [h.strip().lower().lstrip("\ufeff") for h in fieldnames]
    seen: dict[str, int] = {}
    for i, name in enumerate(names, start=1):
        if not name:  # a blank header cell (a trailing comma): its cells are ignored
            continue
        if name in seen:
            raise BulkFileError("FILE_INVALID", f"column {name!r} appears twice in the header (columns {seen[name]} "
                                f"and {i}); name each column once", name[:64])
        seen[name] = i
    unknown = [n for n in seen if n not in FIELDS]
    if unknown:
        shown = ", ".join(repr(n[:64]) for n in unknown[:5])
        raise BulkFileError("FILE_INVALID", f"unknown column(s) {shown} in the header; the columns are: "
                            f"{', '.join(FIELDS)} (docs/reporting.md)", unknown[0][:64])
    return names


def records(stream: Iterable[str], *, note: str = "") -> Iterator[tuple[int, list[str]]]:
    """Each record of a bulk file, with its line number: strict CSV, one record a line
    (:func:`bondtape.csvlines.one_record_a_line`), so that every line of the file gets its
    own result row. Raises :class:`BulkFileError` (``FILE_INVALID``, naming the line,
    ``note`` after the message) for a line that is not CSV or that runs on."""
    try:
        yield from one_record_a_line(stream, "report")
    except CsvLineError as exc:
        raise BulkFileError("FILE_INVALID", f"{exc}{note}") from None


def check_file(stream: Iterable[str], *, only_mpid: str | None = None) -> int:
    """Read the whole file (its text lines) without submitting anything: the header
    (:func:`header_names`) and every line as CSV (:func:`records`); with ``only_mpid``,
    every line's ``reporting_mpid`` must be that firm's (read as intake reads it). Raises
    :class:`BulkFileError`; returns the number of data lines (each gets one result row)."""
    rows = records(stream, note="; nothing was submitted")
    line = 0
    try:
        first = next(rows, None)
        names = header_names(first[1] if first else None)
        col = None
        if only_mpid is not None:
            if "reporting_mpid" not in names:
                raise BulkFileError("FILE_INVALID", "the first line names the columns, reporting_mpid among them",
                                    "reporting_mpid")
            col = names.index("reporting_mpid")
        n = 0
        for line, row in rows:
            if row:
                n += 1
                if col is not None:
                    mpid = (row[col] if col < len(row) else "").strip().upper()
                    if mpid and mpid != only_mpid:
                        raise BulkFileError("FILE_INVALID", f"line {line}: reporting_mpid {mpid[:16]!r} is "
                                            f"not your firm's MPID {only_mpid}; nothing was submitted", "reporting_mpid")
    except UnicodeDecodeError as exc:
        raise BulkFileError("FILE_INVALID", f"the file is not UTF-8 text near line {line + 1} ({exc.reason}); "
                            "save it as UTF-8 (nothing was submitted)") from None
    return n


def check_path(path: Path) -> int:
    """:func:`check_file` on a file, in one pass, naming the first line that is not UTF-8 text."""
    def lines() -> Iterator[str]:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                try:
                    yield raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise BulkFileError("FILE_INVALID", f"line {n} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                                        f"character {exc.start + 1}); save the file as UTF-8 (nothing was submitted)") from None

    return check_file(lines())


def _rows(stream: TextIO) -> Iterator[tuple[int, dict[str, str | None], Reject | None]]:
    """Each data line as a mapping of column name to cell (as ``csv.DictReader`` gives it:
    a missing cell is None), or with the reject of a line of more cells than the header has
    columns (its mapping still holds the cells that have a column, client_ref among them)."""
    rows = records(stream)
    first = next(rows, None)
    if first is None:
        return
    names = header_names(first[1])
    for line, row in rows:
        if not row:  # a blank line: skipped (it keeps its number)
            continue
        cells: dict[str, str | None] = dict(zip(names, row))
        for name in names[len(row):]:
            cells[name] = None
        if len(row) > len(names):  # more cells than the header has columns
            yield line, cells, Reject("FIELD_INVALID", "line", f"the line has {len(row)} cells; the header has {len(names)}")
            continue
        yield line, cells, None


def result_row(line: int, client_ref: str | None, result: Result | None, reject: Reject | None = None) -> dict:
    reject = reject or (result.reject if result else None)
    status = "ACCEPTED" if result is not None and result.accepted else "REJECTED"
    message = reject.message if reject else (result.warning or "") if result else ""
    return {
        "line": line, "client_ref": client_ref or "", "status": status,
        "control_number": result.control_number if result and result.control_number else "",
        "reject_code": reject.code if reject else "", "field": reject.field if reject else "",
        "message": message,
    }


def run_bulk(
    engine: Engine,
    stream: TextIO,
    out: TextIO | None,
    *,
    use_report_time: bool = False,
    channel: str = "bulk",
    batch_size: int = 5000,
    progress: Callable[[int], None] | None = None,
    pipelined: bool = False,
) -> BulkSummary:
    """Submit every row of ``stream``; write result rows to ``out``; return the counts.

    ``pipelined``: through ``Engine.submit_stream``, which validates each batch while the
    one before commits and holds the engine for the whole file (for a process of its own,
    such as ``bondtape report``); otherwise one ``Engine.submit`` a batch, between which
    other callers of the same engine get their turn (a server)."""
    summary = BulkSummary()
    writer = None
    if out is not None:
        writer = csv.DictWriter(out, fieldnames=RESULT_COLUMNS, lineterminator="\n")
        writer.writeheader()
    pending: list[tuple[int, str | None, Command | None, Reject | None]] = []
    submitted: deque[list[tuple[int, str | None, Command | None, Reject | None]]] = deque()

    def batches() -> Iterator[list[Command]]:
        for line, row, rej in _rows(stream):
            cmd = None
            ref = row.get("client_ref") or None  # as given (by its column, on a line of too many cells too)
            if rej is None:
                try:
                    cmd = parse_command(row, channel=channel, use_report_time=use_report_time)
                except Rejected as exc:
                    rej = exc.reject
            pending.append((line, ref, cmd, rej))
            if len(pending) >= batch_size:
                yield take()
        if pending:
            yield take()

    def take() -> list[Command]:
        lines = list(pending)
        pending.clear()
        submitted.append(lines)
        return [c for _, _, c, _ in lines if c is not None]

    def answer(results: list[Result]) -> None:
        """The results of the oldest batch submitted (durable now): its rows, in line order."""
        lines = submitted.popleft()
        answers = iter(results)
        for line, ref, cmd, rej in lines:
            res = next(answers) if cmd is not None else None
            row = result_row(line, ref, res, rej)
            summary.lines += 1
            if row["status"] == "ACCEPTED":
                summary.accepted += 1
            else:
                summary.rejected += 1
            if writer is not None:
                writer.writerow(row)
        if out is not None:
            out.flush()
        if progress:
            progress(len(lines))

    if pipelined:
        engine.submit_stream(batches(), answer)
    else:
        for commands in batches():
            answer(engine.submit(commands) if commands else [])
    return summary

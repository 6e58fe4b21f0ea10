"""Bulk intake: a CSV file of actions in, a results file out (one row per input line).

Columns are the field names of :mod:`bondtape.reporting.commands` (docs/reporting.md).
Rows are submitted in batches through the engine, so a file is journaled in group commits;
each result row is written only after its batch is durable.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TextIO

from bondtape.engine import Engine, Result
from bondtape.reporting.codes import Reject, Rejected
from bondtape.reporting.commands import Command, parse_command

RESULT_COLUMNS = ("line", "client_ref", "status", "control_number", "reject_code", "field", "message")


@dataclass
class BulkSummary:
    lines: int = 0
    accepted: int = 0
    rejected: int = 0


def _rows(stream: TextIO) -> Iterator[tuple[int, dict[str, str] | None, Reject | None]]:
    reader = csv.DictReader(stream)
    if reader.fieldnames is None:
        return
    reader.fieldnames = [h.strip().lower() for h in reader.fieldnames]
    for row in reader:
        if None in row:  # more cells than the header has columns
            yield reader.line_num, None, Reject("FIELD_INVALID", "line", f"the line has {len(reader.fieldnames) + len(row[None])} cells; the header has {len(reader.fieldnames)}")
            continue
        yield reader.line_num, row, None


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
) -> BulkSummary:
    """Submit every row of ``stream``; write result rows to ``out``; return the counts."""
    summary = BulkSummary()
    writer = None
    if out is not None:
        writer = csv.DictWriter(out, fieldnames=RESULT_COLUMNS, lineterminator="\n")
        writer.writeheader()
    pending: list[tuple[int, str | None, Command | None, Reject | None]] = []

    def flush() -> None:
        commands = [c for _, _, c, _ in pending if c is not None]
        results = iter(engine.submit(commands)) if commands else iter(())
        for line, ref, cmd, rej in pending:
            res = next(results) if cmd is not None else None
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
            progress(len(pending))
        pending.clear()

    for line, row, rej in _rows(stream):
        cmd = None
        ref = (row or {}).get("client_ref") or None
        if row is not None:
            try:
                cmd = parse_command(row, channel=channel, use_report_time=use_report_time)
            except Rejected as exc:
                rej = exc.reject
        pending.append((line, ref, cmd, rej))
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    return summary


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return max(sum(1 for _ in f) - 1, 0)

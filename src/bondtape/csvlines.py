"""Strict CSV for files of one record a line: bulk report files, reference data.

A record must end on the line it starts on (a quoted cell may not hold a line break), so
that every line of a file is its own record: with Python's lenient CSV reading, an
unterminated quote takes in every line after it as one cell, and those lines silently
vanish."""
from __future__ import annotations

import csv
from typing import Iterable, Iterator


class CsvLineError(ValueError):
    """A line that is not CSV, or whose record runs on past it; the message names the line."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


def one_record_a_line(stream: Iterable[str], what: str = "record") -> Iterator[tuple[int, list[str]]]:
    """Each record of ``stream`` (text lines) with its line number (a blank line: an empty
    record). Raises :class:`CsvLineError` for a line that is not CSV or that runs on."""
    reader = csv.reader(stream, strict=True)
    last = 0  # the line the previous record ended on
    while True:
        start = last + 1
        try:
            row = next(reader, None)
        except csv.Error as exc:
            if reader.line_num > start:
                raise CsvLineError(start, _runs_on(start, what)) from None
            raise CsvLineError(start, f"line {start} is not CSV: {exc}") from None
        if row is None:
            return
        if reader.line_num > start or any("\n" in cell or "\r" in cell for cell in row):
            raise CsvLineError(start, _runs_on(start, what))
        last = reader.line_num
        yield start, row


def _runs_on(line: int, what: str) -> str:
    return (f"line {line} is not CSV: a quoted cell has no closing quote on that line (each {what} is one line; "
            "a cell may not hold a line break: close the quote, e.g. \"1,000\", or remove it)")

"""The trade-state projection: journal events -> rows of ``trade_reports``.

The engine and replay both use :func:`project`, so a state rebuilt from the journal is the
state built incrementally. Events are (header, payload) with JSON-native payload values.

A new report's or correction's payload (the terms and every derived fact) is stored as a
JSON array, ``[1, v1, v2, ...]``, whose first element names the layout (``TERMS_LAYOUT``
below gives the keys of layout 1, in order); other events' payloads are JSON objects.
Both decode to the same ``Event.payload`` mapping.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bondtape.journal.schema import journal, trade_reports

STATUS_FOR = {"CANCEL": "CANCELLED", "CORRECT": "CORRECTED", "REVERSE": "REVERSED"}


import orjson


def _dumps(value: Any) -> str:
    # compact JSON, UTF-8 (the text json.dumps(separators=(",", ":"), ensure_ascii=False) gives)
    return orjson.dumps(value).decode()


_loads = orjson.loads

# Layout 1 of a NEW or CORRECT event's payload: these keys, in this order.
TERMS_LAYOUT = (
    "report_date", "cusip", "symbol", "data_set", "grade", "rule_144a", "side", "capacity",
    "contra", "contra_type", "quantity_c", "price_u", "yield_u", "execution_us",
    "execution_date", "settlement_date", "commission_c", "when_issued", "special_price",
    "weighted_average", "trading_market", "merger_transfer", "remuneration", "locked_in",
    "agu", "is_test", "withheld", "duplicate_of", "terms_key", "rulebook", "as_of", "late",
    "modifier3", "timeliness", "deadline_us", "first_control_number", "first_report_date",
)
LAYOUTS = {1: TERMS_LAYOUT}
_LAYOUT_VALUES = itemgetter(*TERMS_LAYOUT)


def encode_payload(event_type: str, payload: dict[str, Any]) -> str:
    """The journal's text of a payload (positional for new terms, an object otherwise)."""
    if event_type in ("NEW", "CORRECT") and len(payload) == len(TERMS_LAYOUT):
        return _dumps([1, *_LAYOUT_VALUES(payload)])
    return _dumps(payload)


def decode_payload(text: str) -> dict[str, Any]:
    value = _loads(text)
    if isinstance(value, list):
        keys = LAYOUTS.get(value[0]) if value else None
        if keys is None or len(value) != len(keys) + 1:
            raise ValueError(f"journal payload has an unknown layout: {text[:40]!r}")
        return dict(zip(keys, value[1:]))
    return value


@dataclass
class Event:
    seq: int
    recorded_us: int
    event_type: str
    channel: str
    mpid: str | None
    client_ref: str | None
    control_number: int | None
    ref_control_number: int | None
    payload: dict[str, Any]

    def journal_row(self) -> tuple:
        """The journal row, in the order of ``JOURNAL_COLUMNS``."""
        return (self.seq, self.recorded_us, self.event_type, self.channel, self.mpid, self.client_ref,
                self.control_number, self.ref_control_number, encode_payload(self.event_type, self.payload))

    @classmethod
    def from_row(cls, row: Any) -> "Event":
        return cls(row.seq, row.recorded_us, row.event_type, row.channel, row.mpid, row.client_ref,
                   row.control_number, row.ref_control_number, decode_payload(row.payload))


@dataclass
class Changes:
    inserts: list[tuple] = field(default_factory=list)  # trade_reports rows, in REPORT_COLUMNS order
    updates: list[tuple] = field(default_factory=list)  # (status, closed_seq, closed_us, successor, control_number)


REPORT_COLUMNS = tuple(c.name for c in trade_reports.columns)
JOURNAL_COLUMNS = tuple(c.name for c in journal.columns)
UPDATE_COLUMNS = ("status", "closed_seq", "closed_us", "successor_control_number", "control_number")

# the payload keys that fill trade_reports' columns from cusip to terms_key, in column order
_MIDDLE = REPORT_COLUMNS[REPORT_COLUMNS.index("cusip"):REPORT_COLUMNS.index("disseminated")]
_MIDDLE_VALUES = itemgetter(*_MIDDLE)
_TAIL = REPORT_COLUMNS[REPORT_COLUMNS.index("disseminated"):]
assert REPORT_COLUMNS[:10] == (
    "control_number", "seq", "report_us", "report_date", "first_control_number", "first_report_date",
    "prior_control_number", "reporting_mpid", "client_ref", "channel")
assert _TAIL == ("disseminated", "duplicate_of", "terms_key", "status", "closed_seq", "closed_us",
                 "successor_control_number")


def project(events: Iterable[Event], changes: Changes | None = None) -> Changes:
    changes = changes or Changes()
    inserts, updates = changes.inserts.append, changes.updates.append
    for ev in events:
        p = ev.payload
        kind = ev.event_type
        if kind == "NEW" or kind == "CORRECT":
            inserts((ev.control_number, ev.seq, ev.recorded_us, p["report_date"], p["first_control_number"],
                     p["first_report_date"], ev.ref_control_number, ev.mpid, ev.client_ref, ev.channel,
                     *_MIDDLE_VALUES(p), p["withheld"] is None, p["duplicate_of"], p["terms_key"],
                     "ACTIVE", None, None, None))
        if kind in STATUS_FOR:
            updates((STATUS_FOR[kind], ev.seq, ev.recorded_us,
                     None if kind == "CANCEL" else ev.control_number, ev.ref_control_number))
    return changes


# What the journal writer process (journal/writer_child.py) is sent for a chunk's events:
# each event's header (WIRE_HEADER) and its payload, a new report's or correction's as its
# layout-1 values, whose journal text and trade_reports row the writer makes itself (the
# same text ``encode_payload`` gives, the same row ``project`` gives), so that the engine's
# process does not. ``wire_report_positions`` tells it where each trade_reports column is in
# [*header, *values, disseminated, "ACTIVE", None].
WIRE_HEADER = ("seq", "recorded_us", "event_type", "channel", "mpid", "client_ref", "control_number",
               "ref_control_number")
_N_LAYOUT = len(TERMS_LAYOUT)


def wire_report_positions() -> tuple[list[int], int]:
    """The positions of trade_reports' columns in [*header, *values, disseminated, "ACTIVE",
    None] (see above), and the position of ``withheld`` among the values."""
    h, n = len(WIRE_HEADER), len(WIRE_HEADER) + _N_LAYOUT
    at = {name: i for i, name in enumerate(WIRE_HEADER)}
    at.update({key: h + i for i, key in enumerate(TERMS_LAYOUT)})
    at.update({"report_us": at["recorded_us"], "prior_control_number": at["ref_control_number"],
               "reporting_mpid": at["mpid"], "disseminated": n, "status": n + 1,
               "closed_seq": n + 2, "closed_us": n + 2, "successor_control_number": n + 2})
    at["control_number"] = WIRE_HEADER.index("control_number")
    return [at[c] for c in REPORT_COLUMNS], TERMS_LAYOUT.index("withheld")


def wire(events: Iterable[Event]) -> tuple[list[tuple], list[tuple]]:
    """For the journal writer process: the events (header and payload; a new report whose
    payload is not in layout 1, such as a correction's, with its trade_reports row after
    it), and the status updates."""
    sent: list[tuple] = []
    updates: list[tuple] = []
    for ev in events:
        p = ev.payload
        kind = ev.event_type
        header = (ev.seq, ev.recorded_us, kind, ev.channel, ev.mpid, ev.client_ref, ev.control_number,
                  ev.ref_control_number)
        if kind == "NEW" or kind == "CORRECT":
            if len(p) == _N_LAYOUT:
                sent.append((*header, _LAYOUT_VALUES(p)))
            else:
                sent.append((*header, p, project([ev]).inserts[0]))
        else:
            sent.append((*header, p))
        if kind in STATUS_FOR:  # as project() gives them
            updates += project([ev]).updates
    return sent, updates


def as_mapping(row: tuple) -> dict[str, Any]:
    """A projection row as a column -> value mapping."""
    return dict(zip(REPORT_COLUMNS, row))


def _marker(conn: Connection) -> str:
    return "?" if conn.dialect.paramstyle == "qmark" else "%s"


def insert_sql(marker: str, table: sa.Table) -> str:
    """A plain INSERT of every column of ``table``, in column order."""
    columns = [c.name for c in table.columns]
    return f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join([marker] * len(columns))})"


def update_sql(marker: str) -> str:
    """The status update of ``Changes.updates`` rows (``UPDATE_COLUMNS``)."""
    m = marker
    return (f"UPDATE trade_reports SET status = {m}, closed_seq = {m}, closed_us = {m}, "
            f"successor_control_number = {m} WHERE control_number = {m}")


def insert_rows(conn: Connection, table: sa.Table, rows: list[tuple]) -> None:
    """A plain executemany of ``rows`` (tuples in the table's column order) into ``table``."""
    if rows:
        conn.exec_driver_sql(insert_sql(_marker(conn), table), rows)


def write(conn: Connection, changes: Changes) -> None:
    """Apply projection changes: all inserts, then the status updates in sequence order."""
    insert_rows(conn, trade_reports, changes.inserts)
    if changes.updates:
        conn.exec_driver_sql(update_sql(_marker(conn)), changes.updates)


def replay(conn: Connection, *, chunk: int = 20_000, progress=None) -> int:
    """Rebuild ``trade_reports`` from the journal; returns the number of events applied."""
    conn.execute(trade_reports.delete())
    last, count = 0, 0
    while True:
        rows = conn.execute(
            sa.select(journal).where(journal.c.seq > last).order_by(journal.c.seq).limit(chunk)
        ).all()
        if not rows:
            return count
        write(conn, project(Event.from_row(r) for r in rows))
        last = rows[-1].seq
        count += len(rows)
        if progress:
            progress(len(rows))

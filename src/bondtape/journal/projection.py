"""The trade-state projection: journal events -> rows of ``trade_reports``.

The engine and replay both use :func:`project`, so a state rebuilt from the journal is the
state built incrementally. Events are (header, payload) with JSON-native payload values.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bondtape.journal.schema import journal, trade_reports

STATUS_FOR = {"CANCEL": "CANCELLED", "CORRECT": "CORRECTED", "REVERSE": "REVERSED"}


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


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

    def journal_row(self) -> dict[str, Any]:
        return {
            "seq": self.seq, "recorded_us": self.recorded_us, "event_type": self.event_type,
            "channel": self.channel, "mpid": self.mpid, "client_ref": self.client_ref,
            "control_number": self.control_number, "ref_control_number": self.ref_control_number,
            "payload": _dumps(self.payload),
        }

    @classmethod
    def from_row(cls, row: Any) -> "Event":
        return cls(row.seq, row.recorded_us, row.event_type, row.channel, row.mpid, row.client_ref,
                   row.control_number, row.ref_control_number, json.loads(row.payload))


@dataclass
class Changes:
    inserts: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)


_TERMS = (
    "cusip", "symbol", "data_set", "grade", "rule_144a", "side", "capacity", "contra", "contra_type",
    "quantity_c", "price_u", "yield_u", "execution_us", "execution_date", "settlement_date",
    "commission_c", "when_issued", "special_price", "weighted_average", "trading_market",
    "merger_transfer", "remuneration", "locked_in", "agu", "is_test", "as_of", "late",
    "modifier3", "duplicate_of", "terms_key",
)


def project(events: Iterable[Event], changes: Changes | None = None) -> Changes:
    changes = changes or Changes()
    for ev in events:
        p = ev.payload
        if ev.event_type in ("NEW", "CORRECT"):
            row = {k: p[k] for k in _TERMS}
            row.update(
                control_number=ev.control_number, seq=ev.seq, report_us=ev.recorded_us,
                report_date=p["report_date"], first_control_number=p["first_control_number"],
                first_report_date=p["first_report_date"], prior_control_number=ev.ref_control_number,
                reporting_mpid=ev.mpid, client_ref=ev.client_ref, channel=ev.channel,
                disseminated=p["withheld"] is None, status="ACTIVE", closed_seq=None, closed_us=None,
                successor_control_number=None,
            )
            changes.inserts.append(row)
        if ev.event_type in STATUS_FOR:
            changes.updates.append({
                "b_control_number": ev.ref_control_number, "status": STATUS_FOR[ev.event_type],
                "closed_seq": ev.seq, "closed_us": ev.recorded_us,
                "successor_control_number": None if ev.event_type == "CANCEL" else ev.control_number,
            })
    return changes


_REPORT_COLUMNS = [c.name for c in trade_reports.columns]
_JOURNAL_COLUMNS = [c.name for c in journal.columns]
_UPDATE_COLUMNS = ("status", "closed_seq", "closed_us", "successor_control_number", "b_control_number")


def _marker(conn: Connection) -> str:
    return "?" if conn.dialect.paramstyle == "qmark" else "%s"


def _insert_sql(conn: Connection, table: str, columns: list[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join([_marker(conn)] * len(columns))})"


def insert_rows(conn: Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """A plain executemany of ``rows`` (dicts with every column) into ``table``."""
    if rows:
        cols = [c.name for c in table.columns]
        conn.exec_driver_sql(_insert_sql(conn, table.name, cols), [tuple(r[c] for c in cols) for r in rows])


def write(conn: Connection, changes: Changes) -> None:
    """Apply projection changes: all inserts, then the status updates in sequence order."""
    insert_rows(conn, trade_reports, changes.inserts)
    if changes.updates:
        m = _marker(conn)
        sql = (f"UPDATE trade_reports SET status = {m}, closed_seq = {m}, closed_us = {m}, "
               f"successor_control_number = {m} WHERE control_number = {m}")
        conn.exec_driver_sql(sql, [tuple(u[c] for c in _UPDATE_COLUMNS) for u in changes.updates])


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

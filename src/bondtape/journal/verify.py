"""Check the journal's invariants: gapless sequence, and replay equals the stored state."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bondtape.db import reading
from bondtape.journal.projection import Event, as_mapping, project
from bondtape.journal.schema import journal, journal_head, trade_reports


@dataclass
class VerifyReport:
    events: int = 0
    reports: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        head = f"{self.events} journal events, {self.reports} trade reports"
        return [head + (": OK" if self.ok else ": PROBLEMS")] + [f"- {p}" for p in self.problems]


def rebuild_in_memory(conn: sa.Connection, chunk: int = 50_000) -> dict[int, dict[str, Any]]:
    """The trade state that replaying the journal gives, keyed by control number."""
    state: dict[int, dict[str, Any]] = {}
    last = 0
    while True:
        rows = conn.execute(sa.select(journal).where(journal.c.seq > last).order_by(journal.c.seq).limit(chunk)).all()
        if not rows:
            return state
        changes = project(Event.from_row(r) for r in rows)
        for row in changes.inserts:
            state[row[0]] = as_mapping(row)
        for status, closed_seq, closed_us, successor, control_number in changes.updates:
            state[control_number].update(status=status, closed_seq=closed_seq, closed_us=closed_us,
                                         successor_control_number=successor)
        last = rows[-1].seq


def stored_state(conn: sa.Connection) -> dict[int, dict[str, Any]]:
    out = {}
    for r in conn.execute(sa.select(trade_reports)):
        out[r.control_number] = dict(r._mapping)
    return out


def normalise(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (bool(v) if isinstance(v, bool) or k in _BOOLS else v) for k, v in row.items()}


_BOOLS = {c.name for c in trade_reports.columns if isinstance(c.type, sa.Boolean)}


def verify(engine: Engine) -> VerifyReport:
    report = VerifyReport()
    with reading(engine) as conn:
        count, low, high = conn.execute(sa.select(sa.func.count(), sa.func.min(journal.c.seq), sa.func.max(journal.c.seq))).one()
        report.events = count
        if count and (low != 1 or high != count):
            report.problems.append(f"sequence has gaps: {count} events numbered {low}..{high}")
        head = conn.execute(sa.select(journal_head.c.last_seq)).scalar_one()
        if head != (high or 0):
            report.problems.append(f"journal head says {head}, the journal ends at {high or 0}")
        rebuilt = rebuild_in_memory(conn)
        stored = stored_state(conn)
        report.reports = len(stored)
        if set(rebuilt) != set(stored):
            missing = sorted(set(rebuilt) - set(stored))[:5]
            extra = sorted(set(stored) - set(rebuilt))[:5]
            report.problems.append(f"state and journal disagree on which reports exist (missing {missing}, extra {extra})")
        for cn in sorted(set(rebuilt) & set(stored)):
            a, b = normalise(rebuilt[cn]), normalise(stored[cn])
            diff = sorted(k for k in b if a.get(k) != b.get(k))
            if diff:
                report.problems.append(f"report {cn}: stored state differs from replay in {', '.join(diff)}")
                if len(report.problems) > 20:
                    break
    return report

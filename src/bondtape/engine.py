"""The engine: one sequencer for every channel.

``Engine.submit`` takes a batch of commands and, in one database transaction, validates
each against reference data, the rulebook and the current trade state (including earlier
commands of the same batch), appends the accepted ones to the journal with gapless
sequence numbers and updates the trade-state projection. Results are returned only after
the commit: an acknowledged report is durable.

``Sequencer`` puts a thread in front of the engine so that many callers (web requests,
FIX sessions) share group commits: each caller waits for the batch its command joined.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine as SAEngine

from bondtape.batching import drain_batch
from bondtape.clock import market_parts, now_us
from bondtape.journal.projection import Changes, Event, insert_rows, project, write
from bondtape.journal.schema import CONTROL_BASE, journal, journal_head, trade_reports
from bondtape.reference.model import Firm, Security
from bondtape.reference.schema import firms as firms_table
from bondtape.reference.schema import securities as securities_table
from bondtape.reference.store import load_firms, load_securities
from bondtape.reporting.codes import Reject, Rejected
from bondtape.reporting.commands import Command
from bondtape.reporting.validation import check_firm, check_terms
from bondtape.rulebook import Rulebook, default_rulebook, within_cancel_correct_window

__all__ = ["Engine", "Result", "Sequencer", "EngineUnavailable"]


class EngineUnavailable(RuntimeError):
    """The database could not be reached or the connection broke; retry the same commands.

    Nothing of the batch was journaled, or (if the connection broke during the commit) all
    of it was: a retry with the same ``client_ref`` values gets the first answers back, so
    retrying never duplicates a report.
    """


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


@dataclass(frozen=True, slots=True)
class Result:
    action: str
    client_ref: str | None
    status: str  # ACCEPTED or REJECTED
    control_number: int | None = None
    seq: int | None = None
    reject: Reject | None = None
    timeliness: str | None = None  # ON_TIME, LATE, AS_OF, AS_OF_LATE
    modifier3: str | None = None
    warning: str | None = None
    repeated: bool = False  # the client_ref was seen before: this is the first answer

    @property
    def accepted(self) -> bool:
        return self.status == "ACCEPTED"

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action, "client_ref": self.client_ref, "status": self.status,
            "control_number": None if self.control_number is None else str(self.control_number),
            "seq": self.seq, "timeliness": self.timeliness, "modifier3": self.modifier3,
            "warning": self.warning, "repeated": self.repeated,
            "reject": self.reject.as_dict() if self.reject else None,
        }


@dataclass(slots=True)
class _State:
    """What lifecycle checks need to know of a report."""

    control_number: int
    mpid: str
    status: str
    report_date: str
    first_control_number: int
    first_report_date: str
    is_test: bool
    terms_key: str
    payload: dict[str, Any] | None = None  # for a correction's carried-over fields


def terms_key(mpid: str, cusip: str, side: str, quantity_c: int, price_u: int, execution_us: int, contra: str) -> str:
    raw = f"{mpid}|{cusip}|{side}|{quantity_c}|{price_u}|{execution_us}|{contra}"
    return hashlib.blake2b(raw.encode(), digest_size=16).hexdigest()


def _result_from_journal(row: Any) -> Result:
    import json

    payload = json.loads(row.payload)
    return Result(
        action=row.event_type, client_ref=row.client_ref, status="ACCEPTED",
        control_number=row.control_number, seq=row.seq,
        timeliness=payload.get("timeliness"), modifier3=payload.get("modifier3"), repeated=True,
    )


class Engine:
    def __init__(self, db: SAEngine, rulebook: Rulebook | None = None, clock: Callable[[], int] = now_us):
        self.db = db
        self.rulebook = rulebook or default_rulebook()
        self.clock = clock
        self._reference_mark: tuple | None = None
        self.securities: dict[str, Security] = {}
        self.firms: dict[str, Firm] = {}
        self._lock = threading.Lock()
        # Called after each commit with that batch's journal events, in sequence order.
        # A listener must not raise; it must catch up from the journal after a restart
        # (a crash between commit and call loses the call, never the event).
        self.listeners: list[Callable[[list[Event]], None]] = []

    @property
    def write_lock(self) -> threading.Lock:
        """Held while a batch is processed and committed. On SQLite another writer in this
        process (the FIX session store) takes it so its commits fall between batches instead
        of waiting on the database's write lock."""
        return self._lock

    # -- reference data -------------------------------------------------------------------
    def _refresh_reference(self, conn: Connection) -> None:
        mark = (
            tuple(conn.execute(sa.select(sa.func.count(), sa.func.max(securities_table.c.updated_us))).one()),
            tuple(conn.execute(sa.select(sa.func.count(), sa.func.max(firms_table.c.updated_us))).one()),
        )
        if mark != self._reference_mark:
            self.securities = load_securities(conn)
            self.firms = load_firms(conn)
            self._reference_mark = mark

    # -- intake ---------------------------------------------------------------------------
    def submit(self, commands: Sequence[Command]) -> list[Result]:
        """Validate and journal a batch; results in the same order, after the commit."""
        if not commands:
            return []
        with self._lock:
            try:
                with self.db.begin() as conn:
                    results, changes, events = self._process(conn, commands)
                    if events:
                        insert_rows(conn, journal, [e.journal_row() for e in events])
                        write(conn, changes)
                        conn.execute(journal_head.update().where(journal_head.c.id == 1).values(last_seq=events[-1].seq))
            except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:  # database down or unreachable
                raise EngineUnavailable(_first_line(exc)) from exc
            except sa.exc.DBAPIError as exc:
                if exc.connection_invalidated:
                    raise EngineUnavailable(_first_line(exc)) from exc
                raise
            if events:
                for listener in self.listeners:
                    listener(events)
        return results

    def submit_one(self, command: Command) -> Result:
        return self.submit([command])[0]

    def _head(self, conn: Connection) -> int:
        stmt = sa.select(journal_head.c.last_seq).where(journal_head.c.id == 1)
        if conn.dialect.name != "sqlite":
            stmt = stmt.with_for_update()
        return conn.execute(stmt).scalar_one()

    def _preload(self, conn: Connection, commands: Sequence[Command]) -> tuple[dict, dict]:
        refs = {c.original_control_number for c in commands if c.original_control_number is not None}
        states: dict[int, _State] = {}
        cols = (trade_reports.c.control_number, trade_reports.c.reporting_mpid, trade_reports.c.status,
                trade_reports.c.report_date, trade_reports.c.first_control_number,
                trade_reports.c.first_report_date, trade_reports.c.is_test, trade_reports.c.terms_key,
                trade_reports.c.seq)
        ref_list = list(refs)
        for i in range(0, len(ref_list), 900):
            for r in conn.execute(sa.select(*cols).where(trade_reports.c.control_number.in_(ref_list[i:i + 900]))):
                states[r.control_number] = _State(r.control_number, r.reporting_mpid, r.status, r.report_date,
                                                  r.first_control_number, r.first_report_date, bool(r.is_test), r.terms_key)
        seen: dict[tuple[str, str], Result] = {}
        keyed = [(c.reporting_mpid, c.client_ref) for c in commands if c.client_ref]
        by_firm: dict[str, list[str]] = {}
        for mpid, ref in keyed:
            by_firm.setdefault(mpid, []).append(ref)
        for mpid, ref_values in by_firm.items():
            for i in range(0, len(ref_values), 900):
                for row in conn.execute(sa.select(journal).where(
                        journal.c.mpid == mpid, journal.c.client_ref.in_(ref_values[i:i + 900]))):
                    seen[(row.mpid, row.client_ref)] = _result_from_journal(row)
        return states, seen

    def _active_duplicates(self, conn: Connection, keys: list[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for i in range(0, len(keys), 900):
            for r in conn.execute(sa.select(trade_reports.c.terms_key, trade_reports.c.control_number).where(
                    trade_reports.c.terms_key.in_(keys[i:i + 900]), trade_reports.c.status == "ACTIVE")):
                found.setdefault(r.terms_key, r.control_number)
        return found

    def _process(self, conn: Connection, commands: Sequence[Command]):
        self._refresh_reference(conn)
        seq = self._head(conn)
        states, seen = self._preload(conn, commands)
        now = self.clock()
        results: list[Result] = []
        events: list[Event] = []
        pending_keys: dict[str, int] = {}  # terms keys of reports accepted in this batch
        checked_new: list[tuple[int, Command, Any]] = []
        # First pass: parse-level checks of terms so that duplicate keys can be loaded at once.
        prepared: list[Any] = []
        for cmd in commands:
            report_us = cmd.report_us if cmd.report_us is not None else now
            try:
                firm = check_firm(cmd.reporting_mpid, self.firms)
                is_test = cmd.test or firm.test_only
                checked = None
                if cmd.terms is not None:
                    checked = check_terms(cmd.terms, cmd.reporting_mpid, report_us, is_test,
                                          self.securities, self.firms, self.rulebook)
                prepared.append((report_us, is_test, checked, None))
            except Rejected as exc:
                prepared.append((report_us, False, None, exc.reject))
        keys = []
        for cmd, (report_us, is_test, checked, rej) in zip(commands, prepared):
            if checked is not None:
                t = cmd.terms
                keys.append(terms_key(cmd.reporting_mpid, t.cusip, t.side, checked.quantity_c, checked.price_u, t.execution_us, t.contra))
            else:
                keys.append(None)
        existing_dups = self._active_duplicates(conn, [k for k in keys if k])
        batch_refs: dict[tuple[str, str], Result] = {}
        for cmd, (report_us, is_test, checked, rej), key in zip(commands, prepared, keys):
            ref_key = (cmd.reporting_mpid, cmd.client_ref) if cmd.client_ref else None
            if ref_key and ref_key in seen:
                results.append(replace(seen[ref_key], client_ref=cmd.client_ref))
                continue
            if ref_key and ref_key in batch_refs:
                results.append(replace(batch_refs[ref_key], repeated=True))
                continue
            if rej is not None:
                results.append(Result(cmd.action, cmd.client_ref, "REJECTED", reject=rej))
                continue
            try:
                event = self._decide(cmd, seq + 1, report_us, is_test, checked, key, states,
                                     existing_dups, pending_keys)
            except Rejected as exc:
                results.append(Result(cmd.action, cmd.client_ref, "REJECTED", reject=exc.reject))
                continue
            seq += 1
            events.append(event)
            p = event.payload
            result = Result(
                cmd.action, cmd.client_ref, "ACCEPTED", control_number=event.control_number, seq=event.seq,
                timeliness=p.get("timeliness"), modifier3=p.get("modifier3"),
                warning=(f"possible duplicate of {p['duplicate_of']}" if p.get("duplicate_of") else None),
            )
            results.append(result)
            if ref_key:
                batch_refs[ref_key] = result
        return results, project(events), events

    def _decide(self, cmd: Command, seq: int, report_us: int, is_test: bool, checked: Any, key: str | None,
                states: dict[int, _State], existing_dups: dict[str, int], pending_keys: dict[str, int]) -> Event:
        report_date = market_parts(report_us)[0]
        rules = self.rulebook.at(report_date)
        original: _State | None = None
        if cmd.action != "NEW":
            original = states.get(cmd.original_control_number)  # type: ignore[arg-type]
            if original is None:
                raise Rejected("REPORT_UNKNOWN", "original_control_number", f"no report with control number {cmd.original_control_number}")
            if original.mpid != cmd.reporting_mpid:
                raise Rejected("NOT_OWN_REPORT", "original_control_number", f"report {original.control_number} belongs to another firm")
            if original.status != "ACTIVE":
                raise Rejected("REPORT_NOT_ACTIVE", "original_control_number", f"report {original.control_number} is {original.status.lower()}")
            if original.is_test != is_test:
                raise Rejected("TEST_MISMATCH", "test", "a test report and a production report cannot act on each other")
            in_window = within_cancel_correct_window(dt.date.fromisoformat(original.first_report_date), report_date, rules)
            if cmd.action in ("CANCEL", "CORRECT") and not in_window:
                raise Rejected("WINDOW_CLOSED", "action", f"report {original.control_number} is past the {rules.cancel_correct_window_business_days}-business-day cancel/correct window: REVERSE it")
            if cmd.action == "REVERSE" and in_window:
                raise Rejected("WINDOW_OPEN", "action", f"report {original.control_number} is within the cancel/correct window: CANCEL it instead")
        duplicate_of = None
        if key is not None:
            match = pending_keys.get(key) or existing_dups.get(key)
            if match is not None and match in states and states[match].status != "ACTIVE":
                match = None
            if match is not None and original is not None and match == original.control_number:
                match = None
            if match is not None and not cmd.allow_duplicate:
                if rules.duplicate_terms == "reject":
                    raise Rejected("DUPLICATE_TRADE", "client_ref", f"the terms match accepted report {match}; if this is a separate trade, resend with allow_duplicate=Y")
                duplicate_of = match
        control_number = CONTROL_BASE + seq
        report_date_s = report_date.isoformat()
        payload: dict[str, Any] = {"report_date": report_date_s}
        if cmd.action in ("NEW", "CORRECT"):
            t = cmd.terms
            s = checked.security
            tl = checked.timeliness
            payload.update(
                cusip=t.cusip, symbol=s.symbol, data_set=s.data_set, grade=s.grade, rule_144a=s.rule_144a,
                side=t.side, capacity=t.capacity, contra=t.contra, contra_type=t.contra_type,
                quantity_c=checked.quantity_c, price_u=checked.price_u, yield_u=checked.yield_u,
                execution_us=t.execution_us, execution_date=checked.execution_date.isoformat(),
                settlement_date=checked.settlement_date.isoformat(), commission_c=checked.commission_c,
                when_issued=t.when_issued, special_price=t.special_price, weighted_average=t.weighted_average,
                trading_market=t.trading_market, merger_transfer=t.merger_transfer, remuneration=t.remuneration,
                locked_in=t.locked_in, agu=t.agu, is_test=is_test, withheld=checked.withheld,
                duplicate_of=duplicate_of, terms_key=key, rulebook=checked.rulebook_version,
                as_of=tl.as_of, late=tl.late, modifier3=tl.modifier3, timeliness=tl.label,
                deadline_us=tl.deadline_us,
            )
            if cmd.action == "NEW":
                payload.update(first_control_number=control_number, first_report_date=report_date_s)
            else:
                payload.update(first_control_number=original.first_control_number,
                               first_report_date=original.first_report_date)
            states[control_number] = _State(control_number, cmd.reporting_mpid, "ACTIVE", report_date_s,
                                            payload["first_control_number"], payload["first_report_date"],
                                            is_test, key)
            pending_keys[key] = control_number
        if original is not None:
            original.status = {"CANCEL": "CANCELLED", "CORRECT": "CORRECTED", "REVERSE": "REVERSED"}[cmd.action]
            payload["test"] = is_test
        event_cn = original.control_number if cmd.action == "CANCEL" else control_number
        return Event(
            seq=seq, recorded_us=report_us, event_type=cmd.action, channel=cmd.channel,
            mpid=cmd.reporting_mpid, client_ref=cmd.client_ref, control_number=event_cn,
            ref_control_number=original.control_number if original else None, payload=payload,
        )


class Sequencer:
    """A thread that groups commands from many callers into engine batches (group commit)."""

    def __init__(self, engine: Engine, max_batch: int = 2000):
        self.engine = engine
        self.max_batch = max_batch
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="bondtape-sequencer", daemon=True)
        self._stopping = False
        self._thread.start()

    def submit(self, command: Command) -> Future:
        if self._stopping:
            raise EngineUnavailable("the sequencer is shutting down")
        fut: Future = Future()
        self._queue.put((command, fut))
        return fut

    def __call__(self, command: Command, timeout: float | None = 30.0) -> Result:
        return self.submit(command).result(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch, stopping = drain_batch(self._queue, item, self.max_batch)
            if stopping:
                self._queue.put(None)  # stop after this batch
            try:
                results = self.engine.submit([c for c, _ in batch])
            except Exception as exc:  # every waiter learns of the failure; nothing was journaled
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            for (_, fut), res in zip(batch, results):
                fut.set_result(res)

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking commands, finish those queued, and stop the thread."""
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout)

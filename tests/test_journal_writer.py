"""The journal writer process: on a SQLite file the engine validates in chunks and a process
of its own writes them (bondtape.journal.writer_child). It must answer exactly as the
engine writing on its own connection does, and lose or half-write nothing when it fails."""
import datetime as dt
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from decimal import Decimal

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings, strategies as st

from bondtape.db import connect
from bondtape.engine import Engine, EngineUnavailable
from bondtape.journal.schema import CONTROL_BASE, journal, journal_head, trade_reports
from bondtape.journal.verify import verify
from bondtape.journal.writer import WriterError, WriterProcess
from bondtape.rulebook import default_rulebook
from tests.conftest import et
from tests.helpers import act, new, standard_sqlite

COMMANDS = st.lists(
    st.tuples(
        st.sampled_from(["NEW", "NEW", "NEW", "CANCEL", "CORRECT", "REVERSE"]),
        st.integers(0, 12),  # which control number it acts on: CONTROL_BASE + 1 + this
        st.sampled_from(["DLRA", "DLRB"]),
        st.integers(0, 30),  # business-day offset of the report
        st.sampled_from([Decimal("1000"), Decimal("2000000")]),  # few values: same terms happen
        st.sampled_from([None, "a", "b"]),  # a client ref shared with other commands, or its own
    ),
    min_size=1, max_size=30,
)


def _commands(drawn) -> list:
    cal = default_rulebook().at(dt.date(2024, 3, 4)).calendar
    out = []
    for i, (action, pick, mpid, offset, qty, ref) in enumerate(drawn):
        day = cal.add_business_days(dt.date(2024, 3, 4), offset)
        when = et(day.year, day.month, day.day, 12, 0, i % 60)
        ref = ref or f"r{i}"
        if action == "NEW":
            out.append(new(mpid=mpid, ref=ref, quantity=qty, report_us=when))
        else:
            out.append(act(action, CONTROL_BASE + 1 + pick, mpid=mpid, ref=ref, report_us=when, quantity=qty + 1))
    return out


def _tables(db) -> tuple[list, list]:
    with db.connect() as conn:
        return ([tuple(r) for r in conn.execute(sa.select(journal).order_by(journal.c.seq))],
                [tuple(r) for r in conn.execute(sa.select(trade_reports).order_by(trade_reports.c.control_number))])


def _writer_pid(engine: Engine) -> int:
    assert engine._writer is not None, "this engine writes on its own connection, not through a writer process"
    return engine._writer.proc.pid


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(COMMANDS, st.lists(st.integers(1, 12), min_size=1, max_size=6))
def test_chunks_through_the_writer_answer_and_store_as_one_inline_transaction(tmp_path_factory, drawn, sizes):
    """Batches cut into chunks of two (each chunk validated against what the earlier chunks
    of its batch did, which the database read does not see yet) give the same results and
    the same journal and projection as the engine writing each batch on its own connection.
    Batches of one chunk or less go on the engine's connection, so the two paths alternate."""
    commands = _commands(drawn)
    folder = tmp_path_factory.mktemp("writer")
    answers, stored = [], []
    for writer in ("auto", "inline"):
        db = standard_sqlite(folder / f"{writer}.db")
        engine = Engine(db, writer=writer)
        engine.CHUNK = 2
        results, at, k, chunked = [], 0, 0, False
        while at < len(commands):
            batch = commands[at:at + sizes[k % len(sizes)]]
            results += [r.as_dict() for r in engine.submit(batch)]
            chunked |= len(batch) > engine.CHUNK
            at, k = at + len(batch), k + 1
        if writer == "auto" and chunked:
            assert engine._writer is not None and engine._writer.proc.pid != os.getpid()
        if writer == "inline":
            assert engine._writer is None
        answers.append(results)
        stored.append(_tables(db))
        report = verify(db)
        assert report.ok, report.problems
        engine.close()
        db.dispose()
    assert answers[0] == answers[1]
    assert stored[0] == stored[1]


def _count(db) -> tuple[int, int]:
    with db.connect() as conn:
        return (conn.execute(sa.select(sa.func.count()).select_from(journal)).scalar_one(),
                conn.execute(sa.select(journal_head.c.last_seq)).scalar_one())


def test_writer_killed_between_batches_is_replaced(tmp_path):
    db = standard_sqlite(tmp_path / "k.db")
    engine = Engine(db)
    engine.CHUNK = 1  # a batch of two goes through the writer
    assert all(r.accepted for r in engine.submit([new(ref="one"), new(ref="two", quantity=Decimal("2000"))]))
    first = _writer_pid(engine)
    os.kill(first, signal.SIGKILL)
    engine._writer.proc.wait()
    results = engine.submit([new(ref="three", quantity=Decimal("3000")), new(ref="four", quantity=Decimal("4000"))])
    assert [(r.status, r.seq) for r in results] == [("ACCEPTED", 3), ("ACCEPTED", 4)]
    assert _writer_pid(engine) != first
    assert verify(db).ok
    engine.close()


def test_writer_dying_mid_batch_loses_the_whole_batch_and_a_retry_journals_it_once(tmp_path, monkeypatch):
    db = standard_sqlite(tmp_path / "d.db")
    engine = Engine(db)
    engine.CHUNK = 2
    assert engine.submit([new(ref="before")])[0].accepted
    batch = [new(ref=f"b{i}", quantity=Decimal(1000 * (i + 1))) for i in range(6)]
    sent = []
    real_write = WriterProcess.write

    def write_then_die(self, *rows):
        real_write(self, *rows)
        sent.append(len(rows[0]))
        if len(sent) == 2:  # two chunks are in the writer's open transaction: it dies
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    monkeypatch.setattr(WriterProcess, "write", write_then_die)
    with pytest.raises(EngineUnavailable, match="journal writer process ended"):
        engine.submit(batch)
    assert _count(db) == (1, 1)  # nothing of the batch, the head where it was
    monkeypatch.setattr(WriterProcess, "write", real_write)
    results = engine.submit(batch)
    assert [r.status for r in results] == ["ACCEPTED"] * 6
    assert [r.seq for r in results] == [2, 3, 4, 5, 6, 7] and not any(r.repeated for r in results)
    assert _count(db) == (7, 7)
    assert verify(db).ok
    engine.close()


def test_a_failed_insert_in_the_writer_commits_nothing_of_the_batch(tmp_path):
    db = standard_sqlite(tmp_path / "f.db")
    with db.begin() as conn:  # the writer's third row fails (as a full disk or a bug would)
        conn.exec_driver_sql("CREATE TRIGGER boom BEFORE INSERT ON journal WHEN NEW.client_ref = 'boom' "
                             "BEGIN SELECT RAISE(ABORT, 'refused by trigger'); END")
    engine = Engine(db)
    engine.CHUNK = 2
    batch = [new(ref="x1"), new(ref="x2", quantity=Decimal("2000")), new(ref="boom", quantity=Decimal("3000")),
             new(ref="x4", quantity=Decimal("4000"))]
    with pytest.raises(WriterError, match="refused by trigger"):
        engine.submit(batch)
    assert _count(db) == (0, 0)
    results = engine.submit([batch[0], batch[1], batch[3]])  # the same writer goes on
    assert [r.seq for r in results] == [1, 2, 3]
    assert verify(db).ok
    engine.close()


def test_a_locked_database_makes_the_writer_answer_unavailable_and_it_goes_on(tmp_path, monkeypatch):
    """The writer's SQLite (APSW's) says busy as its own exception: the engine must see the
    DB-API kind, OperationalError, and say unavailable (a retry is safe), not crash."""
    import bondtape.journal.writer as writer_module
    monkeypatch.setattr(writer_module, "SQLITE_PRAGMAS", (*writer_module.SQLITE_PRAGMAS, "PRAGMA busy_timeout=0"))
    db = standard_sqlite(tmp_path / "b.db")
    engine = Engine(db)
    engine.CHUNK = 1
    assert engine.submit([new(ref="warm")])[0].accepted  # set up, on the engine's own connection
    batch = [new(ref="one", quantity=Decimal("3000")), new(ref="two", quantity=Decimal("2000"))]
    other = sqlite3.connect(tmp_path / "b.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(EngineUnavailable, match="OperationalError: database is locked"):
            engine.submit(batch)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert _count(db) == (1, 1)
    writer = _writer_pid(engine)
    assert [r.seq for r in engine.submit(batch)] == [2, 3]
    assert _writer_pid(engine) == writer  # the same writer goes on once the lock is free
    assert verify(db).ok
    engine.close()


def test_the_writer_holds_the_lock_before_the_engine_reads(tmp_path):
    """Another connection's write waits for the batch (the writer took the lock first), so
    the engine's snapshot cannot miss a report committed during its batch."""
    db = standard_sqlite(tmp_path / "l.db")
    engine = Engine(db)
    engine.CHUNK = 1
    engine.submit([new(ref="warm")])
    order = []
    real_begin = WriterProcess.begin

    def begin_then_try_another_writer(self):
        real_begin(self)
        other = sqlite3.connect(tmp_path / "l.db", isolation_level=None, timeout=0)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.close()
        order.append("refused")

    WriterProcess.begin = begin_then_try_another_writer
    try:
        assert all(r.accepted for r in engine.submit([new(ref="next", quantity=Decimal("5000")),
                                                      new(ref="last", quantity=Decimal("6000"))]))
    finally:
        WriterProcess.begin = real_begin
    assert order == ["refused"]
    engine.close()


def test_the_writer_ends_with_the_engine_process(tmp_path):
    """SIGKILL to the engine's process: its writer sees its input close, rolls back and exits."""
    standard_sqlite(tmp_path / "p.db").dispose()
    script = textwrap.dedent(f"""
        import os, signal, sys
        from decimal import Decimal
        from bondtape.db import connect
        from bondtape.engine import Engine
        from tests.helpers import new
        engine = Engine(connect("sqlite:///{tmp_path / 'p.db'}"))
        engine.CHUNK = 1
        engine.submit([new(ref="a"), new(ref="b", quantity=Decimal("2000"))])
        print(engine._writer.proc.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split(") ")[1].startswith("Z"):  # ended, not yet reaped by init
                    break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the writer process {pid} outlived its engine's process")


def test_in_memory_sqlite_writes_on_the_engine_connection():
    db = connect("sqlite://")
    engine = Engine(db)
    engine.CHUNK = 1
    engine.submit([new(ref="m"), new(ref="n")])
    assert engine._writer is None
    with pytest.raises(ValueError, match="auto or inline"):
        Engine(db, writer="process")

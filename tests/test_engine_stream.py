"""Engine.submit_stream: on a SQLite file each batch is validated while the batch before
commits (against what that batch did, which its snapshot may not hold yet). It must answer
and store exactly what Engine.submit of each batch in turn does, notice anyone who wrote
in between, and pass on every committed batch's results, even when it ends by an error."""
import datetime as dt
import os
import select
import signal
import sqlite3
import time
from decimal import Decimal

import orjson
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings, strategies as st

from bondtape.engine import Engine, EngineUnavailable
from bondtape.journal.schema import journal, journal_head
from bondtape.journal.verify import verify
from bondtape.journal.writer import WriterError, WriterProcess
from bondtape.reference.model import Security
from bondtape.reference.store import upsert_securities
from tests.conftest import make_cusip
from tests.helpers import act, new, standard_sqlite
from tests.test_journal_writer import COMMANDS, _commands, _tables


def _batches(commands: list, sizes: list[int]) -> list[list]:
    out, at, k = [], 0, 0
    while at < len(commands):
        out.append(commands[at:at + sizes[k % len(sizes)]])
        at, k = at + sizes[k % len(sizes)], k + 1
    return out


def _engine(path, chunk: int = 2) -> tuple:
    """A database with the standard reference data, and an engine validating in chunks of
    ``chunk`` (so that batches of a few commands already go through the writer process)."""
    db = standard_sqlite(path)
    engine = Engine(db)
    engine.CHUNK = chunk
    return db, engine


def _at_validation(monkeypatch, n: int, act) -> None:
    """``act(writer)`` as the engine starts validating the ``n``-th batch through the writer."""
    real, calls = Engine._validate_chunks, []

    def validate(self, conn, writer, commands, batch):
        calls.append(1)
        if len(calls) == n:
            act(writer)
        return real(self, conn, writer, commands, batch)

    monkeypatch.setattr(Engine, "_validate_chunks", validate)


def _stream(engine: Engine, batches) -> list[list]:
    answers: list[list] = []
    engine.submit_stream(batches, answers.append)
    return answers


class HeldRequests:
    """Holds a stream's commit and begin requests to the writer until the next batch's
    snapshot has been read (or an answer is awaited), then sends them in order: the next
    batch is then always validated against a snapshot without the batch before, the case
    where only the engine's memory of that batch tells what it did. ``between`` runs after
    a commit is sent and before the next begin (for another writer to get in)."""

    def __init__(self, monkeypatch, between=None):
        self.frames: list[tuple[bytes, bytes]] = []
        self.between = between
        real_validate, real_answer = Engine._validate_chunks, WriterProcess.answer
        held = self

        def commit_async(writer, last_seq):
            held.frames.append((b"C", orjson.dumps(last_seq)))
            writer._unanswered += 1

        def begin_async(writer):
            held.frames.append((b"B", b""))
            writer._unanswered += 1

        def validate(engine, conn, writer, commands, batch):
            held.flush(writer)
            return real_validate(engine, conn, writer, commands, batch)

        def answer(writer):
            held.flush(writer)
            return real_answer(writer)

        monkeypatch.setattr(WriterProcess, "commit_async", commit_async)
        monkeypatch.setattr(WriterProcess, "begin_async", begin_async)
        monkeypatch.setattr(Engine, "_validate_chunks", validate)
        monkeypatch.setattr(WriterProcess, "answer", answer)

    def flush(self, writer):
        frames, self.frames = self.frames, []
        for op, payload in frames:
            writer._send(op, payload)
            if op == b"C" and self.between is not None:
                self.between()


def _journaled(db) -> tuple[int, int]:
    with db.connect() as conn:
        return (conn.execute(sa.select(sa.func.count()).select_from(journal)).scalar_one(),
                conn.execute(sa.select(journal_head.c.last_seq)).scalar_one())


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(COMMANDS, st.lists(st.integers(0, 9), min_size=1, max_size=6), st.booleans())
def test_a_stream_answers_and_stores_as_submit_of_each_batch_in_turn(tmp_path_factory, monkeypatch, drawn, sizes, hold):
    """Cancels, corrections and reversals of the batch before's reports, its client
    references sent again, the same terms again: chunks of two, so batches of three or more
    are pipelined, and smaller ones (and empty ones) go between them on the engine's own
    connection. ``hold``: every pipelined batch's snapshot is without the batch before."""
    batches = _batches(_commands(drawn), [s or 1 for s in sizes])
    batches.insert(sizes[0] % (len(batches) + 1), [])  # an empty batch somewhere
    folder = tmp_path_factory.mktemp("stream")
    answers, stored = [], []
    for how in ("stream", "submit"):
        db = standard_sqlite(folder / f"{how}.db")
        engine = Engine(db, writer="auto" if how == "stream" else "inline")
        engine.CHUNK = 2
        if how == "stream":
            with monkeypatch.context() as m:
                if hold:
                    HeldRequests(m)
                got = _stream(engine, batches)
        else:
            got = [engine.submit(b) for b in batches]
        answers.append([[r.as_dict() for r in batch] for batch in got])
        stored.append(_tables(db))
        report = verify(db)
        assert report.ok, report.problems
        engine.close()
        db.dispose()
    assert answers[0] == answers[1]
    assert stored[0] == stored[1]


def test_pipelining_happens(tmp_path, monkeypatch):
    """The next batch is validated before the batch before's commit is answered."""
    db, engine = _engine(tmp_path / "p.db")
    seen = []
    real = Engine._validate_chunks

    def spy(self, conn, writer, commands, batch):
        seen.append(writer.unanswered)
        return real(self, conn, writer, commands, batch)

    monkeypatch.setattr(Engine, "_validate_chunks", spy)
    batches = [[new(ref=f"b{b}-{i}", quantity=Decimal(1000 * (10 * b + i + 1))) for i in range(3)] for b in range(3)]
    answers = _stream(engine, batches)
    assert [[r.seq for r in a] for a in answers] == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert seen == [0, 2, 2]  # the first alone; then the batch before's commit and this one's BEGIN
    engine.close()


def _other_engine_writes(db, command):
    other = Engine(db, writer="inline")
    result = other.submit([command])[0]
    other.close()
    return result


def test_a_report_journaled_by_another_writer_between_batches_is_seen(tmp_path):
    """Someone else commits after the batch before and before this batch's transaction: the
    batch validated against the older state is rolled back and validated again (here: the
    other report has the same terms, a duplicate)."""
    db, engine = _engine(tmp_path / "o.db")
    other = {}

    def batches():
        yield [new(ref="a1", quantity=Decimal("1000")), new(ref="a2", quantity=Decimal("2000")),
               new(ref="a3", quantity=Decimal("3000"))]
        other["result"] = _other_engine_writes(db, new(mpid="DLRB", ref="x", quantity=Decimal("7000")))
        yield [new(ref="b1", quantity=Decimal("4000")), new(mpid="DLRB", ref="b2", quantity=Decimal("7000")),
               new(ref="b3", quantity=Decimal("5000"))]

    answers = _stream(engine, batches())
    assert other["result"].seq == 4
    assert [r.seq for r in answers[1]] == [5, None, 6]
    assert answers[1][1].reject.code == "DUPLICATE_TRADE"
    assert verify(db).ok
    engine.close()


def test_reference_data_changed_between_batches_is_seen(tmp_path, monkeypatch):
    """Another writer changes reference data after the batch before commits and after this
    batch's snapshot was read, before its transaction begins: validated again, with it."""
    db, engine = _engine(tmp_path / "r.db")
    added = make_cusip("55555555")

    def add_security():
        with db.begin() as conn:  # waits for the batch before's commit
            upsert_securities(conn, [Security(added, "NEWC4000001", "Newco", Decimal("4"), dt.date(2034, 1, 1),
                                              "CORP", "IG", False, dt.date(2002, 7, 1))])

    HeldRequests(monkeypatch, between=add_security)
    batches = [[new(ref=f"a{i}", quantity=Decimal(1000 * (i + 1))) for i in range(3)],
               [new(ref="b1", cusip=added), new(ref="b2", quantity=Decimal("8000")),
                new(ref="b3", quantity=Decimal("9000"))]]
    answers = _stream(engine, batches)
    assert [r.status for r in answers[1]] == ["ACCEPTED"] * 3
    assert verify(db).ok
    engine.close()


def test_a_duplicate_after_the_batch_before_cancelled_the_first_match(tmp_path, monkeypatch):
    """Two active reports with the same terms; the batch before cancels the first; the same
    terms again are a duplicate of the second, even though this batch's snapshot still shows
    the first active."""
    db, engine = _engine(tmp_path / "k.db")
    first = engine.submit([new(ref="first", quantity=Decimal("1000")),
                           new(ref="second", quantity=Decimal("1000"), allow_duplicate=True)])
    assert [r.status for r in first] == ["ACCEPTED", "ACCEPTED"]
    HeldRequests(monkeypatch)
    batches = [[act("CANCEL", first[0].control_number, ref="cancel"),
                new(ref="f1", quantity=Decimal("2000")), new(ref="f2", quantity=Decimal("3000"))],
               [new(ref="again", quantity=Decimal("1000")), new(ref="f3", quantity=Decimal("4000")),
                new(ref="f4", quantity=Decimal("5000"))]]
    answers = _stream(engine, batches)
    assert answers[1][0].reject is not None and answers[1][0].reject.code == "DUPLICATE_TRADE"
    assert str(first[1].control_number) in answers[1][0].reject.message
    assert verify(db).ok
    engine.close()


def test_a_duplicate_of_two_matches_made_by_the_batch_before_names_the_first(tmp_path, monkeypatch):
    db, engine = _engine(tmp_path / "t.db")
    HeldRequests(monkeypatch)
    batches = [[new(ref="one", quantity=Decimal("1000")), new(ref="two", quantity=Decimal("1000"), allow_duplicate=True),
                new(ref="f1", quantity=Decimal("2000"))],
               [new(ref="again", quantity=Decimal("1000")), new(ref="f2", quantity=Decimal("3000")),
                new(ref="f3", quantity=Decimal("4000"))]]
    answers = _stream(engine, batches)
    assert answers[0][1].warning is None and answers[0][1].accepted
    assert answers[1][0].reject is not None and answers[1][0].reject.code == "DUPLICATE_TRADE"
    assert str(answers[0][0].control_number) in answers[1][0].reject.message
    engine.close()


def test_a_client_ref_of_the_batch_before_reused_for_a_cancel_is_refused(tmp_path, monkeypatch):
    """The batch before's references (not yet in this batch's snapshot) tell a retry, which
    gets the first answer, from another request under the same client_ref (CLIENT_REF_REUSED)."""
    from bondtape.journal.schema import CONTROL_BASE

    db, engine = _engine(tmp_path / "r.db")
    HeldRequests(monkeypatch)
    cn = CONTROL_BASE + 1
    batches = [[new(ref="one", quantity=Decimal("1000")), new(ref="f1", quantity=Decimal("2000")),
                new(ref="f2", quantity=Decimal("3000"))],
               [act("CANCEL", cn, ref="one"), new(ref="one", quantity=Decimal("1000")),
                new(ref="f3", quantity=Decimal("4000"))]]
    answers = _stream(engine, batches)
    assert answers[0][0].control_number == cn
    reused, retry = answers[1][0], answers[1][1]
    assert reused.reject is not None and reused.reject.code == "CLIENT_REF_REUSED"
    assert retry.repeated and retry.control_number == cn
    assert _journaled(db) == (4, 4) and verify(db).ok
    engine.close()


def test_ctrl_c_after_a_commit_was_sent_still_answers_that_batch(tmp_path):
    """Interrupted while the batch before commits: it committed, so its results are passed
    on before the interrupt goes on; nothing of the next batch is journaled."""
    db, engine = _engine(tmp_path / "c.db")

    def batches():
        yield [new(ref=f"a{i}", quantity=Decimal(1000 * (i + 1))) for i in range(3)]
        raise KeyboardInterrupt

    answers: list = []
    with pytest.raises(KeyboardInterrupt):
        engine.submit_stream(batches(), answers.append)
    assert [[r.seq for r in a] for a in answers] == [[1, 2, 3]]
    assert _journaled(db) == (3, 3)
    assert [r.seq for r in engine.submit([new(ref=f"n{i}", quantity=Decimal(50_000 + i)) for i in range(3)])] == [4, 5, 6]
    assert verify(db).ok
    engine.close()


def test_a_failed_commit_ends_the_stream_and_journals_nothing_after_it(tmp_path):
    db = standard_sqlite(tmp_path / "f.db")
    with db.begin() as conn:  # the second batch's last row fails in the writer
        conn.exec_driver_sql("CREATE TRIGGER boom BEFORE INSERT ON journal WHEN NEW.client_ref = 'boom' "
                             "BEGIN SELECT RAISE(ABORT, 'refused by trigger'); END")
    engine = Engine(db)
    engine.CHUNK = 2
    batches = [[new(ref=f"a{i}", quantity=Decimal(1000 * (i + 1))) for i in range(3)],
               [new(ref="b1", quantity=Decimal("7000")), new(ref="boom", quantity=Decimal("8000")),
                new(ref="b3", quantity=Decimal("9000"))],
               [new(ref=f"c{i}", quantity=Decimal(20_000 + i)) for i in range(3)]]
    answers: list = []
    with pytest.raises(WriterError, match="refused by trigger"):
        engine.submit_stream(batches, answers.append)
    assert [[r.seq for r in a] for a in answers] == [[1, 2, 3]]
    assert _journaled(db) == (3, 3)
    assert verify(db).ok
    engine.close()


_FOUR_BATCHES = [[new(ref=f"b{b}-{i}", quantity=Decimal(1000 * (10 * b + i + 1))) for i in range(3)] for b in range(4)]


def _writer_killed_mid_stream(engine: Engine, monkeypatch, before_kill=lambda writer: None) -> list[list]:
    """Four batches of three streamed; the writer killed (after ``before_kill(writer)``) as
    the third is validated: the stream says unavailable. The answers passed on."""
    def die(writer):
        before_kill(writer)
        os.kill(writer.proc.pid, signal.SIGKILL)
        writer.proc.wait()

    _at_validation(monkeypatch, 3, die)
    answers: list = []
    with pytest.raises(EngineUnavailable, match="journal writer process ended"):
        engine.submit_stream(_FOUR_BATCHES, answers.append)
    return answers


def test_the_writer_dying_mid_stream_says_unavailable_and_every_answer_is_journaled(tmp_path, monkeypatch):
    db, engine = _engine(tmp_path / "d.db")
    real = Engine._validate_chunks
    answers = _writer_killed_mid_stream(engine, monkeypatch)
    answered = [r.seq for a in answers for r in a]
    journaled, head = _journaled(db)
    assert answered == list(range(1, len(answered) + 1)) and head == journaled  # every answer is journaled
    # the second batch's commit may or may not have landed before the kill; if it did, its
    # answer is passed on, unless the kill came between the commit and the answer
    assert (len(answered), journaled) in ((3, 3), (6, 6), (3, 6))
    monkeypatch.setattr(Engine, "_validate_chunks", real)
    retry = _stream(engine, _FOUR_BATCHES)  # the same file again: the first answers come back
    assert [r.seq for a in retry for r in a] == list(range(1, 13))
    assert verify(db).ok
    engine.close()


def test_a_commit_the_writer_answered_before_it_died_is_passed_on(tmp_path, monkeypatch):
    """The writer commits the second batch and answers, then dies while the third is
    validated: the second batch's results are passed on before the stream says unavailable."""
    db, engine = _engine(tmp_path / "a.db")

    def answered_the_commit(writer):  # the oldest answer owed is the second batch's commit
        assert select.select([writer.proc.stdout], [], [], 30)[0], "the writer did not answer the commit"

    answers = _writer_killed_mid_stream(engine, monkeypatch, answered_the_commit)
    assert [[r.seq for r in a] for a in answers] == [[1, 2, 3], [4, 5, 6]]
    assert _journaled(db) == (6, 6)
    assert verify(db).ok
    engine.close()


def test_a_long_stream_keeps_the_wal_bounded(tmp_path):
    """Pipelined, the engine's next snapshot is open whenever a batch commits, and the WAL
    can start over only when none is: once it holds WAL_BOUND_BYTES a batch goes in turn."""
    db = standard_sqlite(tmp_path / "w.db")
    with db.connect() as conn:
        page = conn.exec_driver_sql("PRAGMA page_size").scalar()
    engine = Engine(db)
    engine.CHUNK = 10
    engine.WAL_BOUND_BYTES = 64 * page
    assert engine.submit([new(ref="warm")])[0].accepted
    engine.checkpointer.interval = 0.0
    wal = str(tmp_path / "w.db-wal")

    def restarts() -> int:  # the WAL header's checkpoint sequence: one more each time it starts over
        with open(wal, "rb") as f:
            return int.from_bytes(f.read(16)[12:16], "big")

    largest, before = 0, restarts()

    def answered(results):
        nonlocal largest
        assert all(r.accepted for r in results)
        largest = max(largest, os.path.getsize(wal))

    batches = [[new(ref=f"b{b}-{i}", quantity=Decimal(1000 * (100 * b + i + 1))) for i in range(40)] for b in range(60)]
    engine.submit_stream(batches, answered)
    # measured: 10 restarts and at most 132-152 pages; pipelined throughout, 1-3 and 569-1,039
    assert restarts() - before >= 5
    assert largest < 400 * page, (largest, page)
    assert verify(db).ok
    engine.close()


def _bytes_waiting(stream) -> int:
    import fcntl
    import termios

    buf = bytearray(4)
    fcntl.ioctl(stream.fileno(), termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


def test_a_failed_begin_of_a_pipelined_batch_writes_none_of_its_rows(tmp_path, monkeypatch):
    """The engine sends a pipelined batch's rows before it reads whether its BEGIN took the
    lock. If it did not (another writer held it), the writer must not insert them outside a
    transaction, where each would commit on its own past the journal's head."""
    import bondtape.journal.writer as writer_module

    monkeypatch.setattr(writer_module, "SQLITE_PRAGMAS", (*writer_module.SQLITE_PRAGMAS, "PRAGMA busy_timeout=0"))
    db, engine = _engine(tmp_path / "b.db")
    other = sqlite3.connect(tmp_path / "b.db", isolation_level=None, timeout=10)
    real_begin_async = WriterProcess.begin_async

    def begin_async_while_locked(writer):
        other.execute("BEGIN IMMEDIATE")  # waits for the batch before's commit, then holds the lock
        real_begin_async(writer)
        deadline = time.monotonic() + 30
        while _bytes_waiting(writer.proc.stdout) < 18:  # the commit's answer and the BEGIN's
            assert time.monotonic() < deadline, "the writer did not answer"
            time.sleep(0.01)
        other.execute("ROLLBACK")  # free again before the batch's rows reach the writer

    monkeypatch.setattr(WriterProcess, "begin_async", begin_async_while_locked)
    batches = [[new(ref=f"a{i}", quantity=Decimal(1000 * (i + 1))) for i in range(3)],
               [new(ref=f"b{i}", quantity=Decimal(10_000 * (i + 1))) for i in range(3)]]
    answers: list = []
    with pytest.raises(EngineUnavailable, match="locked"):
        engine.submit_stream(batches, answers.append)
    other.close()
    assert [[r.seq for r in a] for a in answers] == [[1, 2, 3]]
    assert _journaled(db) == (3, 3)
    report = verify(db)
    assert report.ok, report.problems
    monkeypatch.setattr(WriterProcess, "begin_async", real_begin_async)
    assert [r.seq for r in _stream(engine, batches[1:])[0]] == [4, 5, 6]
    engine.close()


def test_a_writer_that_ends_with_a_commit_in_flight_is_not_taken_for_its_successor(tmp_path, monkeypatch):
    """The writer dies after the stream last saw it alive and before the next batch: a new
    writer is started for that batch, and the answer to the commit sent to the dead one
    must not be read from the new one (its BEGIN's answer would pass for the commit's)."""
    db, engine = _engine(tmp_path / "s.db")
    real_commit_async, real_wal_full = WriterProcess.commit_async, Engine._wal_full
    stopped = {}

    def commit_async_to_a_stopped_writer(writer, last_seq):
        os.kill(writer.proc.pid, signal.SIGSTOP)  # it has not got to the commit...
        stopped["writer"] = writer
        real_commit_async(writer, last_seq)

    def wal_full_as_it_dies(self):
        writer = stopped.pop("writer", None)
        if writer is not None:  # ...and dies now, after the stream's check that it is alive
            os.kill(writer.proc.pid, signal.SIGKILL)
            writer.proc.wait()
        return real_wal_full(self)

    monkeypatch.setattr(WriterProcess, "commit_async", commit_async_to_a_stopped_writer)
    monkeypatch.setattr(Engine, "_wal_full", wal_full_as_it_dies)
    batches = [[new(ref=f"a{i}", quantity=Decimal(1000 * (i + 1))) for i in range(3)],
               [new(ref=f"b{i}", quantity=Decimal(10_000 * (i + 1))) for i in range(3)]]
    answers: list = []
    with pytest.raises(EngineUnavailable, match="journal writer process ended"):
        engine.submit_stream(batches, answers.append)
    assert answers == [] and _journaled(db) == (0, 0)
    engine.close()


def test_a_second_ctrl_c_while_the_first_is_handled_still_ends_the_writer(tmp_path, monkeypatch):
    db, engine = _engine(tmp_path / "i.db")
    real = Engine._validate_chunks

    def interrupted(*_):
        raise KeyboardInterrupt

    _at_validation(monkeypatch, 2, interrupted)  # its BEGIN is sent, the batch before's commit too
    batches = [[new(ref=f"a{i}", quantity=Decimal(1000 * (i + 1))) for i in range(3)],
               [new(ref=f"b{i}", quantity=Decimal(10_000 * (i + 1))) for i in range(3)]]
    with pytest.raises(KeyboardInterrupt):
        engine.submit_stream(batches, interrupted)  # and again while that commit's results are passed on
    assert engine._writer is None  # ended: its open transaction (the write lock) went with it
    other = sqlite3.connect(tmp_path / "i.db", isolation_level=None, timeout=1)
    other.execute("BEGIN IMMEDIATE")
    other.execute("ROLLBACK")
    other.close()
    monkeypatch.setattr(Engine, "_validate_chunks", real)
    assert [r.repeated for r in engine.submit(batches[0])] == [True] * 3  # it had committed
    engine.close()

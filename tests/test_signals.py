"""Stopping and interrupting commands as an operator does: real processes, real signals.

Each long-running command is started as a shell starts a background job (SIGINT ignored),
stopped with SIGINT or SIGTERM, and must exit 0 promptly with no traceback; finite work
interrupted must leave nothing half-done behind that looks complete, and a second run must
finish it. Time limits are generous: a slow machine makes a test slower, never red.
"""
from __future__ import annotations

import os
import re
import secrets
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from bondtape.db import connect as connect_db
from tests.conftest import POSTGRES_URL, drop_postgres, fresh_postgres_url

STOP_WITHIN = 60.0  # seconds; a server that stops takes well under one


def bondtape(*args: str, env: dict | None = None, ignore_sigint: bool = True) -> subprocess.Popen:
    """``python -m bondtape ARGS`` in its own session; SIGINT ignored as in a background job,
    or (``ignore_sigint=False``) as in a terminal's foreground, whatever the test run inherited."""
    def preexec() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN if ignore_sigint else signal.SIG_DFL)

    return subprocess.Popen([sys.executable, "-m", "bondtape", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                            preexec_fn=preexec, start_new_session=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(proc: subprocess.Popen, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} after {timeout} s")


def read_stderr_until(proc: subprocess.Popen, pattern: str, timeout: float = 60.0) -> tuple[re.Match, str]:
    """Read the process's stderr until ``pattern`` matches (the rest stays in the pipe)."""
    text = ""
    deadline = time.monotonic() + timeout
    fd = proc.stderr.fileno()
    while time.monotonic() < deadline:
        found = re.search(pattern, text)
        if found:
            return found, text
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536).decode(errors="replace")
            if not chunk:
                break
            text += chunk
    raise AssertionError(f"{pattern!r} not seen on stderr: {text[-2000:]}")


def stopped(proc: subprocess.Popen, sig: int, timeout: float = STOP_WITHIN) -> tuple[int, str, str]:
    """Send ``sig``; the exit status and the output. A process still running after ``timeout``
    is killed (with its group) and the test fails."""
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"still running {timeout} s after {signal.Signals(sig).name}; stderr: {err[-2000:]}")
    return proc.returncode, out, err


def signal_mid_run(proc: subprocess.Popen, sig: int, finished) -> tuple[str, str] | None:
    """Send ``sig`` to ``proc`` while it is held stopped (SIGSTOP) mid-run; its output. None
    when it had finished first (it exited, or ``finished()`` is true once it is stopped): the
    caller tries again."""
    os.kill(proc.pid, signal.SIGSTOP)
    if proc.poll() is not None or finished():
        os.kill(proc.pid, signal.SIGCONT)
        proc.communicate(timeout=120)
        return None
    proc.send_signal(sig)
    os.kill(proc.pid, signal.SIGCONT)
    return proc.communicate(timeout=STOP_WITHIN)


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)


class SseReader:
    """An SSE subscriber in a thread: records what it got and when its stream ended."""

    def __init__(self, url: str, cookies: dict | None = None):
        self.url, self.cookies = url, cookies or {}
        self.status: int | None = None
        self.text = ""
        self.ended = threading.Event()
        self.first = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            with httpx.stream("GET", self.url, cookies=self.cookies, timeout=httpx.Timeout(10, read=None)) as r:
                self.status = r.status_code
                for chunk in r.iter_text():
                    self.text += chunk
                    self.first.set()
        except httpx.HTTPError:
            pass
        finally:
            self.first.set()
            self.ended.set()


# --- servers with feed subscribers connected ------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("stop_with", ["SIGINT", "SIGTERM"])
def test_feed_serve_stops_with_subscribers_connected(market, db_url, stop_with):
    """``bondtape feed serve`` with an SSE and a WebSocket subscriber: it ends both streams
    (the WebSocket with 1012, reconnect) and exits 0. Before: an SSE subscriber held it for
    ever, and SIGTERM killed it (-15) without closing the feed or the bus."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    port = free_port()
    proc = bondtape("feed", "serve", "--port", str(port), "--db", db_url)
    try:
        wait_for_port(proc, port)
        sse = SseReader(f"http://127.0.0.1:{port}/feed/sse")
        assert sse.first.wait(30) and sse.status == 200, sse.text
        with connect(f"ws://127.0.0.1:{port}/feed/ws", open_timeout=30) as ws:
            code, _out, err = stopped(proc, getattr(signal, stop_with))
            assert code == 0, err
            assert "Traceback" not in err, err
            assert "stopped" in err
            assert sse.ended.wait(30), "the SSE stream was not ended"
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012, closed.value
    finally:
        kill_group(proc)


def _operator_session(db_url: str, key: bytes) -> str:
    """A website session of an operator (entitled to every feed data set): its cookie value."""
    from bondtape.access.api import create_active_user, create_organisation
    from bondtape.access.settings import AccessSettings
    from bondtape.clock import now_us
    from bondtape.db import connect
    from bondtape.web import sessions

    db = connect(db_url)
    try:
        org = create_organisation(db, "Market Operator", "OPERATOR")
        user = create_active_user(db, org_id=org, username="olive", password="operator password 1",
                                  roles=["operator_admin"])
        with db.begin() as conn:
            token, _ = sessions.start(conn, user, method="mfa", now_us=now_us(),
                                      settings=AccessSettings(secret_key=key), source="test")
    finally:
        db.dispose()
    return token


@pytest.mark.timeout(180)
@pytest.mark.parametrize("stop_with", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("mode", ["serve", "production"])
def test_serve_stops_with_an_sse_subscriber_connected(market, db_url, tmp_path, mode, stop_with):
    """``bondtape serve`` (one process; and the production worker, ``--workers 1``) with a
    signed-in SSE subscriber stops at once and exits 0. Before: the plain server waited for
    the stream for ever; the production worker for its whole shutdown_timeout, then logged
    a traceback."""
    from bondtape.web.sessions import SESSION_COOKIE

    key = secrets.token_bytes(32)
    token = _operator_session(db_url, key)
    port = free_port()
    args = ["serve", "--port", str(port), "--db", db_url] + (["--workers", "1"] if mode == "production" else [])
    env = {"BONDTAPE_SECRET_KEY": key.hex(), "BONDTAPE_SHUTDOWN_TIMEOUT": "600", "BONDTAPE_LOG_FORMAT": "text"}
    proc = bondtape(*args, env=env)
    try:
        wait_for_port(proc, port)
        sse = SseReader(f"http://127.0.0.1:{port}/feed/sse", cookies={SESSION_COOKIE: token})
        assert sse.first.wait(30) and sse.status == 200, (sse.status, sse.text)
        code, _out, err = stopped(proc, getattr(signal, stop_with))
        assert code == 0, err
        assert "Traceback" not in err, err
        assert sse.ended.wait(30)
    finally:
        kill_group(proc)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("stop_with", ["SIGINT", "SIGTERM"])
def test_web_serve_stops_gracefully(db_url, tmp_path, stop_with):
    """``bondtape web serve`` (HTTPS only) started in the background answers, then stops on
    SIGINT or SIGTERM: its services closed (it says `stopped` only after), exit 0, no
    traceback. Before: uvicorn owned the signals; SIGTERM killed it (-15) once uvicorn had
    stopped, and SIGINT exited without closing the sequencer and the publisher."""
    env = {"BONDTAPE_SECRET_KEY": secrets.token_hex(32), "BONDTAPE_CA_DIR": str(tmp_path / "ca")}
    for args in (["certs", "init"], ["certs", "server", "--out", str(tmp_path / "tls")]):
        made = bondtape(*args, env=env)
        _o, err = made.communicate(timeout=120)
        assert made.returncode == 0, err
    port = free_port()
    proc = bondtape("web", "serve", "--port", str(port), "--tls-cert", str(tmp_path / "tls" / "server-cert.pem"),
                    "--tls-key", str(tmp_path / "tls" / "server-key.pem"), "--db", db_url, env=env)
    try:
        read_stderr_until(proc, r"serving https://127\.0\.0\.1:%d/" % port, timeout=120)
        page = httpx.get(f"https://127.0.0.1:{port}/", verify=False, timeout=30)
        assert page.status_code == 200
        code, _out, err = stopped(proc, getattr(signal, stop_with))
        assert code == 0, err
        assert "Traceback" not in err, err
        assert err.strip().splitlines()[-1] == "stopped", err
    finally:
        kill_group(proc)


# --- the production supervisor --------------------------------------------------------------


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.timeout(180)
def test_workers_stop_when_their_supervisor_is_killed(tmp_path):
    """SIGKILL (or the OOM killer) to the supervisor of ``--workers 2``: its workers stop by
    themselves and free the port. Before: they served on for ever, holding the port, so the
    service could not be started again."""
    if not POSTGRES_URL:
        pytest.skip("several workers need PostgreSQL: set BONDTAPE_TEST_POSTGRES_URL")
    url = fresh_postgres_url()
    port = free_port()
    env = {"BONDTAPE_SECRET_KEY": secrets.token_hex(32), "BONDTAPE_LOG_FORMAT": "text"}
    proc = bondtape("serve", "--workers", "2", "--port", str(port), "--db", url, env=env)
    workers: list[int] = []
    try:
        read_stderr_until(proc, r"workers: 2")
        workers = _children(proc.pid)
        assert len(workers) == 2
        proc.kill()
        proc.wait(30)
        deadline = time.monotonic() + STOP_WITHIN
        while any(_running(w) for w in workers):
            assert time.monotonic() < deadline, "the workers outlived their supervisor"
            time.sleep(0.1)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        for w in workers:
            if _running(w):
                os.kill(w, signal.SIGKILL)
        kill_group(proc)
        drop_postgres(url)


# --- finite work, interrupted -----------------------------------------------------------------


def _journal(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as c:
        return c.execute("SELECT seq, event_type, mpid, client_ref, control_number, ref_control_number "
                         "FROM journal ORDER BY seq").fetchall()


def _simulate(db: Path, days: int, trades: int, ignore_sigint: bool = True) -> subprocess.Popen:
    return bondtape("simulate", "--start", "2024-03-04", "--days", str(days), "--trades-per-day", str(trades),
                    "--seed", "7", "--securities", "40", "--db", f"sqlite:///{db}", ignore_sigint=ignore_sigint)


def test_simulate_continued_equals_one_run(tmp_path):
    """A simulation stopped after its first day and run again gives the same journal as one
    that was never stopped. Before: the first day's cancels and corrections were lost and
    every later day differed (its answers came back as repeats and were left out)."""
    one, two = tmp_path / "one.db", tmp_path / "two.db"
    assert _simulate(one, 2, 300).wait(120) == 0
    assert _simulate(two, 1, 300).wait(120) == 0  # as if stopped after day 1
    assert _simulate(two, 2, 300).wait(120) == 0
    assert _journal(two) == _journal(one)


@pytest.mark.timeout(300)
def test_simulate_interrupted_by_ctrl_c_then_run_again(tmp_path):
    """Ctrl-C part-way: a one-line message, no traceback; the same command again finishes the
    market exactly as one uninterrupted run makes it."""
    whole, cut = tmp_path / "whole.db", tmp_path / "cut.db"
    assert _simulate(whole, 3, 1500).wait(120) == 0
    proc = _simulate(cut, 3, 1500, ignore_sigint=False)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:  # interrupt once reports are journaled
            try:
                if _journal(cut):
                    break
            except sqlite3.Error:
                pass
            time.sleep(0.02)
        code, _out, err = stopped(proc, signal.SIGINT)
        assert "Traceback" not in err, err
        assert code in (0, 130), err  # 130: interrupted; 0: it had finished already
        if code == 130:
            assert err.strip().splitlines()[-1].startswith("interrupted: what was journaled stays; run the same "
                                                           "command again"), err
    finally:
        kill_group(proc)
    assert _simulate(cut, 3, 1500).wait(120) == 0
    assert _journal(cut) == _journal(whole)


def _bulk_file(path: Path, n: int) -> None:
    from tests.conftest import IG

    with open(path, "w", newline="") as f:
        f.write("action,client_ref,reporting_mpid,cusip,side,capacity,contra,quantity,price,execution_time,"
                "report_time\n")
        for i in range(n):
            f.write(f"NEW,k{i},DLRA,{IG},S,P,C,{1000 + i},100,2024-03-04T10:00:00-05:00,2024-03-04T10:01:00-05:00\n")


def _result_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stop_with", ["SIGINT", "SIGTERM"])
def test_report_interrupted_says_what_was_answered_then_run_again(market, db_url, tmp_path, stop_with):
    """Ctrl-C or SIGTERM during ``bondtape report``: one line saying how many rows are answered
    in the results file (each of them journaled), exit 130/143, no traceback; the same file
    again answers every row, the first ones with their first answers, and journals none
    twice. Before: Ctrl-C said "Aborted!" (exit 1) and SIGTERM killed it (-15) silently."""
    import sqlalchemy as sa

    from bondtape.journal.schema import journal
    from bondtape.journal.verify import verify

    n = 60_000
    src, results = tmp_path / "big.csv", tmp_path / "results.csv"
    _bulk_file(src, n)
    args = ["report", str(src), "--results", str(results), "--use-report-time", "--batch-size", "500",
            "--db", db_url]
    proc = bondtape(*args, ignore_sigint=False)
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:  # once some rows are answered
            if results.exists() and results.stat().st_size > 20_000:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the report finished before it could be interrupted: make the file larger"
        os.kill(proc.pid, signal.SIGSTOP)  # held while the signal is sent
        proc.send_signal(getattr(signal, stop_with))
        os.kill(proc.pid, signal.SIGCONT)
        _o, err = proc.communicate(timeout=STOP_WITHIN)
    finally:
        kill_group(proc)
    assert proc.returncode == (130 if stop_with == "SIGINT" else 143), err
    assert "Traceback" not in err and "Aborted" not in err, err
    found = re.fullmatch(r"interrupted: ([\d,]+) rows answered in (.+); run the same file again to continue "
                         r"\(client_ref gives the first answers back\)", err.strip().splitlines()[-1])
    assert found and found.group(2) == str(results), err
    first = _result_rows(results)
    assert int(found.group(1).replace(",", "")) == len(first) and 0 < len(first) < n
    db = connect_db(db_url)
    try:
        with db.connect() as conn:
            journaled = dict(conn.execute(sa.select(journal.c.client_ref, journal.c.control_number)).all())
        assert all(r["status"] == "ACCEPTED" and journaled[r["client_ref"]] == int(r["control_number"])
                   for r in first)
        again = bondtape(*args)
        _o, err = again.communicate(timeout=480)
        assert again.returncode == 0, err
        rows = _result_rows(results)
        assert len(rows) == n and all(r["status"] == "ACCEPTED" for r in rows)
        assert rows[:len(first)] == first  # the first answers, given back
        with db.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(journal)).scalar_one() == n
        assert verify(db).ok
    finally:
        db.dispose()


def _historic_db(tmp_path: Path) -> str:
    db = tmp_path / "h.db"
    assert _simulate(db, 3, 2000).wait(120) == 0
    return f"sqlite:///{db}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stop_with", ["SIGINT", "SIGTERM"])
def test_historic_build_interrupted_leaves_nothing_and_says_so(tmp_path, stop_with):
    """Ctrl-C or SIGTERM during ``historic build``: one line on stderr, exit 130/143, no OUT
    and no half-built folder; the same command then builds it. Before: SIGTERM left the
    half-built folder behind (and Ctrl-C said only "Aborted!")."""
    url = _historic_db(tmp_path)
    sig = getattr(signal, stop_with)
    for attempt in range(5):  # the build must be caught while it runs: a fast machine may finish first
        out = tmp_path / f"out{attempt}"
        building = tmp_path / f".{out.name}.building"
        proc = bondtape("historic", "build", "--data-set", "corporate", "--year", "2024", "--as-of", "2026-07-01",
                        "--out", str(out), "--db", url, ignore_sigint=False)
        try:
            deadline = time.monotonic() + 120
            while not building.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.001)
            if proc.poll() is not None or not building.exists():
                _o, err = proc.communicate(timeout=60)
                assert proc.returncode == 0, err  # it had finished (not been refused): again
                continue
            got = signal_mid_run(proc, sig, lambda: (out / "manifest.json").exists())
            if got is None:  # it finished before the stop
                continue
            out_text, err = got
        finally:
            kill_group(proc)
        assert proc.returncode == (130 if sig == signal.SIGINT else 143), err
        assert "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith(f"interrupted: {out} was not written"), err
        assert not out.exists() and not building.exists()
        again = bondtape("historic", "build", "--data-set", "corporate", "--year", "2024", "--as-of", "2026-07-01",
                         "--out", str(out), "--db", url)
        _o, err = again.communicate(timeout=120)
        assert again.returncode == 0, err
        assert (out / "manifest.json").exists()
        return
    pytest.skip("the build always finished before it could be interrupted")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stop_with", ["SIGINT", "SIGTERM"])
def test_demo_on_a_new_folder_serves_then_stops(tmp_path, stop_with):
    """``bondtape demo`` builds a market (and its Historic data) and serves it in one process,
    then stops cleanly. Before: on a new folder it failed as it started serving ("file is not
    a database": the Historic build's ADBC SQLite, closed, broke the feed's connections)."""
    proc = bondtape("demo", "--dir", str(tmp_path / "demo"), "--days", "1", "--trades-per-day", "30",
                    "--port", "0", "--tls-port", "0", "--fix-port", "0")
    try:
        found, text = read_stderr_until(proc, r"Serving http (http://127\.0\.0\.1:\d+)", timeout=240)
        assert httpx.get(found.group(1) + "/feed/status", timeout=30).status_code == 200
        code, out, err = stopped(proc, getattr(signal, stop_with))
        assert code == 0, text + err
        assert "Traceback" not in text + err and "internal error" not in text + err, text + err
        assert "stopped" in out + err, out + err  # said once it has finished, as `bondtape serve` does
    finally:
        kill_group(proc)


@pytest.mark.parametrize("after", [0.1, 0.2, 0.35, 0.5])
def test_ctrl_c_while_the_command_loads_ends_it_without_a_traceback(after):
    """Loading the command imports every capability (about half a second): Ctrl-C then
    ends it as Ctrl-C does later, exit 130 and no traceback (before: a KeyboardInterrupt
    traceback through bondtape.cli's imports)."""
    proc = bondtape("historic", "build", "--help", ignore_sigint=False)
    try:
        time.sleep(after)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        kill_group(proc)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    # 130: stopped; 0: it had finished; -2: the signal came before Python took it over
    assert proc.returncode in (130, 0, -signal.SIGINT), (proc.returncode, err)

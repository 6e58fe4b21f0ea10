"""Production: configuration, the operations endpoints, metrics, 503 while the database is
down, graceful shutdown, the supervisor. Fault tests under load are in test_faults.py."""
from __future__ import annotations

import re
import signal
import socket
import tempfile
import time
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from bondtape.engine import Engine, EngineUnavailable, Sequencer
from bondtape.observability import INTAKE_UNAVAILABLE, REGISTRY, REPORTS
from bondtape.production import resilience
from bondtape.production.config import KEYS, ConfigError, ServeConfig, load_config
from bondtape.web.testing import World
from tests.conftest import et
from tests.helpers import new

ROOT = Path(__file__).resolve().parent.parent
NOW = et(2026, 6, 1, 10, 0, 0)


# --- configuration ---------------------------------------------------------------------------

def test_config_file_then_environment_then_options(tmp_path):
    path = tmp_path / "bondtape.toml"
    path.write_text('[serve]\ndatabase_url = "postgresql+psycopg://db/bondtape"\nworkers = 4\nport = 8080\n'
                    'nats_url = "nats://file:4222"\nlog_format = "text"\n')
    cfg = load_config(path, env={"BONDTAPE_NATS_URL": "nats://env:4222", "BONDTAPE_PORT": "9090"}, port=7070)
    assert cfg.database_url == "postgresql+psycopg://db/bondtape" and cfg.workers == 4
    assert cfg.nats_url == "nats://env:4222"  # the environment over the file
    assert cfg.port == 7070  # the command line over both
    assert cfg.log_format == "text" and cfg.log_level == "info"
    assert ServeConfig.from_dict(cfg.as_dict()) == cfg  # what the supervisor hands its workers


@pytest.mark.parametrize("text, env, code, key", [
    ("[serve]\nport = 70000\n", {}, "CONFIG_INVALID", "port"),
    ("[serve]\nworkers = 0\n", {}, "CONFIG_INVALID", "workers"),
    ("[serve]\nlog_level = \"loud\"\n", {}, "CONFIG_INVALID", "log_level"),
    ("[serve]\nthreads = 4\n", {}, "CONFIG_UNKNOWN_KEY", "threads"),
    ("[server]\nport = 1\n", {}, "CONFIG_UNKNOWN_KEY", "server"),
    ("[serve\n", {}, "CONFIG_FILE", None),
    ("[serve]\nworkers = 2\n", {}, "CONFIG_INVALID", "workers"),  # several workers on SQLite
    ("[serve]\n", {"BONDTAPE_SHUTDOWN_TIMEOUT": "-1"}, "CONFIG_INVALID", "shutdown_timeout"),
    ("[serve]\ntls_port = 8443\n", {}, "CONFIG_INVALID", "tls_port"),  # no certificate
])
def test_config_errors_name_the_setting_and_what_is_accepted(tmp_path, text, env, code, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, env=env)
    assert err.value.code == code
    if key:
        assert err.value.key == key


def test_config_missing_file():
    with pytest.raises(ConfigError) as err:
        load_config("/nonexistent/bondtape.toml", env={})
    assert err.value.code == "CONFIG_FILE"


def test_every_setting_is_documented():
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for key, (var, _) in KEYS.items():
        assert f"`{key}`" in doc and f"`{var}`" in doc, f"docs/deploy.md does not describe {key} / {var}"


# --- operations endpoints ----------------------------------------------------------------------

@pytest.fixture
def world(market, tmp_path):
    w = World(market, tmp_path, NOW, cookie_secure=False)
    w.app.state.metrics_token = "s3cret-scrape"
    resilience.install(w.app)
    return w


def test_health_and_readiness(world):
    client = world.client().http
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready" and body["database"]["status"] == "up"
    assert body["bus"] == {"status": "not_configured"}


def test_metrics_need_the_operator_or_the_scrape_token(world):
    op = world.user("op-admin", world.org("Operator", "OPERATOR"), "operator_admin")
    trader = world.user("a-trader", world.org("Dealer A", "FIRM", mpid="DLRA"), "trader")
    anonymous = world.client().http
    assert anonymous.get("/metrics").status_code == 303  # to the sign-in page
    assert anonymous.get("/metrics", headers={"authorization": "Bearer wrong"}).status_code == 303
    r = anonymous.get("/metrics", headers={"authorization": "Bearer s3cret-scrape"})
    assert r.status_code == 200 and "bondtape_journal_sequence" in r.text
    assert 'bondtape_dependency_up{dependency="database"} 1.0' in r.text
    as_trader = world.client()
    as_trader.login(trader)
    assert as_trader.get("/metrics").status_code == 403
    as_op = world.client()
    as_op.login(op)
    r = as_op.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")


def test_database_down_answers_503_with_retry_after(world):
    with socket.socket() as s:  # a loopback port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world.app.state.db = sa.create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/none")
    client = world.client().http
    r = client.get("/login")
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.json()["code"] == "SERVICE_UNAVAILABLE"
    assert "Traceback" not in r.text
    assert client.get("/healthz").status_code == 200  # alive
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["database"]["status"] == "down"
    r = client.get("/metrics", headers={"authorization": "Bearer s3cret-scrape"})
    assert 'bondtape_dependency_up{dependency="database"} 0.0' in r.text


def _sample(name: str, labels: dict) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_sequencer_answers_are_counted_by_code_and_channel(market):
    sequencer = resilience.instrument(Sequencer(Engine(market)))
    accepted = {"action": "NEW", "status": "ACCEPTED", "code": "", "channel": "web"}
    unknown = {"action": "NEW", "status": "REJECTED", "code": "SECURITY_UNKNOWN", "channel": "web"}
    before = (_sample("bondtape_reports_total", accepted), _sample("bondtape_reports_total", unknown),
              _sample("bondtape_intake_latency_seconds_count", {"channel": "web"}))
    ok = sequencer(replace(new(ref="m1"), channel="web"))
    bad = sequencer(replace(new(ref="m2", cusip="000000000"), channel="web"))
    assert ok.accepted and bad.reject.code == "SECURITY_UNKNOWN"
    deadline = time.monotonic() + 5  # the done-callbacks run right after the answers
    while _sample("bondtape_intake_latency_seconds_count", {"channel": "web"}) < before[2] + 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert _sample("bondtape_reports_total", accepted) == before[0] + 1
    assert _sample("bondtape_reports_total", unknown) == before[1] + 1
    sequencer.close()
    unavailable = _sample("bondtape_intake_unavailable_total", {"channel": "web"})
    with pytest.raises(EngineUnavailable):
        sequencer(replace(new(ref="m3"), channel="web"))
    assert _sample("bondtape_intake_unavailable_total", {"channel": "web"}) == unavailable + 1
    assert INTAKE_UNAVAILABLE is not None and REPORTS is not None


# --- the served process: graceful shutdown, JSON logs, the supervisor ---------------------------

def _fix_reports(sender: str, mpid: str, cusip: str, n: int) -> list[bytes]:
    from bondtape.fix import codec

    out = []
    for i in range(n):
        body = [(571, f"G{i}"), (487, "0"), (856, "0"), (48, cusip), (22, "1"), (32, str(10000 + i)), (31, "99.5"),
                (60, time.strftime("%Y%m%d-%H:%M:%S", time.gmtime(time.time() - 5))), (552, "1"), (54, "2"),
                (453, "2"), (448, mpid), (447, "C"), (452, "1"), (448, "C"), (447, "C"), (452, "17"), (528, "P")]
        out.append(codec.encode("AE", sender, "BONDTAPE", 2 + i, "20260101-00:00:00.000", body))
    return out


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigterm_finishes_what_was_accepted_and_logs_json(tmp_path):
    import json

    from bondtape.db import connect
    from bondtape.fix import codec
    from bondtape.journal.schema import journal
    from bondtape.production.loadkit import ServerProcess, provision

    dep = provision(f"sqlite:///{tmp_path}/b.db", tmp_path / "dep", dealers=1, securities=3)
    server = ServerProcess(dep)
    server.start()
    trader = dep.traders[0]
    try:
        sock = socket.create_connection(("127.0.0.1", server.fix_port), timeout=20)
        sock.sendall(codec.encode("A", "GRACE", "BONDTAPE", 1, "20260101-00:00:00.000",
                                  [(98, "0"), (108, "30"), (553, trader.username), (554, trader.password), (141, "Y")]))
        framer, msgs = codec.Framer(), []
        while not any(m.msg_type == "A" for m in msgs):
            msgs += [m for m in framer.feed(sock.recv(65536)) if isinstance(m, codec.RawMessage)]
        n = 300
        sock.sendall(b"".join(_fix_reports("GRACE", trader.mpid, dep.securities[0][0], n)))
        time.sleep(0.05)  # let the gateway read them (TCP): then stop the server at once
        server.proc.send_signal(signal.SIGTERM)
        acks = []
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            acks += [m for m in framer.feed(chunk) if isinstance(m, codec.RawMessage) and m.msg_type == "AR"]
        assert server.proc.wait(30) == 0
    finally:
        server.kill()
    accepted = {m.first(571): int(m.first(818)) for m in acks if m.first(939) == "0"}
    assert len(acks) > 0
    print(f"{len(acks)} of {n} reports answered before the exit")
    db = connect(dep.url, migrate_schema=False)
    with db.connect() as conn:
        journaled = dict(conn.execute(sa.select(journal.c.client_ref, journal.c.control_number)).all())
    db.dispose()
    assert journaled == accepted  # every report answered before the exit is journaled, and only those
    log_lines = [line for line in server.log_path.read_text().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in log_lines]
    assert any(r["message"].startswith("worker 0 stopping") for r in records)
    assert any(r["message"].startswith("worker 0 stopped") for r in records)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_supervisor_starts_a_worker_again_after_it_dies(tmp_path):
    from tests.servers import PrivatePostgres, postgres_unavailable_reason
    from bondtape.production.loadkit import ServerProcess, provision

    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    pg = PrivatePostgres(Path(tempfile.mkdtemp(prefix="bondtape-pg-")))
    pg.start()
    server = None
    try:
        dep = provision(pg.url, tmp_path / "dep", dealers=1, securities=3)
        server = ServerProcess(dep, workers=2, fix=False)
        server.start()
        children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
        workers = [int(p) for p in children.read_text().split()]
        assert len(workers) == 2
        import os

        os.kill(workers[1], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            now = [int(p) for p in children.read_text().split()]
            if len(now) == 2 and workers[1] not in now:
                break
            assert time.monotonic() < deadline, "the worker was not started again"
            time.sleep(0.05)
        http = server.addresses["http"]
        deadline = time.monotonic() + 30
        ok = 0
        while ok < 20:  # both workers answer (the kernel spreads connections over them)
            assert time.monotonic() < deadline
            try:
                ok += httpx.get(http + "/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                time.sleep(0.05)
        for _ in range(6):  # the feed lives in the primary, on its own port; the shared port says where
            r = httpx.get(http + "/feed/status", timeout=5)
            assert r.status_code == 421 and r.json()["code"] == "FEED_ON_FEED_PORT"
        assert httpx.get(server.addresses["feed"] + "/feed/status", timeout=5).status_code == 200
        assert server.stop() == 0
        assert re.search(r"worker 1 exited with -9; starting it again", server.log_path.read_text())
    finally:
        if server is not None:
            server.kill()
        pg.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_load_benchmark_small(tmp_path):
    """benchmarks/load.py end to end, kept small: three simulated minutes at 60x, SQLite."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("bondtape_load_bench", ROOT / "benchmarks" / "load.py")
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    out = tmp_path / "load.json"
    result = load.main(["--sqlite", "--hours", "0.05", "--speed", "60", "--capacity", "60", "--out", str(out)])
    assert result["complete"] and result["reports"] == round(40_000 * 0.05 / 10.5)
    assert result["replay"]["statuses"] == {"ACCEPTED": result["reports"]}
    assert set(result["replay"]["latency_by_channel"]) == {"http", "fix"}
    assert result["replay"]["latency"]["p99_ms"] >= result["replay"]["latency"]["p50_ms"] > 0
    assert result["capacity"]["statuses"] == {"ACCEPTED": 60} and result["headroom"] > 0
    assert result["memory"]["server_peak_rss_total_mib"] > 0
    assert result["graceful_stop_exit_code"] == 0
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))


def test_feed_lag_per_subscriber(market, tmp_path):
    """Each connected feed subscriber has its own lag series, gone when it goes."""
    from bondtape.dissemination.publisher import Publisher
    from bondtape.web.routes_ops import _subscriber_lags
    from bondtape.observability import FEED_LAG

    class State:
        pass

    state = State()
    engine = Engine(market)
    pub = Publisher(market).start(engine)
    held = []
    sub = pub.subscribe(held.append, ["CORP"])
    try:
        engine.submit([new(ref=f"lag{i}", quantity=Decimal(1000 + i)) for i in range(3)])
        assert pub.wait_for(3)
        _subscriber_lags(state, pub)
        [(label, _)] = state._feed_subscriber_labels.values()
        assert REGISTRY.get_sample_value("bondtape_feed_subscriber_lag_messages", {"subscriber": label}) == 0
        assert held  # delivered: no lag
        sub.last["CORP"] = (sub.last["CORP"][0], sub.last["CORP"][1] - 2)  # as if two were not yet sent
        _subscriber_lags(state, pub)
        assert REGISTRY.get_sample_value("bondtape_feed_subscriber_lag_messages", {"subscriber": label}) == 2
        sub.close()
        _subscriber_lags(state, pub)
        assert REGISTRY.get_sample_value("bondtape_feed_subscriber_lag_messages", {"subscriber": label}) is None
        assert FEED_LAG is not None
    finally:
        pub.stop()


@pytest.mark.timeout(60)
def test_bus_down_at_start_connects_when_nats_comes(market):
    """A worker starts while NATS is down: intake goes on, the bridge connects later and
    sends everything from the start of the feed."""
    from bondtape.dissemination.publisher import Publisher
    from bondtape.production.worker import Bus
    from tests.servers import PrivateNats, nats_unavailable_reason

    if nats_unavailable_reason():
        pytest.skip(nats_unavailable_reason())
    nats = PrivateNats(Path(tempfile.mkdtemp(prefix="bondtape-nats-")))
    engine = Engine(market)
    pub = Publisher(market).start(engine)
    bus = Bus(pub, nats.url)  # nothing listens there yet
    try:
        assert bus.status()["status"] == "down"
        results = engine.submit([new(ref=f"b{i}", quantity=Decimal(1000 + i)) for i in range(5)])
        assert all(r.accepted for r in results)  # intake without the bus
        nats.start()
        deadline = time.monotonic() + 30
        while bus.status()["status"] != "up" or bus.js.published < 5:
            assert time.monotonic() < deadline, bus.status()
            time.sleep(0.05)
        assert bus.status()["lag_messages"] == 0
    finally:
        bus.close(5)
        pub.stop()
        nats.close()


def test_serve_command_reports_configuration_errors(tmp_path):
    from click.testing import CliRunner

    from bondtape.cli import cli

    runner = CliRunner()
    r = runner.invoke(cli, ["serve", "--workers", "2", "--db", f"sqlite:///{tmp_path}/x.db"],
                      env={"BONDTAPE_SECRET_KEY": "00" * 32})
    assert r.exit_code == 1 and "CONFIG_INVALID: workers: several workers need PostgreSQL" in r.output
    bad = tmp_path / "bad.toml"
    bad.write_text("[serve]\nport = \"eighty\"\n")
    r = runner.invoke(cli, ["serve", "--config", str(bad)], env={"BONDTAPE_SECRET_KEY": "00" * 32})
    assert r.exit_code == 1 and "CONFIG_INVALID: port" in r.output and "Traceback" not in r.output

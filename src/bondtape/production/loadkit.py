"""A provisioned deployment and the clients that load it: used by ``benchmarks/load.py``
and the fault tests (tests/test_faults.py). Loopback only.

- :func:`provision`: reference data (a simulated universe and dealers), one trader per
  dealer with a password and a client certificate, a certificate authority and a server
  certificate for 127.0.0.1.
- :func:`trading_day`: the reports of a simulated trading day (08:00 to 18:30 ET), each
  with its offset in the day, its dealer and its channel (REST API or FIX).
- :class:`LoadRun`: replays reports at a multiple of real time over HTTPS (REST API, client
  certificate + login) and FIX 4.4; every answer is recorded with its latency. A 503 is
  retried after its Retry-After, a broken connection after a pause, always with the same
  ``client_ref``: the engine answers a repeat with the first answer, never a second report.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import os
import random
import ssl
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PASSWORD = "Load-Test-Password-2026!"
SESSION_START_S = 8 * 3600
SESSION_END_S = 18.5 * 3600


@dataclass
class Trader:
    username: str
    password: str
    mpid: str
    cert: str
    key: str


@dataclass
class Deployment:
    url: str
    folder: str
    secret_key_hex: str
    ca_dir: str
    server_cert: str
    server_key: str
    traders: list[Trader]
    securities: list[tuple[str, float]]  # cusip, starting price

    def env(self) -> dict[str, str]:
        """Environment for ``bondtape serve`` of this deployment."""
        return {"BONDTAPE_SECRET_KEY": self.secret_key_hex, "BONDTAPE_CA_DIR": self.ca_dir,
                "BONDTAPE_DATABASE_URL": self.url}

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> "Deployment":
        data = json.loads(Path(path).read_text())
        data["traders"] = [Trader(**t) for t in data["traders"]]
        data["securities"] = [tuple(s) for s in data["securities"]]
        return cls(**data)


def provision(url: str, folder: Path, *, dealers: int = 4, securities: int = 40, seed: int = 7) -> Deployment:
    from bondtape.access import accounts
    from bondtape.access.ca import CertificateAuthority
    from bondtape.clock import now_us
    from bondtape.db import connect
    from bondtape.reference.store import upsert_firms, upsert_securities
    from bondtape.simulate.market import build_firms, build_universe

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = now_us()
    rng = random.Random(seed)
    universe = [s for s in build_universe(rng, securities * 2, dt.date(2026, 1, 2))
                if not s.security.rule_144a][:securities]
    firms = build_firms()
    chosen = [f for f in firms if f.finra_member and not f.test_only][:dealers]
    db = connect(url)
    ca = CertificateAuthority.create(folder / "ca", now_us=now)
    server_cert, server_key = ca.issue_server(["127.0.0.1", "localhost"], folder / "tls", now_us=now)
    traders = []
    with db.begin() as conn:
        upsert_securities(conn, [s.security for s in universe])
        upsert_firms(conn, firms)
        for firm in chosen:
            org = accounts.create_organisation(conn, firm.name, "FIRM", mpid=firm.mpid, at_us=now)
            username = f"load-{firm.mpid.lower()}"
            uid, _ = accounts.create_active_user(conn, org_id=org, username=username, password=PASSWORD,
                                                 roles=["trader"], at_us=now)
            cert_pem, key_pem, _ = ca.issue_client(conn, uid, now_us=now)
            cert, key = folder / f"{username}-cert.pem", folder / f"{username}-key.pem"
            cert.write_bytes(cert_pem)
            key.write_bytes(key_pem)
            os.chmod(key, 0o600)
            traders.append(Trader(username, PASSWORD, firm.mpid, str(cert), str(key)))
    db.dispose()
    return Deployment(url, str(folder), os.urandom(32).hex(), str(folder / "ca"), str(server_cert), str(server_key),
                      traders, [(s.security.cusip, round(s.price, 3)) for s in universe])


@dataclass(frozen=True)
class Order:
    offset_s: float  # seconds after the start of the simulated session
    trader: int
    channel: str  # "http" or "fix"
    ref: str
    cusip: str
    side: str
    quantity: int
    price: str
    delay_s: float  # from execution to report


def trading_day(dep: Deployment, *, trades: int, seed: int = 11, hours: float | None = None,
                fix_share: float = 0.5) -> list[Order]:
    """``trades`` reports spread over the session (busier at the open and the close), or
    over its first ``hours`` hours; sizes heavy-tailed, prices random-walking."""
    rng = random.Random(seed)
    length = (SESSION_END_S - SESSION_START_S) if hours is None else hours * 3600
    prices = {c: p for c, p in dep.securities}
    weights = [1 / (1 + i) ** 0.8 for i in range(len(dep.securities))]
    out = []
    for i in range(trades):
        while True:  # U-shaped intraday activity
            t = rng.random()
            if rng.random() < 0.6 + 0.4 * (2 * abs(t - 0.5)) ** 2:
                break
        cusip = rng.choices(dep.securities, weights)[0][0]
        prices[cusip] = max(5.0, prices[cusip] * math.exp(rng.gauss(0, 0.0005)))
        qty = int(min(max(math.exp(rng.gauss(math.log(60_000), 1.9)), 1_000), 50_000_000) // 1000 * 1000) or 1000
        out.append(Order(t * length, rng.randrange(len(dep.traders)), "fix" if rng.random() < fix_share else "http",
                         f"L{seed}-{i}", cusip, rng.choice("BS"), qty, f"{prices[cusip]:.3f}",
                         min(rng.expovariate(1 / 20), 600)))
    out.sort(key=lambda o: o.offset_s)
    return out


@dataclass
class Answer:
    ref: str
    channel: str
    status: str  # ACCEPTED, REJECTED, FAILED
    control_number: int | None
    latency_s: float
    code: str | None = None


@dataclass
class LoadRun:
    """Replays orders against ``https_url`` (REST) and ``fix_port`` at ``speed`` x real time."""

    dep: Deployment
    https_url: str
    fix_port: int | None
    speed: float = 10.0
    deadline_s: float = 60.0  # give up retrying an order after this many seconds
    answers: list[Answer] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)  # codes of 503 answers seen
    connection_errors: int = 0
    connections: int = 8  # keep-alive HTTPS connections per trader (each new one costs a login check)

    def _ssl(self, trader: Trader) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(Path(self.dep.ca_dir) / "ca-cert.pem"))
        ctx.load_cert_chain(trader.cert, trader.key)
        return ctx

    async def run(self, orders: list[Order], *, concurrency: int = 64) -> list[Answer]:
        import httpx

        clients = [httpx.AsyncClient(base_url=self.https_url, verify=self._ssl(t), auth=(t.username, t.password),
                                     timeout=30.0, limits=httpx.Limits(max_connections=self.connections))
                   for t in self.dep.traders]
        fix = [FixSession(self, i, t) for i, t in enumerate(self.dep.traders)] if self.fix_port else []
        try:
            for s in fix:
                await s.open()
            gate = asyncio.Semaphore(concurrency)
            start = time.perf_counter()

            async def one(o: Order) -> None:
                wait = start + o.offset_s / self.speed - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                async with gate:
                    if o.channel == "fix" and fix:
                        await fix[o.trader].report(o)
                    else:
                        await self._http(clients[o.trader], o)

            await asyncio.gather(*(one(o) for o in orders))
        finally:
            for s in fix:
                await s.close()
            for c in clients:
                await c.aclose()
        return self.answers

    async def _http(self, client, o: Order) -> None:
        import httpx

        sent = time.perf_counter()
        give_up = sent + self.deadline_s
        # the trade's execution time is stamped once: a retry repeats the same report (the
        # engine answers a client_ref repeated with other terms CLIENT_REF_REUSED)
        execution = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=o.delay_s)
        body = {"client_ref": o.ref, "cusip": o.cusip, "side": o.side, "capacity": "P", "contra": "C",
                "quantity": o.quantity, "price": o.price, "execution_time": execution.isoformat(timespec="seconds")}
        while True:
            try:
                r = await client.post("/api/v1/reports", json=body)
            except (httpx.TransportError, OSError):
                self.connection_errors += 1
                if time.perf_counter() > give_up:
                    self.answers.append(Answer(o.ref, "http", "FAILED", None, time.perf_counter() - sent, "CONNECTION"))
                    return
                await asyncio.sleep(0.2)
                continue
            if r.status_code == 503:
                data = r.json()
                self.unavailable.append(f"{data.get('code')}|{r.headers.get('retry-after')}")
                if time.perf_counter() > give_up:
                    self.answers.append(Answer(o.ref, "http", "FAILED", None, time.perf_counter() - sent, data.get("code")))
                    return
                await asyncio.sleep(min(float(r.headers.get("retry-after", "1")), 0.5))
                continue
            data = r.json()
            if r.status_code in (200, 422) and "status" in data:
                cn = data.get("control_number")
                code = (data.get("reject") or {}).get("code")
                self.answers.append(Answer(o.ref, "http", data["status"], int(cn) if cn else None,
                                           time.perf_counter() - sent, code))
            else:
                self.answers.append(Answer(o.ref, "http", "FAILED", None, time.perf_counter() - sent,
                                           data.get("code", str(r.status_code))))
            return


class FixSession:
    """One FIX 4.4 session of a trader: Trade Capture Reports out, acks matched by 571.

    When the connection breaks (a server killed, restarted), the session logs on again
    (ResetSeqNum) and sends the reports not yet answered again, with the same
    TradeReportID (571): the engine answers a repeat with its first answer."""

    def __init__(self, run: LoadRun, index: int, trader: Trader):
        self.run, self.trader = run, trader
        self.sender = f"LOAD{index}"
        self.seq = 1
        self.pending: dict[str, tuple[asyncio.Future, float]] = {}
        self.reader = self.writer = None
        self._task = None
        self._reconnect = asyncio.Lock()
        self.generation = 0

    def _encode(self, msg_type: str, body: list) -> bytes:
        from bondtape.fix import codec
        from bondtape.clock import now_us

        data = codec.encode(msg_type, self.sender, "BONDTAPE", self.seq, codec.utc_timestamp(now_us()), body)
        self.seq += 1
        return data

    @property
    def connected(self) -> bool:
        return self._task is not None and not self._task.done()

    async def open(self) -> None:
        from bondtape.fix import codec

        self.seq = 1
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.run.fix_port)
        self.writer.write(self._encode("A", [(98, "0"), (108, "30"), (553, self.trader.username),
                                             (554, self.trader.password), (141, "Y")]))
        await self.writer.drain()
        framer = codec.Framer()
        while True:
            chunk = await asyncio.wait_for(self.reader.read(65536), 10)
            if not chunk:
                raise ConnectionError(f"FIX logon of {self.trader.username} refused")
            msgs = [m for m in framer.feed(chunk) if isinstance(m, codec.RawMessage)]
            if any(m.msg_type == "A" for m in msgs):
                break
            if any(m.msg_type == "5" for m in msgs):
                raise RuntimeError(f"FIX logon of {self.trader.username} refused: {msgs}")
        self.framer = framer
        self.generation += 1
        self._task = asyncio.create_task(self._read())

    async def _ensure(self, give_up: float) -> bool:
        async with self._reconnect:
            while not self.connected:
                if time.perf_counter() > give_up:
                    return False
                try:
                    await self.open()
                except (OSError, asyncio.TimeoutError, ConnectionError):
                    self.run.connection_errors += 1
                    await asyncio.sleep(0.2)
            return True

    async def _read(self) -> None:
        from bondtape.fix import codec

        try:
            while True:
                chunk = await self.reader.read(1 << 16)
                if not chunk:
                    break
                for m in self.framer.feed(chunk):
                    if not isinstance(m, codec.RawMessage):
                        continue
                    if m.msg_type == "1":  # test request: answer with a heartbeat
                        self.writer.write(self._encode("0", [(112, m.first(112) or "")]))
                    if m.msg_type not in ("AR", "j"):
                        continue
                    ref = m.first(571) or m.first(379)
                    waiter = self.pending.pop(ref, None)
                    if waiter is None:
                        continue
                    fut, sent = waiter
                    if m.msg_type == "AR" and m.first(939) == "0":
                        answer = Answer(ref, "fix", "ACCEPTED", int(m.first(818)), time.perf_counter() - sent)
                    elif m.msg_type == "AR":
                        answer = Answer(ref, "fix", "REJECTED", None, time.perf_counter() - sent, m.first(751))
                    else:  # Business Message Reject: the engine is unavailable, resend later
                        answer = Answer(ref, "fix", "RETRY", None, time.perf_counter() - sent, "UNAVAILABLE")
                    if not fut.done():
                        fut.set_result(answer)
        except (OSError, ConnectionError):
            pass
        finally:
            for ref, (fut, sent) in list(self.pending.items()):
                if not fut.done():
                    fut.set_result(Answer(ref, "fix", "RETRY", None, time.perf_counter() - sent, "CONNECTION"))
            self.pending.clear()

    async def report(self, o: Order) -> None:
        sent = time.perf_counter()
        give_up = sent + self.run.deadline_s
        execution = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=o.delay_s)  # once: a retry repeats it
        while True:
            if not await self._ensure(give_up):
                self.run.answers.append(Answer(o.ref, "fix", "FAILED", None, time.perf_counter() - sent, "CONNECTION"))
                return
            body = [(571, o.ref), (487, "0"), (856, "0"), (48, o.cusip), (22, "1"), (32, str(o.quantity)),
                    (31, o.price), (60, execution.strftime("%Y%m%d-%H:%M:%S")), (552, "1"),
                    (54, "1" if o.side == "B" else "2"), (453, "2"), (448, self.trader.mpid), (447, "C"), (452, "1"),
                    (448, "C"), (447, "C"), (452, "17"), (528, "P")]
            fut = asyncio.get_running_loop().create_future()
            self.pending[o.ref] = (fut, sent)
            try:
                self.writer.write(self._encode("AE", body))
            except (OSError, ConnectionError, RuntimeError):
                pass
            if not self.connected:  # broke while we wrote: the reader has finished
                self.pending.pop(o.ref, None)
                if not fut.done():
                    fut.set_result(Answer(o.ref, "fix", "RETRY", None, 0.0, "CONNECTION"))
            answer = await fut
            if answer.status != "RETRY":
                answer.latency_s = time.perf_counter() - sent
                self.run.answers.append(answer)
                return
            if answer.code == "CONNECTION":
                self.run.connection_errors += 1
            else:
                self.run.unavailable.append("FIX_BUSINESS_REJECT_UNAVAILABLE")
            if time.perf_counter() > give_up:
                self.run.answers.append(Answer(o.ref, "fix", "FAILED", None, time.perf_counter() - sent, answer.code))
                return
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        if self.writer is None:
            return
        try:
            if self.connected:
                self.writer.write(self._encode("5", []))
                await self.writer.drain()
                await asyncio.wait_for(self._task, 5)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass
        self.writer.close()


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


class ServerProcess:
    """``bondtape serve --config FILE`` in a child process, on free loopback ports."""

    def __init__(self, dep: Deployment, *, workers: int = 1, nats_url: str | None = None, fix: bool = True,
                 extra: dict[str, Any] | None = None, log_path: Path | None = None):
        self.dep, self.workers, self.nats_url, self.fix = dep, workers, nats_url, fix
        self.extra = extra or {}
        self.log_path = Path(log_path or Path(dep.folder) / "serve.log")
        self.proc = None
        self.addresses: dict[str, str] = {}
        self.ports: dict[str, int] = {}  # kept for a restart on the same ports

    def _config(self) -> Path:
        port = self.ports.get
        lines = ["[serve]", f'database_url = "{self.dep.url}"', 'host = "127.0.0.1"', f"port = {port('http', 0)}",
                 f"tls_port = {port('https', 0)}",
                 f'tls_cert = "{self.dep.server_cert}"', f'tls_key = "{self.dep.server_key}"',
                 f'ca_dir = "{self.dep.ca_dir}"', f"workers = {self.workers}", 'metrics_token = "scrape-token"',
                 "shutdown_timeout = 10"]
        if self.fix:
            lines.append(f"fix_port = {port('fix', 0)}")
        if self.workers > 1:
            lines.append(f"feed_port = {port('feed', 0)}")
        if self.nats_url:
            lines.append(f'nats_url = "{self.nats_url}"')
        for k, v in self.extra.items():
            lines.append(f"{k} = {json.dumps(v)}")
        path = Path(self.dep.folder) / "bondtape.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 60.0) -> dict[str, str]:
        import subprocess
        import sys

        env = {k: v for k, v in os.environ.items() if not k.startswith("BONDTAPE_")}
        env.update(self.dep.env())
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "bondtape", "serve", "--config", str(self._config())],
                                     env=env, stdout=log, stderr=subprocess.PIPE, start_new_session=True)
        log.close()
        os.set_blocking(self.proc.stderr.fileno(), False)
        deadline = time.monotonic() + timeout
        buf = b""
        self.addresses = {}
        wanted = {"http", "https"} | ({"fix"} if self.fix else set()) | ({"feed"} if self.workers > 1 else set())
        with open(self.log_path, "ab") as out:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    out.write(self.proc.stderr.read() or b"")
                    raise RuntimeError(f"bondtape serve exited with {self.proc.returncode}; see {self.log_path}")
                chunk = self.proc.stderr.read()
                if chunk:
                    out.write(chunk)
                    buf += chunk
                    for line in buf.decode(errors="replace").splitlines():
                        name, _, value = line.partition(": ")
                        if name in ("http", "https", "fix", "feed"):
                            self.addresses[name] = value.strip()
                    if wanted <= set(self.addresses):
                        self.ports = {k: int(v.rsplit(":", 1)[1]) for k, v in self.addresses.items()}
                        self._drain()
                        return self.addresses
                time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"bondtape serve did not become ready in {timeout} s; see {self.log_path}")

    def _drain(self) -> None:
        """Keep copying the server's stderr (its JSON logs) to the log file."""
        import threading

        proc, path = self.proc, self.log_path

        def copy() -> None:
            os.set_blocking(proc.stderr.fileno(), True)
            with open(path, "ab") as out:
                for line in proc.stderr:
                    out.write(line)
                    out.flush()

        threading.Thread(target=copy, daemon=True).start()

    @property
    def https_url(self) -> str:
        return self.addresses["https"]

    @property
    def fix_port(self) -> int | None:
        return int(self.addresses["fix"].rsplit(":", 1)[1]) if "fix" in self.addresses else None

    def stop(self, timeout: float = 30.0) -> int:
        import signal

        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL to the server and every worker it started (its process group)."""
        import signal

        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

"""Private server processes for fault tests: a PostgreSQL cluster and a NATS server that a
test may stop and start without touching the machine's shared servers. Loopback only."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


def postgres_unavailable_reason() -> str | None:
    if _pg_bin() is None:
        return "PostgreSQL server binaries (/usr/lib/postgresql/*/bin) are not installed"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no 'postgres' system user to run a private cluster"
    return None


class PrivatePostgres:
    """initdb + pg_ctl in a temporary folder, run as the postgres user, trust auth."""

    def __init__(self, root: Path):
        self.bin = _pg_bin()
        self.root = root
        self.data = root / "pgdata"
        self.port = free_port()
        self.user = pwd.getpwnam("postgres")
        os.makedirs(self.data, exist_ok=True)
        for p in (root, self.data):
            os.chown(p, self.user.pw_uid, self.user.pw_gid)
        self._as_postgres([str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"])
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{root}'\n"
                    "fsync = on\nmax_connections = 50\n")

    def _as_postgres(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True,
                              check=check, timeout=120)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self._as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w", "start"])

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"], check=False)

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def nats_unavailable_reason() -> str | None:
    return None if shutil.which("nats-server") or Path("/usr/sbin/nats-server").exists() else "nats-server is not installed"


class PrivateNats:
    """A nats-server with JetStream on a free loopback port and its own store folder."""

    def __init__(self, root: Path):
        self.binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd",
                                      str(self.root / "js")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nats-server did not start")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

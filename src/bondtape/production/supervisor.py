"""The supervisor: several web worker processes on shared listening sockets.

The supervisor migrates the schema once, opens the listening sockets (HTTP, HTTPS) and
starts ``workers`` processes that inherit them: the kernel hands each new connection to
one of the workers waiting in ``accept``. A worker that dies is started again (after a
short, growing pause). SIGTERM or SIGINT stops every worker gracefully (each finishes what
it accepted), waiting at most ``shutdown_timeout`` seconds before SIGKILL.
"""
from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from typing import Callable

from bondtape.production.config import ServeConfig
from bondtape.production.worker import listening_socket

log = logging.getLogger("bondtape.production.supervisor")

__all__ = ["Supervisor"]


class Supervisor:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.sockets = {}
        self.procs: dict[int, subprocess.Popen] = {}
        self.restarts: dict[int, int] = {}
        self.addresses: dict[str, str] = {}
        self._stopping = False

    def _spawn(self, index: int) -> subprocess.Popen:
        fds = {name: s.fileno() for name, s in self.sockets.items()}
        argv = [sys.executable, "-m", "bondtape.production.worker", json.dumps(self.cfg.as_dict()), str(index),
                *[f"{n}={fd}" for n, fd in fds.items()]]
        env = {**os.environ, "BONDTAPE_SUPERVISOR_PID": str(os.getpid())}  # a worker stops when this process dies
        proc = subprocess.Popen(argv, pass_fds=list(fds.values()), stdout=subprocess.PIPE, text=True, env=env)
        os.set_blocking(proc.stdout.fileno(), False)
        return proc

    def run(self, ready: Callable[[dict], None] | None = None) -> int:
        from bondtape.db import connect
        from bondtape.observability import configure_logging

        cfg = self.cfg
        configure_logging(cfg.log_level, cfg.log_format == "json")
        connect(cfg.database_url).dispose()  # migrations, once, before any worker
        if cfg.port is not None:
            self.sockets["http"] = listening_socket(cfg.host, cfg.port)
        if cfg.tls_port is not None:
            self.sockets["https"] = listening_socket(cfg.host, cfg.tls_port)
        stop_signal = []

        def on_signal(signum, _frame) -> None:
            stop_signal.append(signum)

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for i in range(cfg.workers):
                self.procs[i] = self._spawn(i)
            announced = False
            waiting = set(self.procs)
            sel = selectors.DefaultSelector()
            for i, p in self.procs.items():
                sel.register(p.stdout, selectors.EVENT_READ, i)
            while not stop_signal:
                for key, _ in sel.select(timeout=0.2):
                    line = key.fileobj.readline()
                    if line.strip().startswith("{"):
                        info = json.loads(line)
                        waiting.discard(info.pop("ready"))
                        self.addresses.update(info)
                if waiting == set() and not announced:
                    announced = True
                    log.info("all %d workers ready", cfg.workers, extra=self.addresses)
                    if ready is not None:
                        ready({**self.addresses, "workers": cfg.workers})
                for i, p in list(self.procs.items()):
                    if p.poll() is not None and not stop_signal:
                        n = self.restarts.get(i, 0) + 1
                        self.restarts[i] = n
                        log.error("worker %d exited with %s; starting it again (restart %d)", i, p.returncode, n,
                                  extra={"worker": i})
                        sel.unregister(p.stdout)
                        p.stdout.close()
                        time.sleep(min(5.0, 0.1 * 2 ** min(n, 6)))
                        self.procs[i] = self._spawn(i)
                        sel.register(self.procs[i].stdout, selectors.EVENT_READ, i)
            return self.shutdown()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            for sock in self.sockets.values():
                sock.close()

    def shutdown(self) -> int:
        """SIGTERM to every worker; SIGKILL to those still running after the timeout."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.shutdown_timeout + 5
        code = 0
        for i, p in self.procs.items():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop in time; killing it", i, extra={"worker": i})
                p.kill()
                p.wait()
                code = 1
            if p.returncode not in (0, -signal.SIGTERM):
                code = code or 1
        log.info("all workers stopped")
        return code


def serve(cfg: ServeConfig, ready: Callable[[dict], None] | None = None) -> int:
    """Run the deployment ``cfg`` describes: one worker in this process, or a supervisor."""
    if cfg.workers == 1:
        from bondtape.production.worker import run_worker

        run_worker(cfg, ready=ready)
        return 0
    return Supervisor(cfg).run(ready)

"""Metrics (Prometheus), structured logs (JSON lines) and health checks.

Metrics live in one registry per process (``REGISTRY``); ``/metrics`` serves it in the
Prometheus text format. Several worker processes each expose their own (scrape each) —
documented in docs/deploy.md.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the web app)

REGISTRY = CollectorRegistry(auto_describe=True)

REPORTS = Counter("bondtape_reports_total", "Reports answered by the engine, by action, status and reject code",
                  ["action", "status", "code", "channel"], registry=REGISTRY)
INTAKE_LATENCY = Histogram("bondtape_intake_latency_seconds", "From a command's submission to its durable answer",
                           ["channel"], registry=REGISTRY,
                           buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
JOURNAL_SEQ = Gauge("bondtape_journal_sequence", "The last journal sequence number this process wrote or saw",
                    registry=REGISTRY)
FEED_LAG = Gauge("bondtape_feed_subscriber_lag_messages", "Messages published but not yet delivered, per subscriber",
                 ["subscriber"], registry=REGISTRY)
DEPENDENCY_UP = Gauge("bondtape_dependency_up", "1 when a dependency answers its health check, else 0",
                      ["dependency"], registry=REGISTRY)
INTAKE_UNAVAILABLE = Counter("bondtape_intake_unavailable_total",
                             "Commands answered with the retryable 'unavailable' error (nothing journaled)",
                             ["channel"], registry=REGISTRY)


def record_results(results: Iterable[Any], channel: str, started: float | None = None) -> None:
    """Count engine results (``engine.Result``) and, with ``started``, their latency."""
    last_seq = None
    for r in results:
        code = r.reject.code if r.reject else ""
        REPORTS.labels(r.action, r.status, code, channel).inc()
        if r.seq:
            last_seq = r.seq if last_seq is None else max(last_seq, r.seq)
        if started is not None:
            INTAKE_LATENCY.labels(channel).observe(time.perf_counter() - started)
    if last_seq is not None:
        JOURNAL_SEQ.set(max(last_seq, JOURNAL_SEQ._value.get()))


def metrics_text() -> bytes:
    return generate_latest(REGISTRY)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    _skip = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._skip and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


def configure_logging(level: str = "info", json_lines: bool = True, stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("bondtape")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False

"""Reading the published feed: status, public time and sales, daily snapshot files.

Everything here reads only what was disseminated (capped quantities, no MPIDs): the
``feed_messages`` and the public trade blocks of ``feed_reports``.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bondtape.db import reading
from bondtape.dissemination.publisher import DATA_SETS, FeedError
from bondtape.dissemination.schema import feed_days, feed_messages, feed_reports
from bondtape.reference.schema import securities as securities_table

__all__ = ["feed_status", "time_and_sales", "snapshot_lines", "write_snapshot"]


def feed_status(db: Engine) -> dict[str, dict[str, Any]]:
    """Each data set's latest feed day, its last message number and whether it is closed."""
    out: dict[str, dict[str, Any]] = {}
    with reading(db) as conn:
        for ds in DATA_SETS:
            row = conn.execute(sa.select(feed_days).where(feed_days.c.data_set == ds)
                               .order_by(feed_days.c.feed_date.desc()).limit(1)).first()
            if row is not None:
                out[ds] = {"date": row.feed_date, "last_seq": row.last_seq, "closed": bool(row.closed)}
    return out


def _date(text: str | None, field: str) -> str | None:
    if not text:
        return None
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise FeedError("DATE_INVALID", field, f"{field} {text!r} is not a date (YYYY-MM-DD)") from None


def time_and_sales(db: Engine, cusip: str, date_from: str | None = None, date_to: str | None = None,
                   limit: int = 500) -> dict[str, Any]:
    """The disseminated trades of one security that stand (not cancelled, corrected away
    or reversed), newest first, as the public saw them (capped quantities)."""
    cusip = cusip.strip().upper()
    d0, d1 = _date(date_from, "date_from"), _date(date_to, "date_to")
    if not 1 <= limit <= 10_000:
        raise FeedError("LIMIT_INVALID", "limit", "limit is 1 to 10000")
    fr = feed_reports.c
    with reading(db) as conn:
        sec = conn.execute(sa.select(securities_table).where(securities_table.c.cusip == cusip)).first()
        if sec is None:
            raise FeedError("SECURITY_UNKNOWN", "cusip", f"cusip {cusip} is not in reference data")
        stmt = sa.select(fr.block, fr.msg_date, fr.msg_seq).where(
            fr.cusip == cusip, fr.withheld.is_(None), fr.status == "ACTIVE")
        if d0:
            stmt = stmt.where(fr.feed_date >= d0)
        if d1:
            stmt = stmt.where(fr.feed_date <= d1)
        rows = conn.execute(stmt.order_by(fr.execution_us.desc(), fr.journal_seq.desc()).limit(limit)).all()
    trades = [{**json.loads(r.block), "message": {"date": r.msg_date, "seq": r.msg_seq}} for r in rows]
    return {"cusip": cusip, "symbol": sec.symbol, "issuer": sec.issuer, "data_set": sec.data_set, "trades": trades}


def snapshot_lines(db: Engine, data_set: str, date: str) -> list[str]:
    """The day's disseminated messages of one data set, in sequence order."""
    date = _date(date, "date") or ""
    m = feed_messages.c
    with reading(db) as conn:
        return list(conn.execute(sa.select(m.body).where(m.data_set == data_set, m.feed_date == date)
                                 .order_by(m.msg_seq)).scalars())


def write_snapshot(db: Engine, data_set: str, date: str, directory: Path) -> tuple[Path, int, bool]:
    """Write ``bondtape-feed-DATASET-DATE.jsonl`` (one message a line) and its ``.sha256``.

    Returns (path, messages, whether the day is closed). The file is written whole or not
    at all (a temporary file renamed into place).
    """
    data_set = data_set.upper()
    if data_set not in DATA_SETS:
        raise FeedError("DATA_SET_INVALID", "data_set", f"data set is one of {', '.join(DATA_SETS)}")
    lines = snapshot_lines(db, data_set, date)
    with reading(db) as conn:
        day = conn.execute(sa.select(feed_days.c.closed).where(feed_days.c.data_set == data_set,
                                                                feed_days.c.feed_date == date)).first()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"bondtape-feed-{data_set}-{date}.jsonl"
    data = "".join(line + "\n" for line in lines).encode()
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    path.with_suffix(".jsonl.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
    return path, len(lines), bool(day and day.closed)

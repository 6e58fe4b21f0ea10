"""The index the Historic build reads closed reports through.

A data set's X, C and Y records come from the reports *closed* in its year, in order of
closing. Without an index that query reads every row of ``trade_reports`` (all years) and
sorts the matches; this partial index holds only closed reports (a few percent: a new
report pays nothing to maintain it), in the order the build reads them.
"""
from __future__ import annotations

import sqlalchemy as sa

from bondtape.db import migration
from bondtape.journal.schema import trade_reports

_CLOSED = sa.text("closed_us IS NOT NULL")
closed_index = sa.Index(
    "ix_historic_trade_reports_closed", trade_reports.c.closed_us, trade_reports.c.closed_seq,
    sqlite_where=_CLOSED, postgresql_where=_CLOSED,
)


@migration("0060_historic_closed_index")
def _create(conn: sa.Connection) -> None:
    closed_index.create(conn, checkfirst=True)

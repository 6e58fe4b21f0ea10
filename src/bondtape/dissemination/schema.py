"""Tables of the public feed: the messages as published, and what the publisher needs to
decide the next ones (its position in the journal, the day and sequence of each data set,
the disseminated state of each report, the operator's actions).

Every table here is a projection of the journal plus ``feed_operator_actions``: dropping the
others and publishing again from journal sequence 1 gives the same messages, byte for byte.
"""
from __future__ import annotations

import sqlalchemy as sa

from bondtape.db import create_tables, metadata, migration

# One row per public message. ``body`` is the exact JSON every transport carries.
feed_messages = sa.Table(
    "feed_messages",
    metadata,
    sa.Column("data_set", sa.String(4), primary_key=True),
    sa.Column("feed_date", sa.String(10), primary_key=True),  # market day of the feed
    sa.Column("msg_seq", sa.BigInteger, primary_key=True, autoincrement=False),  # gapless per data set and day
    sa.Column("pub_order", sa.BigInteger, nullable=False, unique=True),  # order across data sets
    sa.Column("msg_type", sa.String(20), nullable=False),
    sa.Column("cusip", sa.String(9)),
    sa.Column("journal_seq", sa.BigInteger),  # the event that caused it (None: operator action)
    sa.Column("body", sa.Text, nullable=False),
    sa.Index("ix_feed_messages_cusip", "cusip", "feed_date"),
)

# Where the publisher is: the last journal event and operator action it has applied.
feed_position = sa.Table(
    "feed_position",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("journal_seq", sa.BigInteger, nullable=False),
    sa.Column("action_id", sa.BigInteger, nullable=False),
)

# Each data set's market days: the last message number and whether the day is closed.
feed_days = sa.Table(
    "feed_days",
    metadata,
    sa.Column("data_set", sa.String(4), primary_key=True),
    sa.Column("feed_date", sa.String(10), primary_key=True),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
    sa.Column("closed", sa.Boolean, nullable=False),
)

# Every non-test report the publisher has seen, as the public feed knows it (no MPIDs).
feed_reports = sa.Table(
    "feed_reports",
    metadata,
    sa.Column("control_number", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("journal_seq", sa.BigInteger, nullable=False),
    sa.Column("data_set", sa.String(4), nullable=False),
    sa.Column("feed_date", sa.String(10), nullable=False),
    sa.Column("cusip", sa.String(9), nullable=False),
    sa.Column("symbol", sa.String(14), nullable=False),
    sa.Column("grade", sa.String(2), nullable=False),
    sa.Column("quantity_c", sa.BigInteger, nullable=False),  # uncapped, for aggregates only
    sa.Column("price_u", sa.BigInteger, nullable=False),
    sa.Column("yield_u", sa.BigInteger),
    sa.Column("execution_us", sa.BigInteger, nullable=False),
    sa.Column("counted", sa.Boolean, nullable=False),  # in market aggregates (each trade once)
    sa.Column("sets_last_sale", sa.Boolean, nullable=False),  # may set high/low/last
    sa.Column("withheld", sa.String(32)),  # None: disseminated
    sa.Column("msg_date", sa.String(10)),  # the message that disseminated it
    sa.Column("msg_seq", sa.BigInteger),
    sa.Column("block", sa.Text),  # the public trade block (JSON), when disseminated
    sa.Column("status", sa.String(10), nullable=False),  # ACTIVE CANCELLED CORRECTED REVERSED
    sa.Index("ix_feed_reports_day", "data_set", "feed_date"),
    sa.Index("ix_feed_reports_cusip", "cusip", "execution_us"),
)

# The last sale of each security at its last close, for advances and declines.
feed_last_sale = sa.Table(
    "feed_last_sale",
    metadata,
    sa.Column("data_set", sa.String(4), primary_key=True),
    sa.Column("cusip", sa.String(9), primary_key=True),
    sa.Column("feed_date", sa.String(10), nullable=False),
    sa.Column("price_u", sa.BigInteger, nullable=False),
)

# Operator actions (halt, resume, end of day): the one input of the feed that is not in
# the journal. ``after_journal_seq`` places each action in the journal's order for a rebuild.
feed_operator_actions = sa.Table(
    "feed_operator_actions",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("after_journal_seq", sa.BigInteger, nullable=False),
    sa.Column("action", sa.String(16), nullable=False),  # HALT RESUME END_OF_DAY
    sa.Column("cusip", sa.String(9)),
    sa.Column("reason", sa.String(4)),
    sa.Column("feed_date", sa.String(10)),
    sa.Column("at_us", sa.BigInteger, nullable=False),
    sa.Column("operator", sa.String(64)),
)

FEED_TABLES = (feed_messages, feed_position, feed_days, feed_reports, feed_last_sale)


@migration("0300_dissemination_feed")
def _create(conn: sa.Connection) -> None:
    create_tables(conn, *FEED_TABLES, feed_operator_actions)
    if conn.execute(sa.select(feed_position.c.id)).first() is None:
        conn.execute(feed_position.insert().values(id=1, journal_seq=0, action_id=0))

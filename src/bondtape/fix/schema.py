"""Tables of the FIX gateway: session sequence numbers and the messages sent (for resends).

``fix_sessions`` holds one row per FIX session (the firm's SenderCompID and ours), with the
next sequence numbers in each direction; they survive restarts. ``fix_messages`` keeps every
application message sent, so that a ResendRequest (35=2) is answered with the stored
message (PossDupFlag=Y); administrative messages are answered with a gap fill.
"""
from __future__ import annotations

import sqlalchemy as sa

from bondtape.db import create_tables, metadata, migration

fix_sessions = sa.Table(
    "fix_sessions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sender_comp_id", sa.String(64), nullable=False),  # the firm's (49 on its messages)
    sa.Column("target_comp_id", sa.String(64), nullable=False),  # ours (56 on its messages)
    sa.Column("mpid", sa.String(4), nullable=False),  # the firm the session is bound to
    sa.Column("username", sa.String(64), nullable=False),  # the last user who logged on
    sa.Column("next_in_seq", sa.BigInteger, nullable=False),  # expected MsgSeqNum from the firm
    sa.Column("next_out_seq", sa.BigInteger, nullable=False),  # our next MsgSeqNum
    sa.Column("created_us", sa.BigInteger, nullable=False),
    sa.Column("updated_us", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("sender_comp_id", "target_comp_id", name="uq_fix_sessions_comp_ids"),
)

fix_messages = sa.Table(
    "fix_messages",
    metadata,
    sa.Column("session_id", sa.Integer, sa.ForeignKey("fix_sessions.id"), primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("msg_type", sa.String(4), nullable=False),
    sa.Column("sent_us", sa.BigInteger, nullable=False),
    sa.Column("message", sa.Text, nullable=False),  # the message as sent, latin-1 text
)


@migration("0080_fix_sessions")
def _create(conn: sa.Connection) -> None:
    create_tables(conn, fix_sessions, fix_messages)

"""An error raised while Ctrl-C or SIGTERM was being handled is still the interrupt.

On PostgreSQL a SIGTERM that lands while SQLAlchemy's pool pings a connection leaves
psycopg mid-query; the ping's cleanup then raises "can't change 'autocommit' now:
connection in transaction status ACTIVE" in the interrupt's place, and `bondtape report`
said "internal error" (exit 1) instead of how many rows were answered (exit 143; seen in
tests/test_signals.py on PostgreSQL, about one run in three). The driver's failure is
played here by a function that fails while handling the interrupt."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

import bondtape.intake.bulk as bulk_module
import bondtape.simulate.market as market_module
from bondtape.cli import Terminated, cli, interrupt_in


def _fails_while_interrupted(interrupt: KeyboardInterrupt):
    def run(*_args, **_kwargs):
        try:
            raise interrupt
        except KeyboardInterrupt:
            raise RuntimeError("can't change 'autocommit' now: connection in transaction status ACTIVE")
    return run


@pytest.mark.parametrize("interrupt, status", [(Terminated(), 143), (KeyboardInterrupt(), 130)])
def test_report_ends_as_interrupted_when_cleanup_fails(tmp_path, monkeypatch, interrupt, status):
    monkeypatch.setattr(bulk_module, "run_bulk", _fails_while_interrupted(interrupt))
    src = tmp_path / "trades.csv"
    src.write_text("action,client_ref,reporting_mpid,cusip,side,capacity,contra,quantity,price,execution_time\n"
                   "NEW,a1,DLRA,037833100,S,P,C,100000,99.5,2024-03-04T10:00:00\n")
    result = CliRunner().invoke(cli, ["report", str(src), "--db", f"sqlite:///{tmp_path / 'm.db'}"])
    assert result.exit_code == status, result.output
    assert "internal error" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("interrupted: 0 rows answered in "), result.output


def test_simulate_ends_as_interrupted_when_cleanup_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(market_module, "simulate_market", _fails_while_interrupted(Terminated()))
    result = CliRunner().invoke(cli, ["simulate", "--start", "2024-03-04", "--days", "1",
                                      "--db", f"sqlite:///{tmp_path / 'm.db'}"])
    assert result.exit_code == 143, result.output
    assert result.output.strip().splitlines()[-1].startswith("interrupted: what was journaled stays")


def test_a_command_without_its_own_message_ends_as_interrupted_too(tmp_path, monkeypatch):
    import bondtape.journal.verify as verify_module
    from bondtape.db import connect

    connect(f"sqlite:///{tmp_path / 'm.db'}").dispose()  # a market (empty) for journal verify to read
    monkeypatch.setattr(verify_module, "verify", _fails_while_interrupted(Terminated()))
    result = CliRunner().invoke(cli, ["journal", "verify", "--db", f"sqlite:///{tmp_path / 'm.db'}"])
    assert result.exit_code == 143, result.output
    assert result.output.strip().splitlines()[-1] == "interrupted: the command stopped before it finished"


def test_interrupt_in_follows_the_context_chain_and_stops_on_a_cycle():
    interrupt = KeyboardInterrupt()
    outer = RuntimeError("cleanup")
    outer.__context__ = ValueError("inner")
    outer.__context__.__context__ = interrupt
    assert interrupt_in(outer) is interrupt
    wrapped = RuntimeError("sqlalchemy's wrapper")
    wrapped.__cause__ = RuntimeError("psycopg's error")
    wrapped.__cause__.__context__ = interrupt
    assert interrupt_in(wrapped) is interrupt
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert interrupt_in(a) is None and interrupt_in(None) is None

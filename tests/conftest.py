"""Shared fixtures. ``db`` runs a test on SQLite and, where BONDTAPE_TEST_POSTGRES_URL is set
(CI sets it), on PostgreSQL too, each in a fresh database/schema."""
from __future__ import annotations

import datetime as dt
import os
import uuid
from decimal import Decimal

import pytest
import sqlalchemy as sa

from bondtape.clock import MARKET_TZ, to_us
from bondtape.db import connect
from bondtape.reference.cusip import cusip_check_digit
from bondtape.reference.model import Firm, Security
from bondtape.reference.store import upsert_firms, upsert_securities

POSTGRES_URL = os.environ.get("BONDTAPE_TEST_POSTGRES_URL")
BACKENDS = ["sqlite"] + (["postgres"] if POSTGRES_URL else [])


def make_cusip(base8: str) -> str:
    return base8 + str(cusip_check_digit(base8))


IG = make_cusip("11111111")
HY = make_cusip("22222222")
R144A = make_cusip("33333333")
AGCY = make_cusip("44444444")


def et(*args) -> int:
    """A market-time (America/New_York) instant as UTC microseconds."""
    return to_us(dt.datetime(*args, tzinfo=MARKET_TZ))


def fresh_postgres_url() -> str:
    """A fresh database on the test server; dropped by the caller's fixture."""
    name = "bt_" + uuid.uuid4().hex[:12]
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f"CREATE DATABASE {name}")
    admin.dispose()
    return POSTGRES_URL.rsplit("/", 1)[0] + "/" + name


def drop_postgres(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.dispose()


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
    else:
        url = fresh_postgres_url()
        yield url
        drop_postgres(url)


@pytest.fixture
def db(db_url):
    engine = connect(db_url)
    yield engine
    engine.dispose()


STANDARD_SECURITIES = [
    Security(IG, "ACME4012345", "Acme Industrial", Decimal("4.25"), dt.date(2035, 6, 1), "CORP", "IG", False, dt.date(2002, 7, 1)),
    Security(HY, "BORE4054321", "Borealis Energy", Decimal("7.5"), dt.date(2031, 3, 15), "CORP", "HY", False, dt.date(2002, 7, 1)),
    Security(R144A, "COBT4099999", "Cobalt Telecom", Decimal("5"), dt.date(2030, 1, 1), "CORP", "IG", True, dt.date(2002, 7, 1)),
    Security(AGCY, "FHLB4011111", "Federal Home Loan Banks", Decimal("3"), dt.date(2029, 1, 1), "AGCY", "IG", False, dt.date(2002, 7, 1)),
]
STANDARD_FIRMS = [
    Firm("DLRA", "Dealer A"), Firm("DLRB", "Dealer B"), Firm("DLRC", "Dealer C"),
    Firm("NMBR", "Non-member Broker", finra_member=False), Firm("CERT", "Certifying Dealer", test_only=True),
]


@pytest.fixture
def market(db):
    """A database with the standard securities and firms."""
    with db.begin() as conn:
        upsert_securities(conn, STANDARD_SECURITIES)
        upsert_firms(conn, STANDARD_FIRMS)
    return db

"""Pure access rules: the seed's access policy dates, Historic aging, secrets at rest, and
another firm's report by id."""
from __future__ import annotations

import os

import pytest
from cryptography.exceptions import InvalidTag

from bondtape.access import audit
from bondtape.access.authz import historic_year_aged
from bondtape.access.crypto import decrypt_totp_secret, encrypt_totp_secret, new_totp_secret
from bondtape.access.policy import load_policy, parse_policy
from bondtape.engine import Engine
from bondtape.web.testing import World
from tests.conftest import et
from tests.helpers import new


@pytest.mark.parametrize("when, mode", [
    (et(2021, 3, 5, 17, 0, 0), "certificate"),
    (et(2021, 3, 8, 0, 0, 1), "parallel"),  # seed R3: Mon 2021-03-08 ...
    (et(2021, 4, 16, 23, 59, 0), "parallel"),  # ... to Fri 2021-04-16
    (et(2021, 4, 18, 12, 0, 0), "parallel"),  # the weekend before the cut-over (documented choice)
    (et(2021, 4, 19, 0, 0, 1), "mfa_only"),  # seed R2: from Mon 2021-04-19
    (et(2026, 1, 1, 0, 0, 0), "mfa_only"),
])
def test_seed_access_policy(when, mode):
    period = load_policy().at(when)
    assert period.website == mode
    assert period.api == "certificate_password"  # seed R8: API files need certificate + login + password


def test_policy_file_errors_are_clear():
    with pytest.raises(ValueError, match="website must be one of certificate, parallel, mfa_only"):
        parse_policy('[[period]]\nfrom = "2021-01-01"\nwebsite = "sometimes"\n')
    with pytest.raises(ValueError, match="'from' must be a date"):
        parse_policy('[[period]]\nfrom = "soon"\nwebsite = "parallel"\n')


def test_historic_year_is_available_after_eighteen_months():
    # seed R24: at least 18 months; a whole year once its 31 December is 18 months old
    assert not historic_year_aged(2008, et(2010, 6, 30, 12, 0, 0))
    assert historic_year_aged(2008, et(2010, 7, 1, 9, 0, 0))
    assert not historic_year_aged(2009, et(2011, 6, 30, 23, 0, 0))
    assert historic_year_aged(2009, et(2011, 7, 1, 0, 0, 1))


def test_historic_aging_of_any_year_is_an_answer_not_an_error():
    """A year whose 18 months end after 9999-12-31 is never aged (was ValueError: year 10000
    is out of range, an HTTP 500 on /data/requests and /download/historic/.../9999/...)."""
    import datetime as dt

    from bondtape.access.authz import historic_year_available_from

    now = et(2026, 8, 3, 10, 0, 0)
    for year in (9997, 9998, 9999, 10**6):
        assert not historic_year_aged(year, now)
    assert historic_year_available_from(9997) == dt.date(9999, 7, 1)
    assert historic_year_available_from(9998) == historic_year_available_from(9999) == dt.date.max
    assert historic_year_aged(0, now) and historic_year_aged(2024, now)


def test_totp_secret_is_encrypted_and_bound_to_its_user():
    key = os.urandom(32)
    secret = new_totp_secret()
    stored = encrypt_totp_secret(key, 7, secret)
    assert secret not in stored and len(stored) == 64
    assert decrypt_totp_secret(key, 7, stored) == secret
    with pytest.raises(InvalidTag):
        decrypt_totp_secret(key, 8, stored)  # copied to another user's row
    with pytest.raises(InvalidTag):
        decrypt_totp_secret(os.urandom(32), 7, stored)  # without the configured key


def test_another_firms_report_by_id_is_not_found(market, tmp_path):
    w = World(market, tmp_path, et(2026, 6, 1, 10, 0, 0))
    a, b = w.org("Dealer A", "FIRM", mpid="DLRA"), w.org("Dealer B", "FIRM", mpid="DLRB")
    alice, bob = w.user("a-trader", a, "trader"), w.user("b-trader", b, "trader")
    [mine] = Engine(market).submit([new(mpid="DLRA", ref="x1")])
    c = w.client()
    assert c.login(bob).status_code == 303
    theirs = c.get(f"/reports/{mine.control_number}")
    missing = c.get(f"/reports/{mine.control_number + 1000}")
    assert theirs.status_code == missing.status_code == 404
    assert "DLRA" not in theirs.text and str(mine.control_number) not in theirs.text
    w.clock.advance(31)
    c2 = w.client()
    assert c2.login(alice).status_code == 303
    own = c2.get(f"/reports/{mine.control_number}")
    assert own.status_code == 200 and "DLRA" in own.text
    with market.connect() as conn:
        denied = audit.search(conn, action="access.denied", actor="b-trader")
    assert denied[0].detail == {"rule": "trade.view", "reason": "other_firm"}


def test_every_access_setting_and_command_is_documented():
    import re
    from pathlib import Path

    import bondtape.access.settings as settings_module
    import bondtape.cli  # noqa: F401  (registers every command group first)
    from bondtape.access.cli import COMMANDS

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "access.md").read_text()
    names = set(re.findall(r'"(BONDTAPE_[A-Z_]+)"', Path(settings_module.__file__).read_text()))
    assert names and not [n for n in names if n not in doc]
    for group in COMMANDS:
        for name in getattr(group, "commands", {}):
            assert f"bondtape {group.name} {name}" in doc, f"bondtape {group.name} {name} is not in docs/access.md"


def test_settings_from_environment():
    from bondtape.access.settings import AccessSettings

    with pytest.raises(ValueError, match="BONDTAPE_SECRET_KEY is not set"):
        AccessSettings.from_env({})
    with pytest.raises(ValueError, match="32 bytes"):
        AccessSettings.from_env({"BONDTAPE_SECRET_KEY": "abcd"})
    s = AccessSettings.from_env({"BONDTAPE_SECRET_KEY": "11" * 32, "BONDTAPE_SMTP_HOST": "mail", "BONDTAPE_SMTP_PORT": "2525"})
    assert s.secret_key == b"\x11" * 32 and (s.smtp_host, s.smtp_port) == ("mail", 2525) and s.cookie_secure

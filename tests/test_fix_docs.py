"""docs/fix.md documents every tag the gateway reads or writes, and every session reject reason."""
from __future__ import annotations

import re
from pathlib import Path

from bondtape.fix import mapping

DOC = (Path(__file__).resolve().parents[1] / "docs" / "fix.md").read_text()
TAGS_IN_TABLES = {int(t) for t in re.findall(r"^\| (\d+)(?:, \d+)? \|", DOC, re.M)} | {
    int(t) for t in re.findall(r"^\| \d+, (\d+) \|", DOC, re.M)}


def test_every_tag_read_is_documented():
    read = set(mapping._SINGLE) | mapping._PARTY_TAGS - {802, 523, 803}
    assert read - TAGS_IN_TABLES == set()


def test_every_tag_written_is_documented():
    written = {571, 487, 856, 150, 572, 818, 939, 751, 58, 48, 22, mapping.TAG_TIMELINESS, mapping.TAG_MODIFIER3,
               mapping.TAG_REJECT_CODE, mapping.TAG_REJECT_FIELD}
    assert written - TAGS_IN_TABLES == set()


def test_every_indicator_tag_is_documented_with_its_field():
    for tag, name in mapping.INDICATOR_TAGS.items():
        assert re.search(rf"^\| {tag} \| .* \| `{name}` \|$", DOC, re.M), (tag, name)


def test_every_reject_field_is_a_bondtape_field_or_documented_as_a_tag():
    """RejectField (20013) is the bondtape field name, or for a FIX tag with no bondtape field
    its name and number, each listed in the 20013 row (docs/fix.md said only field names)."""
    from bondtape.reporting.commands import FIELDS

    source = Path(mapping.__file__).read_text()
    named = set(re.findall(r'reject\("[A-Z_]+", "([^"]+)"', source))
    assert {"cusip", "TradeReportType (856)"} <= named
    row = re.search(r"^\| 20013 \| .*$", DOC, re.M).group(0)
    for name in named - set(FIELDS):
        assert re.fullmatch(r"[A-Za-z]+ \(\d+\)", name), name
        assert f"`{name}`" in row, name
        tag = name.split("(")[1].rstrip(")")
        assert re.search(rf"^\| {tag} \| .*`FIELD_INVALID` on `{re.escape(name)}`", DOC, re.M), name


def test_session_reject_reasons_are_documented():
    for reason in (0, 1, 4, 5, 6, 9, 11, 13, 15, 16):
        assert re.search(rf"^\| {reason} \| ", DOC, re.M), reason


def test_public_names():
    import bondtape.fix as fix

    assert sorted(fix.__all__) == ["DEFAULT_COMP_ID", "FixServer", "LogonRefused", "Principal",
                                   "access_authenticator", "start_fix_server", "tls_context"]
    for name in fix.__all__:
        assert getattr(fix, name) is not None

"""The journal's payload text, the fast market-date path and the engine's GC pause."""
from __future__ import annotations

import datetime as dt
import gc
import json
import random

import pytest

from bondtape.batching import gc_paused
from bondtape.clock import MARKET_TZ, market_date, market_time, to_us
from bondtape.journal.projection import TERMS_LAYOUT, decode_payload, encode_payload


def test_market_date_matches_the_time_zone_on_every_hour_and_around_dst():
    start = to_us(dt.datetime(2023, 12, 31, tzinfo=MARKET_TZ))
    hour = 3_600_000_000
    rng = random.Random(7)
    for h in range(24 * 400):  # every hour of 2024, each at a random instant within it
        us = start + h * hour + rng.randrange(hour)
        assert market_date(us) == market_time(us).date(), us
    for edge in (dt.datetime(2024, 3, 10, 2, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
                 dt.datetime(2024, 11, 3, 1, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5)))):
        for delta in (-1, 0, 1):
            us = to_us(edge) + delta
            assert market_date(us) == market_time(us).date()
        midnight = to_us(dt.datetime.combine(edge.date(), dt.time(0), tzinfo=MARKET_TZ))
        assert market_date(midnight - 1) == edge.date() - dt.timedelta(days=1)
        assert market_date(midnight) == edge.date()


def _terms_payload() -> dict:
    values = {k: None for k in TERMS_LAYOUT}
    values.update(report_date="2024-03-04", cusip="000001AA8", symbol="ÄBC.GB", quantity_c=12_345_600,
                  price_u=101_125_000, execution_us=1_709_560_800_000_000, rule_144a=False, terms_key="ab" * 16,
                  timeliness="ON_TIME", first_control_number=1_000_000_001)
    return values


def test_new_terms_are_stored_positionally_and_decode_to_the_same_mapping():
    payload = _terms_payload()
    text = encode_payload("NEW", payload)
    assert text.startswith("[1,") and '"ÄBC.GB"' in text
    assert json.loads(text)[1:] == [payload[k] for k in TERMS_LAYOUT]
    assert decode_payload(text) == payload
    assert list(decode_payload(text)) == list(TERMS_LAYOUT)


def test_other_payloads_and_old_journals_are_json_objects():
    cancel = {"report_date": "2024-03-05", "test": False}
    assert encode_payload("CANCEL", cancel) == '{"report_date":"2024-03-05","test":false}'
    assert decode_payload(encode_payload("CANCEL", cancel)) == cancel
    extra = dict(_terms_payload(), test=True)  # a correction's payload has one key more
    assert decode_payload(encode_payload("CORRECT", extra)) == extra
    old = json.dumps(_terms_payload())  # journals written before the positional layout
    assert decode_payload(old) == _terms_payload()


def test_an_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="unknown layout"):
        decode_payload("[2, 1, 2]")
    with pytest.raises(ValueError, match="unknown layout"):
        decode_payload("[1, 1, 2]")


def test_gc_is_paused_within_batches_and_restored_after():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()

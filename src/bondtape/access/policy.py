"""The effective-dated access policy (seed 000): certificate, parallel, then MFA only.

The built-in periods are in ``policy.toml``; an operator may replace them with a file of
the same shape (``BONDTAPE_ACCESS_POLICY``). Pure: the time is an argument.
"""
from __future__ import annotations

import datetime as dt
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from bondtape.clock import market_date

WEBSITE_MODES = ("certificate", "parallel", "mfa_only")
API_MODES = ("certificate_password",)


@dataclass(frozen=True)
class Period:
    start: dt.date
    website: str
    api: str

    @property
    def website_methods(self) -> frozenset[str]:
        """How one may sign in to the website: ``certificate`` and/or ``mfa``."""
        return frozenset({"certificate": {"certificate"}, "parallel": {"certificate", "mfa"},
                          "mfa_only": {"mfa"}}[self.website])


@dataclass(frozen=True)
class AccessPolicy:
    periods: tuple[Period, ...]

    def at(self, now_us: int) -> Period:
        day = market_date(now_us)
        current = self.periods[0]
        for period in self.periods:
            if period.start <= day:
                current = period
        return current


def parse_policy(text: str) -> AccessPolicy:
    data = tomllib.loads(text)
    periods = []
    for i, entry in enumerate(data.get("period", [])):
        try:
            start = dt.date.fromisoformat(str(entry["from"]))
        except (KeyError, ValueError):
            raise ValueError(f"access policy period {i + 1}: 'from' must be a date YYYY-MM-DD") from None
        website, api = entry.get("website"), entry.get("api", "certificate_password")
        if website not in WEBSITE_MODES:
            raise ValueError(f"access policy period {i + 1}: website must be one of {', '.join(WEBSITE_MODES)}; got {website!r}")
        if api not in API_MODES:
            raise ValueError(f"access policy period {i + 1}: api must be one of {', '.join(API_MODES)}; got {api!r}")
        periods.append(Period(start, website, api))
    if not periods:
        raise ValueError("access policy: at least one [[period]] is required")
    periods.sort(key=lambda p: p.start)
    return AccessPolicy(tuple(periods))


def load_policy(path: Path | None = None) -> AccessPolicy:
    if path is not None:
        return parse_policy(Path(path).read_text(encoding="utf-8"))
    return parse_policy((resources.files("bondtape.access") / "policy.toml").read_text(encoding="utf-8"))

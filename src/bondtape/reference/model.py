from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal

DATA_SETS = {"CORP": "Corporate", "AGCY": "Agency"}
GRADES = {"IG": "investment grade", "HY": "high yield"}


@dataclass(frozen=True)
class Security:
    cusip: str
    symbol: str
    issuer: str
    coupon: Decimal | None
    maturity: dt.date | None
    data_set: str  # CORP or AGCY
    grade: str  # IG or HY
    rule_144a: bool
    eligible_from: dt.date
    eligible_to: dt.date | None = None

    def eligible_on(self, day: dt.date) -> bool:
        end = self.eligible_to or self.maturity
        return self.eligible_from <= day and (end is None or day <= end)


@dataclass(frozen=True)
class Firm:
    mpid: str
    name: str
    finra_member: bool = True
    test_only: bool = False  # in certification: every report it sends is a test report

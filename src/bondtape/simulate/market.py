"""A deterministic synthetic bond market, traded through the real intake path.

The universe: investment-grade and high-yield corporates, Rule 144A issues and agency
debt; dealers (one of them in certification, reporting test trades) and customers.
Each day: customer and inter-dealer trades (both sides reported), heavy-tailed sizes with
some above the caps, prices that random-walk, mostly timely reports with realistic shares
of late and as-of reports, and cancels, corrections and reversals. Same seed, same market.
"""
from __future__ import annotations

import datetime as dt
import math
import random
import string
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Callable

import sqlalchemy as sa

from bondtape.clock import MARKET_TZ, to_us
from bondtape.engine import Engine
from bondtape.reference.cusip import cusip_check_digit
from bondtape.reference.model import Firm, Security
from bondtape.reference.store import upsert_firms, upsert_securities
from bondtape.reporting.commands import Command, Terms
from bondtape.rulebook import default_rulebook

SIM_TEST_FIRM = "CERT"


@dataclass
class SimSecurity:
    security: Security
    price: float  # current mid, percent of par
    volatility: float  # daily, percent
    activity: float  # relative trading weight


@dataclass
class SimSummary:
    days: int = 0
    trades: int = 0
    results: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    reject_codes: Counter = field(default_factory=Counter)

    def text(self) -> str:
        acc = sum(v for (a, s), v in self.results.items() if s == "ACCEPTED")
        rej = sum(v for (a, s), v in self.results.items() if s == "REJECTED")
        parts = [f"simulated {self.days} days, {self.trades} trades: {acc} reports accepted, {rej} rejected"]
        by_action = Counter()
        for (a, s), v in self.results.items():
            if s == "ACCEPTED":
                by_action[a] += v
        parts.append("  accepted by action: " + ", ".join(f"{k} {v}" for k, v in sorted(by_action.items())))
        parts.append("  trades by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items())))
        if self.reject_codes:
            parts.append("  rejects: " + ", ".join(f"{k} {v}" for k, v in self.reject_codes.most_common()))
        return "\n".join(parts)


_ISSUERS = [
    "Acme Industrial", "Borealis Energy", "Cobalt Telecom", "Delta Rail", "Evergreen Foods",
    "Fulcrum Pharma", "Granite Bank", "Harbor Utilities", "Ionic Semis", "Juniper Retail",
    "Kestrel Airlines", "Lumen Media", "Meridian Health", "Northwind Auto", "Orchid Chemicals",
    "Pinnacle Insurance", "Quarry Materials", "Redwood REIT", "Sable Mining", "Tidewater Shipping",
    "Umbra Software", "Vantage Hotels", "Willow Paper", "Xenon Gas", "Yarrow Agri", "Zephyr Wind",
]
_AGENCIES = ["Federal Home Loan Banks", "Federal Farm Credit Banks", "Fannie Mae", "Freddie Mac", "Tennessee Valley Authority"]


def _cusip(rng: random.Random, used: set[str]) -> str:
    while True:
        base = "".join(rng.choice(string.digits) for _ in range(3)) + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(5))
        cusip = base + str(cusip_check_digit(base))
        if cusip not in used:
            used.add(cusip)
            return cusip


def build_universe(rng: random.Random, n: int, start: dt.date) -> list[SimSecurity]:
    used: set[str] = set()
    out = []
    for i in range(n):
        u = rng.random()
        if u < 0.17:
            issuer, data_set, grade, is_144a = rng.choice(_AGENCIES), "AGCY", "IG", False
        else:
            issuer, data_set = rng.choice(_ISSUERS), "CORP"
            grade = "IG" if rng.random() < 0.65 else "HY"
            is_144a = rng.random() < 0.1
        coupon = Decimal(rng.choice(range(100, 900, 25))) / 100
        maturity = start + dt.timedelta(days=rng.randint(400, 30 * 365))
        ticker = "".join(w[0] for w in issuer.split())[:3].upper() + f"{i % 100:02d}"
        symbol = f"{ticker}{rng.randint(1000000, 9999999)}"[:14]
        sec = Security(_cusip(rng, used), symbol, issuer, coupon, maturity, data_set, grade, is_144a,
                       dt.date(2002, 7, 1))
        par = 100.0 + (float(coupon) - 4.5) * 3 + rng.gauss(0, 4) - (8 if grade == "HY" else 0)
        out.append(SimSecurity(sec, max(par, 40.0), 0.15 if grade == "IG" else 0.6, rng.paretovariate(1.2)))
    return out


def build_firms(n_dealers: int = 16) -> list[Firm]:
    names = ["Alder Securities", "Birch Capital Markets", "Cedar & Co", "Dogwood Brokers", "Elm Street Partners",
             "Fir Trading", "Ginkgo Securities", "Hazel Capital", "Ironwood Markets", "Jacaranda LLC",
             "Kapok Securities", "Larch Brothers", "Maple Fixed Income", "Nutmeg Markets", "Oak Hill Securities",
             "Poplar Capital"]
    firms = [Firm(n[:2].upper() + "SX"[i % 2] + string.ascii_uppercase[i], n) for i, n in enumerate(names[:n_dealers])]
    firms.append(Firm(SIM_TEST_FIRM, "Certification Test Dealer", True, True))
    firms.append(Firm("NMBD", "Non-member Broker (reported as a customer)", False, False))
    return firms


def _size(rng: random.Random) -> Decimal:
    # heavy tail: most tickets small, a few above the 1MM/5MM caps
    value = math.exp(rng.gauss(math.log(60_000), 1.9))
    value = min(max(value, 1_000), 150_000_000)
    step = 1_000 if value < 1_000_000 else 100_000
    return Decimal(int(value // step) * step or step)


def _business_days(start: dt.date, days: int) -> list[dt.date]:
    cal = default_rulebook().at(start).calendar
    out = []
    day = start if cal.is_business_day(start) else cal.next_business_day(start)
    while len(out) < days:
        out.append(day)
        day = cal.next_business_day(day)
    return out


def _at(day: dt.date, seconds: float) -> int:
    return to_us(dt.datetime.combine(day, dt.time(0), tzinfo=MARKET_TZ) + dt.timedelta(seconds=seconds))


def _terms(sec: Security, side: str, capacity: str, contra: str, qty: Decimal, price: float, exec_us: int,
           **flags) -> Terms:
    px = Decimal(f"{price:.3f}")
    return Terms(cusip=sec.cusip, side=side, capacity=capacity, contra=contra, quantity=qty, price=px,
                 yield_=None, execution_us=exec_us, settlement_date=None,
                 commission=Decimal("0") if capacity == "A" else None,
                 remuneration=None, **flags)


def simulate_market(
    db: sa.Engine,
    start: dt.date,
    days: int,
    trades_per_day: int,
    seed: int,
    *,
    n_securities: int = 200,
    progress: Callable[[dt.date, int], None] | None = None,
    batch_size: int = 5000,
) -> SimSummary:
    rng = random.Random(seed)
    universe = build_universe(rng, n_securities, start)
    firms = build_firms()
    dealers = [f.mpid for f in firms if f.finra_member and not f.test_only]
    with db.begin() as conn:
        upsert_securities(conn, [s.security for s in universe])
        upsert_firms(conn, firms)
    engine = Engine(db)
    weights = [s.activity for s in universe]
    summary = SimSummary()
    history: list[tuple[dt.date, int, str, Terms]] = []  # accepted NEW reports: day, control, mpid, terms
    ref_counter = 0
    for day in _business_days(start, days):
        for s in universe:
            s.price = max(5.0, s.price * math.exp(rng.gauss(0, s.volatility / 100)))
        actions: list[tuple[int, Command, str]] = []

        def add(report_us: int, cmd_kwargs: dict, kind: str) -> None:
            nonlocal ref_counter
            ref_counter += 1
            actions.append((report_us, Command(client_ref=f"SIM{seed}-{ref_counter}", channel="bulk",
                                               report_us=report_us, **cmd_kwargs), kind))

        for _ in range(trades_per_day):
            s = rng.choices(universe, weights)[0]
            sec = s.security
            qty = _size(rng)
            u = rng.random()
            exec_s = rng.uniform(8 * 3600, 17.25 * 3600)
            exec_day = day
            kind = "customer"
            if u < 0.02:  # after hours
                exec_s = rng.uniform(18.6 * 3600, 23.9 * 3600)
                kind = "after-hours"
            exec_us = _at(exec_day, exec_s)
            delay = rng.expovariate(1 / 90)  # seconds; mostly prompt
            v = rng.random()
            if v < 0.03:
                delay = rng.uniform(16 * 60, 3 * 3600)
                kind = "late"
            elif v < 0.04:  # as-of: executed on an earlier business day
                back = rng.randint(1, 3)
                exec_day = _business_days(day - dt.timedelta(days=7), 12)
                exec_day = [d for d in exec_day if d < day][-back]
                exec_us = _at(exec_day, rng.uniform(9 * 3600, 16 * 3600))
                kind = "as-of"
            report_us = exec_us + int(delay * 1e6) if exec_day == day and kind != "after-hours" else 0
            if kind == "after-hours":
                report_us = _at(day, exec_s + rng.uniform(30, 600))
            if kind == "as-of":
                report_us = _at(day, rng.uniform(8.1 * 3600, 12 * 3600))
            report_us = min(report_us, _at(day, 23.99 * 3600))
            flags = {}
            w = rng.random()
            if w < 0.005:
                flags["special_price"] = True
            elif w < 0.008:
                flags["weighted_average"] = True
            elif w < 0.013:
                flags["trading_market"] = "P1"
            elif w < 0.0135:
                flags["merger_transfer"] = True
            dealer = rng.choice(dealers)
            spread = 0.25 if sec.grade == "IG" else 0.75
            if rng.random() < 0.7 or flags.get("trading_market") == "P1":
                side = rng.choice("BS")
                price = s.price + (spread if side == "S" else -spread) * rng.random()
                capacity = "A" if rng.random() < 0.1 else "P"
                reporter = SIM_TEST_FIRM if rng.random() < 0.01 else dealer
                contra = "A" if rng.random() < 0.01 else "C"
                add(report_us, {"action": "NEW", "reporting_mpid": reporter,
                                "terms": _terms(sec, side, capacity, contra, qty, price, exec_us, **flags)}, kind)
                summary.kinds["test" if reporter == SIM_TEST_FIRM else kind] += 1
            else:
                buyer = rng.choice([d for d in dealers if d != dealer])
                price = s.price + rng.gauss(0, spread / 4)
                add(report_us, {"action": "NEW", "reporting_mpid": dealer,
                                "terms": _terms(sec, "S", "P", buyer, qty, price, exec_us, **flags)}, kind)
                buy_delay = int(rng.expovariate(1 / 120) * 1e6)
                add(report_us + buy_delay, {"action": "NEW", "reporting_mpid": buyer,
                                            "terms": _terms(sec, "B", "P", dealer, qty, price, exec_us, **flags)}, kind)
                summary.kinds["inter-dealer"] += 1
            summary.trades += 1
        # the day's new reports, in order of receipt
        actions.sort(key=lambda a: a[0])
        accepted_today: list[tuple[int, int, str, Terms]] = []
        for i in range(0, len(actions), batch_size):
            chunk = actions[i:i + batch_size]
            results = engine.submit([c for _, c, _ in chunk])
            for (rus, cmd, _), res in zip(chunk, results):
                summary.results[(cmd.action, res.status)] += 1
                if res.reject:
                    summary.reject_codes[res.reject.code] += 1
                elif res.control_number:
                    # a repeated client_ref (a run resumed after an interruption) counts as the
                    # first answer did: the lifecycle below then draws the same cancels and
                    # corrections, and the resumed run equals an uninterrupted one
                    accepted_today.append((rus, res.control_number, cmd.reporting_mpid, cmd.terms))
        # lifecycle: cancels and corrections of today's reports, reversals of old ones
        later: list[tuple[int, Command]] = []
        close = _at(day, 18.4 * 3600)
        for rus, cn, mpid, terms in accepted_today:
            x = rng.random()
            when = min(close, rus + int(rng.uniform(60, 4 * 3600) * 1e6))
            if when <= rus:
                continue
            ref_counter += 1
            ref = f"SIM{seed}-{ref_counter}"
            if x < 0.01:
                later.append((when, Command("CANCEL", mpid, ref, original_control_number=cn, channel="bulk", report_us=when)))
            elif x < 0.025:
                fixed = Terms(**{**{f: getattr(terms, f) for f in Terms.__slots__},
                                 "price": (terms.price + Decimal(rng.choice([-1, 1])) * Decimal("0.125")).quantize(Decimal("0.001"))})
                later.append((when, Command("CORRECT", mpid, ref, terms=fixed, original_control_number=cn, channel="bulk", report_us=when)))
        old = [h for h in history if (day - h[0]).days > 31]
        for _ in range(int(len(old) * 0.0005) + (1 if old and rng.random() < 0.3 else 0)):
            d0, cn, mpid, terms = rng.choice(old)
            ref_counter += 1
            when = _at(day, rng.uniform(9 * 3600, 17 * 3600))
            later.append((when, Command("REVERSE", mpid, f"SIM{seed}-{ref_counter}", original_control_number=cn, channel="bulk", report_us=when)))
        later.sort(key=lambda a: a[0])
        if later:
            for res, (_, cmd) in zip(engine.submit([c for _, c in later]), later):
                summary.results[(cmd.action, res.status)] += 1
                if res.reject:
                    summary.reject_codes[res.reject.code] += 1
        history.extend((day, cn, mpid, t) for _, cn, mpid, t in accepted_today)
        summary.days += 1
        if progress:
            progress(day, len(actions) + len(later))
    return summary

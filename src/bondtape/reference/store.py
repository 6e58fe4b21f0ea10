"""Loading, importing and listing reference data."""
from __future__ import annotations

import csv
import datetime as dt
import io
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from bondtape.clock import now_us
from bondtape.reference.cusip import cusip_problem
from bondtape.reference.model import DATA_SETS, GRADES, Firm, Security
from bondtape.reference.schema import firms as firms_table
from bondtape.reference.schema import securities as securities_table
from bondtape.reference.schema import reference_version

TRACE_START = dt.date(2002, 7, 1)
SECURITY_COLUMNS = ("cusip", "symbol", "issuer", "coupon", "maturity", "data_set", "grade", "rule_144a")
FIRM_COLUMNS = ("mpid", "name")
_YES = {"Y": True, "N": False}


@dataclass
class ImportResult:
    loaded: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)


class RowError(ValueError):
    pass


def _date(value: str, name: str, required: bool) -> dt.date | None:
    value = value.strip()
    if not value:
        if required:
            raise RowError(f"{name} is required (YYYY-MM-DD)")
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise RowError(f"{name} {value!r} is not a date (YYYY-MM-DD)") from None


def _flag(value: str, name: str, default: bool | None = None) -> bool:
    value = value.strip().upper()
    if not value and default is not None:
        return default
    if value not in _YES:
        raise RowError(f"{name} must be Y or N; got {value!r}")
    return _YES[value]


def security_from_row(row: dict[str, str]) -> Security:
    get = lambda k: (row.get(k) or "").strip()  # noqa: E731
    cusip = get("cusip").upper()
    problem = cusip_problem(cusip)
    if problem:
        raise RowError(f"cusip {cusip!r}: {problem}")
    symbol = get("symbol").upper()
    if not symbol or len(symbol) > 14:
        raise RowError("symbol is required, at most 14 characters")
    issuer = get("issuer")
    if not issuer:
        raise RowError("issuer is required")
    coupon = None
    if get("coupon"):
        try:
            coupon = Decimal(get("coupon"))
        except InvalidOperation:
            raise RowError(f"coupon {get('coupon')!r} is not a number (percent, e.g. 4.25)") from None
        if not coupon.is_finite() or coupon < 0 or coupon > 100:
            raise RowError("coupon must be between 0 and 100 (percent)")
    maturity = _date(get("maturity"), "maturity", required=False)
    data_set = get("data_set").upper()
    if data_set not in DATA_SETS:
        raise RowError(f"data_set must be CORP or AGCY; got {data_set!r}")
    grade = get("grade").upper()
    if grade not in GRADES:
        raise RowError(f"grade must be IG or HY; got {grade!r}")
    rule_144a = _flag(get("rule_144a"), "rule_144a")
    eligible_from = _date(get("eligible_from"), "eligible_from", required=False) or TRACE_START
    eligible_to = _date(get("eligible_to"), "eligible_to", required=False)
    if eligible_to and eligible_to < eligible_from:
        raise RowError("eligible_to is before eligible_from")
    return Security(cusip, symbol, issuer, coupon, maturity, data_set, grade, rule_144a, eligible_from, eligible_to)


def firm_from_row(row: dict[str, str]) -> Firm:
    get = lambda k: (row.get(k) or "").strip()  # noqa: E731
    mpid = get("mpid").upper()
    if not (1 <= len(mpid) <= 4) or not mpid.isalnum() or mpid in {"C", "A"}:
        raise RowError(f"mpid {mpid!r}: 1 to 4 letters or digits (C and A are reserved contra codes)")
    name = get("name")
    if not name:
        raise RowError("name is required")
    return Firm(mpid, name, _flag(get("finra_member"), "finra_member", True), _flag(get("test_only"), "test_only", False))


def _security_values(s: Security, ts: int) -> dict:
    return {
        "cusip": s.cusip, "symbol": s.symbol, "issuer": s.issuer,
        "coupon": None if s.coupon is None else str(s.coupon),
        "maturity": s.maturity.isoformat() if s.maturity else None,
        "data_set": s.data_set, "grade": s.grade, "rule_144a": s.rule_144a,
        "eligible_from": s.eligible_from.isoformat(),
        "eligible_to": s.eligible_to.isoformat() if s.eligible_to else None,
        "updated_us": ts,
    }


def _upsert(conn: Connection, table: sa.Table, key: str, rows: list[dict]) -> None:
    if not rows:
        return
    keys = [r[key] for r in rows]
    existing = set()
    for chunk in range(0, len(keys), 500):
        existing |= {r[0] for r in conn.execute(sa.select(table.c[key]).where(table.c[key].in_(keys[chunk:chunk + 500])))}
    new = [r for r in rows if r[key] not in existing]
    old = [r for r in rows if r[key] in existing]
    if new:
        conn.execute(table.insert(), new)
    for r in old:
        conn.execute(table.update().where(table.c[key] == r[key]).values(**r))
    conn.execute(reference_version.update().where(reference_version.c.id == 1)
                 .values(version=reference_version.c.version + 1))


def upsert_securities(conn: Connection, items: Iterable[Security], ts: int | None = None) -> None:
    ts = ts or now_us()
    _upsert(conn, securities_table, "cusip", [_security_values(s, ts) for s in items])


def upsert_firms(conn: Connection, items: Iterable[Firm], ts: int | None = None) -> None:
    ts = ts or now_us()
    _upsert(conn, firms_table, "mpid", [
        {"mpid": f.mpid, "name": f.name, "finra_member": f.finra_member, "test_only": f.test_only, "updated_us": ts}
        for f in items
    ])


def _import(engine: Engine, text: str, required: tuple[str, ...], parse, upsert, key) -> ImportResult:
    result = ImportResult()
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    missing = [c for c in required if c not in header]
    if missing:
        result.errors.append((1, f"header lacks column(s) {', '.join(missing)}; needs {','.join(required)}"))
        return result
    reader.fieldnames = header
    good, seen = [], {}
    for row in reader:
        line = reader.line_num
        try:
            item = parse(row)
        except RowError as exc:
            result.errors.append((line, str(exc)))
            continue
        k = getattr(item, key)
        if k in seen:
            result.errors.append((line, f"{key} {k} repeats line {seen[k]}"))
            continue
        seen[k] = line
        good.append(item)
    with engine.begin() as conn:
        upsert(conn, good)
    result.loaded = len(good)
    return result


def import_securities(engine: Engine, path: Path | str) -> ImportResult:
    text = Path(path).read_text(encoding="utf-8-sig")
    return _import(engine, text, SECURITY_COLUMNS, security_from_row, upsert_securities, "cusip")


def import_firms(engine: Engine, path: Path | str) -> ImportResult:
    text = Path(path).read_text(encoding="utf-8-sig")
    return _import(engine, text, FIRM_COLUMNS, firm_from_row, upsert_firms, "mpid")


def _security(row) -> Security:
    return Security(
        cusip=row.cusip, symbol=row.symbol, issuer=row.issuer,
        coupon=Decimal(row.coupon) if row.coupon is not None else None,
        maturity=dt.date.fromisoformat(row.maturity) if row.maturity else None,
        data_set=row.data_set, grade=row.grade, rule_144a=bool(row.rule_144a),
        eligible_from=dt.date.fromisoformat(row.eligible_from),
        eligible_to=dt.date.fromisoformat(row.eligible_to) if row.eligible_to else None,
    )


def load_securities(conn: Connection) -> dict[str, Security]:
    return {r.cusip: _security(r) for r in conn.execute(sa.select(securities_table).order_by(securities_table.c.cusip))}


def load_firms(conn: Connection) -> dict[str, Firm]:
    return {
        r.mpid: Firm(r.mpid, r.name, bool(r.finra_member), bool(r.test_only))
        for r in conn.execute(sa.select(firms_table).order_by(firms_table.c.mpid))
    }

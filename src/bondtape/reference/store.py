"""Loading, importing and listing reference data."""
from __future__ import annotations

import datetime as dt
import io
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from bondtape.clock import now_us
from bondtape.csvlines import CsvLineError, one_record_a_line
from bondtape.reference.cusip import cusip_problem
from bondtape.reference.model import DATA_SETS, GRADES, Firm, Security
from bondtape.reference.schema import firms as firms_table
from bondtape.reference.schema import securities as securities_table
from bondtape.reference.schema import reference_version

TRACE_START = dt.date(2002, 7, 1)
SECURITY_COLUMNS = ("cusip", "symbol", "issuer", "coupon", "maturity", "data_set", "grade", "rule_144a")
FIRM_COLUMNS = ("mpid", "name")
SECURITY_OPTIONAL = ("eligible_from", "eligible_to")
FIRM_OPTIONAL = ("finra_member", "test_only")
MAX_NAME = 200  # issuer and firm names: the columns' width
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_COUPON_RE = re.compile(r"[0-9]{1,3}(?:\.[0-9]{0,6})?|\.[0-9]{1,6}")
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
        if not _DATE_RE.fullmatch(value):
            raise ValueError(value)
        return dt.date.fromisoformat(value)
    except ValueError:
        raise RowError(f"{name} {value[:40]!r} is not a date (YYYY-MM-DD)") from None


def _flag(value: str, name: str, default: bool | None = None) -> bool:
    value = value.strip().upper()
    if not value and default is not None:
        return default
    if value not in _YES:
        raise RowError(f"{name} must be Y or N; got {value[:40]!r}")
    return _YES[value]


def security_from_row(row: dict[str, str]) -> Security:
    get = lambda k: (row.get(k) or "").strip()  # noqa: E731
    cusip = get("cusip").upper()
    problem = cusip_problem(cusip)
    if problem:
        raise RowError(f"cusip {cusip[:40]!r}: {problem}")
    symbol = get("symbol").upper()
    if not symbol or len(symbol) > 14:
        raise RowError("symbol is required, at most 14 characters")
    issuer = get("issuer")
    if not issuer or len(issuer) > MAX_NAME:
        raise RowError(f"issuer is required, at most {MAX_NAME} characters")
    coupon = None
    if get("coupon"):
        text = get("coupon")
        if not _COUPON_RE.fullmatch(text) or Decimal(text) > 100:
            raise RowError(f"coupon {text[:40]!r} is not accepted: percent from 0 to 100 with at most 6 decimals, "
                           "e.g. 4.25")
        coupon = Decimal(text)
    maturity = _date(get("maturity"), "maturity", required=False)
    data_set = get("data_set").upper()
    if data_set not in DATA_SETS:
        raise RowError(f"data_set must be CORP or AGCY; got {data_set[:40]!r}")
    grade = get("grade").upper()
    if grade not in GRADES:
        raise RowError(f"grade must be IG or HY; got {grade[:40]!r}")
    rule_144a = _flag(get("rule_144a"), "rule_144a")
    eligible_from = _date(get("eligible_from"), "eligible_from", required=False) or TRACE_START
    eligible_to = _date(get("eligible_to"), "eligible_to", required=False)
    if eligible_to and eligible_to < eligible_from:
        raise RowError("eligible_to is before eligible_from")
    return Security(cusip, symbol, issuer, coupon, maturity, data_set, grade, rule_144a, eligible_from, eligible_to)


def firm_from_row(row: dict[str, str]) -> Firm:
    get = lambda k: (row.get(k) or "").strip()  # noqa: E731
    mpid = get("mpid").upper()
    if not (1 <= len(mpid) <= 4) or not (mpid.isascii() and mpid.isalnum()) or mpid in {"C", "A"}:
        raise RowError(f"mpid {mpid[:40]!r}: 1 to 4 letters or digits A-Z, 0-9 (C and A are reserved contra codes)")
    name = get("name")
    if not name or len(name) > MAX_NAME:
        raise RowError(f"name is required, at most {MAX_NAME} characters")
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


def _import(engine: Engine, text: str, required: tuple[str, ...], optional: tuple[str, ...], parse, upsert, key,
            check=None) -> ImportResult:
    result = ImportResult()
    lines = one_record_a_line(io.StringIO(text, newline=""), "row")  # strict: a line never swallows the next
    try:
        first = next(lines, None)
    except CsvLineError as exc:
        result.errors.append((1, f"the header is not CSV: {exc}"))
        return result
    header = [h.strip().lower() for h in (first[1] if first else [])]
    missing = [c for c in required if c not in header]
    if missing:
        result.errors.append((1, f"header lacks column(s) {', '.join(missing)}; needs {','.join(required)}"))
        return result
    repeated = sorted({h for h in header if h and header.count(h) > 1})
    unknown = [h for h in header if h and h not in required + optional]
    if repeated or unknown:
        problem = (f"column(s) {', '.join(repeated)} appear twice" if repeated else
                   f"unknown column(s) {', '.join(repr(u[:40]) for u in unknown[:5])}")
        result.errors.append((1, f"{problem}; the columns are {','.join(required + optional)}; nothing was loaded"))
        return result
    good, seen = [], {}
    try:
        for line, cells in lines:
            if not cells:  # a blank line
                continue
            try:
                if len(cells) > len(header):
                    raise RowError(f"the line has more cells than the header's {len(header)}")
                row: dict[str, str | None] = {name: None for name in header}  # a missing cell: None
                row.update(zip(header, cells))
                item = parse(row)
            except RowError as exc:
                result.errors.append((line, str(exc)))
                continue
            k = getattr(item, key)
            if k in seen:
                result.errors.append((line, f"{key} {k} repeats line {seen[k]}"))
                continue
            seen[k] = line
            good.append((line, item))
    except CsvLineError as exc:
        result.errors = [(exc.line, f"{exc}; nothing was loaded")]
        return result
    with engine.begin() as conn:
        if check is not None:
            bad = check(conn, good)
            result.errors.extend(bad)
            result.errors.sort()
            dropped = {line for line, _ in bad}
            good = [(line, item) for line, item in good if line not in dropped]
        upsert(conn, [item for _, item in good])
    result.loaded = len(good)
    return result


def _symbol_clashes(conn: Connection, good: list[tuple[int, Security]]) -> list[tuple[int, str]]:
    """Rows whose symbol another CUSIP holds (in the database, or on an earlier line)."""
    held = {r.symbol: r.cusip for r in conn.execute(sa.select(securities_table.c.symbol, securities_table.c.cusip))}
    errors, taken = [], {}
    for line, s in good:
        owner = held.get(s.symbol)
        if s.symbol in taken:
            errors.append((line, f"symbol {s.symbol} repeats line {taken[s.symbol]}; a symbol names one security"))
        elif owner is not None and owner != s.cusip:
            errors.append((line, f"symbol {s.symbol} belongs to {owner}; a symbol names one security"))
        else:
            taken[s.symbol] = line
    return errors


def _read_text(path: Path | str) -> str:
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ImportFileError(f"line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as "
                              "UTF-8; nothing was loaded") from None


class ImportFileError(ValueError):
    """The file as a whole cannot be read; nothing of it was loaded."""


def import_securities(engine: Engine, path: Path | str) -> ImportResult:
    return _import(engine, _read_text(path), SECURITY_COLUMNS, SECURITY_OPTIONAL, security_from_row,
                   upsert_securities, "cusip", _symbol_clashes)


def import_firms(engine: Engine, path: Path | str) -> ImportResult:
    return _import(engine, _read_text(path), FIRM_COLUMNS, FIRM_OPTIONAL, firm_from_row, upsert_firms, "mpid")


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

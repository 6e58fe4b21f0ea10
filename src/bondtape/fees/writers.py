"""Invoice files: JSON and CSV for machines, printable HTML for people.

Amounts are written as decimal strings (never floats). A run writes, in ``DIR``:
``<invoice number>.json``, ``.csv`` and ``.html`` for each invoice, and ``summary.json``
listing every invoice with its total and any MPIDs whose reports could not be billed.
"""
from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Iterable

from jinja2 import Environment, PackageLoader, select_autoescape

from bondtape.fees.invoice import Invoice, Unbilled, plain, rate_text

__all__ = ["CSV_COLUMNS", "FORMATS", "invoice_csv", "invoice_html", "invoice_json", "write_invoices"]

FORMATS = ("json", "csv", "html")
CSV_COLUMNS = ["invoice_number", "month", "organisation_id", "mpid", "code", "description", "data_set",
               "quantity", "unit", "rate", "amount", "sources"]

_env = Environment(loader=PackageLoader("bondtape.fees", "templates"), autoescape=select_autoescape(["html"]))


def _sources_text(sources: dict[str, list[str]]) -> str:
    return "; ".join(f"{kind}={' '.join(ids)}" for kind, ids in sources.items())


def _id_list(ids: list[str]) -> str:
    # Control numbers and record ids are digits: join them directly (a month of a large
    # firm's control numbers is tens of thousands of strings); anything else goes through json.
    if "".join(ids).isdigit():
        return '["' + '","'.join(ids) + '"]'
    return json.dumps(ids)


def invoice_json(inv: Invoice) -> str:
    """The invoice as JSON: ``organisation``, ``lines`` (``code``, ``description``, ``quantity``,
    ``rate``, ``amount``, ``sources``...) and ``total``; numbers as decimal strings."""
    doc = inv.as_dict()
    parts = []
    for line, data in zip(inv.lines, doc["lines"]):
        data.pop("sources")
        sources = ",".join(f"{json.dumps(kind)}:{_id_list(ids)}" for kind, ids in line.sources.items())
        parts.append(json.dumps(data, separators=(",", ":"))[:-1] + ',"sources":{' + sources + "}}")
    doc["lines"] = []
    head = json.dumps(doc, separators=(",", ":"))
    marker = '"lines":[]'
    at = head.index(marker) + len(marker) - 1
    return head[:at] + ",\n".join(parts) + head[at:] + "\n"


def _cell(value: object) -> str:
    text = str(value)
    if "," in text or '"' in text or "\n" in text or "\r" in text:
        return '"' + text.replace('"', '""') + '"'
    return text


def invoice_csv(inv: Invoice) -> str:
    """One row per line (``sources`` as ``kind=id id ...; kind=...``), then a TOTAL row."""
    org = inv.organisation
    head = [inv.number, inv.month, org.id, org.mpid or ""]
    rows = [",".join(CSV_COLUMNS)]
    for line in inv.lines:
        rows.append(",".join(_cell(v) for v in head + [
            line.code, line.description, line.data_set or "", plain(line.quantity), line.unit,
            rate_text(line.rate), line.amount, _sources_text(line.sources)]))
    rows.append(",".join(_cell(v) for v in head + ["TOTAL", f"Total ({inv.rounding})", "", "", "", "", inv.total, ""]))
    return "\n".join(rows) + "\n"


def invoice_html(inv: Invoice) -> str:
    sourced = [(line, [(kind, " ".join(ids)) for kind, ids in line.sources.items()])
               for line in inv.lines if line.sources]
    return _env.get_template("invoice.html").render(
        inv=inv, org=inv.organisation, lines=inv.lines, total=inv.total, sourced=sourced, plain=plain, rate_text=rate_text)


_RENDER = {"json": invoice_json, "csv": invoice_csv, "html": invoice_html}


def write_invoices(out: Path, month: str, schedule: str, invoices: Iterable[Invoice], unbilled: Iterable[Unbilled],
                   formats: Iterable[str] = FORMATS) -> Path:
    """Write every invoice in each format, then ``summary.json``; returns the summary's path.

    The summary is written last, so its presence means every invoice file is there.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    formats = tuple(formats)
    listed = []
    grand = Decimal("0.00")
    for inv in invoices:
        for fmt in formats:
            (out / f"{inv.number}.{fmt}").write_text(_RENDER[fmt](inv), encoding="utf-8")
        grand += inv.total
        org = inv.organisation
        listed.append({"invoice_number": inv.number, "organisation": {"id": org.id, "mpid": org.mpid, "name": org.name},
                       "lines": len(inv.lines), "total": str(inv.total)})
    summary = {"month": month, "schedule": schedule, "invoices": listed, "total": str(grand),
               "unbilled": [u.as_dict() for u in unbilled]}
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return path

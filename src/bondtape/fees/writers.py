"""Invoice files: JSON and CSV for machines, printable HTML for people.

Amounts are written as decimal strings (never floats). A run writes, in ``DIR``:
``<invoice number>.json``, ``.csv`` and ``.html`` for each invoice, and ``summary.json``
listing every invoice with its total and any MPIDs whose reports could not be billed.

The folder is written beside ``DIR`` under a hidden name and renamed to ``DIR`` only when
complete (as ``historic build`` does): an interrupted run leaves ``DIR`` as it was. ``DIR``
may be new, empty, or the folder of an earlier run of the same month, which is replaced
whole; anything else is refused (``OUT_NOT_EMPTY``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from decimal import Decimal
from pathlib import Path
from typing import Iterable

from jinja2 import Environment, PackageLoader, select_autoescape

from bondtape.fees.invoice import Invoice, Unbilled, plain, rate_text
from bondtape.fees.schedule import FeeError

__all__ = ["CSV_COLUMNS", "FORMATS", "check_out", "invoice_csv", "invoice_html", "invoice_json", "write_invoices"]

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


_INVOICE_FILE = re.compile(r"(\d{4}-\d{2})-\d{6,}\.(?:json|csv|html)")  # YYYY-MM-<org id, 6+ digits>


def _hidden(out: Path, what: str) -> Path:
    return out.parent / f".{out.name}.{what}"


def _recover(out: Path) -> None:
    """A run killed (SIGKILL, power loss) after it moved the earlier run aside and before its
    own folder took its place: the earlier run goes back. Once ``out`` is there, it is stale."""
    old = _hidden(out, "replaced")
    if old.is_dir():
        if out.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, out)


def check_out(out: Path, month: str) -> Path:
    """``out`` may not exist, be an empty folder, or hold an earlier run of ``month`` (only its
    invoice files and ``summary.json``), which a run replaces whole; anything else is refused
    with ``OUT_NOT_EMPTY``: another month's invoices or other files are never mixed in or
    deleted."""
    out = Path(out)
    if out.name in ("", ".", ".."):  # "." has no name to hide a folder beside it under
        out = Path(os.path.abspath(out))
    _recover(out)
    if not out.exists():
        return out
    if not out.is_dir():
        raise FeeError("OUT_NOT_EMPTY", "out", f"{out} exists and is not a folder: choose a new folder")
    for entry in out.iterdir():
        found = _INVOICE_FILE.fullmatch(entry.name)
        if entry.name == "summary.json" and entry.is_file():
            try:
                other = json.loads(entry.read_text(encoding="utf-8")).get("month", month)
            except (ValueError, AttributeError):
                other = month  # cut short by an earlier run (before runs were atomic): replaced
            if other == month:
                continue
        elif found and found.group(1) == month and entry.is_file():
            continue
        raise FeeError("OUT_NOT_EMPTY", "out", f"{out} holds {entry.name}, which is not part of an invoice run of "
                       f"{month}: choose a new or empty folder, or the folder of an earlier run of {month} "
                       "(it is replaced whole)")
    return out


def write_invoices(out: Path, month: str, schedule: str, invoices: Iterable[Invoice], unbilled: Iterable[Unbilled],
                   formats: Iterable[str] = FORMATS) -> Path:
    """Write every invoice in each format, then ``summary.json``; returns the summary's path.

    Everything is written into a hidden folder beside ``out`` (``.<name>.invoicing``), then
    renamed to ``out``: the folder appears whole or not at all. An earlier run of the month
    in ``out`` is replaced whole (invoices it had and this run has not are gone with it);
    an interruption (Ctrl-C, SIGTERM: KeyboardInterrupt) or an error removes the hidden
    folder and leaves ``out`` as it was. ``out`` is checked by :func:`check_out`.
    """
    out = check_out(Path(out), month)
    work, old = _hidden(out, "invoicing"), _hidden(out, "replaced")
    formats = tuple(formats)
    listed = []
    grand = Decimal("0.00")
    out.parent.mkdir(parents=True, exist_ok=True)
    if work.exists():
        shutil.rmtree(work)  # a run that was killed half-way: ours, never published
    try:  # from the first folder made: an interruption anywhere leaves out as it was
        work.mkdir()
        for inv in invoices:
            for fmt in formats:
                (work / f"{inv.number}.{fmt}").write_text(_RENDER[fmt](inv), encoding="utf-8")
            grand += inv.total
            org = inv.organisation
            listed.append({"invoice_number": inv.number,
                           "organisation": {"id": org.id, "mpid": org.mpid, "name": org.name},
                           "lines": len(inv.lines), "total": str(inv.total)})
        summary = {"month": month, "schedule": schedule, "invoices": listed, "total": str(grand),
                   "unbilled": [u.as_dict() for u in unbilled]}
        (work / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
        if out.exists():
            os.replace(out, old)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)  # interrupted between the two renames: the earlier run stays
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out / "summary.json"

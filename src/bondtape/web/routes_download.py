"""The download service (the seed's "API files"): daily reference-data files and the
Historic data sets. Every request needs TLS with the user's client certificate AND the
user's login and password (HTTP Basic); every file is checked against entitlements and
every download is in the audit trail.

- ``GET /download/reference/securities-YYYY-MM-DD.csv``: the securities master for a date.
- ``GET /download/historic/``: the Historic data sets on this server, with what you may take.
- ``GET /download/historic/{corporate|agency}/{year}/{file}``: one file of a built data set
  (``manifest.json``, ``data_dictionary.json``, ``ehts/...``, ``parquet/...``, ``final/...``),
  laid out as ``bondtape historic build`` writes it under ``BONDTAPE_HISTORIC_DIR/<set>/<year>``.
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import re

from starlette.responses import FileResponse, Response

from bondtape.access.authz import HistoricSet, decide, historic_year_available_from
from bondtape.access.model import AccessError
from bondtape.clock import market_date
from bondtape.reference.store import load_securities
from bondtape.web.routing import Ctx, NotFound, json_response, route

HISTORIC_SETS = {"corporate": "CORP", "agency": "AGCY"}
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
REFERENCE_COLUMNS = ["cusip", "symbol", "issuer", "coupon", "maturity", "data_set", "grade", "rule_144a"]


def reference_file(ctx: Ctx):
    text = ctx.request.path_params["day"]
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise AccessError("DOWNLOAD_DATE", f"the file date must be YYYY-MM-DD; got {text!r}", "day") from None
    if day > market_date(ctx.now_us):
        raise AccessError("DOWNLOAD_DATE", f"no file for {day}: it is in the future", "day")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(REFERENCE_COLUMNS)
    for s in sorted(load_securities(ctx.conn).values(), key=lambda s: s.cusip):
        if s.eligible_on(day):
            writer.writerow([s.cusip, s.symbol, s.issuer, "" if s.coupon is None else s.coupon, s.maturity or "",
                             s.data_set, s.grade, "Y" if s.rule_144a else "N"])
    body = out.getvalue().encode("utf-8")
    name = f"securities-{day.isoformat()}.csv"
    ctx.audit("download", target=f"reference/{name}", detail={"bytes": len(body)})
    return Response(body, media_type="text/csv", headers={"content-disposition": f'attachment; filename="{name}"'})


def _historic_set(ctx: Ctx) -> HistoricSet:
    name = ctx.request.path_params["data_set"]
    if name not in HISTORIC_SETS:
        raise NotFound(f"no Historic data set {name!r}; there are: {', '.join(HISTORIC_SETS)}")
    return HistoricSet(HISTORIC_SETS[name], ctx.request.path_params["year"])


def historic_index(ctx: Ctx):
    base = ctx.settings.historic_dir
    sets = []
    for name, code in HISTORIC_SETS.items():
        folder = base / name if base else None
        years = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder and folder.is_dir() else []
        for year in years:
            decision = decide(ctx.conn, ctx.actor, "download.historic", HistoricSet(code, year), now_us=ctx.now_us)
            sets.append({"data_set": name, "year": year, "allowed": decision.allowed, "reason": decision.reason,
                         "available_from": historic_year_available_from(year).isoformat(),
                         "manifest": f"/download/historic/{name}/{year}/manifest.json"})
    return json_response({"data_sets": sets})


def historic_file(ctx: Ctx):
    base = ctx.settings.historic_dir
    name, year, rel = ctx.request.path_params["data_set"], ctx.request.path_params["year"], ctx.request.path_params["path"]
    parts = rel.split("/")
    if not base or not rel or len(parts) > 3 or not all(_SEGMENT.match(p) and ".." not in p for p in parts):
        raise NotFound("no such file")
    root = (base / name / str(year)).resolve()
    path = root.joinpath(*parts).resolve()
    if root not in path.parents or not path.is_file():
        raise NotFound(f"no such file in the {name} {year} data set")
    ctx.audit("download", target=f"historic/{name}/{year}/{rel}", detail={"bytes": path.stat().st_size})
    return FileResponse(path, filename=path.name)


ROUTES = [
    route("/download/reference/securities-{day}.csv", reference_file, rule="download.reference", auth="certificate"),
    route("/download/historic/", historic_index, rule="account", auth="certificate"),
    route("/download/historic/{data_set}/{year:int}/{path:path}", historic_file, rule="download.historic",
          resource=_historic_set, auth="certificate"),
]

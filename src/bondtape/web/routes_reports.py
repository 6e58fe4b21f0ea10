"""A firm's own trade report by control number (read-only). A firm sees its own reports
only: another firm's control number answers 404, as a missing one does."""
from __future__ import annotations

import sqlalchemy as sa

from bondtape.journal.schema import trade_reports
from bondtape.web.routing import Ctx, NotFound, route


def _report(ctx: Ctx):
    row = ctx.conn.execute(sa.select(trade_reports).where(
        trade_reports.c.control_number == ctx.request.path_params["control_number"])).first()
    if row is None:
        raise NotFound("no such trade report")
    ctx.report = row
    return row.reporting_mpid


def report_page(ctx: Ctx):
    row = ctx.report
    ctx.audit("report.view", target=f"report:{row.control_number}")
    return ctx.render("report.html", report=row)


ROUTES = [
    route("/reports/{control_number:int}", report_page, rule="trade.view", resource=_report),
]

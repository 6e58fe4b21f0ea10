"""A firm's own trade report by control number (read-only). A firm sees its own reports
only: another firm's control number answers 404, as a missing one does."""
from __future__ import annotations

from bondtape.web.routes_trading import report_mpid
from bondtape.web.routing import Ctx, route


def report_page(ctx: Ctx):
    row = ctx.report
    ctx.audit("report.view", target=f"report:{row.control_number}")
    return ctx.render("report.html", report=row)


ROUTES = [
    route("/reports/{control_number:int}", report_page, rule="trade.view", resource=report_mpid),
]

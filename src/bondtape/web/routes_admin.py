"""The order form (an organisation's administrator requests user IDs), the operator's
approval (which emails the invitation) and the operator's audit-trail search."""
from __future__ import annotations

import datetime as dt

from starlette.responses import RedirectResponse

from bondtape.access import accounts, audit
from bondtape.access.mail import MailError, invitation_email
from bondtape.access.model import AccessError
from bondtape.access.schema import ROLES
from bondtape.clock import MARKET_TZ, to_us
from bondtape.web.routing import Ctx, route


def orders_page(ctx: Ctx):
    org_id = None if ctx.actor.is_operator else ctx.actor.org_id
    return ctx.render("orders.html", orders=accounts.order_list(ctx.conn, org_id), roles=ROLES, error=None,
                      org=accounts.organisation(ctx.conn, ctx.actor.org_id))


def submit_order(ctx: Ctx):
    roles = [r for r in ROLES if ctx.form.get(f"role_{r}") == "on"]
    order_id = accounts.request_user(
        ctx.conn, actor=ctx.actor, org_id=ctx.actor.org_id, username=ctx.form.get("username", ""),
        email=ctx.form.get("email", ""), full_name=ctx.form.get("full_name", ""), roles=roles,
        now_us=ctx.now_us, source=ctx.source, note=ctx.form.get("note"))
    return RedirectResponse(f"/orders?submitted={order_id}", status_code=303)


def operator_orders(ctx: Ctx):
    return ctx.render("operator_orders.html", orders=accounts.order_list(ctx.conn), error=None)


def _decide(ctx: Ctx, approve: bool):
    order_id = ctx.request.path_params["order_id"]
    mailer = ctx.state.mailer
    if approve and mailer is None:
        raise AccessError("MAIL_NOT_CONFIGURED", "no email is configured (SMTP or outbox): cannot send the invitation", "order")
    with ctx.conn.begin_nested():  # an invitation that cannot be sent approves nothing
        token = accounts.decide_order(ctx.conn, order_id, approve=approve, actor=ctx.actor, now_us=ctx.now_us,
                                      source=ctx.source, invitation_hours=ctx.settings.invitation_hours,
                                      note=ctx.form.get("note") or None)
        if token is not None:
            order = [o for o in accounts.order_list(ctx.conn) if o.id == order_id][0]
            subject, body = invitation_email(ctx.settings, full_name=order.full_name, username=order.username,
                                             token=token, hours=ctx.settings.invitation_hours)
            try:
                mailer.send(order.email, subject, body)
            except MailError as exc:
                raise AccessError("MAIL_FAILED", f"the invitation was not sent, nothing was approved: {exc}",
                                  "order") from None
    return RedirectResponse("/operator/orders", status_code=303)


def approve_order(ctx: Ctx):
    return _decide(ctx, True)


def reject_order(ctx: Ctx):
    return _decide(ctx, False)


def _day_us(text: str | None, field: str) -> int | None:
    if not text:
        return None
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise AccessError("AUDIT_DATE", f"{field} must be a date YYYY-MM-DD; got {text!r}", field) from None
    return to_us(dt.datetime.combine(day, dt.time(), tzinfo=MARKET_TZ))


def audit_search(ctx: Ctx):
    q = ctx.request.query_params
    since = _day_us(q.get("since"), "since")
    until = _day_us(q.get("until"), "until")
    if until is not None:
        until += 86_400_000_000
    entries = audit.search(ctx.conn, actor=q.get("actor") or None, action=q.get("action") or None,
                           outcome=q.get("outcome") or None, target=q.get("target") or None,
                           since_us=since, until_us=until, limit=500)
    return ctx.render("audit.html", entries=entries, query=dict(q))


ROUTES = [
    route("/orders", orders_page, rule="org.admin"),
    route("/orders", submit_order, rule="org.admin", methods=["POST"], name="orders_submit"),
    route("/operator/orders", operator_orders, rule="operator"),
    route("/operator/orders/{order_id:int}/approve", approve_order, rule="operator", methods=["POST"]),
    route("/operator/orders/{order_id:int}/reject", reject_order, rule="operator", methods=["POST"]),
    route("/operator/audit", audit_search, rule="operator"),
]

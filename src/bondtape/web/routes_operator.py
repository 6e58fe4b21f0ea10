"""The operator's pages: organisations and reference firms, users (with approvals on
``/operator/orders`` and the audit trail on ``/operator/audit``), securities, and trading
halts (published on the feed as HALT / RESUME)."""
from __future__ import annotations

import sqlalchemy as sa
from starlette.responses import RedirectResponse, Response

from bondtape.access import accounts
from bondtape.access.model import AccessError
from bondtape.access.schema import login_state, organisations, users
from bondtape.reference.schema import firms, securities
from bondtape.web.routes_trading import AfterCommit
from bondtape.web.routing import Ctx, route

PAGE = 300


def index(ctx: Ctx):
    counts = {
        "organisations": ctx.conn.execute(sa.select(sa.func.count()).select_from(organisations)).scalar_one(),
        "users": ctx.conn.execute(sa.select(sa.func.count()).select_from(users)).scalar_one(),
        "requested": ctx.conn.execute(sa.select(sa.func.count()).select_from(users)
                                      .where(users.c.status == "REQUESTED")).scalar_one(),
        "securities": ctx.conn.execute(sa.select(sa.func.count()).select_from(securities)).scalar_one(),
        "firms": ctx.conn.execute(sa.select(sa.func.count()).select_from(firms)).scalar_one(),
    }
    return ctx.render("operator_index.html", counts=counts)


def firms_page(ctx: Ctx):
    orgs = ctx.conn.execute(sa.select(organisations).order_by(organisations.c.id)).all()
    reference = ctx.conn.execute(sa.select(firms).order_by(firms.c.mpid)).all()
    return ctx.render("operator_firms.html", orgs=orgs, firms=reference)


def users_page(ctx: Ctx):
    u, o, ls = users.c, organisations.c, login_state.c
    q = (ctx.request.query_params.get("q") or "").strip().lower()[:64]
    stmt = (sa.select(u.id, u.username, u.full_name, u.email, u.roles, u.status, o.name.label("org"), o.kind,
                      ls.locked_until_us, ls.mfa_enrolled_us, ls.failed_count)
            .select_from(users.join(organisations, o.id == u.org_id).outerjoin(login_state, ls.user_id == u.id)))
    if q:
        stmt = stmt.where(sa.or_(u.username.contains(q), sa.func.lower(u.full_name).contains(q)))
    rows = ctx.conn.execute(stmt.order_by(u.id).limit(PAGE)).all()
    return ctx.render("operator_users.html", rows=rows, q=q, now_us=ctx.now_us)


def _user_id(ctx: Ctx) -> int:
    text = ctx.form.get("user_id", "").strip()
    if not text.isdigit() or len(text) > 9 or accounts.user_by_id(ctx.conn, int(text)) is None:
        raise AccessError("USER_UNKNOWN", f"no user with id {text[:20]!r}", "user_id")
    return int(text)


def user_action(ctx: Ctx):
    user_id = _user_id(ctx)
    action = ctx.form.get("action", "")
    if action == "unlock":
        accounts.unlock(ctx.conn, user_id, actor=ctx.actor, at_us=ctx.now_us, source=ctx.source)
    elif action in ("disable", "enable"):
        accounts.set_user_status(ctx.conn, user_id, "DISABLED" if action == "disable" else "ACTIVE", actor=ctx.actor,
                                 at_us=ctx.now_us, source=ctx.source)
    else:
        raise AccessError("ACTION_INVALID", "the action is unlock, disable or enable", "action")
    return RedirectResponse("/operator/users", status_code=303)


def securities_page(ctx: Ctx):
    s = securities.c
    q = (ctx.request.query_params.get("q") or "").strip().upper()[:40]
    stmt = sa.select(securities)
    if q:
        stmt = stmt.where(sa.or_(s.cusip.contains(q), s.symbol.contains(q), sa.func.upper(s.issuer).contains(q)))
    total = ctx.conn.execute(sa.select(sa.func.count()).select_from(stmt.subquery())).scalar_one()
    rows = ctx.conn.execute(stmt.order_by(s.cusip).limit(PAGE)).all()
    return ctx.render("operator_securities.html", rows=rows, q=q, total=total, page=PAGE)


def halts_page(ctx: Ctx):
    from bondtape.dissemination.schema import feed_operator_actions
    from bondtape.web.routes_market import halted_cusips

    halted = sorted(halted_cusips(ctx.conn))
    names = {r.cusip: r for r in ctx.conn.execute(sa.select(securities).where(securities.c.cusip.in_(halted)))}
    recent = ctx.conn.execute(sa.select(feed_operator_actions).order_by(feed_operator_actions.c.id.desc()).limit(50)).all()
    return ctx.render("operator_halts.html", halted=[(c, names.get(c)) for c in halted], recent=recent,
                      message=ctx.request.query_params.get("done"), error=None)


def halt_action(ctx: Ctx):
    """Halt or resume: the feed publishes it; the audit trail records who did it."""
    from bondtape.access.api import record_audit
    from bondtape.dissemination.publisher import FeedError
    from bondtape.serve import services

    action = ctx.request.path_params["action"]
    if action not in ("halt", "resume"):
        raise AccessError("ACTION_INVALID", "the action is halt or resume", "action")
    cusip = ctx.form.get("cusip", "").strip().upper()
    reason = ctx.form.get("reason", "").strip().upper() or ("R" if action == "resume" else "")
    actor, source, state = ctx.actor, ctx.source, ctx.state

    def work() -> Response:  # the publisher writes the feed in its own transaction
        publisher = services(state).publisher
        try:
            if action == "halt":
                publisher.halt(cusip, reason, operator=actor.username)
            else:
                publisher.resume(cusip, reason, operator=actor.username)
        except FeedError as exc:
            record_audit(state.db, f"feed.{action}", now_us=state.clock(), actor=actor, outcome="failed",
                         target=f"security:{cusip[:9]}", source=source, detail={"code": exc.code})
            return ctx.render("error.html", status=400, error=AccessError(exc.code, exc.message, exc.field))
        record_audit(state.db, f"feed.{action}", now_us=state.clock(), actor=actor, target=f"security:{cusip}",
                     source=source, detail={"reason": reason})
        return RedirectResponse(f"/operator/halts?done={action}", status_code=303)

    return AfterCommit(work)


ROUTES = [
    route("/operator", index, rule="operator"),
    route("/operator/firms", firms_page, rule="operator"),
    route("/operator/users", users_page, rule="operator"),
    route("/operator/users", user_action, rule="operator", methods=["POST"], name="operator_user_action"),
    route("/operator/securities", securities_page, rule="operator"),
    route("/operator/halts", halts_page, rule="operator"),
    route("/operator/halts/{action}", halt_action, rule="operator", methods=["POST"]),
]

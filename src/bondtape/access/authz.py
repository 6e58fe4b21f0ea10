"""May this actor do this to that? One model for site pages, REST, the feed, downloads, FIX.

``decide(conn, actor, action, resource, now_us=...)`` returns a :class:`Decision`. Every
route of the website declares one of :data:`ACTIONS` (see ``bondtape.web.routing``); a
route without a rule fails the authorization-matrix test.

| action | allowed to |
| --- | --- |
| ``public`` | anyone, signed in or not |
| ``account`` | any signed-in user (their own account) |
| ``operator`` | the operator's administrators |
| ``org.admin`` | the administrator of the organisation (resource: org id; None = own), the operator |
| ``trade.report`` | a trader of a reporting firm (resource: MPID, must be the firm's own) |
| ``trade.view`` | a reporting firm's trader, viewer or administrator, for its own MPID; the operator |
| ``trade.act`` | a trader of the firm that reported it (cancel, correct, reverse) |
| ``fix.logon`` | a trader of a reporting firm |
| ``feed.realtime`` | a subscriber whose organisation holds REALTIME for the data set; a Non-Professional must have attested; the operator |
| ``download.reference`` | reporting firms' users; subscribers holding REFERENCE; the operator |
| ``download.historic`` | a subscriber holding HISTORIC for (data set, year), once the year is aged (18 months); the operator, aged too |
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection

from bondtape.access import entitlements
from bondtape.access.model import AuthenticatedUser
from bondtape.clock import market_date

ACTIONS = (
    "public", "account", "operator", "org.admin", "trade.report", "trade.view", "trade.act", "fix.logon",
    "feed.realtime", "download.reference", "download.historic",
)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # a stable code: ok, not_signed_in, role, other_firm, not_entitled, not_aged, no_attestation

    def __bool__(self) -> bool:
        return self.allowed


@dataclass(frozen=True)
class HistoricSet:
    data_set: str
    year: int


ALLOW = Decision(True, "ok")


def _deny(reason: str) -> Decision:
    return Decision(False, reason)


def decide(conn: Connection, actor: AuthenticatedUser | None, action: str, resource: Any = None, *,
           now_us: int) -> Decision:
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; known: {', '.join(ACTIONS)}")
    if action == "public":
        return ALLOW
    if actor is None:
        return _deny("not_signed_in")
    if action == "account":
        return ALLOW
    operator = actor.is_operator
    if action == "operator":
        return ALLOW if operator else _deny("role")
    if action == "org.admin":
        if operator:
            return ALLOW
        if not actor.has_role("org_admin"):
            return _deny("role")
        return ALLOW if resource in (None, actor.org_id) else _deny("other_organisation")
    if action in ("trade.report", "trade.act", "fix.logon"):
        if actor.org_kind != "FIRM" or not actor.mpid or not actor.has_role("trader"):
            return _deny("role")
        if action != "fix.logon" and resource is not None and resource != actor.mpid:
            return _deny("other_firm")
        return ALLOW
    if action == "trade.view":
        if operator:
            return ALLOW
        if actor.org_kind != "FIRM" or not actor.mpid or not actor.has_role("trader", "viewer", "org_admin"):
            return _deny("role")
        return ALLOW if resource is None or resource == actor.mpid else _deny("other_firm")
    if action == "download.reference":
        if operator or (actor.org_kind == "FIRM" and actor.has_role("trader", "viewer", "org_admin", "subscriber")):
            return ALLOW
        if not actor.has_role("subscriber"):
            return _deny("role")
        return ALLOW if entitlements.holds(conn, actor.org_id, "REFERENCE", "", at_us=now_us) else _deny("not_entitled")
    if action == "feed.realtime":
        if operator:
            return ALLOW
        if not actor.has_role("subscriber"):
            return _deny("role")
        if not entitlements.holds(conn, actor.org_id, "REALTIME", str(resource or ""), at_us=now_us):
            return _deny("not_entitled")
        if actor.org_kind == "NON_PROFESSIONAL" and not entitlements.has_attested(conn, actor.user_id):
            return _deny("no_attestation")
        return ALLOW
    if action == "download.historic":
        if not isinstance(resource, HistoricSet):
            raise ValueError("download.historic needs a HistoricSet(data_set, year)")
        if not historic_year_aged(resource.year, now_us):
            return _deny("not_aged")
        if operator:
            return ALLOW
        if not actor.has_role("subscriber"):
            return _deny("role")
        if not entitlements.holds(conn, actor.org_id, "HISTORIC", resource.data_set, resource.year, at_us=now_us):
            return _deny("not_entitled")
        if actor.org_kind == "NON_PROFESSIONAL" and not entitlements.has_attested(conn, actor.user_id):
            return _deny("no_attestation")
        return ALLOW
    raise AssertionError(action)  # pragma: no cover


def _available_from(year: int) -> dt.date | None:
    """The first market date on which every trade of ``year`` is aged; None when that date
    would fall after the end of the calendar (9999-12-31): such a year is never aged."""
    from bondtape.rulebook import default_rulebook, historic_available_from

    if year < dt.MINYEAR:  # long before TRACE: nothing to age
        return dt.date.min
    if year >= dt.MAXYEAR:
        return None
    rules = default_rulebook().at(dt.date(year + 1, 1, 1))
    try:
        return historic_available_from(year, rules)
    except (ValueError, OverflowError):  # e.g. 9998 + 18 months
        return None


def historic_year_available_from(year: int) -> dt.date:
    """The first market date on which every trade of ``year`` is aged (the rulebook's aging);
    ``dt.date.max`` for a year whose date would fall after 9999-12-31 (see ``historic_year_aged``)."""
    available = _available_from(year)
    return dt.date.max if available is None else available


def historic_year_aged(year: int, now_us: int) -> bool:
    """Every trade of ``year`` is at least 18 months old (the rulebook's aging) on this date.
    False, never an error, for any year, however late."""
    available = _available_from(year)
    return available is not None and market_date(now_us) >= available

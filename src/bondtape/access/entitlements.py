"""Entitlements: what an organisation may receive, effective-dated, and attestations.

One row per grant: ``(org_id, product, data_set, year, start_us, end_us)``.

- ``REALTIME``: the real-time feed for one data set (``CORP``, ``AGCY``, ``144A``).
- ``HISTORIC``: one Historic data set (``CORP``, ``AGCY``) for one calendar ``year``.
- ``REFERENCE``: the daily reference-data files (data_set ``""``).

Fees bills from its own records (subscriptions, purchases) and joins here on these columns.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bondtape.access import audit
from bondtape.access.model import AccessError, AuthenticatedUser
from bondtape.access.schema import ENTITLEMENT_PRODUCTS, attestations, entitlements, organisations

DATA_SETS_FOR = {"REALTIME": ("CORP", "AGCY", "144A"), "HISTORIC": ("CORP", "AGCY", "144A"), "REFERENCE": ("",)}

# Rule 7730(f)(1): the Non-Professional's four conditions, each attested "true".
NON_PROFESSIONAL_STATEMENTS = {
    "natural_person_personal_use": "I am a natural person and use TRACE data only for my personal, non-commercial use.",
    "not_registered": "(A) I am not registered or qualified with the SEC, the CFTC, any state securities agency, "
                      "any securities exchange or association, or any commodities or futures market or association, "
                      "and I am not employed by such a person in that capacity.",
    "not_investment_adviser": "(B) I am not engaged as an investment adviser (Investment Advisers Act section "
                              "202(a)(11)), whether registered or not, nor employed by one.",
    "not_bank_insurer_role": "(C) I am not employed by a bank, insurance company or exempt organisation in a role "
                             "that would require registration if done for a broker-dealer or adviser.",
    "no_redistribution": "(D) I do not redistribute TRACE data and do not intend to.",
}


@dataclass(frozen=True)
class Entitlement:
    id: int
    org_id: int
    product: str
    data_set: str
    year: int | None
    start_us: int
    end_us: int | None
    note: str | None


def grant(conn: Connection, *, org_id: int, product: str, data_set: str = "", year: int | None = None,
          start_us: int, end_us: int | None = None, actor: AuthenticatedUser | None, at_us: int,
          source: str | None = None, note: str | None = None) -> int:
    product = product.upper()
    data_set = (data_set or "").upper()
    if product not in ENTITLEMENT_PRODUCTS:
        raise AccessError("ENT_PRODUCT", f"product must be one of {', '.join(ENTITLEMENT_PRODUCTS)}", "product")
    if data_set not in DATA_SETS_FOR[product]:
        accepted = ", ".join(d or '""' for d in DATA_SETS_FOR[product])
        raise AccessError("ENT_DATA_SET", f"{product} data set must be one of {accepted}; got {data_set!r}", "data_set")
    if product == "HISTORIC" and (year is None or not 2002 <= year <= 2200):
        raise AccessError("ENT_YEAR", "a Historic entitlement names a calendar year (2002 or later)", "year")
    if product != "HISTORIC" and year is not None:
        raise AccessError("ENT_YEAR", "only Historic entitlements have a year", "year")
    if end_us is not None and end_us <= start_us:
        raise AccessError("ENT_DATES", "the end must be after the start", "end")
    org = conn.execute(sa.select(organisations).where(organisations.c.id == org_id)).first()
    if org is None:
        raise AccessError("ORG_UNKNOWN", f"no organisation with id {org_id}", "org_id")
    new_id = conn.execute(entitlements.insert().values(
        org_id=org_id, product=product, data_set=data_set, year=year, start_us=start_us, end_us=end_us,
        granted_by=actor and actor.user_id, granted_us=at_us, note=note)).inserted_primary_key[0]
    audit.record(conn, "admin.entitlement.grant", at_us=at_us, actor_user_id=actor and actor.user_id,
                 actor=actor and actor.username, org_id=org_id, target=f"entitlement:{new_id}", source=source,
                 detail={"product": product, "data_set": data_set, "year": year, "start_us": start_us, "end_us": end_us})
    return int(new_id)


def end(conn: Connection, entitlement_id: int, *, end_us: int, actor: AuthenticatedUser | None, at_us: int,
        source: str | None = None) -> None:
    row = conn.execute(sa.select(entitlements).where(entitlements.c.id == entitlement_id)).first()
    if row is None:
        raise AccessError("ENT_UNKNOWN", f"no entitlement {entitlement_id}", "id")
    conn.execute(entitlements.update().where(entitlements.c.id == entitlement_id).values(end_us=max(end_us, row.start_us)))
    audit.record(conn, "admin.entitlement.end", at_us=at_us, actor_user_id=actor and actor.user_id,
                 actor=actor and actor.username, org_id=row.org_id, target=f"entitlement:{entitlement_id}", source=source,
                 detail={"end_us": end_us})


def list_for(conn: Connection, org_id: int | None = None) -> list[Entitlement]:
    q = sa.select(entitlements).order_by(entitlements.c.org_id, entitlements.c.id)
    if org_id is not None:
        q = q.where(entitlements.c.org_id == org_id)
    return [Entitlement(r.id, r.org_id, r.product, r.data_set, r.year, r.start_us, r.end_us, r.note) for r in conn.execute(q)]


def holds(conn: Connection, org_id: int, product: str, data_set: str = "", year: int | None = None, *, at_us: int) -> bool:
    q = (sa.select(entitlements.c.id)
         .where(entitlements.c.org_id == org_id, entitlements.c.product == product, entitlements.c.data_set == data_set,
                entitlements.c.start_us <= at_us,
                sa.or_(entitlements.c.end_us.is_(None), entitlements.c.end_us > at_us)))
    if year is not None:
        q = q.where(entitlements.c.year == year)
    return conn.execute(q.limit(1)).first() is not None


def attest_non_professional(conn: Connection, user: AuthenticatedUser, answers: dict[str, bool], signed_name: str, *,
                            at_us: int, source: str | None) -> int:
    """Keep a Non-Professional's attestation; every one of the conditions must be affirmed."""
    missing = [k for k in NON_PROFESSIONAL_STATEMENTS if answers.get(k) is not True]
    if missing:
        raise AccessError("ATTEST_INCOMPLETE", "a Non-Professional must affirm every condition of Rule 7730(f)(1); "
                          f"not affirmed: {', '.join(missing)}", missing[0])
    if not signed_name.strip():
        raise AccessError("ATTEST_NAME", "type your full name to sign", "signed_name")
    statements = {k: {"text": v, "affirmed": True} for k, v in NON_PROFESSIONAL_STATEMENTS.items()}
    new_id = conn.execute(attestations.insert().values(
        user_id=user.user_id, org_id=user.org_id, kind="NON_PROFESSIONAL", statements=json.dumps(statements, sort_keys=True),
        signed_name=signed_name.strip()[:200], attested_us=at_us, source=source)).inserted_primary_key[0]
    audit.record(conn, "attest.non_professional", at_us=at_us, actor_user_id=user.user_id, actor=user.username,
                 org_id=user.org_id, target=f"attestation:{new_id}", source=source)
    return int(new_id)


def has_attested(conn: Connection, user_id: int, kind: str = "NON_PROFESSIONAL") -> bool:
    return conn.execute(sa.select(attestations.c.id).where(attestations.c.user_id == user_id,
                                                           attestations.c.kind == kind).limit(1)).first() is not None

"""Who is acting: an authenticated user, as every channel sees it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AuthenticatedUser:
    user_id: int
    username: str
    org_id: int
    org_kind: str  # one of schema.ORG_KINDS
    mpid: str | None  # the organisation's MPID when it is a reporting firm
    roles: tuple[str, ...]  # schema.ROLES
    method: str = "password"  # password, mfa, certificate, recovery, certificate+password

    def has_role(self, *roles: str) -> bool:
        return any(r in self.roles for r in roles)

    @property
    def is_operator(self) -> bool:
        return self.org_kind == "OPERATOR" and "operator_admin" in self.roles


class AccessError(Exception):
    """A refused access-management action: a stable code, the field, and what is accepted."""

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field

    def __str__(self) -> str:
        where = f" ({self.field})" if self.field else ""
        return f"{self.code}{where}: {self.message}"

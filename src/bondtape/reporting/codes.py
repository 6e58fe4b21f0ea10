"""Stable reject codes. A program acts on the code; a person reads the message.

Every channel (bulk file, REST, website, FIX) returns these same codes. The list is
documented in docs/reject-codes.md and a test checks that each one is documented and can
be produced from an input.
"""
from __future__ import annotations

from dataclasses import dataclass

REJECT_CODES: dict[str, str] = {
    "FIELD_REQUIRED": "a required field is missing",
    "FIELD_INVALID": "a field's value is not one of those accepted",
    "ACTION_INVALID": "action must be NEW, CANCEL, CORRECT or REVERSE",
    "CUSIP_MALFORMED": "a CUSIP is 9 characters: 8 of A-Z, 0-9, *, @, # and a digit",
    "CUSIP_CHECK_DIGIT": "the CUSIP's check digit does not match its first 8 characters",
    "SECURITY_UNKNOWN": "no security with this CUSIP in reference data",
    "SECURITY_NOT_ELIGIBLE": "the security is not TRACE-eligible on the execution date",
    "FIRM_UNKNOWN": "the reporting MPID is not a firm in reference data",
    "FIRM_NOT_MEMBER": "the reporting firm is not a FINRA member",
    "CONTRA_UNKNOWN": "the contra MPID is not a firm in reference data (C customer, A affiliate)",
    "CONTRA_NOT_MEMBER": "the contra firm is not a FINRA member: report it as C",
    "CONTRA_IS_REPORTER": "a firm cannot be its own contra party",
    "PRICE_INVALID": "price must be a positive number, percent of par, in plain digits",
    "PRICE_IMPLAUSIBLE": "price is above the plausible maximum or has too many decimals",
    "QUANTITY_INVALID": "quantity must be a positive par amount in plain digits",
    "QUANTITY_IMPLAUSIBLE": "quantity is above the plausible maximum or has too many decimals",
    "YIELD_INVALID": "yield must be a number within the plausible range",
    "COMMISSION_INVALID": "commission must be a non-negative dollar amount with at most 2 decimals",
    "TIME_INVALID": "a time must be ISO 8601 date and time of day, e.g. 2024-03-01T10:15:00-05:00, that exists "
                    "in market time, to the microsecond at most",
    "TIME_AMBIGUOUS": "a time without an offset falls in the hour the clocks repeat: give its offset (-04:00 or -05:00) or Z",
    "DATE_INVALID": "a date must be YYYY-MM-DD",
    "EXECUTION_IN_FUTURE": "the execution time is after the time the report was received",
    "EXECUTION_BEFORE_TRACE": "the execution date is before TRACE began (2002-07-01)",
    "SETTLEMENT_BEFORE_EXECUTION": "the settlement date is before the execution date",
    "SYSTEM_CLOSED": "the report was received outside system hours",
    "REPORT_UNKNOWN": "the firm has no report with this control number (another firm's report answers the same)",
    "NOT_OWN_REPORT": "a FIX reporting party (452=1) that is not the firm of the session's user",
    "REPORT_NOT_ACTIVE": "the report was already cancelled, corrected or reversed",
    "WINDOW_CLOSED": "past the cancel/correct window (T+20 business days): reverse instead",
    "WINDOW_OPEN": "within the cancel/correct window: cancel instead of reversing",
    "DUPLICATE_TRADE": "the terms match an accepted report of the same firm",
    "CLIENT_REF_REUSED": "the client_ref was used for another request (another action, report acted on or terms)",
    "TEST_MISMATCH": "a test report and a production report cannot act on each other",
}


@dataclass(frozen=True, slots=True)
class Reject:
    code: str
    field: str
    message: str

    def __post_init__(self) -> None:
        if self.code not in REJECT_CODES:  # pragma: no cover - programming error
            raise ValueError(f"unknown reject code {self.code}")

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "field": self.field, "message": self.message}


class Rejected(Exception):
    """Raised inside validation; carries the reject."""

    def __init__(self, code: str, field: str, message: str):
        super().__init__(message)
        self.reject = Reject(code, field, message)

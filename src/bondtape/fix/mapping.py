"""The application layer: Trade Capture Report (35=AE) in, Trade Capture Report Ack
(35=AR) out. Every tag is documented in docs/fix.md.

An AE is turned into the text fields of :func:`bondtape.reporting.commands.parse_command`
(the same fields as a bulk-file row or a REST body), so validation, reject codes and texts
are those of every other channel. Problems with the message's structure (TradeReportID
missing, a repeated tag, a wrong NumInGroup count) are session-level: a Reject (35=3).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from bondtape.engine import Result
from bondtape.fix.codec import RawMessage, parse_utc_timestamp_us
from bondtape.reporting.codes import Reject

# TradeReportTransType (487) -> action
TRANS_TYPES = {"0": "NEW", "1": "CANCEL", "2": "CORRECT", "4": "REVERSE"}
SIDES = {"1": "B", "2": "S"}
CAPACITIES = {"P": "P", "A": "A", "R": "P"}  # OrderCapacity (528); riskless principal reports as principal
ROLE_REPORTING = "1"  # PartyRole Executing Firm
ROLE_CONTRA = "17"  # PartyRole Contra Firm

# TRACE indicators: user-defined tags (docs/fix.md), Y or N
INDICATOR_TAGS = {
    20001: "when_issued", 20002: "special_price", 20003: "weighted_average", 20006: "merger_transfer",
    20007: "locked_in", 20008: "agu", 20009: "allow_duplicate",
}
TAG_TRADING_MARKET = 20004
TAG_REMUNERATION = 20005
# Outbound user-defined tags on the AR
TAG_TIMELINESS = 20010
TAG_MODIFIER3 = 20011
TAG_REJECT_CODE = 20012
TAG_REJECT_FIELD = 20013

# Tags read from an AE: each may appear once (outside the parties group).
_SINGLE = {571, 487, 856, 572, 48, 22, 32, 31, 423, 54, 528, 60, 64, 236, 12, 464, 552, 453,
           TAG_TRADING_MARKET, TAG_REMUNERATION, *INDICATOR_TAGS}
_PARTY_TAGS = {448, 447, 452, 802, 523, 803}

# TradeReportRejectReason (751) for each reject code; 99 (Other) for the rest.
REJECT_REASONS = {
    "FIRM_UNKNOWN": "1", "FIRM_NOT_MEMBER": "1", "CONTRA_UNKNOWN": "1", "CONTRA_NOT_MEMBER": "1",
    "CONTRA_IS_REPORTER": "1",
    "CUSIP_MALFORMED": "2", "CUSIP_CHECK_DIGIT": "2", "SECURITY_UNKNOWN": "2", "SECURITY_NOT_ELIGIBLE": "2",
    "NOT_OWN_REPORT": "3",
    "ACTION_INVALID": "4",
}
# ExecType (150) on an accepted AR
_EXEC_TYPES = {"NEW": "F", "CORRECT": "G", "CANCEL": "H", "REVERSE": "H"}


class SessionLevelReject(Exception):
    """The message breaks a FIX rule: answer with a Reject (35=3)."""

    def __init__(self, reason: int, tag: int | None, text: str):
        super().__init__(text)
        self.reason = reason
        self.tag = tag
        self.text = text


@dataclass
class TradeReport:
    """An AE, read: the fields for parse_command, or the reject found while reading."""

    trade_report_id: str
    trans_type: str
    fields: dict[str, object] = field(default_factory=dict)
    echo: list[tuple[int, str]] = field(default_factory=list)  # 856, 572, 48, 22 as received
    ref_id: str | None = None  # TradeReportRefID (572)
    reject: Reject | None = None

    @property
    def action(self) -> str | None:
        return TRANS_TYPES.get(self.trans_type)


def _bad(code: str, name: str, text: str) -> Reject:
    return Reject(code, name, text)


def ascii_digits(text: str) -> bool:
    """Only the ASCII digits 0-9 (str.isdigit() also takes e.g. '²', which int() refuses)."""
    return text.isascii() and text.isdigit()


# FIX 4.4 text without MessageEncoding (347) is ASCII: a TradeReportID, TradeReportRefID or
# PartyID is printable ASCII, space to ~.
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")
TEXT_ACCEPTED = "printable ASCII, space to ~ (FIX 4.4 text is ASCII: no control characters, no accented letters)"


def text_problem(value: str, name: str) -> str | None:
    """Why a FIX text value is refused (it holds a byte outside printable ASCII), or None."""
    bad = _NOT_PRINTABLE_ASCII.search(value)
    if bad is None:
        return None
    byte = ord(bad.group())  # the wire's byte: fields are read as latin-1
    kind = "a control character" if byte < 0x20 or byte == 0x7F else "a byte that is not ASCII"
    shown = repr(value) if len(value) <= 40 else repr(value[:40]) + "..."
    return f"{name} {shown} holds {kind} (0x{byte:02X}) at position {bad.start() + 1}: {TEXT_ACCEPTED}"


def _multi_side(msg: RawMessage, sides: str) -> TradeReport:
    """A report with NoSides (552) other than 1 whose group repeats a tag (a two-sided report:
    Side (54) and the parties twice): not read further; the AR refuses NoSides, as for one side."""
    first: dict[int, str] = {}
    for tag, value in msg.fields:
        first.setdefault(tag, value)
    trade_report_id = first.get(571)
    if trade_report_id is None or not trade_report_id.strip():
        raise SessionLevelReject(1, 571, "TradeReportID (571) is required")
    report = TradeReport(trade_report_id, first.get(487, "0"))
    for tag in (856, 572, 48, 22):
        if tag in first:
            report.echo.append((tag, first[tag]))
    report.ref_id = first.get(572)
    report.fields["client_ref"] = trade_report_id
    report.reject = _bad("FIELD_INVALID", "NoSides (552)", f"NoSides (552) {sides!r} is not accepted: 1 (each firm reports its own side)")
    return report


def read_trade_report(msg: RawMessage) -> TradeReport:
    """Read an AE. Raises :class:`SessionLevelReject` for structural problems."""
    values: dict[int, str] = {}
    parties: list[dict[int, str]] = []
    declared_parties: int | None = None
    in_parties = False
    for tag, value in msg.fields:
        if in_parties and tag in _PARTY_TAGS:
            if tag == 448:
                parties.append({448: value})
            elif not parties:
                raise SessionLevelReject(15, tag, f"repeating group fields out of order: {tag} before PartyID (448)")
            elif tag in (447, 452) and tag in parties[-1]:
                raise SessionLevelReject(13, tag, f"tag {tag} appears more than once in a party")
            else:
                parties[-1].setdefault(tag, value)
            continue
        in_parties = False
        if tag in _PARTY_TAGS:
            raise SessionLevelReject(15, tag, f"tag {tag} outside the parties group (453)")
        if tag in _SINGLE:
            if tag in values:
                if values.get(552, "1") != "1":  # a two-sided report: its second side repeats Side (54)...
                    return _multi_side(msg, values[552])
                raise SessionLevelReject(13, tag, f"tag {tag} appears more than once")
            values[tag] = value
            if tag == 453:
                if not ascii_digits(value) or len(value) > 3:
                    raise SessionLevelReject(6, 453, "NoPartyIDs (453) is not a number")
                declared_parties = int(value)
                in_parties = declared_parties > 0
    if declared_parties is not None and declared_parties != len(parties):
        raise SessionLevelReject(16, 453, f"NoPartyIDs (453) is {declared_parties} but {len(parties)} parties follow")
    trade_report_id = values.get(571)
    if trade_report_id is None or not trade_report_id.strip():  # only spaces: no reference either
        raise SessionLevelReject(1, 571, "TradeReportID (571) is required")

    trans_type = values.get(487, "0")
    report = TradeReport(trade_report_id, trans_type)
    for tag in (856, 572, 48, 22):
        if tag in values:
            report.echo.append((tag, values[tag]))
    report.ref_id = values.get(572)
    f = report.fields
    f["client_ref"] = trade_report_id

    def reject(code: str, name: str, text: str) -> TradeReport:
        report.reject = report.reject or _bad(code, name, text)
        return report

    problem = text_problem(trade_report_id, "TradeReportID (571)")
    if problem is not None:
        return reject("FIELD_INVALID", "client_ref", problem)
    action = TRANS_TYPES.get(trans_type)
    if action is None:
        return reject("ACTION_INVALID", "action", f"TradeReportTransType (487) {trans_type!r} is not accepted: 0 New, 1 Cancel, 2 Replace (correction) or 4 Reverse")
    f["action"] = action
    if values.get(856, "0") != "0":
        return reject("FIELD_INVALID", "TradeReportType (856)", f"TradeReportType (856) {values[856]!r} is not accepted: 0 (Submit) or absent; the action is TradeReportTransType (487)")
    if values.get(552, "1") != "1":
        return reject("FIELD_INVALID", "NoSides (552)", f"NoSides (552) {values[552]!r} is not accepted: 1 (each firm reports its own side)")
    if report.ref_id is not None:
        problem = text_problem(report.ref_id, "TradeReportRefID (572)")
        if problem is not None:
            return reject("FIELD_INVALID", "original_control_number", problem)
    # parties
    reporting = [p for p in parties if p.get(452) == ROLE_REPORTING]
    contra = [p for p in parties if p.get(452) == ROLE_CONTRA]
    if len(reporting) > 1:
        return reject("FIELD_INVALID", "reporting_mpid", "more than one party with PartyRole (452) 1 (Executing Firm)")
    if len(contra) > 1:
        return reject("FIELD_INVALID", "contra", "more than one party with PartyRole (452) 17 (Contra Firm)")
    for p in reporting + contra:
        if p.get(447, "C") != "C":
            return reject("FIELD_INVALID", "PartyIDSource (447)", f"PartyIDSource (447) {p[447]!r} is not accepted: C (MPID)")
    for name, found in (("reporting_mpid", reporting), ("contra", contra)):
        if found:
            problem = text_problem(found[0][448], "PartyID (448)")
            if problem is not None:
                return reject("FIELD_INVALID", name, problem)
    if reporting:
        f["reporting_mpid"] = reporting[0][448]
    if contra:
        f["contra"] = contra[0][448]
    # instrument
    if 48 in values:
        if 22 not in values:
            return reject("FIELD_INVALID", "cusip", "SecurityIDSource (22) is missing: it is required with SecurityID (48), and must be 1 (CUSIP)")
        if values[22] != "1":
            return reject("FIELD_INVALID", "cusip", f"SecurityIDSource (22) {values[22]!r} is not accepted: 1 (CUSIP) with SecurityID (48)")
        f["cusip"] = values[48]
    if 32 in values:
        f["quantity"] = values[32]
    if 31 in values:
        if values.get(423, "1") != "1":
            return reject("FIELD_INVALID", "price", f"PriceType (423) {values[423]!r} is not accepted: 1 (percentage of par)")
        f["price"] = values[31]
    if 54 in values:
        side = SIDES.get(values[54])
        if side is None:
            return reject("FIELD_INVALID", "side", f"Side (54) {values[54]!r} is not accepted: 1 (Buy) or 2 (Sell)")
        f["side"] = side
    if 528 in values:
        capacity = CAPACITIES.get(values[528])
        if capacity is None:
            return reject("FIELD_INVALID", "capacity", f"OrderCapacity (528) {values[528]!r} is not accepted: P (principal), R (riskless principal) or A (agency)")
        f["capacity"] = capacity
    if 60 in values:
        try:
            f["execution_time"] = parse_utc_timestamp_us(values[60])
        except ValueError:
            return reject("TIME_INVALID", "execution_time", f"TransactTime (60) {values[60]!r} is not a UTCTimestamp (YYYYMMDD-HH:MM:SS[.sss[sss]], "
                          "to the microsecond at most)")
    if 64 in values:
        text = values[64]
        if len(text) != 8 or not ascii_digits(text):
            return reject("DATE_INVALID", "settlement_date", f"SettlDate (64) {text!r} is not a date (YYYYMMDD)")
        f["settlement_date"] = f"{text[:4]}-{text[4:6]}-{text[6:]}"
    if 236 in values:
        f["yield"] = values[236]
    if 12 in values:
        f["commission"] = values[12]
    if 464 in values:
        f["test"] = values[464]
    for tag, name in INDICATOR_TAGS.items():
        if tag in values:
            f[name] = values[tag]
    if TAG_TRADING_MARKET in values:
        f["trading_market"] = values[TAG_TRADING_MARKET]
    if TAG_REMUNERATION in values:
        f["remuneration"] = values[TAG_REMUNERATION]
    return report


def reject_text(reject: Reject) -> str:
    """Text (58): the stable code, then the same message every channel gives."""
    return f"{reject.code}: {reject.message}"


def ack_body(report: TradeReport, result: Result | None, reject: Reject | None) -> list[tuple[int, str]]:
    """The body of the Trade Capture Report Ack (35=AR) for a report."""
    body: list[tuple[int, str]] = [(571, report.trade_report_id)]
    if ascii_digits(report.trans_type) and len(report.trans_type) < 3:
        body.append((487, report.trans_type))
    echo = dict(report.echo)
    if 856 in echo:
        body.append((856, echo[856]))
    accepted = result is not None and result.accepted and reject is None
    if reject is None and result is not None and result.reject is not None:
        reject = result.reject
    body.append((150, _EXEC_TYPES.get(report.action or "", "F") if accepted else "8"))
    if 572 in echo:
        body.append((572, echo[572]))
    if accepted:
        body.append((818, str(result.control_number)))
    body.append((939, "0" if accepted else "1"))
    if not accepted:
        assert reject is not None
        body.append((751, REJECT_REASONS.get(reject.code, "99")))
        body.append((58, reject_text(reject)))
    elif result is not None and result.warning:
        body.append((58, result.warning))
    if 48 in echo:
        body.append((48, echo[48]))
    if 22 in echo:
        body.append((22, echo[22]))
    if accepted:
        if result.timeliness:
            body.append((TAG_TIMELINESS, result.timeliness))
        if result.modifier3:
            body.append((TAG_MODIFIER3, result.modifier3))
    else:
        body.append((TAG_REJECT_CODE, reject.code))
        if reject.field:
            body.append((TAG_REJECT_FIELD, reject.field))
    return body

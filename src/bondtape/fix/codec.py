"""FIX 4.4 tag=value framing: split a byte stream into messages, check BodyLength (9) and
CheckSum (10), parse fields, and encode outbound messages.

A message on the wire is ``8=FIX.4.4<SOH>9=<len><SOH>...<SOH>10=<3 digits><SOH>``. The
framer never raises on hostile input: bytes that cannot be a message are reported as
garbled and skipped (FIX: a garbled message is ignored, not rejected).
"""
from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field

SOH = b"\x01"
BEGIN_STRING = "FIX.4.4"
_BEGIN = b"8=FIX.4.4\x019="
_ANY_BEGIN = b"8=FIX"
_STANDARD_HEAD = re.compile(rb"8=FIX\.4\.4\x019=([0-9]{1,7})\x01")
MAX_BODY_LENGTH = 64 * 1024  # a Trade Capture Report is a few hundred bytes


class FieldError(ValueError):
    """A field is not ``tag=value`` with a positive integer tag and a value."""

    def __init__(self, reason: int, tag: int | None, text: str):
        super().__init__(text)
        self.reason = reason  # SessionRejectReason (373)
        self.tag = tag
        self.text = text


@dataclass(slots=True)
class RawMessage:
    """One framed message: its bytes, and its fields in wire order (tag, text)."""

    data: bytes
    fields: list[tuple[int, str]]
    begin_string: str = BEGIN_STRING
    error: FieldError | None = None  # the first field that is not tag=value

    def first(self, tag: int) -> str | None:
        for t, v in self.fields:
            if t == tag:
                return v
        return None

    @property
    def msg_type(self) -> str | None:
        return self.first(35)


@dataclass(slots=True)
class Garbled:
    """Bytes skipped by the framer, and why (logged, never answered)."""

    data: bytes
    reason: str


def checksum(data: bytes) -> int:
    return sum(data) % 256


_FIELD = re.compile(r"([1-9][0-9]{0,8})=([^\x01]+)\x01")
_WELL_FORMED = re.compile(r"(?:[1-9][0-9]{0,8}=[^\x01]+\x01)*")
_TAGS = {str(i): i for i in range(1, 10_000)}  # tag text -> number, for the usual tags


def parse_fields(body: bytes) -> tuple[list[tuple[int, str]], FieldError | None]:
    """``tag=value<SOH>`` pairs, and the first bad field as a :class:`FieldError` (373 reason).

    Parsing goes on past a bad field so that the header (MsgSeqNum) can still be read.
    """
    text = body.decode("latin-1")
    if _WELL_FORMED.fullmatch(text):  # the usual case: every field well formed
        tags = _TAGS
        return [(tags.get(t) or int(t), v) for t, v in _FIELD.findall(text)], None
    out: list[tuple[int, str]] = []
    error: FieldError | None = None
    parts = text.split("\x01")
    if parts and parts[-1] == "":
        parts.pop()
    append = out.append
    for part in parts:
        tag_text, eq, value = part.partition("=")
        if eq and value and tag_text.isdigit() and tag_text.isascii() and len(tag_text) <= 9 and tag_text[0] != "0":
            append((int(tag_text), value))
            continue
        if not eq or not tag_text.isascii() or not tag_text.isdigit() or len(tag_text) > 9 or tag_text[0] == "0":
            error = error or FieldError(0, None, f"invalid tag number {(tag_text or part)[:12]!r}")
        else:
            error = error or FieldError(4, int(tag_text), f"tag {int(tag_text)} has no value")  # Tag specified without a value
    return out, error


@dataclass
class Framer:
    """Accumulates bytes and yields complete messages (or garbled spans) in order."""

    buffer: bytearray = field(default_factory=bytearray)
    max_body: int = MAX_BODY_LENGTH
    fast: bool = True  # take whole, intact FIX.4.4 messages without the general checks

    def feed(self, data: bytes) -> list[RawMessage | Garbled]:
        self.buffer += data
        out: list[RawMessage | Garbled] = []
        buf = self.buffer
        while True:
            head = _STANDARD_HEAD.match(buf) if self.fast else None
            if head is not None:  # the usual case: a FIX.4.4 message, whole and intact
                body_start = head.end()
                body_end = body_start + int(head.group(1))
                total = body_end + 7
                if body_end - body_start <= self.max_body and len(buf) >= total:
                    trailer = buf[body_end:total]
                    if (trailer[:3] == b"10=" and trailer[6] == 1 and trailer[3:6].isdigit()
                            and int(trailer[3:6]) == checksum(buf[:body_end])):
                        data = bytes(buf[:total])
                        del buf[:total]
                        fields, error = parse_fields(data[body_start:body_end])
                        out.append(RawMessage(data, fields, BEGIN_STRING, error))
                        continue
                # incomplete, too long or damaged: the general path below decides
            start = buf.find(_ANY_BEGIN)
            if start < 0:
                # Keep a possible partial "8=FIX" at the end; drop the rest as garbage.
                keep = next((k for k in (4, 3, 2, 1) if buf[-k:] == _ANY_BEGIN[:k]), 0)
                if len(buf) > keep:
                    out.append(Garbled(bytes(buf[: len(buf) - keep]), "no BeginString (8=)"))
                    del buf[: len(buf) - keep]
                break
            if start > 0:
                out.append(Garbled(bytes(buf[:start]), "bytes before BeginString (8=)"))
                del buf[:start]
            # 8=<begin><SOH>9=<digits><SOH>
            soh1 = buf.find(SOH)
            if soh1 < 0:
                if len(buf) > 32:
                    out.append(Garbled(bytes(buf[:2]), "BeginString too long"))
                    del buf[:2]
                    continue
                break
            begin = bytes(buf[2:soh1])
            if buf[soh1 + 1: soh1 + 3] != b"9=":
                if len(buf) < soh1 + 3:
                    break
                out.append(Garbled(bytes(buf[: soh1 + 1]), "BodyLength (9) does not follow BeginString"))
                del buf[: soh1 + 1]
                continue
            soh2 = buf.find(SOH, soh1 + 3)
            if soh2 < 0:
                if len(buf) - soh1 > 12:
                    out.append(Garbled(bytes(buf[: soh1 + 1]), "BodyLength (9) is not a number"))
                    del buf[: soh1 + 1]
                    continue
                break
            length_text = bytes(buf[soh1 + 3: soh2])
            if not length_text.isdigit() or len(length_text) > 7 or int(length_text) > self.max_body:
                out.append(Garbled(bytes(buf[: soh2 + 1]), f"BodyLength (9) {length_text[:10]!r} is not accepted"))
                del buf[: soh2 + 1]
                continue
            body_start = soh2 + 1
            body_end = body_start + int(length_text)
            total = body_end + 7  # 10=NNN<SOH>
            if len(buf) < total:
                break
            trailer = bytes(buf[body_end:total])
            if (trailer[:3] != b"10=" or trailer[6:7] != SOH or not trailer[3:6].isdigit()
                    or int(trailer[3:6]) != checksum(buf[:body_end])):
                # Wrong length or wrong sum: skip to the next BeginString after this one.
                nxt = buf.find(_ANY_BEGIN, 1)
                cut = nxt if nxt >= 0 else len(buf)
                reason = "CheckSum (10) does not match" if trailer[:3] == b"10=" else "BodyLength (9) does not match"
                out.append(Garbled(bytes(buf[:cut]), reason))
                del buf[:cut]
                continue
            data = bytes(buf[:total])
            del buf[:total]
            fields, error = parse_fields(data[body_start:body_end])
            out.append(RawMessage(data, fields, begin.decode("latin-1"), error))
        return out


def utc_timestamp(us: int) -> str:
    """UTCTimestamp with milliseconds: YYYYMMDD-HH:MM:SS.sss"""
    global _last_second
    second, micro = divmod(us, 1_000_000)
    cached = _last_second
    if cached[0] != second:
        t = dt.datetime(1970, 1, 1) + dt.timedelta(seconds=second)
        cached = _last_second = (second, t.strftime("%Y%m%d-%H:%M:%S."))
    return f"{cached[1]}{micro // 1000:03d}"


_last_second: tuple = (None, "")  # the last second formatted, replaced as a whole


def parse_utc_timestamp_us(text: str, *, exact: bool = True) -> int:
    """A UTCTimestamp, YYYYMMDD-HH:MM:SS[.sss[sss[sss]]], as UTC microseconds since the
    epoch (dates cached); raises ValueError. With ``exact`` (a trade's time), also for
    nanoseconds that are not zeros: a time is kept to the microsecond, never cut; without
    (a message header's SendingTime, only checked), they are dropped."""
    if len(text) < 17 or text[8] != "-" or text[11] != ":" or text[14] != ":" or not text.isascii():
        raise ValueError(text)
    day_us = _DAY_US.get(text[:8])
    if day_us is None:
        day = text[:8]
        if not day.isdigit():
            raise ValueError(text)
        day_us = (dt.date(int(day[:4]), int(day[4:6]), int(day[6:8])).toordinal() - _EPOCH_ORDINAL) * 86_400_000_000
        if len(_DAY_US) > 10_000:
            _DAY_US.clear()
        _DAY_US[day] = day_us
    hh, mm, ss, frac = text[9:11], text[12:14], text[15:17], text[17:]
    if not (hh + mm + ss).isdigit():
        raise ValueError(text)
    hour, minute, second = int(hh), int(mm), int(ss)
    if hour > 23 or minute > 59 or second > 59:  # as datetime refuses them
        raise ValueError(text)
    micro = 0
    if frac:
        if frac[0] != "." or not frac[1:].isdigit() or len(frac) - 1 not in (3, 6, 9) \
                or (exact and frac[7:].strip("0")):
            raise ValueError(text)  # nanoseconds are taken only as zeros: a time is never cut to microseconds
        micro = int(frac[1:7].ljust(6, "0"))
    return day_us + ((hour * 60 + minute) * 60 + second) * 1_000_000 + micro


_DAY_US: dict[str, int] = {}
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


def encode(msg_type: str, sender: str, target: str, seq: int, sending_time: str,
           body: list[tuple[int, str]], *, poss_dup: bool = False, orig_sending_time: str | None = None) -> bytes:
    """A complete message with BodyLength and CheckSum."""
    parts = [f"35={msg_type}", f"49={sender}", f"56={target}", f"34={seq}"]
    if poss_dup:
        parts.append("43=Y")
    parts.append(f"52={sending_time}")
    if orig_sending_time:
        parts.append(f"122={orig_sending_time}")
    parts.extend(f"{t}={v}" for t, v in body)
    payload = ("\x01".join(parts) + "\x01").encode("latin-1")
    head = f"8={BEGIN_STRING}\x019={len(payload)}\x01".encode()
    data = head + payload
    return data + f"10={checksum(data):03d}\x01".encode()


def display(data: bytes) -> str:
    """A message with | for SOH, for logs and error text."""
    return data.replace(SOH, b"|").decode("latin-1")

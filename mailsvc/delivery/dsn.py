"""Delivery status notifications (rfc3464): the bounce, delay and success reports.

``build_dsn`` is a pure function: it reads (a bounded part of) the original
message and returns the report in wire form (CRLF line ends), ready to be
queued from the null sender ``<>`` (rfc3461 6.1, rfc5321 4.5.5) to the
original envelope sender. ``should_bounce`` and ``wants_dsn`` say whether a
report is sent at all. Only the standard library is used.

A report on a message received with SMTPUTF8, or naming an address that is
not ASCII, is an internationalized one (rfc6533, ``mailsvc.delivery.dsnglobal``):
``message/global-delivery-status`` with ``utf-8`` typed addresses, the
original as ``message/global`` or ``message/global-headers``. Any other
report is plain rfc3464, all ASCII but for the returned original.
"""

from __future__ import annotations

import io
import quopri
import re
import secrets
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime, formataddr, make_msgid
from typing import BinaryIO

from mailsvc.delivery import dsnglobal
from mailsvc.envelope import Envelope, Recipient

FULL_LIMIT = 10 * 1024 * 1024  # octets of the original returned with RET=FULL
HEADERS_LIMIT = 256 * 1024  # octets of the original's header section returned

_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
    "relayed": "Successful Mail Delivery Report",
}
_INTRO = {
    "failed": "Your message could not be delivered to the recipients below.\n"
    "The mail system has given up; it will not try again.",
    "delayed": "Your message has not yet been delivered to the recipients below.\n"
    "The mail system is still trying; you do not need to send it again.",
    "delivered": "Your message was delivered to the recipients below.",
    "relayed": "Your message was passed on to the recipients below, to mail systems\n"
    "that do not send delivery reports; you may hear nothing more of it.",
}
_OUTCOME = {"failed": "not delivered", "delayed": "not yet delivered", "delivered": "delivered",
            "relayed": "relayed"}
# rfc3461 4.1: the NOTIFY keyword that asks for each kind of report.
_NOTIFY_KEYWORD = {"failed": "FAILURE", "delayed": "DELAY", "delivered": "SUCCESS", "relayed": "SUCCESS"}
_DEFAULT_STATUS = {"failed": "5.0.0", "delayed": "4.0.0", "delivered": "2.0.0", "relayed": "2.0.0"}
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")  # rfc3463 2
_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class RecipientOutcome:
    """What happened to one recipient, for the report.

    ``status`` is the rfc3463 code (``"5.1.1"``), ``diagnostic`` the reply
    that decided it (``"550 5.1.1 no such user"``) or our own reason,
    ``remote_mta`` the host that gave the reply (empty when we decided).
    """

    recipient: Recipient
    status: str
    diagnostic: str = ""
    remote_mta: str = ""


def should_bounce(envelope: Envelope) -> bool:
    """Whether any report may go back for ``envelope``.

    Never to the null sender: reports and bounces are sent from ``<>``, and a
    report about a report could loop (rfc5321 4.5.5, rfc3464 3).
    """
    return envelope.sender != ""


def wants_dsn(action: str, notify: str | None = None) -> bool:
    """Whether a report with ``action`` is wanted under the rfc3461 NOTIFY value ``notify``.

    ``notify`` is the RCPT NOTIFY parameter (``"NEVER"``, ``"SUCCESS,DELAY"``,
    any case) or ``None`` when the client gave none; then failures and delays
    are reported, successes not (rfc3461 4.1: absent means FAILURE,DELAY).
    """
    _check_action(action)
    if notify is None:
        return action in ("failed", "delayed")
    keywords = {word.strip().upper() for word in notify.split(",")}
    if "NEVER" in keywords:
        return False
    # rfc3461 5.2.2: "relayed" is the success report of a hop that cannot pass NOTIFY on.
    return _NOTIFY_KEYWORD[action] in keywords


def build_dsn(
    reporting_mta: str,
    envelope: Envelope,
    recipients_with_outcome: Iterable[RecipientOutcome],
    original_message: BinaryIO,
    now: float | datetime,
    action: str = "failed",
    ret: str | None = None,
    envid: str | None = None,
    *,
    retry_until: float | datetime | None = None,
    full_limit: int = FULL_LIMIT,
    headers_limit: int = HEADERS_LIMIT,
) -> bytes:
    """An rfc3464 report on ``recipients_with_outcome``, as wire-form bytes.

    :param reporting_mta: our host name (``From: MAILER-DAEMON@...``, Reporting-MTA).
    :param original_message: the queued message in wire form, read from its start.
    :param now: when the report is made (POSIX time or aware datetime).
    :param action: the rfc3464 2.3.3 Action of every recipient listed.
    :param ret: ``"FULL"`` or ``"HDRS"`` (rfc3461 4.3); ``None`` takes the
        envelope's ``RET`` parameter, else ``HDRS``. Only a ``failed``
        report returns the full message (rfc3461 6.2), and only up to
        ``full_limit`` octets; a longer one is returned as headers only.
    :param envid: the decoded rfc3461 ENVID; ``None`` takes the envelope's
        ``ENVID`` parameter (xtext, decoded here).
    :param retry_until: for ``delayed``: when we give up (Will-Retry-Until).

    The report is a global one (rfc6533) when ``dsnglobal.is_global`` says
    so; it must then be sent with SMTPUTF8 (``mailsvc.delivery.bounce``).
    """
    _check_action(action)
    outcomes = list(recipients_with_outcome)
    utf8 = dsnglobal.is_global(envelope, outcomes)
    if ret is None:
        ret = envelope.parameter("RET") or "HDRS"
    if envid is None and envelope.parameter("ENVID") is not None:
        envid = _xtext_decode(envelope.parameter("ENVID"))
    original, full = _read_original(
        original_message, action == "failed" and ret.upper() == "FULL", full_limit, headers_limit
    )
    returned = ("whole" if full else "headers") if original else ""
    text = _human_text(reporting_mta, outcomes, action, retry_until, returned)
    status = _delivery_status(reporting_mta, envelope, outcomes, action, now, envid, retry_until, utf8)
    status_type = dsnglobal.STATUS_TYPE if utf8 else b"message/delivery-status"  # rfc6533 6.4
    parts = [_text_part(text), _part(status_type, b"Delivery report", status)]
    if original:
        if utf8:  # rfc6533 6.3, rfc6532 3.7: the original may have UTF-8 header fields
            kind = dsnglobal.FULL_TYPE if full else dsnglobal.HEADERS_TYPE
        else:
            kind = b"message/rfc822" if full else b"text/rfc822-headers"  # rfc6522 4
        description = b"Undelivered message" if full else b"Undelivered message headers"
        parts.append(_part(kind, description, original))
    boundary = _boundary(parts)
    eight_bit = any(_is_8bit(part) for part in parts)
    report_type = dsnglobal.REPORT_TYPE if utf8 else "delivery-status"
    headers = [
        "From: " + formataddr(("Mail Delivery System", f"MAILER-DAEMON@{reporting_mta}")),
        # rfc6532 3.2: a UTF-8 address goes raw in a global report (sent with SMTPUTF8).
        "To: " + _one_line(f"<{envelope.sender}>"),
        "Subject: " + _SUBJECTS[action],
        "Date: " + _date(now),
        "Message-ID: " + make_msgid(domain=reporting_mta),
        "Auto-Submitted: auto-replied",  # rfc3834 5: no auto-reply to this
        "MIME-Version: 1.0",
        # rfc6522 3, rfc3464 2: the report in three parts.
        f'Content-Type: multipart/report; report-type={report_type};\r\n\tboundary="{boundary}"',
    ]
    if eight_bit:
        headers.append("Content-Transfer-Encoding: 8bit")  # rfc2045 6.4: only 7bit/8bit/binary here
    out = [("\r\n".join(headers) + "\r\n\r\n").encode("utf-8", "replace")]
    out.append(b"This is a MIME-encapsulated message.\r\n")
    for part in parts:
        out.append(b"\r\n--" + boundary.encode("ascii") + b"\r\n" + part)
    out.append(b"\r\n--" + boundary.encode("ascii") + b"--\r\n")
    return b"".join(out)


def _check_action(action: str) -> None:
    if action not in _SUBJECTS:
        raise ValueError(f"unknown DSN action {action!r}")


def _read_original(source: BinaryIO, full: bool, full_limit: int, headers_limit: int) -> tuple[bytes, bool]:
    """The part of the original to return, CRLF ended, and whether it is the whole message."""
    if full:
        data = _read_at_most(source, full_limit + 1)
        if len(data) <= full_limit:
            return _crlf(data), True
        # rfc3461 6.2: too long: the MTA MAY return only the headers.
        source = io.BytesIO(data)
    return _crlf(_read_headers(source, headers_limit)), False


def _read_at_most(source: BinaryIO, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit:
        chunk = source.read(min(65536, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _read_headers(source: BinaryIO, limit: int) -> bytes:
    """The header section (up to the blank line), whole lines, at most ``limit`` octets."""
    lines, size = [], 0
    while True:
        line = source.readline(limit - size + 1)
        if not line or line in (b"\r\n", b"\n"):
            break
        if size + len(line) > limit:
            break  # cut at the last whole line
        lines.append(line)
        size += len(line)
    return b"".join(lines)


def _crlf(data: bytes) -> bytes:
    """``data`` with every line end CRLF (a bare CR or LF is never left alone)."""
    if not data:
        return data
    data = _LINE_END.sub(b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def _human_text(reporting_mta, outcomes, action, retry_until, returned) -> str:
    """The first part: what happened, for a person (rfc6522 3, rfc3464 3).

    ``returned`` says what the third part holds: ``"whole"``, ``"headers"`` or ``""``.
    """
    lines = [f"This is the mail system at {reporting_mta}.", "", *_INTRO[action].split("\n")]
    if action == "delayed" and retry_until is not None:
        lines.append(f"It will stop trying after {_date(retry_until)}.")
    lines.append("")
    for outcome in outcomes:
        status = _status(outcome.status, action)
        lines.append(f"<{_shown(outcome.recipient.address)}>: {_OUTCOME[action]} (status {status})")
        if outcome.diagnostic:
            said = f"{outcome.remote_mta} said: " if outcome.remote_mta else ""
            lines.extend(textwrap.wrap(said + _shown(outcome.diagnostic), 72, initial_indent="    ",
                                       subsequent_indent="    ", break_long_words=True) or [])
        lines.append("")
    if action == "failed" and returned:
        lines.append("The message you sent follows." if returned == "whole"
                     else "The headers of the message you sent follow.")
    return "\r\n".join(lines) + "\r\n"


def _delivery_status(reporting_mta, envelope, outcomes, action, now, envid, retry_until, utf8=False) -> bytes:
    """The message/delivery-status body: per-message then per-recipient fields (rfc3464 2.2, 2.3).

    ``utf8``: the message/global-delivery-status body of a global report
    (rfc6533 6.4): addresses typed by ``dsnglobal.typed_address`` (rfc6533
    3) and Diagnostic-Code text in UTF-8 (rfc6533 6.2: "smtp" may be UTF-8
    there); the other fields stay ASCII as before.
    """
    address = dsnglobal.typed_address if utf8 else (lambda a: f"rfc822; {a}")
    fields = []
    if envid:
        fields.append(_field("Original-Envelope-Id", envid))  # rfc3464 2.2.1
    fields.append(_field("Reporting-MTA", f"dns; {reporting_mta}"))  # rfc3464 2.2.2
    if envelope.helo:
        fields.append(_field("Received-From-MTA", f"dns; {envelope.helo}"))  # rfc3464 2.2.4
    if envelope.received_at:
        fields.append(_field("Arrival-Date", _date(envelope.received_at)))  # rfc3464 2.2.5
    blocks = [fields]
    for outcome in outcomes:
        recipient = outcome.recipient
        block = []
        if recipient.original:
            block.append(_field("Original-Recipient", address(recipient.original), utf8))  # 2.3.1
        block.append(_field("Final-Recipient", address(recipient.address), utf8))  # 2.3.2
        block.append(_field("Action", action))  # 2.3.3
        block.append(_field("Status", _status(outcome.status, action)))  # 2.3.4
        if outcome.remote_mta:
            block.append(_field("Remote-MTA", f"dns; {outcome.remote_mta}"))  # 2.3.5
        if outcome.diagnostic:
            block.append(_field("Diagnostic-Code", _diagnostic(outcome.diagnostic), utf8))  # 2.3.6
        block.append(_field("Last-Attempt-Date", _date(now)))  # 2.3.7
        if action == "delayed" and retry_until is not None:
            block.append(_field("Will-Retry-Until", _date(retry_until)))  # 2.3.9: delayed only
        blocks.append(block)
    # rfc3464 2.3: each group of per-recipient fields is preceded by a blank line.
    return "\r\n".join("".join(block) for block in blocks).encode("utf-8" if utf8 else "ascii")


def _diagnostic(text: str) -> str:
    """A Diagnostic-Code value: ``smtp;`` for an SMTP reply (rfc3461 9.2), ours otherwise."""
    text = _one_line(text)
    if re.match(r"[245]\d\d[ -]", text + " "):
        return f"smtp; {text}"
    return f"X-mailsvc; {text}"  # rfc3464 2.1.2: X- types for our own diagnostics


def _status(status: str, action: str) -> str:
    return status if _STATUS.match(status or "") else _DEFAULT_STATUS[action]


def _field(name: str, value: str, utf8: bool = False) -> str:
    """One DSN field, folded at spaces near 78 columns (rfc3464 2.1.1).

    ASCII only, but for ``utf8`` (a field of message/global-delivery-status,
    rfc6533 6.4): then UTF-8, a long word cut at 900 octets between
    characters and never inside a ``\\x{HEX}``.
    """
    value = _one_line(value)
    if utf8:
        value = value.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate becomes "?"
    else:
        value = value.encode("ascii", "replace").decode("ascii")
    words = []
    for word in value.split(" "):
        if utf8 and len(word.encode("utf-8")) > 900:
            words.extend(dsnglobal.pieces(word, 900))
        else:
            words.extend(word[i : i + 900] for i in range(0, max(len(word), 1), 900))
    lines = [f"{name}: {words[0]}"]
    for word in words[1:]:
        if len(lines[-1]) + 1 + len(word) > 78:
            lines.append(" " + word)  # a continuation line (rfc5322 2.2.3 folding)
        else:
            lines[-1] += " " + word
    return "\r\n".join(lines) + "\r\n"


def _shown(text: str) -> str:
    """``text`` for the human-readable part: one line, any lone surrogate as "?"."""
    return _one_line(text).encode("utf-8", "replace").decode("utf-8")


def _one_line(text: str) -> str:
    """``text`` with line ends and control characters turned into spaces."""
    return " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", text).split())


def _text_part(text: str) -> bytes:
    """The human-readable part: US-ASCII if it can be, else UTF-8 quoted-printable."""
    try:
        body = text.encode("ascii")
    except UnicodeEncodeError:
        body = _crlf(quopri.encodestring(text.replace("\r\n", "\n").encode("utf-8")))
        return (b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
                b"Content-Description: Notification\r\n\r\n" + body)
    return b"Content-Type: text/plain; charset=us-ascii\r\nContent-Description: Notification\r\n\r\n" + body


def _part(content_type: bytes, description: bytes, body: bytes) -> bytes:
    headers = b"Content-Type: " + content_type + b"\r\nContent-Description: " + description + b"\r\n"
    if _is_8bit(body):
        headers += b"Content-Transfer-Encoding: 8bit\r\n"
    return headers + b"\r\n" + body


def _is_8bit(data: bytes) -> bool:
    return not data.isascii()


def _boundary(parts: list[bytes]) -> str:
    """A boundary that occurs in no part (rfc2046 5.1.1)."""
    while True:
        boundary = "=_mailsvc_" + secrets.token_hex(12)
        if not any(boundary.encode("ascii") in part for part in parts):
            return boundary


def _date(when: float | datetime) -> str:
    """An rfc5322 date with a numeric zone (rfc3464 2.2.5)."""
    if not isinstance(when, datetime):
        when = datetime.fromtimestamp(when, timezone.utc)
    elif when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return format_datetime(when)


def _xtext_decode(text: str) -> str:
    """rfc3461 4: ``+XX`` stands for the octet with hex value XX."""
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), text)

"""The control file (``C.<id>``): a queued message's envelope as readable text.

One field per line, ``keyword value``, in UTF-8 (in practice ASCII, since
everything outside printable ASCII is escaped)::

    version 1
    id 0ckfs3v9g2q1r4a7b8c9
    sender <alice@example.test>
    received-at 1763891234.123456
    helo client.example.test
    client-address 192.0.2.1
    protocol ESMTP
    parameter BODY 8BITMIME
    header Received: from client.example.test ...
    recipient state=pending attempts=0 next=0.0 address=<bob@example.test> original=<Bob@example.test> mailbox=bob error=
    end

Values are escaped as in rfc3461 4 (xtext): ``+`` followed by two upper-case
hex digits stands for one octet of the value's UTF-8 form. ``+``, control
characters and non-ASCII characters are always escaped; in the ``key=value``
fields of a ``recipient`` line, and in parameter names, space and ``=`` are
too. Every ``str`` round-trips exactly, lone surrogates included (they are
encoded with ``surrogatepass``). The ``end`` line makes a truncated file
detectable.
"""

from __future__ import annotations

import math
import re

from mailsvc.envelope import Envelope, QueuedMessage, Recipient, RecipientState

VERSION = "1"

# Written as they are: printable ASCII but "+" (the escape) in every value,
# plus space and "=" in a line value; a key=value field escapes those two.
# These match one character each that ``escape`` writes as ``+XX``.
_ESCAPED_IN_FIELD = re.compile(r"[^\x21-\x7e]|[+=]")
_ESCAPED_IN_LINE = re.compile(r"[^\x20-\x7e]|\+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ESCAPE = re.compile(rb"\+([0-9A-F]{2})")
_BAD_ESCAPE = re.compile(r"\+(?![0-9A-F]{2})")
_RECIPIENT_KEYS = ("state", "attempts", "next", "address", "original", "mailbox", "error")
_OPTIONAL_RECIPIENT_KEYS = ("notify", "warned")  # written only when set; older files lack them


def escape(value: str, *, in_field: bool = False) -> str:
    """Escape ``value`` for a control file line (xtext, rfc3461 4).

    ``in_field`` also escapes space and ``=``, for ``key=value`` fields.
    """
    pattern = _ESCAPED_IN_FIELD if in_field else _ESCAPED_IN_LINE
    if not pattern.search(value):
        return value
    return pattern.sub(_escape_match, value)


def _escape_match(match: re.Match) -> str:
    """``+XX`` for each UTF-8 octet of one escaped character."""
    return "".join(f"+{octet:02X}" for octet in match.group().encode("utf-8", "surrogatepass"))


def unescape(text: str) -> str:
    """Undo ``escape``. :raise ValueError: a bad ``+XX`` or a control character."""
    control = _CONTROL.search(text)
    if "+" not in text:
        if control:
            raise ValueError(f"unescaped control character {control.group()!r}")
        return text  # nothing escaped (most fields)
    bad = _BAD_ESCAPE.search(text)
    if bad and (not control or bad.start() < control.start()):
        raise ValueError(f"bad escape {text[bad.start() : bad.start() + 3]!r}")
    if control:
        raise ValueError(f"unescaped control character {control.group()!r}")
    octets = _ESCAPE.sub(_octet, text.encode("utf-8", "surrogatepass"))
    try:
        return octets.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as e:
        raise ValueError(f"escaped octets are not UTF-8: {e}") from None


def _octet(match: re.Match) -> bytes:
    return bytes((int(match.group(1), 16),))


def _address(value: str) -> str:
    return "<" + escape(value, in_field=True) + ">"


def _unaddress(text: str) -> str:
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise ValueError(f"expected <address>, got {text!r}")
    return unescape(text[1:-1])


def _number(value: float) -> str:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"not a finite time: {value!r}")
    return repr(value)


def _unnumber(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"not a finite time: {text!r}")
    return value


def _recipient_line(r: Recipient) -> str:
    return (
        f"recipient state={r.state.value} attempts={int(r.attempts)} "
        f"next={_number(r.next_attempt)} address={_address(r.address)} "
        f"original={_address(r.original)} mailbox={escape(r.mailbox, in_field=True)} "
        f"error={escape(r.last_error, in_field=True)}"
        + (f" notify={escape(r.notify, in_field=True)}" if r.notify else "")
        + (" warned=yes" if r.warned else "")
    )


def _flag(text: str) -> bool:
    if text not in ("yes", "no"):
        raise ValueError(f"expected yes or no, got {text!r}")
    return text == "yes"


def _parse_recipient(text: str) -> Recipient:
    fields = {}
    for token in text.split(" "):
        key, sep, value = token.partition("=")
        if not sep:
            raise ValueError(f"expected key=value, got {token!r}")
        if key not in _RECIPIENT_KEYS and key not in _OPTIONAL_RECIPIENT_KEYS:
            raise ValueError(f"unknown recipient field {key!r}")
        if key in fields:
            raise ValueError(f"recipient field {key!r} given twice")
        fields[key] = value
    missing = [key for key in _RECIPIENT_KEYS if key not in fields]
    if missing:
        raise ValueError(f"recipient lacks {', '.join(missing)}")
    attempts = fields["attempts"]
    if not attempts.isdigit() or not attempts.isascii():
        raise ValueError(f"attempts is not a count: {attempts!r}")
    return Recipient(
        address=_unaddress(fields["address"]),
        original=_unaddress(fields["original"]),
        mailbox=unescape(fields["mailbox"]),
        state=RecipientState(fields["state"]),
        attempts=int(attempts),
        next_attempt=_unnumber(fields["next"]),
        last_error=unescape(fields["error"]),
        notify=unescape(fields.get("notify", "")),
        warned=_flag(fields.get("warned", "no")),
    )


def _line(keyword: str, value: str) -> str:
    # No trailing space after the keyword when the value is empty.
    return f"{keyword} {value}" if value else keyword


def dump(message: QueuedMessage) -> bytes:
    """The control file for ``message`` (its hop is the directory, not stored)."""
    env = message.envelope
    lines = [
        f"version {VERSION}",
        _line("id", escape(message.id)),
        _line("sender", _address(env.sender)),
        _line("received-at", _number(env.received_at)),
        _line("helo", escape(env.helo)),
        _line("client-address", escape(env.client_address)),
        _line("protocol", escape(env.protocol)),
    ]
    for name, value in env.parameters:
        if not name:
            raise ValueError("a MAIL parameter needs a name")
        lines.append(_line(f"parameter {escape(name, in_field=True)}", escape(value)))
    for header in env.prepend_headers:
        lines.append(_line("header", escape(header)))
    for recipient in env.recipients:
        lines.append(_recipient_line(recipient))
    lines.append("end")
    return ("\n".join(lines) + "\n").encode("utf-8")


_SINGLE = {
    "id": unescape,
    "sender": _unaddress,
    "received-at": _unnumber,
    "helo": unescape,
    "client-address": unescape,
    "protocol": unescape,
}


def load(data: bytes, hop: str, id: str) -> QueuedMessage:
    """Parse a control file read from ``<hop>/C.<id>``.

    :raise ValueError: the file is truncated or corrupt; the text names the
        file and the line.
    """
    name = f"{hop}/C.{id}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: not UTF-8: {e}") from None
    if not text.endswith("\n"):
        raise ValueError(f"{name}: truncated (no final line end)")
    # Split on LF only: str.splitlines() would also split on U+2028 and friends.
    lines = text[:-1].split("\n")
    single: dict[str, object] = {}
    parameters: list[tuple[str, str]] = []
    headers: list[str] = []
    recipients: list[Recipient] = []
    ended = False
    for number, line in enumerate(lines, 1):
        where = f"{name}: line {number}"
        keyword, _, rest = line.partition(" ")
        try:
            if ended:
                raise ValueError("text after 'end'")
            if number == 1:
                if keyword != "version" or rest != VERSION:
                    raise ValueError(f"expected 'version {VERSION}', got {line[:40]!r}")
            elif keyword == "end" and not rest:
                ended = True
            elif keyword in _SINGLE:
                if keyword in single:
                    raise ValueError(f"{keyword!r} given twice")
                single[keyword] = _SINGLE[keyword](rest)
            elif keyword == "parameter":
                key, _, value = rest.partition(" ")
                if not key:
                    raise ValueError("expected 'parameter NAME VALUE'")
                parameters.append((unescape(key), unescape(value)))
            elif keyword == "header":
                headers.append(unescape(rest))
            elif keyword == "recipient":
                recipients.append(_parse_recipient(rest))
            else:
                raise ValueError(f"unknown keyword {keyword[:40]!r}")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if not ended:
        raise ValueError(f"{name}: truncated (no 'end' line)")
    missing = [key for key in _SINGLE if key not in single]
    if missing:
        raise ValueError(f"{name}: missing {', '.join(missing)}")
    if single["id"] != id:
        raise ValueError(f"{name}: holds id {single['id']!r}")
    envelope = Envelope(
        sender=single["sender"],
        recipients=tuple(recipients),
        parameters=tuple(parameters),
        helo=single["helo"],
        client_address=single["client-address"],
        protocol=single["protocol"],
        received_at=single["received-at"],
        prepend_headers=tuple(headers),
    )
    return QueuedMessage(hop=hop, id=id, envelope=envelope)

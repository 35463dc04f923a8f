"""What goes into the client machine (``Transaction``) and the events it hands
to whoever drives it (``mailsvc.smtp.client``).

Each event says what the server answered and what the caller may do next.
Every ``send_message`` ends in exactly one of ``TransactionFailed``,
``MessageResult``, ``ConnectionFailed`` or ``ProtocolError``; after the first
two the machine is ready for the next message (or ``quit()``), after the
last two it is closed.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from mailsvc.smtp.address import check_mailbox
from mailsvc.smtp.replies import Reply

# rfc5321 4.1.1.1: ehlo-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-"); the
# same grammar as esmtp-keyword (4.1.2).
ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
# rfc5321 4.1.2 esmtp-value: %d33-60 / %d62-126, widened to UTF-8 by rfc6531 3.3.
_VALUE = re.compile(r"[^\x00-\x20=\x7f]+\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
# Set by the machine from ``Transaction.size`` and ``body_8bit``, never by hand.
MACHINE_PARAMETERS = frozenset({"SIZE", "BODY"})


@dataclass(frozen=True)
class Transaction:
    """One message's envelope (rfc5321 3.3).

    ``sender`` is ``""`` for the null reverse-path. ``recipients`` holds
    ``(address, rcpt_params)`` pairs (a bare address string is taken as one
    with no parameters). Parameters map keywords to a value or ``None``; they
    are sent only when the server offers their extension (DSN's RET, ENVID,
    NOTIFY, ORCPT only with DSN). ``size`` (octets, as stored) becomes SIZE=
    and ``body_8bit`` BODY=8BITMIME.

    SMTPUTF8 (rfc6531 3.4): a non-ASCII address needs it, and so does
    ``SMTPUTF8`` in ``mail_params`` (the sender asked for it: the header
    section may be UTF-8, rfc6532) unless ``ascii_headers`` says the caller
    found the header section all ASCII; then SMTPUTF8 goes only to a server
    that offers it, and one that does not gets the message without it.
    """

    sender: str
    recipients: tuple = field(hash=False)
    mail_params: dict = field(default_factory=dict, hash=False)
    size: int | None = None
    body_8bit: bool = False
    ascii_headers: bool = False

    def __post_init__(self) -> None:
        _check_address(self.sender, null_allowed=True)
        pairs = []
        for item in self.recipients:
            address, params = (item, {}) if isinstance(item, str) else item
            _check_address(address, null_allowed=False)
            pairs.append((address, _check_params(params)))
        if not pairs:
            raise ValueError("a transaction needs at least one recipient")
        object.__setattr__(self, "recipients", tuple(pairs))
        params = _check_params(self.mail_params)
        if MACHINE_PARAMETERS & params.keys():
            raise ValueError("SIZE and BODY come from size and body_8bit")
        object.__setattr__(self, "mail_params", params)
        if self.size is not None and self.size < 0:
            raise ValueError("size must not be negative")

    @property
    def needs_smtputf8(self) -> bool:
        """True when the envelope or the message needs SMTPUTF8 (rfc6531 3.4)."""
        return bool(self.smtputf8_need)

    @property
    def smtputf8_need(self) -> str:
        """Why the message needs SMTPUTF8 (rfc6531 3.4), or ``""``."""
        return smtputf8_need(
            self.sender,
            (address for address, _ in self.recipients),
            "SMTPUTF8" in self.mail_params,
            self.ascii_headers,
        )


def smtputf8_need(sender: str, recipients, asked: bool, ascii_headers: bool) -> str:
    """Why a message needs SMTPUTF8, or ``""`` when it does not (rfc6531 3.4:
    "If the envelope or message being sent requires the capabilities of the
    SMTPUTF8 extension"). Like Postfix: a non-ASCII sender or recipient
    address; or, when the sender gave SMTPUTF8 (``asked``), a header section
    not known to be all ASCII (``ascii_headers``; rfc6532 UTF-8 headers). A
    message that needs it goes to no server without SMTPUTF8 (rfc6531 3.2).
    The text names no address: it goes into bounces."""
    if not sender.isascii():
        return "the sender address is not ASCII"
    if not all(address.isascii() for address in recipients):
        return "a recipient address is not ASCII"
    if asked and not ascii_headers:
        return "its header section is not ASCII"
    return ""


# A pure function of its arguments, and the same senders and recipients come
# again and again: the addresses that passed are remembered (a failure raises,
# and is never remembered).
@functools.lru_cache(maxsize=4096)
def _check_address(address: str, *, null_allowed: bool) -> None:
    """Refuse what could break the command line; rfc6531 allows UTF-8."""
    if address == "" and null_allowed:
        return
    if address.lower() == "postmaster" and not null_allowed:
        return  # rfc5321 4.1.1.3
    if _CONTROL.search(address):
        raise ValueError(f"control character in address {address!r}")
    # Non-ASCII is checked as the ASCII letter it stands in for (rfc6531 3.3).
    check_mailbox(address if address.isascii() else _NON_ASCII.sub("a", address))


def _check_params(params: dict) -> dict:
    checked = {}
    for key, value in params.items():
        if not ESMTP_KEYWORD.match(key) or (value is not None and not _VALUE.match(value)):
            raise ValueError(f"bad ESMTP parameter {key}={value!r}")
        checked[key.upper()] = value
    return checked


class ClientEvent:
    """Base class of every client event."""


@dataclass(frozen=True)
class GreetingRefused(ClientEvent):
    """The server opened with something other than 220 (rfc5321 3.1, 4.3.2).

    After 554 (or any other refusal but 421) the server waits for QUIT: call
    ``quit()``. After 421 the machine is closed.
    """

    reply: Reply


@dataclass(frozen=True)
class Ready(ClientEvent):
    """EHLO (``extended``) or the HELO fallback was accepted: messages may be sent.

    ``extensions`` maps upper-case EHLO keywords to their parameter string
    (rfc5321 4.1.1.1), empty after HELO. Emitted again after STARTTLS.
    """

    extensions: dict[str, str] = field(hash=False)
    extended: bool
    reply: Reply


@dataclass(frozen=True)
class HelloRefused(ClientEvent):
    """EHLO and then HELO were refused, or EHLO got a 4xx: only ``quit()`` is left."""

    reply: Reply


@dataclass(frozen=True)
class TLSReady(ClientEvent):
    """STARTTLS got 220 (rfc3207 4): start the TLS handshake on the transport,
    then call ``tls_started()``. Nothing more is read until then."""

    reply: Reply


@dataclass(frozen=True)
class TLSRefused(ClientEvent):
    """STARTTLS was refused (454, 501...); the session goes on in clear text,
    or the caller quits."""

    reply: Reply


@dataclass(frozen=True)
class AuthSucceeded(ClientEvent):
    """AUTH got 235 (rfc4954 4): the session is authenticated."""

    reply: Reply


@dataclass(frozen=True)
class AuthFailed(ClientEvent):
    """AUTH was refused (535 bad credentials, 538 needs TLS, 504, 454...);
    the session goes on unauthenticated, or the caller quits."""

    reply: Reply


@dataclass(frozen=True)
class Turned(ClientEvent):
    """TURN or ATRN got 250 (rfc821 4.1.1, rfc2645 5.3): the roles are
    reversed. The machine is done; the caller becomes the server on the same
    connection (first a 220 greeting), fed ``trailing_data`` first."""

    reply: Reply


@dataclass(frozen=True)
class TurnRefused(ClientEvent):
    """TURN or ATRN was refused: 502, 530 (no AUTH), 450 (not your domain),
    451 (try later), 453 (no mail waiting, rfc2645 7). The session goes on."""

    reply: Reply


@dataclass(frozen=True)
class TransactionFailed(ClientEvent):
    """The message went to nobody; ``reply`` applies to every recipient.

    Either MAIL was refused, or the machine refused the message itself without
    sending it (``synthetic``): too big for the server's SIZE (rfc1870),
    8-bit body without 8BITMIME (rfc6152 3, 5.6.3), internationalized envelope
    without SMTPUTF8 (rfc6531 3.5, 5.6.7).
    """

    reply: Reply
    synthetic: bool = False


@dataclass(frozen=True)
class RecipientResult(ClientEvent):
    """The server's reply to RCPT for ``address`` (rfc5321 4.1.1.3)."""

    address: str
    reply: Reply

    @property
    def accepted(self) -> bool:
        """True for a 2xx reply (250, or 251 "will forward")."""
        return 200 <= self.reply.code < 300


@dataclass(frozen=True)
class StartData(ClientEvent):
    """DATA got 354 and at least one recipient was accepted: stream the body
    with ``send_data()``, then ``end_data()``.

    With BDAT (rfc3030) there is no DATA and no 354: ``reply`` is ``None``
    and the event comes once every RCPT is answered and one was accepted;
    the chunks then go as ``data_wanted`` allows."""

    reply: Reply | None


@dataclass(frozen=True)
class MessageResult(ClientEvent):
    """The outcome for the accepted ``recipients`` (SMTP, one reply for all).

    ``reply`` answers the end of data, or refuses DATA itself. When no
    recipient was accepted, ``recipients`` is empty and ``reply`` is the
    refusal of DATA or a "no recipient was accepted" reply.
    """

    reply: Reply
    recipients: tuple[str, ...]


@dataclass(frozen=True)
class ConnectionFailed(ClientEvent):
    """The server said 421 (closing, rfc5321 3.8) or gave a reply the command
    cannot have; the machine is closed and the transport should be dropped.
    Recipients without a final result get ``reply`` (transient if 4xx)."""

    reply: Reply


@dataclass(frozen=True)
class ProtocolError(ClientEvent):
    """The server's output was malformed, or came when no reply was due; the
    machine is closed. Treat unfinished recipients as deferred."""

    reason: str


@dataclass(frozen=True)
class Closed(ClientEvent):
    """QUIT was answered (rfc5321 4.1.1.10); the transport may be closed."""

    reply: Reply

"""Events the server machine hands to whoever drives it.

Two kinds. A *decision* (``needs_reply = True``) waits for an answer: the
machine reads no further input until ``ServerConnection.accept()`` or
``reply()`` is called, so replies stay in order under PIPELINING (rfc2920
3.1). A *notice* only tells what happened; the machine has already queued
its reply, if any.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mailsvc.smtp.replies import Reply


class Event:
    """Base class of every event."""

    needs_reply = False


class Decision(Event):
    """An event that waits for ``accept()`` or ``reply(Reply)``."""

    needs_reply = True


@dataclass(frozen=True)
class Hello(Decision):
    """HELO (``extended=False``) or EHLO; accepting starts a fresh session state."""

    name: str
    extended: bool


@dataclass(frozen=True)
class MailFrom(Decision):
    """MAIL FROM (or SEND/SOML/SAML FROM, rfc821 3.4). ``sender`` is ``""`` for ``<>``.

    ``command`` is the verb used. ``parameters`` are upper-cased keys; SIZE and
    BODY were already checked by the machine.
    """

    sender: str
    parameters: dict = field(hash=False)
    command: str = "MAIL"


@dataclass(frozen=True)
class RcptTo(Decision):
    """RCPT TO. ``recipient`` is the mailbox (or bare ``Postmaster``)."""

    recipient: str
    parameters: dict = field(hash=False)


@dataclass(frozen=True)
class DataCommand(Decision):
    """DATA with at least one accepted recipient; accepting sends 354."""


@dataclass(frozen=True)
class DataChunk(Event):
    """Message bytes (unstuffed, CRLF) to append to the message being received."""

    data: bytes


@dataclass(frozen=True)
class DataEnd(Decision):
    """CRLF.CRLF arrived and the message is acceptable so far; reply with the
    outcome of storing it (250 queued, or 451/452/552/554)."""

    size: int


@dataclass(frozen=True)
class DataRefused(Event):
    """The data ended but the machine refused it (too big, bare CR/LF, long
    line); ``reply`` was sent. Discard what was stored."""

    reply: Reply


@dataclass(frozen=True)
class Reset(Event):
    """RSET, or a new HELO/EHLO/MAIL state: any transaction is forgotten."""


@dataclass(frozen=True)
class Verify(Decision):
    """VRFY ``argument`` (rfc5321 3.5.1); no default answer: reply.
    ``utf8``: the client gave SMTPUTF8, so the reply may show a UTF-8
    mailbox (rfc6531 3.7.4.2)."""

    argument: str
    utf8: bool = False


@dataclass(frozen=True)
class Expand(Decision):
    """EXPN ``argument`` (rfc5321 3.5.2); no default answer: reply.
    ``utf8`` as for ``Verify``."""

    argument: str
    utf8: bool = False


@dataclass(frozen=True)
class Turn(Decision):
    """TURN (rfc821 4.1.1). ``accept()`` (or a 2xx ``reply``) sends 250 and
    reverses the roles: the machine enters ``TURNED`` and stops parsing;
    whatever the client sent after TURN is in ``trailing_data`` for the
    client role that takes over (rfc821 4.1.1: it then expects the 220
    greeting). Refuse with 502 (rfc821 4.3), 530 before AUTH (rfc4954 6)."""


@dataclass(frozen=True)
class Atrn(Decision):
    """ATRN [domain,...] (rfc2645 5.2.1), only after AUTH (the machine says
    530 before). ``domains`` are lower-cased; empty means "all of mine".
    Answered like ``Turn``: accepting reverses the roles; refusals are 450
    (no access), 451 (cannot check now) and 453 (no mail)."""

    domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class Etrn(Decision):
    """ETRN [option]node (rfc1985 5): ``option`` is ``""``, ``"@"`` (the node
    and its subdomains) or ``"#"`` (a queue name); ``node`` is as sent.
    No default answer: 250/251/252/253, or 458/459 (rfc1985 5.1)."""

    node: str
    option: str = ""


@dataclass(frozen=True)
class Quit(Event):
    """QUIT was answered with 221: close once the reply is written."""



@dataclass(frozen=True)
class StartTLS(Decision):
    """STARTTLS (rfc3207 4). Accepting sends 220 and the machine stops reading:
    the glue switches the transport to TLS, then calls ``tls_started()``,
    which forgets everything said before (rfc3207 4.2). Refuse with 454 4.7.0."""


@dataclass(frozen=True)
class Auth(Decision):
    """AUTH ``mechanism`` [``initial_response``] (rfc4954 4); no default answer.

    ``mechanism`` is upper-cased and one the machine offers; ``initial_response``
    is the base64 text as sent (``"="`` is an empty response), or ``None``.
    Reply ``334 <base64 challenge>`` to go on (the next line comes as an
    ``AuthResponse``), 235 on success, or a failure (535, 501, 454...).
    """

    mechanism: str
    initial_response: str | None = None


@dataclass(frozen=True)
class AuthResponse(Decision):
    """One client line of a running AUTH exchange (base64 text, not decoded);
    answered like ``Auth``."""

    line: str = field(repr=False)


@dataclass(frozen=True)
class AuthCancelled(Event):
    """The client cancelled the AUTH exchange with ``*``; the machine said 501 5.7.0."""

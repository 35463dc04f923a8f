"""Batch SMTP (rfc2442): messages written as the client side of an SMTP session.

rfc2442 "Generation": a batch is what an SMTP client would send to a server
that answers every command with success, collected without the replies. So a
batch is a session from its start: ``EHLO`` (rfc2442 "Use of SMTP
Extensions": the generator may assume ESMTP, and with it 8BITMIME, SIZE and
NOTARY, rfc3461 DSN, which it SHOULD use), then per message ``MAIL FROM``
with BODY/SIZE/RET/ENVID (and SMTPUTF8, below), one ``RCPT TO`` per recipient with NOTIFY/ORCPT,
``DATA``, the dot-stuffed message (rfc5321 4.5.2) and its terminating ``.``,
and at the end ``QUIT``. No RSET is needed between messages: after a
successful end of data a server is ready for the next MAIL (rfc5321 4.1.4).
CRLF ends every line (rfc2442: "CRLF line terminators MUST be used").

SMTPUTF8 (rfc6531) is passed on as the relay decides it, but it is not
among the extensions rfc2442 lets a generator assume ("Additional SMTP
extensions MUST NOT be used in the absence of such an agreement"; a
generator "MUST be able to produce objects restricted to" them). So it is
written only for a message that needs it and could not be written without
it (``mailsvc.smtp.client_events.smtputf8_need``: a non-ASCII address, or
SMTPUTF8 given and a non-ASCII header section, rfc6532); a message that had
it but needs none of it goes without it (rfc6531 3.4: "SHOULD NOT supply"),
for any site. The header section is looked at, by pulling the first chunks
of the data ahead of ``MAIL``, only for a message that had SMTPUTF8 and an
ASCII envelope. A MAIL line with SMTPUTF8 may be 10 octets longer (rfc6531
3.1 (5)). A site taking such a message has agreed to SMTPUTF8 (our
``rsmtp`` takes it when ``[smtp] smtputf8`` is on).

Everything here is pure: no I/O and no Twisted. ``BatchWriter`` makes the
bytes piece by piece; ``write_batch`` strings the pieces of whole messages
together lazily, pulling the message data chunk by chunk from iterables the
caller gives (file reads), so a batch is never held in memory.
``plan_batches`` cuts a run of messages into batches within the limits of a
``[[uucp.site]]`` (``max_messages``, ``max_bytes``).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from mailsvc.envelope import Envelope, Recipient
from mailsvc.smtp import xtext
from mailsvc.smtp.client_events import smtputf8_need
from mailsvc.smtp.stuffing import DotStuffer

CRLF = b"\r\n"
MAX_COMMAND_LINE = 512  # rfc5321 4.5.3.1.4: octets, CRLF included
QUIT = b"QUIT\r\n"
DATA = b"DATA\r\n"
# MAIL parameters of the received message that a batch carries on: rfc6152
# BODY (8BITMIME) and rfc3461 RET and ENVID (NOTARY), the extensions rfc2442
# lets a generator assume. SMTPUTF8 goes only when needed (module docstring).
_PASSED_ON = ("BODY", "RET", "ENVID")
SMTPUTF8_ROOM = 10  # rfc6531 3.1 (5): a MAIL line with SMTPUTF8 may be this much longer
# How much of a message's data is pulled ahead to find its header section's
# end; a longer header section counts as not ASCII (SMTPUTF8 kept).
HEADER_PEEK_LIMIT = 256 * 1024
# rfc5322 2.1: the header section ends at the first empty line.
_HEADER_END = re.compile(rb"(?:\A|\n)\r?\n")


class BatchError(ValueError):
    """Something cannot be written in a batch (a CR or LF in an address...)."""


@dataclass(frozen=True)
class BatchMessage:
    """One message of a batch: its envelope, the recipients to write, and
    its data as the receiver will see it, in wire form (CRLF, not stuffed),
    as chunks pulled one at a time. ``size``, when known, is the octet count
    of that data (given as rfc1870 SIZE)."""

    envelope: Envelope
    recipients: tuple[Recipient, ...]
    chunks: Iterable[bytes]
    size: int | None = None


def _line(text: str) -> bytes:
    """One command line; refuses what would break the session's framing."""
    if "\r" in text or "\n" in text:
        raise BatchError(f"CR or LF in a command: {text[:80]!r}")
    return text.encode("utf-8") + CRLF


def _fits(text: str, room: int = 0) -> bool:
    """rfc5321 4.5.3.1.4: a command line is at most 512 octets with its CRLF
    (``room`` more for MAIL with SMTPUTF8, rfc6531 3.1 (5))."""
    return len(text.encode("utf-8")) + 2 <= MAX_COMMAND_LINE + room


def hello_command(hostname: str) -> bytes:
    """``EHLO hostname``: a batch opens an ESMTP session (rfc2442, rfc5321 4.1.1.1)."""
    if not hostname or " " in hostname:
        raise BatchError(f"not a host name for EHLO: {hostname!r}")
    return _line(f"EHLO {hostname}")


def mail_command(
    envelope: Envelope,
    size: int | None = None,
    recipients: Sequence[Recipient] | None = None,
    ascii_headers: bool = False,
) -> bytes:
    """``MAIL FROM:<sender>`` with the parameters the message came with.

    rfc1870 SIZE is the size of the data that follows, when known. SMTPUTF8
    when the message needs it (``recipients``, default the envelope's, are
    those written; ``ascii_headers``: its header section was found all
    ASCII). An ENVID that would make the line too long for rfc5321
    4.5.3.1.4 is left out rather than break the session.
    """
    if recipients is None:
        recipients = envelope.recipients
    asked = envelope.parameter("SMTPUTF8") is not None
    utf8 = bool(smtputf8_need(envelope.sender, (r.address for r in recipients), asked, ascii_headers))
    room = SMTPUTF8_ROOM if utf8 else 0
    tail = " SMTPUTF8" if utf8 else ""  # rfc6531 3.4: no value
    text = f"MAIL FROM:<{envelope.sender}>"
    for key in _PASSED_ON:
        value = envelope.parameter(key)
        if value:
            candidate = f"{text} {key}={value}"
            if key == "ENVID" and not _fits(candidate + tail + (" SIZE=99999999999" if size is not None else ""), room):
                continue  # too long to pass on: DSNs then lack the ENVID, mail still flows
            text = candidate
    text += tail
    if size is not None:
        text += f" SIZE={size}"
    return _line(text)


def needs_header_look(envelope: Envelope, recipients: Sequence[Recipient]) -> bool:
    """Whether SMTPUTF8 in the batch depends on the message's header
    section: the sender gave it and every address written is ASCII."""
    if envelope.parameter("SMTPUTF8") is None:
        return False
    return not smtputf8_need(envelope.sender, (r.address for r in recipients), False, True)


def peek_header(chunks: Iterator[bytes], limit: int = HEADER_PEEK_LIMIT) -> tuple[list[bytes], bool]:
    """Pull ``chunks`` until the end of the header section (rfc5322 2.1: the
    first empty line) is among them, or the data ends: the chunks pulled,
    to be written first, and whether the header section is all ASCII (past
    ``limit`` octets without its end, it is taken as not ASCII)."""
    pulled: list[bytes] = []
    head = b""
    for chunk in chunks:
        pulled.append(chunk)
        head += chunk
        end = _HEADER_END.search(head)
        if end is not None:
            return pulled, head[: end.start()].isascii()
        if len(head) > limit or not head.isascii():
            return pulled, False
    return pulled, head.isascii()


def rcpt_command(recipient: Recipient) -> bytes:
    """``RCPT TO:<address>`` with rfc3461 NOTIFY and ORCPT.

    ORCPT is given when the address first written by the sender differs
    from the one we deliver to; it is dropped if it would make the line
    longer than rfc5321 4.5.3.1.4 allows.
    """
    text = f"RCPT TO:<{recipient.address}>"
    if recipient.notify:
        text += f" NOTIFY={recipient.notify}"
    original = recipient.original
    if original and original.lower() != recipient.address.lower():
        candidate = f"{text} ORCPT=rfc822;{xtext.encode(original)}"
        if _fits(candidate):
            text = candidate
    return _line(text)


class BatchWriter:
    """The bytes of one batch, piece by piece, in session order.

    ``begin()`` once, then for each message ``message(...)``, ``data(chunk)``
    as often as needed and ``end_message()``, and finally ``end()``. Each
    returns the bytes to append. ``messages`` counts the messages written
    and ``octets`` every octet returned so far.
    """

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self.messages = 0
        self.octets = 0
        self._stuffer: DotStuffer | None = None
        self._begun = self._ended = False

    def _out(self, data: bytes) -> bytes:
        self.octets += len(data)
        return data

    def begin(self) -> bytes:
        """The session's start: EHLO."""
        if self._begun:
            raise RuntimeError("begin() called twice")
        self._begun = True
        return self._out(hello_command(self.hostname))

    def message(
        self, envelope: Envelope, recipients: Sequence[Recipient], size: int | None = None, ascii_headers: bool = False
    ) -> bytes:
        """MAIL, RCPT for each recipient, DATA: the envelope of the next
        message (``ascii_headers``: see ``mail_command``)."""
        if not self._begun or self._ended or self._stuffer is not None:
            raise RuntimeError("message() outside a batch, or inside another message")
        if not recipients:
            raise BatchError("a message needs at least one recipient")
        out = [mail_command(envelope, size, recipients, ascii_headers)]
        out.extend(rcpt_command(r) for r in recipients)
        out.append(DATA)
        self._stuffer = DotStuffer()
        return self._out(b"".join(out))

    def data(self, chunk: bytes) -> bytes:
        """Message data (wire form), dot-stuffed (rfc5321 4.5.2)."""
        if self._stuffer is None:
            raise RuntimeError("data() outside a message")
        return self._out(self._stuffer.stuff(chunk))

    def end_message(self) -> bytes:
        """The terminator: ``.`` on a line of its own (with a CRLF before it
        if the data lacked a final one, rfc5321 4.1.1.4)."""
        if self._stuffer is None:
            raise RuntimeError("end_message() outside a message")
        stuffer, self._stuffer = self._stuffer, None
        self.messages += 1
        return self._out(stuffer.end())

    def end(self) -> bytes:
        """The session's end: QUIT."""
        if not self._begun or self._ended or self._stuffer is not None:
            raise RuntimeError("end() outside a batch, or inside a message")
        self._ended = True
        return self._out(QUIT)


def write_batch(hostname: str, messages: Iterable[BatchMessage]) -> Iterator[bytes]:
    """The pieces of a whole batch, made lazily: message data is pulled
    from each message's ``chunks`` only as the pieces are consumed (its
    header section ahead of its MAIL when SMTPUTF8 depends on it)."""
    writer = BatchWriter(hostname)
    yield writer.begin()
    for message in messages:
        chunks: Iterable[bytes] = message.chunks
        ascii_headers = False
        if needs_header_look(message.envelope, message.recipients):
            iterator = iter(chunks)
            pulled, ascii_headers = peek_header(iterator)
            chunks = itertools.chain(pulled, iterator)
        yield writer.message(message.envelope, message.recipients, message.size, ascii_headers)
        for chunk in chunks:
            piece = writer.data(chunk)
            if piece:
                yield piece
        yield writer.end_message()
    yield writer.end()


def batch_bytes(hostname: str, messages: Iterable[BatchMessage]) -> bytes:
    """A whole batch as one ``bytes`` (for small batches and tests)."""
    return b"".join(write_batch(hostname, messages))


def plan_batches(sizes: Sequence[int], max_messages: int, max_bytes: int) -> list[list[int]]:
    """Cut messages of the given ``sizes`` (in order) into batches.

    Returns lists of indexes into ``sizes``, in order. A batch holds at most
    ``max_messages`` messages and at most ``max_bytes`` octets in all; a
    single message larger than ``max_bytes`` goes alone in a batch of its
    own (it cannot be split, and must still leave).
    """
    if max_messages < 1 or max_bytes < 1:
        raise ValueError("max_messages and max_bytes must be positive")
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index, size in enumerate(sizes):
        if current and (len(current) >= max_messages or total + size > max_bytes):
            batches.append(current)
            current, total = [], 0
        current.append(index)
        total += size
    if current:
        batches.append(current)
    return batches

"""Parsing SMTP server replies from bytes: the client's reading half.

rfc5321 4.2: a reply is one or more lines ``Reply-code [SP textstring] CRLF``;
every line but the last has a hyphen after the code instead of the space, and
all lines carry the same code (rfc5321 4.2.1 does not allow mixing). Clients
must accept a bare code with or without the trailing space (rfc5321 4.2).
rfc2034 3: when the server uses enhanced status codes, each line of a 2xx,
4xx or 5xx reply starts with one (rfc3463 2: class.subject.detail); it is
taken out of the text into ``Reply.enhanced``.

Bounds (rfc5321 4.5.3.1.5): a reply line is at most 512 octets with its CRLF;
a reply has at most ``MAX_REPLY_LINES`` lines. Anything else (a bare CR or LF,
a line without a valid code, mixed codes, an over-long line, too many lines)
is a ``MalformedReply``, never an exception: after one the stream cannot be
trusted and the parser stops.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailsvc.smtp.replies import Reply

MAX_REPLY_LINE = 512  # rfc5321 4.5.3.1.5, CRLF included
MAX_REPLY_LINES = 100
# One-line replies remembered per parser, line -> Reply (see ReplyParser).
KNOWN_REPLIES = 16

# rfc5321 4.2: Reply-code = %x32-35 %x30-35 %x30-39
_CODE = re.compile(rb"[2-5][0-5][0-9]\Z")
# rfc3463 2: status-code = class "." subject "." detail, 1-3 digits each.
_ENHANCED = re.compile(r"([245]\.[0-9]{1,3}\.[0-9]{1,3})(?: |\Z)")


@dataclass(frozen=True)
class MalformedReply:
    """The server's output broke the reply syntax; ``reason`` says how and
    ``line`` holds (the start of) the offending line."""

    reason: str
    line: bytes = b""


class ReplyParser:
    """Cuts the server's byte stream into ``Reply`` objects.

    ``feed(data)`` buffers; ``next_reply()`` returns the next whole reply,
    ``None`` if more bytes are needed, or a ``MalformedReply`` once (after
    which it returns ``None`` for ever: ``failed`` is set).

    A server says the same one-line replies again and again on one
    connection ("250 2.1.0 Ok" to each MAIL, "354 ..." to each DATA): the
    first ``KNOWN_REPLIES`` of them are remembered, and the same line again
    gives the same (immutable) ``Reply`` without being parsed again. A
    one-line reply depends on nothing but its line.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lines: list[str] = []  # text of the lines of the reply so far
        self._code = b""  # their code
        self._known: dict[bytes, Reply] = {}  # one-line replies seen: line -> Reply
        self.failed: MalformedReply | None = None

    def feed(self, data: bytes) -> None:
        """Take more bytes from the server."""
        if self.failed is None:
            self._buf += data

    def discard(self) -> bytes:
        """Forget all buffered input and return it (rfc3207 4.2: nothing
        received before the TLS handshake may be used after it)."""
        rest = bytes(self._buf)
        self._buf.clear()
        self._lines, self._code = [], b""
        self._known.clear()
        return rest

    @property
    def buffered(self) -> int:
        """How many received octets are not yet part of a returned reply."""
        return len(self._buf)

    def next_reply(self) -> Reply | MalformedReply | None:
        """The next complete reply; see the class docstring."""
        while self.failed is None:
            if not self._buf:
                return None  # the common case once the replies received are read
            end = self._buf.find(b"\r\n")
            if end < 0:
                pending = len(self._buf) - (1 if self._buf.endswith(b"\r") else 0)
                if pending + 2 > MAX_REPLY_LINE:
                    return self._fail("reply line too long", bytes(self._buf[:80]))
                return None
            line = bytes(self._buf[:end])
            del self._buf[: end + 2]
            if end + 2 > MAX_REPLY_LINE:
                return self._fail("reply line too long", line[:80])
            if not self._lines:
                reply = self._known.get(line)
                if reply is not None:
                    return reply
            reply = self._line(line)
            if reply is not None:
                return reply
        return None

    def _fail(self, reason: str, line: bytes) -> MalformedReply:
        self.failed = MalformedReply(reason, line)
        self._buf.clear()
        return self.failed

    def _line(self, line: bytes) -> Reply | MalformedReply | None:
        """Take one line; return the reply it completes, an error, or None."""
        if b"\r" in line or b"\n" in line:
            # rfc5321 2.3.8: CR and LF only ever come together, as a line end.
            return self._fail("bare CR or LF in a reply", line)
        code, separator = line[:3], line[3:4]
        if not _CODE.match(code) or separator not in (b"", b" ", b"-"):
            return self._fail("reply line does not start with a reply code", line)
        if self._code and code != self._code:
            return self._fail("lines of one reply carry different codes", line)
        if len(self._lines) >= MAX_REPLY_LINES:
            return self._fail(f"reply longer than {MAX_REPLY_LINES} lines", line)
        self._code = code
        self._lines.append(line[4:].decode("utf-8", "replace"))
        if separator == b"-":
            return None
        lines, self._lines, self._code = self._lines, [], b""
        reply = _reply(int(code), lines)
        if len(lines) == 1 and len(self._known) < KNOWN_REPLIES:
            self._known[line] = reply
        return reply


def _reply(code: int, lines: list[str]) -> Reply:
    """A Reply with the rfc2034 enhanced code, if any, taken out of the text."""
    match = _ENHANCED.match(lines[0])
    if match is None or match.group(1)[0] != str(code)[0]:
        return Reply(code, "", tuple(lines))
    enhanced = match.group(1)
    texts = []
    for text in lines:
        if text == enhanced or text.startswith(enhanced + " "):
            text = text[len(enhanced) + 1 :]
        texts.append(text)
    return Reply(code, enhanced, tuple(texts))

"""Message submission (rfc6409) fix-ups and trace, as pure code.

- ``HeaderScanner`` watches the header section of a message as it streams
  past (never the body, at most ``limit`` octets) and notes whether it has a
  ``Date:`` and a ``Message-ID:`` field.
- ``missing_headers`` gives the fields rfc6409 8.2 and 8.3 let a submission
  server add when they are missing; the receiver adds them through
  ``Envelope.prepend_headers``.
- ``protocol_name`` is the ``with`` keyword of the ``Received:`` field
  (rfc3848: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA).
"""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from email.utils import format_datetime

HEADER_SCAN_LIMIT = 64 * 1024


class HeaderScanner:
    """Finds ``Date:`` and ``Message-ID:`` in a streamed header section.

    ``feed(data)`` takes message bytes (CRLF, unstuffed) in any pieces. The
    scan ends at the empty line that ends the header section, at a line that
    cannot be a header field, or after ``limit`` octets: memory stays bounded
    whatever the message. ``complete`` says whether the whole header section
    was seen; ``has(name)`` whether a field was found.
    """

    WATCHED = ("date", "message-id")

    def __init__(self, limit: int = HEADER_SCAN_LIMIT) -> None:
        self.limit = limit
        self.complete = False  # the end of the header section was seen
        self.truncated = False  # the limit was reached first
        self._seen = 0
        self._partial = b""
        self._found: set[str] = set()

    @property
    def done(self) -> bool:
        """Nothing more will be looked at."""
        return self.complete or self.truncated

    def has(self, name: str) -> bool:
        """Whether a field called ``name`` (case-insensitive) was found."""
        return name.lower() in self._found

    def feed(self, data: bytes) -> None:
        """Look at the next ``data`` of the message."""
        if self.done:
            return
        room = self.limit - self._seen
        if len(data) > room:
            data, self.truncated = data[:room], True
        self._seen += len(data)
        buffer = self._partial + data
        lines = buffer.split(b"\r\n")
        self._partial = lines.pop()
        for line in lines:
            if self._line(line):
                self.complete, self.truncated = True, False
                self._partial = b""
                return
        if self.truncated:
            self._partial = b""

    def finish(self) -> None:
        """The message ended: a header section without a body ends here."""
        if not self.done:
            if self._partial:
                self._line(self._partial)
            self.complete = True
            self._partial = b""

    def _line(self, line: bytes) -> bool:
        """Look at one complete line; True when it ends the header section."""
        if not line:
            return True
        if line[:1] in (b" ", b"\t"):
            return False  # a folded continuation (rfc5322 2.2.3)
        name, colon, _ = line.partition(b":")
        if not colon or not name or any(c <= 32 or c >= 127 for c in name):
            return True  # not a header field: the body has begun (rfc5322 2.1)
        key = name.decode("ascii").lower()
        if key in self.WATCHED:
            self._found.add(key)
        return False


def missing_headers(scanner: HeaderScanner, hostname: str, queue_id: str, now: float) -> tuple[str, ...]:
    """The ``Date:`` (rfc6409 8.3) and ``Message-ID:`` (rfc6409 8.2) fields to add.

    Nothing is added when the header section was not seen whole (over the
    scan limit): better no fix-up than a second Date or Message-ID.
    """
    if not scanner.complete:
        return ()
    added = []
    if not scanner.has("date"):
        added.append("Date: " + format_datetime(datetime.fromtimestamp(now, timezone.utc)))
    if not scanner.has("message-id"):
        added.append(f"Message-ID: <{queue_id}.{secrets.token_hex(6)}@{hostname}>")
    return tuple(added)


def protocol_name(extended: bool, tls: bool, authenticated: bool, smtputf8: bool = False) -> str:
    """rfc3848 2: ``with`` SMTP, ESMTP, ESMTPS (TLS), ESMTPA (AUTH), ESMTPSA
    (both); rfc6531 4.3: UTF8SMTP, UTF8SMTPS, UTF8SMTPA, UTF8SMTPSA for a
    transaction with SMTPUTF8."""
    if not extended:
        return "SMTP"
    return ("UTF8SMTP" if smtputf8 else "ESMTP") + ("S" if tls else "") + ("A" if authenticated else "")

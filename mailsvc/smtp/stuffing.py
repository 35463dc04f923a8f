"""Dot-stuffing outgoing message data: the sending half of rfc5321 4.5.2.

rfc5321 4.5.2: before sending a line of mail text, the client checks its
first character; if it is a period, one more period is put at the start of
the line. The data ends with CRLF "." CRLF, where the CRLF before the period
belongs to the data (rfc5321 4.1.1.4), so data that does not end with CRLF
gets one added before the final period.

``DataReader`` in ``mailsvc.smtp.data`` is the receiving half. A "line start"
is only ever the byte after CRLF (rfc5321 2.3.8): bare CR or LF never start
a line. Data coming from our own spool has none; any that slips through is
sent as it is, and a strict receiver (ours) refuses the message.
"""

from __future__ import annotations

_CRLF = b"\r\n"


class DotStuffer:
    """Stuffs one message's data, chunk by chunk, with any chunking.

    ``stuff(chunk)`` returns the bytes to send for ``chunk``; ``end()`` the
    terminator. The only state carried between chunks is what the chunk
    boundary hides: whether the next byte starts a line (the data so far is
    empty or ends with CRLF), or the data so far ends with a lone CR, whose LF
    may open the next chunk.
    """

    def __init__(self) -> None:
        # The tail of the data so far that matters: CRLF (the next byte starts
        # a line; a virtual CRLF before the very first byte), CR, or nothing.
        self._tail = _CRLF
        self.size = 0  # unstuffed octets taken so far

    def stuff(self, chunk: bytes) -> bytes:
        """The wire bytes for ``chunk``: a period that starts a line is doubled."""
        if not chunk:
            return b""
        self.size += len(chunk)
        view = self._tail + chunk
        # One replace over the whole chunk, with the carried tail in front so
        # that a line start at the chunk's first byte is seen too. The tail
        # itself is never changed: the extra period goes after "\r\n.".
        stuffed = view.replace(b"\r\n.", b"\r\n..")[len(self._tail) :]
        if view.endswith(_CRLF):
            self._tail = _CRLF
        elif chunk.endswith(b"\r"):
            self._tail = b"\r"
        else:
            self._tail = b""
        return stuffed

    @property
    def at_line_start(self) -> bool:
        """True when the data so far is empty or ends with CRLF."""
        return self._tail == _CRLF

    def end(self) -> bytes:
        """The end-of-data terminator (rfc5321 4.1.1.4): ``.CRLF`` after a
        CRLF, else ``CRLF.CRLF`` (the added CRLF is then part of the data)."""
        return b".\r\n" if self.at_line_start else b"\r\n.\r\n"


def stuff_whole(data: bytes) -> bytes:
    """``data`` stuffed and terminated, in one call (for small messages and tests)."""
    stuffer = DotStuffer()
    return stuffer.stuff(data) + stuffer.end()

"""Reading message data sent with BDAT (rfc3030): counted, never stuffed.

With BDAT the client says how many octets follow, so nothing in the data
can end it early: no dot-stuffing to undo, no CRLF.CRLF to look for
(rfc3030 2). What the server still checks is the message itself, with the
same rules and the same ``DataFault``\\s as DATA (``mailsvc.smtp.data``):
the SIZE limit (rfc1870), text lines of at most 1000 octets (rfc5321
4.5.3.1.6; we offer no BINARYMIME, so the body is text), and CR and LF only
as the pair CRLF (rfc5321 2.3.8), so that a message taken with BDAT can be
relayed later with DATA unchanged.

The work is done on whole chunks with bytes methods; the only state carried
between pieces is the length of the line in progress and whether the last
octet was a CR (half of a CRLF that the next piece may complete).
"""

from __future__ import annotations

from mailsvc.smtp.data import MAX_LINE, DataFault

_CRLF = b"\r\n"


class ChunkReader:
    """Checks and counts the octets of one BDAT transaction, every chunk's.

    ``feed(piece)`` returns the octets to store (empty once a fault is
    found: nothing more needs storing); ``finish()`` ends the message and
    returns the fault that refuses it, if any. ``size`` counts every octet.
    """

    def __init__(self, max_size: int = 0) -> None:
        self.max_size = max_size  # 0: no limit
        self.size = 0
        self.fault: DataFault | None = None
        self._line = 0  # text octets of the line in progress
        self._cr = False  # the last octet was a CR

    def feed(self, piece: bytes) -> bytes:
        """Take the next octets of the message (any cut); see the class docstring."""
        if not piece:
            return b""
        self.size += len(piece)
        if self.fault is None:
            self._check(piece)
        if self.fault is None and self.max_size and self.size > self.max_size:
            self.fault = DataFault.TOO_BIG
        return piece if self.fault is None else b""

    def finish(self) -> DataFault | None:
        """The message ended (``BDAT n LAST``): the first fault found, or None."""
        if self.fault is None and self._cr:
            self.fault = DataFault.BARE_LINE_END  # it ends with a lone CR
        return self.fault

    def _check(self, piece: bytes) -> None:
        view = (b"\r" if self._cr else b"") + piece
        self._cr = view.endswith(b"\r")
        body = view[:-1] if self._cr else view  # a final CR may be half of a CRLF
        crlf = body.count(_CRLF)
        if body.count(b"\r") != crlf or body.count(b"\n") != crlf:
            self.fault = DataFault.BARE_LINE_END
            return
        first = body.find(_CRLF)
        if first < 0:
            self._line += len(body)
        else:
            last = body.rfind(_CRLF)
            longest = self._line + first
            if last > first and last - first > MAX_LINE - 2:
                longest = max(longest, *map(len, body[first + 2 : last].split(_CRLF)))
            if longest + 2 > MAX_LINE:
                self.fault = DataFault.LINE_TOO_LONG
                return
            self._line = len(body) - last - 2
        if self._line + 2 > MAX_LINE:
            self.fault = DataFault.LINE_TOO_LONG

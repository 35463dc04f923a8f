"""Reading message data after DATA: end at CRLF.CRLF, undo dot-stuffing.

rfc5321 4.1.1.4 and 4.5.2: the data ends with a line holding only a period,
that is the sequence CRLF "." CRLF; a period at the start of any other line
was doubled by the sender and one is removed. rfc5321 2.3.8: CR and LF only
ever appear together as a line end. Bare CR or bare LF (the 2023 "SMTP
smuggling" class: ``LF.LF``, ``LF.CRLF``, ``CRLF.LF``, ``CR.CR``...) never end
the data here; they mark the message as refused, and the reader keeps going to
the true CRLF.CRLF so the rest of the body is never read as commands. The same
policy as Postfix's ``smtpd_forbid_bare_newline = reject``.

The work is done on whole chunks with bytes methods (find, replace, count),
never a Python loop per line. Only complete lines are processed; a partial
line waits for the next chunk, unless it is already too long, in which case
it is counted and dropped (memory stays bounded).
"""

from __future__ import annotations

import enum

MAX_LINE = 1000  # rfc5321 4.5.3.1.6: text line, CRLF included
_END = b"\r\n.\r\n"


class DataFault(enum.Enum):
    """Why received data is refused at its end (the first fault found wins)."""

    BARE_LINE_END = "bare CR or LF"
    LINE_TOO_LONG = "line too long"
    TOO_BIG = "message too big"


class DataReader:
    """Consumes the bytes that follow a 354 reply.

    ``feed(data)`` returns ``(content, rest)``: ``content`` is unstuffed
    message bytes to store (empty once a fault is found: nothing more needs
    storing), ``rest`` is ``None`` while the data goes on, or the bytes that
    followed CRLF.CRLF once it ended (they are commands). ``fault`` says
    whether the message must be refused; ``size`` counts content octets.
    """

    def __init__(self, max_size: int = 0) -> None:
        self.max_size = max_size  # 0: no limit
        self.size = 0
        self.fault: DataFault | None = None
        self._pending = b""  # an incomplete last line
        self._line_start = True  # the next byte begins a line
        self._carried = 0  # length of the current line already consumed

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """Take more bytes; see the class docstring."""
        buf = self._pending + data
        # A virtual CRLF before a line start lets one search find both the
        # terminator and stuffed dots at the very start of the buffer.
        prefix = b"\r\n" if self._line_start else b""
        view = prefix + buf
        skip = len(prefix)
        end = view.find(_END)
        if end >= 0:
            self._pending = b""
            content = self._lines(view[: end + 2], skip)
            return content, view[end + 5 :]
        last = view.rfind(b"\r\n")
        if last + 2 > skip:
            content = self._lines(view[: last + 2], skip)
            self._pending = view[last + 2 :]
            self._line_start = True
        else:
            content = b""
            self._pending = buf
        if self._partial_length() > MAX_LINE - 2:
            content += self._drop_long_partial()
        return content, None

    def _partial_length(self) -> int:
        """Text octets of the incomplete last line so far, as rfc5321 4.5.3.1.6
        counts them: without a stuffed dot and without a CR that may be half
        of its CRLF."""
        partial = self._pending
        length = self._carried + len(partial)
        if self._line_start and partial.startswith(b"."):
            length -= 1
        if partial.endswith(b"\r"):
            length -= 1
        return length

    def _lines(self, region: bytes, skip: int) -> bytes:
        """Unstuff and check ``region`` (whole lines), drop the virtual prefix."""
        content = region.replace(b"\r\n.", b"\r\n")[skip:]
        if not content:
            return b""
        self._check(content)
        self._carried = 0
        return self._accept(content)

    def _drop_long_partial(self) -> bytes:
        """The partial line is past the limit: consume all of it but a final CR."""
        partial = self._pending
        keep = b"\r" if partial.endswith(b"\r") else b""
        head = partial[: len(partial) - len(keep)]
        if self._line_start and head.startswith(b"."):
            head = head[1:]  # rfc5321 4.5.2: a stuffed dot at a line start
        self._pending = keep
        self._line_start = False
        self._carried += len(head)
        self._check_partial(head)
        return self._accept(head)

    def _check(self, content: bytes) -> None:
        """Look for bare CR/LF and over-long lines in complete lines."""
        if self.fault is not None:
            return
        crlf = content.count(b"\r\n")
        if content.count(b"\r") != crlf or content.count(b"\n") != crlf:
            self.fault = DataFault.BARE_LINE_END
            return
        first = content.find(b"\r\n")
        if self._carried + first + 2 > MAX_LINE:
            self.fault = DataFault.LINE_TOO_LONG
        elif len(content) > MAX_LINE and max(map(len, content.split(b"\r\n"))) + 2 > MAX_LINE:
            self.fault = DataFault.LINE_TOO_LONG

    def _check_partial(self, head: bytes) -> None:
        """``head`` is dropped because its line is already past the limit."""
        if self.fault is None:
            if b"\r" in head or b"\n" in head:
                self.fault = DataFault.BARE_LINE_END
            else:
                self.fault = DataFault.LINE_TOO_LONG

    def _accept(self, content: bytes) -> bytes:
        """Count ``content``; return it unless the message is already refused."""
        self.size += len(content)
        if self.fault is None and self.max_size and self.size > self.max_size:
            self.fault = DataFault.TOO_BIG
        return b"" if self.fault is not None else content

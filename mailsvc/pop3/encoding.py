"""POP3 message encoding: stored LF bytes to dot-stuffed CRLF, TOP's line limit."""

from __future__ import annotations


from mailsvc.smtp.stuffing import DotStuffer
from mailsvc.store.access import WireForm


# ---------------------------------------------------------------- message encoding


class TopLimit:
    """TOP (rfc1939 7): the header section, the blank line, then ``lines``
    lines of the body, from wire-form (CRLF) text fed in any chunks that do
    not split a CRLF (``WireForm`` output)."""

    def __init__(self, lines: int) -> None:
        self.left = lines
        self.inHeaders = True
        self.atLineStart = True
        self.done = False

    def take(self, data: bytes) -> bytes:
        """The part of ``data`` still to send."""
        position, size = 0, len(data)
        while position < size and not self.done:
            if self.atLineStart:
                if not self.inHeaders and self.left <= 0:
                    self.done = True
                    break
                if self.inHeaders and data.startswith(b"\r\n", position):
                    self.inHeaders = False  # the blank line: sent, then the body
                    position += 2
                    continue
            end = data.find(b"\r\n", position)
            if end < 0:
                position, self.atLineStart = size, False
                break
            position, self.atLineStart = end + 2, True
            if not self.inHeaders:
                self.left -= 1
        return data[:position]


class MessageEncoder:
    """A stored message (LF line ends) to the body of a POP3 multi-line
    response: CRLF, dot-stuffed, optionally cut for TOP, and terminated."""

    def __init__(self, bodyLines: int | None = None) -> None:
        self._wire = WireForm()
        self._top = TopLimit(bodyLines) if bodyLines is not None else None
        self._stuffer = DotStuffer()

    @property
    def done(self) -> bool:
        """True once TOP has all it needs: the rest of the file need not be read."""
        return self._top is not None and self._top.done

    def feed(self, chunk: bytes) -> bytes:
        """The wire bytes for the next stored chunk."""
        if self.done:
            return b""
        data = self._wire.feed(chunk)
        if self._top is not None:
            data = self._top.take(data)
        return self._stuffer.stuff(data)

    def end(self) -> bytes:
        """The last bytes and the terminator: ``.CRLF``, after a CRLF if the message lacked one."""
        tail = b"" if self.done else self._stuffer.stuff(self._wire.end())
        return tail + self._stuffer.end()


class _EncodedReader:
    """A file for ``basic.FileSender``: reads the stored file, returns wire
    bytes; ``b""`` only at the end (an empty chunk would end the transfer)."""

    def __init__(self, source, encoder: MessageEncoder) -> None:
        self.source, self.encoder = source, encoder

    def read(self, size: int) -> bytes:
        while not self.encoder.done:
            chunk = self.source.read(size)
            if not chunk:
                return b""
            data = self.encoder.feed(chunk)
            if data:
                return data
        return b""

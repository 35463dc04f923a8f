"""Writing a message body as BDAT chunks (rfc3030): counted, never stuffed.

The client side of ``mailsvc.smtp.chunking``. Each piece of the body the
caller hands over becomes one ``BDAT n`` command followed by exactly those
octets (rfc3030 2); the last becomes ``BDAT n LAST``.
"""

from __future__ import annotations


class ChunkWriter:
    """The BDAT commands for one message's body.

    ``chunk(data)`` returns what may be written now (empty, or one
    ``BDAT n`` with its octets); ``last()`` returns the final
    ``BDAT n LAST``. Each chunk is held back until the next one comes, so
    that the last one can carry LAST (rfc3030 2) without "BDAT 0 LAST".
    """

    def __init__(self) -> None:
        self._held: bytes | None = None  # the chunk held back, to go with LAST
        self._tail = b""  # the last two octets of the data so far

    def chunk(self, data: bytes) -> bytes:
        """Take the next piece of the body; the ``BDAT n`` of the piece held
        before it, or ``b""`` when nothing is to be written yet."""
        if not data:
            return b""
        out = _bdat(self._held, last=False) if self._held else b""
        self._held = data
        self._tail = (self._tail + data)[-2:]
        return out

    def last(self) -> bytes:
        """End the body: ``BDAT n LAST`` with the piece held back."""
        chunk, self._held = self._held or b"", None
        if self._tail not in (b"", b"\r\n"):
            # As with DATA, data that does not end with CRLF gets one
            # (rfc5321 4.1.1.4), so both ways deliver the same octets.
            chunk += b"\r\n"
        return _bdat(chunk, last=True)


def _bdat(chunk: bytes, last: bool) -> bytes:
    """rfc3030 2: ``BDAT <size> [LAST]`` CRLF, then exactly that many octets."""
    head = f"BDAT {len(chunk)} LAST\r\n" if last else f"BDAT {len(chunk)}\r\n"
    return head.encode("ascii") + chunk

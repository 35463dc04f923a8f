"""The bytes of a message on its way to a relay peer: as queued, or converted to 7-bit.

``OutgoingMessage`` serves every session of one delivery of one message
(one per domain, sometimes several): each opens its own reader. For a peer
without 8BITMIME (rfc6152 3) the 7-bit form (``mailsvc.delivery.downgrade``)
is made once, off the reactor thread, into a temporary file in the spool's
``tmp/`` (which recovery empties at start after a crash) and removed when
the delivery is done.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from twisted.internet import defer

from mailsvc.delivery.downgrade import CannotDowngrade, downgrade
from mailsvc.envelope import QueuedMessage


class OutgoingMessage:
    """The bytes of one message as they are sent: the spool's, or their 7-bit
    conversion (rfc6152 3), made once, when a peer without 8BITMIME first
    needs it, into a temporary file removed by ``close()``."""

    def __init__(self, spool, message: QueuedMessage, run_blocking: Callable, limit: int) -> None:
        self._spool = spool
        self._message = message
        self._blocking = run_blocking
        self._limit = limit
        self._lock: defer.DeferredLock | None = None  # made when a peer needs 7-bit: most never do
        self._converted: tuple[str, int] | Exception | None = None
        self._path: str | None = None
        self._closed = False

    def open(self):
        """The message as queued (a binary file)."""
        return self._spool.open(self._message)

    async def seven_bit(self) -> int:
        """Convert (once) and return the size of the 7-bit form.

        :raise CannotDowngrade: it cannot be made 7-bit.
        :raise OSError: reading or writing failed.
        """
        if self._lock is None:
            self._lock = defer.DeferredLock()
        async with self._lock:
            if self._converted is None:
                try:
                    self._converted = await self._blocking(self._convert)
                except (CannotDowngrade, OSError) as e:
                    self._converted = e
        if isinstance(self._converted, Exception):
            raise self._converted
        return self._converted[1]

    def open_seven_bit(self):
        """The 7-bit form (after ``seven_bit``), a binary file."""
        assert isinstance(self._converted, tuple)
        return open(self._converted[0], "rb")

    def _temp_directory(self) -> str | None:
        """The spool's tmp/ when it has one (a crash leaves nothing there that
        recovery at start does not remove); else the system's. Looked up only
        when a conversion is made, not for every message relayed."""
        directory = getattr(self._spool, "directory", None)
        tmp = os.path.join(directory, "tmp") if directory is not None else None
        return tmp if tmp is not None and os.path.isdir(tmp) else None

    def _convert(self) -> tuple[str, int]:
        """Blocking: write the 7-bit form to a temporary file; its path and size."""
        fd, path = tempfile.mkstemp(prefix="downgrade.", suffix=".tmp", dir=self._temp_directory())
        self._path = path
        try:
            with os.fdopen(fd, "wb") as out, self._spool.open(self._message) as source:
                downgrade(source, out, self._limit)
            size = os.path.getsize(path)
        except BaseException:
            _unlink(path)
            raise
        if self._closed:  # given up meanwhile
            _unlink(path)
        return path, size

    def close(self) -> None:
        """Remove the 7-bit form, if one was made."""
        self._closed = True
        if self._path is not None:
            _unlink(self._path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

"""Mailbox stores: where local delivery puts messages.

``mailsvc.store.maildir`` and ``mailsvc.store.mbox`` implement
``mailsvc.interfaces.IMailboxStore``; their factories are Twisted plugins
(``twisted/plugins/mailsvc_builtins.py``). This module holds what both share:
mailbox name checks, the streaming CRLF to LF conversion, and the mapping of
``OSError`` to delivery errors. It does blocking I/O and imports no Twisted.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Iterator, Mapping
from typing import BinaryIO

from mailsvc.errors import ConfigError, PermanentDeliveryError, TemporaryDeliveryError

#: Octets read from the source at a time: memory per delivery stays bounded.
CHUNK_SIZE = 64 * 1024

# Readers whose read(n) returns fewer than n octets only at the end of the
# file (io.BufferedIOBase.read, in blocking mode): what FileSpool.open
# returns, and what tests pass. Exact types: a subclass may read otherwise.
_WHOLE_READS = frozenset({io.BufferedReader, io.BytesIO})

# rfc3463 3.4: X.3.1 "mail system full"; X.3.0 other mail system status.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def checkMailboxName(mailbox: str) -> str:
    """Return ``mailbox`` if it is safe as a file name in a store directory.

    :raise PermanentDeliveryError: 5.1.3 (rfc3463 3.2: bad destination mailbox
        address syntax) for an empty name, one holding ``/`` or NUL, one
        starting with ``.`` (hidden, ``.``, ``..``) or holding ``..``.
    """
    if (
        not isinstance(mailbox, str)
        or not mailbox
        or "/" in mailbox
        or "\0" in mailbox
        or ".." in mailbox
        or mailbox.startswith(".")
    ):
        raise PermanentDeliveryError(f"invalid mailbox name {mailbox!r}", "5.1.3")
    return mailbox


def deliveryErrorFor(error: OSError, doing: str) -> TemporaryDeliveryError:
    """The delivery error for an ``OSError`` met while ``doing`` something.

    A full disk or quota gives 4.3.1; anything else (permissions, read-only
    file system, I/O errors) gives 4.3.0: an administrator can fix it, so
    trying again later may succeed.
    """
    reason = error.strerror or str(error)
    if error.errno in _FULL_ERRNOS:
        return TemporaryDeliveryError(f"{doing}: {reason}", "4.3.1")
    return TemporaryDeliveryError(f"{doing}: {reason}", "4.3.0")


def lfChunks(source: BinaryIO, chunkSize: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Read ``source`` (CRLF line ends) in chunks; yield them with LF line ends.

    A CR at the end of one chunk is held back until the next chunk shows
    whether an LF follows it, so a CRLF split across two reads still becomes
    one LF. A CR not followed by LF (which the receiver never lets through)
    is passed on unchanged. Never holds more than one chunk in memory.
    """
    chunk = source.read(chunkSize)
    if type(source) in _WHOLE_READS and len(chunk) < chunkSize:
        # Fast path, a message smaller than a chunk (the common case): these
        # files return fewer octets than asked only at their end, so it is
        # all here; no second read just to see the end. Same octets out.
        if chunk:
            yield chunk.replace(b"\r\n", b"\n")
        return
    heldCR = False
    while chunk:
        if heldCR:
            chunk = b"\r" + chunk
            heldCR = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            heldCR = True
        if chunk:
            yield chunk.replace(b"\r\n", b"\n")
        chunk = source.read(chunkSize)
    if heldCR:
        yield b"\r"


def headerBytes(headers) -> bytes:
    """Header lines (``str``, no line end) as bytes, each ended by LF.

    :raise ValueError: a line holds CR or LF (it would smuggle in a line).
    """
    lines = headers if isinstance(headers, (list, tuple)) else list(headers)
    for line in lines:
        if "\r" in line or "\n" in line:
            raise ValueError(f"header line holds a line end: {line!r}")
    if not lines:
        return b""
    try:
        # One join and one encoding for all the lines (each checked above).
        return ("\n".join(lines) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        for line in lines:
            line.encode("utf-8")  # the error as the line alone gives it
        raise


def storePath(options: Mapping[str, object], kind: str, allowed: frozenset[str]) -> str:
    """Check a store's ``options`` and return its absolute ``path``.

    :raise ConfigError: an unknown option (naming it), or a missing or
        relative ``path``.
    """
    for key in options:
        if key not in allowed:
            raise ConfigError(f"[store] {key}: unknown option for the {kind} store")
    path = options.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"[store] path: the {kind} store needs a path")
    if not os.path.isabs(path):
        raise ConfigError(f"[store] path: expected an absolute path, got {path!r}")
    return path


def writeAll(fd: int, data: bytes) -> None:
    """Write all of ``data`` to file descriptor ``fd`` (``os.write`` may write less)."""
    written = os.write(fd, data)
    if written < len(data):  # a short write (rare: a signal, a nearly full disk)
        view = memoryview(data)[written:]
        while view:
            written = os.write(fd, view)
            view = view[written:]

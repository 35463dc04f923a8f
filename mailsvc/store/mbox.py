"""mbox mailboxes: every message of a user appended to one file.

Format "mboxrd": each message starts with a ``From <sender> <date>`` line,
a line of the message matching ``^>*From `` gets one more ``>``, and the
message ends with an empty line. Writers lock the file with a dot-lock
(``<file>.lock``) and ``fcntl.lockf``, as Postfix local(8) does, so mail
readers using either method agree with us. Files use LF line ends.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import BinaryIO

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailsvc.errors import ConfigError, PermanentDeliveryError, TemporaryDeliveryError
from mailsvc.interfaces import IMailboxAccess, IMailboxStore, IMailboxStoreFactory
from mailsvc.store import (
    checkMailboxName,
    deliveryErrorFor,
    headerBytes,
    lfChunks,
    storePath,
    writeAll,
)
from mailsvc.store.mbox_access import MboxSession

#: A dot-lock older than this (seconds) was left by a crashed writer.
STALE_LOCK_AGE = 300.0
#: How long (seconds) to wait for a lock held by someone else.
DEFAULT_LOCK_TIMEOUT = 5.0
_POLL = 0.05

_FROM = b"From "
_QUOTES = re.compile(rb">*")


class MboxrdQuoter:
    """Streaming mboxrd quoting of LF-ended text: feed chunks, get chunks.

    A line matching ``^>*From `` gets one more ``>``. Since the leading run
    of ``>`` is all alike, the extra ``>`` may go anywhere in it: the run is
    passed on as it comes and the ``>`` is put just before ``From `` once
    all five octets were seen. At most four octets (a partial ``From ``) are
    held between chunks, so memory does not grow with line length.
    """

    def __init__(self) -> None:
        self._atLineStart = True
        self._held = b""
        self.endsWithNewline = True

    def feed(self, data: bytes) -> bytes:
        """Quote the next piece of text; return what can be written now."""
        out: list[bytes] = []
        pos, size = 0, len(data)
        while pos < size:
            if not self._atLineStart:
                newline = data.find(b"\n", pos)
                if newline < 0:
                    out.append(data[pos:])
                    break
                out.append(data[pos : newline + 1])
                pos = newline + 1
                self._atLineStart = True
                continue
            if not self._held:
                run = _QUOTES.match(data, pos).end()
                out.append(data[pos:run])
                pos = run
                if pos == size:
                    break
            candidate = self._held + data[pos : pos + len(_FROM) - len(self._held)]
            if not _FROM.startswith(candidate):
                out.append(self._held)
                self._held = b""
                self._atLineStart = False
                continue
            pos += len(candidate) - len(self._held)
            if len(candidate) == len(_FROM):
                out.append(b">" + _FROM)
                self._held = b""
                self._atLineStart = False
            else:
                self._held = candidate
        result = b"".join(out)
        if result:
            self.endsWithNewline = result.endswith(b"\n")
        return result

    def end(self) -> bytes:
        """The octets still held at the end of the text."""
        held, self._held = self._held, b""
        if held:
            self.endsWithNewline = False
        return held


def fromLine(headers: Sequence[str], now: float) -> bytes:
    """The ``From `` line that starts a message in mbox.

    The sender comes from the ``Return-Path:`` header; the null reverse-path
    ``<>`` (rfc5321 4.5.5) and a missing header give ``MAILER-DAEMON``. The
    date is in asctime(3) form, local time, as in Postfix local(8).
    """
    sender = ""
    for line in headers:
        name, _, value = line.partition(":")
        if name.strip().lower() == "return-path":
            sender = value.strip().removeprefix("<").removesuffix(">").strip()
            break
    # Readers split the From line at spaces: a space in a quoted local part
    # (rfc5321 4.1.2) must not end the sender.
    sender = re.sub(r"\s", "_", sender) or "MAILER-DAEMON"
    return f"From {sender} {time.asctime(time.localtime(now))}\n".encode("utf-8")


@implementer(IMailboxStore, IMailboxAccess)
class MboxStore:
    """mbox files under the directory ``path``: ``<path>/<mailbox>``, mode 0600.

    ``lockTimeout`` is how long to wait for a busy mailbox before giving up
    with 4.2.0; ``clock`` returns the POSIX time (for the ``From `` line).
    """

    def __init__(
        self,
        path: str,
        lockTimeout: float = DEFAULT_LOCK_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.lockTimeout = lockTimeout
        self.clock = clock

    def open(self, mailbox: str) -> MboxSession:
        """``IMailboxAccess``: a reading session (POP3) on ``mailbox``
        (``mailsvc.store.access.MboxSession``, which takes this store's locks)."""
        return MboxSession.open(self, mailbox)

    def exists(self, mailbox: str) -> bool:
        """Whether the mbox file of ``mailbox`` exists."""
        try:
            checkMailboxName(mailbox)
        except PermanentDeliveryError:
            return False
        return os.path.isfile(os.path.join(self.path, mailbox))

    def deliver(self, mailbox: str, headers: Sequence[str], source: BinaryIO) -> str:
        """Append one message to ``mailbox``'s file, locked; return the path.

        On any failure the file is truncated back to its length before, so no
        partial message stays in it.
        """
        checkMailboxName(mailbox)
        head = headerBytes(headers)
        path = os.path.join(self.path, mailbox)
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        except OSError as e:
            raise deliveryErrorFor(e, f"cannot create {self.path}") from e
        deadline = time.monotonic() + self.lockTimeout
        lockPath = path + ".lock"
        self._dotLock(lockPath, deadline)
        try:
            self._appendLocked(path, head, headers, source, deadline)
        finally:
            try:
                os.unlink(lockPath)
            except OSError:
                pass
        return path

    def _dotLock(self, lockPath: str, deadline: float) -> None:
        """Create ``<file>.lock`` exclusively, removing one gone stale."""
        while True:
            try:
                fd = os.open(lockPath, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                try:
                    if time.time() - os.stat(lockPath).st_mtime > STALE_LOCK_AGE:
                        os.unlink(lockPath)
                        continue
                except FileNotFoundError:
                    continue
                except OSError as e:
                    raise deliveryErrorFor(e, f"cannot lock {lockPath}") from e
            except OSError as e:
                raise deliveryErrorFor(e, f"cannot lock {lockPath}") from e
            else:
                try:
                    writeAll(fd, f"{os.getpid()}\n".encode())
                finally:
                    os.close(fd)
                return
            if time.monotonic() >= deadline:
                raise TemporaryDeliveryError(f"mailbox busy: {lockPath} exists", "4.2.0")
            time.sleep(_POLL)

    def _appendLocked(self, path, head, headers, source, deadline) -> None:
        """Open, ``lockf`` and append to the file; truncate it back on failure."""
        try:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(path, flags, 0o600)
        except OSError as e:
            raise deliveryErrorFor(e, f"cannot open {path}") from e
        try:
            self._lockf(fd, path, deadline)
            try:
                original = os.fstat(fd).st_size
            except OSError as e:
                raise deliveryErrorFor(e, f"cannot stat {path}") from e
            try:
                self._write(fd, head, headers, source)
            except BaseException as e:
                try:
                    os.ftruncate(fd, original)
                    os.fsync(fd)
                except OSError:
                    pass
                if isinstance(e, OSError):
                    raise deliveryErrorFor(e, f"cannot deliver to {path}") from e
                raise
        finally:
            os.close(fd)  # closing releases the lockf lock

    def _lockf(self, fd: int, path: str, deadline: float) -> None:
        """Take the ``fcntl.lockf`` write lock on the whole file, waiting a little."""
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise deliveryErrorFor(e, f"cannot lock {path}") from e
            if time.monotonic() >= deadline:
                raise TemporaryDeliveryError(f"mailbox busy: {path} is locked", "4.2.0")
            time.sleep(_POLL)

    def _write(self, fd: int, head: bytes, headers, source: BinaryIO) -> None:
        """Write the From line, headers and quoted message, then fsync."""
        quoter = MboxrdQuoter()
        writeAll(fd, fromLine(headers, self.clock()) + quoter.feed(head))
        for chunk in lfChunks(source):
            writeAll(fd, quoter.feed(chunk))
        tail = quoter.end()
        if not quoter.endsWithNewline:
            tail += b"\n"
        writeAll(fd, tail + b"\n")  # the empty line that ends a message
        os.fsync(fd)


@implementer(IPlugin, IMailboxStoreFactory)
class MboxStoreFactory:
    """The ``mbox`` store plugin. Options: ``path`` (absolute), ``lock_timeout`` (seconds)."""

    name = "mbox"
    description = "mbox files: <path>/<user>, mboxrd quoting, dot-lock and lockf"

    def makeStore(self, options: Mapping[str, object]) -> MboxStore:
        """An ``MboxStore`` for the ``[store]`` options.

        :raise mailsvc.errors.ConfigError: unknown option or bad value.
        """
        path = storePath(options, self.name, frozenset({"path", "lock_timeout"}))
        timeout = options.get("lock_timeout", DEFAULT_LOCK_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
            raise ConfigError(f"[store] lock_timeout: expected a number of seconds >= 0, got {timeout!r}")
        return MboxStore(path, lockTimeout=float(timeout))

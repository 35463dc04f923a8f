"""Reading an mbox file for POP3 (``IMailboxSession``): parse under the delivery
locks, undo ``>From`` quoting, rewrite atomically at commit.

See ``mailsvc.store.access`` for what the sessions promise."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from zope.interface import implementer

from mailsvc.durable import fsync_directory
from mailsvc.errors import TemporaryDeliveryError
from mailsvc.interfaces import IMailboxSession
from mailsvc.store import CHUNK_SIZE, writeAll
from mailsvc.store.access import MessageInfo, WireForm, checkName, lockSession
# ---------------------------------------------------------------- mbox

_QUOTED_FROM = re.compile(rb">+From ")


@dataclass
class _MboxEntry:
    start: int  # offset of its "From " line
    bodyStart: int  # offset of the message itself
    contentEnd: int  # end of the message (before the empty line that ends it)
    end: int  # start of the next message, or the end of the parsed file
    info: MessageInfo


class MboxMessageReader(io.RawIOBase):
    """Reads one message of an mbox file: ``[start, end)`` with the mboxrd
    quoting undone (``>From `` at a line start loses one ``>``). Owns a
    duplicate of the file descriptor, so it outlives the session."""

    def __init__(self, fd: int, start: int, end: int) -> None:
        super().__init__()
        self._file = io.BufferedReader(io.FileIO(os.dup(fd), "rb"), CHUNK_SIZE)
        self._file.seek(start)
        self._left = end - start
        self._atLineStart = True
        self._pending = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` octets (``CHUNK_SIZE`` when not given); ``b""`` at the end."""
        limit = CHUNK_SIZE if size is None or size < 0 else size
        out, total = [self._pending], len(self._pending)
        while total < limit and self._left > 0:
            # Whole lines (or CHUNK_SIZE pieces of longer ones): a quoted
            # "From " is never cut before it is recognised.
            piece = self._file.readline(min(self._left, CHUNK_SIZE))
            if not piece:
                self._left = 0
                break
            self._left -= len(piece)
            if self._atLineStart and _QUOTED_FROM.match(piece):
                piece = piece[1:]
            self._atLineStart = piece.endswith(b"\n")
            out.append(piece)
            total += len(piece)
        data = b"".join(out)
        data, self._pending = data[:limit], data[limit:]
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


@implementer(IMailboxSession)
class MboxSession:
    """A reading session on one mbox file (``IMailboxSession``); see the module docstring.

    ``store`` is the ``mailsvc.store.mbox.MboxStore``: its dot-lock and
    ``lockf`` helpers and ``lockTimeout`` are used, so that sessions and
    deliveries agree.
    """

    def __init__(self, store, path: str, fd: int, entries: list[_MboxEntry], parsedSize: int, inode: tuple) -> None:
        self.store = store
        self.path = path
        self._fd: int | None = fd
        self._entries = entries
        self._parsedSize = parsedSize
        self._inode = inode

    @classmethod
    def open(cls, store, mailbox: str) -> "MboxSession":
        """Lock the mbox of ``mailbox`` (made empty if missing) and parse it under the delivery locks."""
        path = os.path.join(store.path, checkName(mailbox))
        os.makedirs(store.path, mode=0o700, exist_ok=True)
        for _attempt in range(10):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                lockSession(fd, f"mailbox {mailbox}")
                st = os.fstat(fd)
                if _sameFile(st, os.stat(path)):
                    break  # not replaced by a commit between open and flock
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        else:
            raise OSError(errno.EAGAIN, "mailbox keeps changing", path)
        try:
            with _DeliveryLocks(store, path) as lockFd:
                if not _sameFile(os.fstat(lockFd), st):
                    raise OSError(errno.EAGAIN, "mailbox replaced while opening", path)
                size = os.fstat(fd).st_size
                entries = _parseMbox(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls(store, path, fd, entries, size, (st.st_dev, st.st_ino))

    # ------------------------------------------------------ IMailboxSession

    def list(self) -> list[MessageInfo]:
        return [entry.info for entry in self._entries]

    def read(self, index: int) -> BinaryIO:
        entry = self._entry(index)
        if self._fd is None:
            raise ValueError("the session is closed")
        return MboxMessageReader(self._fd, entry.bodyStart, entry.contentEnd)

    def markSeen(self, index: int) -> None:
        """mbox keeps no flags of ours: nothing to do."""
        self._entry(index)

    def delete(self, index: int) -> None:
        entry = self._entry(index)
        entry.info = dataclasses.replace(entry.info, deleted=True)

    def undelete(self) -> None:
        for entry in self._entries:
            entry.info = dataclasses.replace(entry.info, deleted=False)

    def commit(self) -> int:
        """Rewrite the file without the deleted messages (atomically); end the session."""
        deleted = [entry for entry in self._entries if entry.info.deleted]
        try:
            if deleted:
                self._rewrite()
        finally:
            self.close()
        return len(deleted)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    # ------------------------------------------------------ internals

    def _entry(self, index: int) -> _MboxEntry:
        if not 0 <= index < len(self._entries):
            raise IndexError(f"no message {index}")
        return self._entries[index]

    def _rewrite(self) -> None:
        directory, name = os.path.split(self.path)
        with _DeliveryLocks(self.store, self.path) as fd:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._inode or st.st_size < self._parsedSize or any(
                os.pread(fd, 5, entry.start) != b"From " for entry in self._entries
            ):
                raise OSError(errno.ESTALE, "the mailbox was changed by another program; nothing was removed", self.path)
            keep = []
            if self._entries and self._entries[0].start > 0:
                keep.append((0, self._entries[0].start))  # whatever precedes the first message
            keep.extend((entry.start, entry.end) for entry in self._entries if not entry.info.deleted)
            keep.append((self._parsedSize, st.st_size))  # mail delivered during the session
            temporary = os.path.join(directory, f".{name}.pop3.{os.getpid()}.tmp")
            out = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                try:
                    os.fchmod(out, st.st_mode & 0o7777)
                    for start, end in keep:
                        _copy(fd, out, start, end)
                    os.fsync(out)
                finally:
                    os.close(out)
                os.rename(temporary, self.path)
            except BaseException:
                try:
                    os.unlink(temporary)
                except OSError:
                    pass
                raise
            fsync_directory(directory)


class _DeliveryLocks:
    """The locks an mbox delivery takes (``MboxStore``): the dot-lock, then
    ``lockf`` on a descriptor of the file; yields that descriptor."""

    def __init__(self, store, path: str) -> None:
        self.store, self.path = store, path
        self.lockPath = path + ".lock"
        self.fd: int | None = None

    def __enter__(self) -> int:
        deadline = time.monotonic() + self.store.lockTimeout
        try:
            self.store._dotLock(self.lockPath, deadline)
        except TemporaryDeliveryError as e:
            raise OSError(errno.EAGAIN, e.text, self.path) from None
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                self.store._lockf(self.fd, self.path, deadline)
            except TemporaryDeliveryError as e:
                raise OSError(errno.EAGAIN, e.text, self.path) from None
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.fd

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases lockf
            self.fd = None
        try:
            os.unlink(self.lockPath)
        except OSError:
            pass


def _sameFile(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _copy(source: int, target: int, start: int, end: int) -> None:
    """Copy octets ``[start, end)`` of ``source`` to the end of ``target``."""
    while start < end:
        chunk = os.pread(source, min(CHUNK_SIZE, end - start), start)
        if not chunk:
            raise OSError(errno.EIO, "the mailbox is shorter than expected")
        writeAll(target, chunk)
        start += len(chunk)


def _lines(fd: int, size: int) -> Iterator[tuple[int, bytes]]:
    """``(offset, piece)`` for the first ``size`` octets of ``fd``: whole
    lines, or pieces of at most ``CHUNK_SIZE`` octets of longer ones."""
    with io.BufferedReader(io.FileIO(os.dup(fd), "rb"), CHUNK_SIZE) as f:
        position = 0
        while position < size:
            piece = f.readline(min(CHUNK_SIZE, size - position))
            if not piece:
                return
            yield position, piece
            position += len(piece)


class _MboxMessageBuilder:
    """Sizes and hashes one message as its (unquoted) pieces go by."""

    def __init__(self, start: int, bodyStart: int) -> None:
        self.start, self.bodyStart = start, bodyStart
        self.form = WireForm()
        self.size = 0
        self.hash = hashlib.sha256()

    def add(self, data: bytes) -> None:
        self.hash.update(data)
        self.size += len(self.form.feed(data))

    def finish(self, contentEnd: int, end: int, seen: dict[str, int]) -> _MboxEntry:
        self.size += len(self.form.end())
        uid = self.hash.hexdigest()[:32]
        count = seen.get(uid, 0)
        seen[uid] = count + 1
        if count:
            uid = f"{uid}-{count}"  # the same message twice: still unique
        return _MboxEntry(self.start, self.bodyStart, contentEnd, end, MessageInfo(uid, self.size))


def _parseMbox(fd: int, size: int) -> list[_MboxEntry]:
    """Every message in the first ``size`` octets of the mbox file ``fd``.

    A message starts at a line ``From ...`` (mboxrd quotes any such line in
    a message, so every one is a separator); its content ends before the
    empty line that precedes the next ``From `` line (or the end).
    """
    entries: list[_MboxEntry] = []
    seen: dict[str, int] = {}
    current: _MboxMessageBuilder | None = None
    atLineStart = True
    inFromLine = False
    blankAt: int | None = None  # offset of an empty line held back: the separator?

    def finish(end: int) -> None:
        if current is not None:
            entries.append(current.finish(blankAt if blankAt is not None else end, end, seen))

    for offset, piece in _lines(fd, size):
        if inFromLine:  # the rest of an over-long "From " line
            inFromLine = not piece.endswith(b"\n")
            if current is not None and not inFromLine:
                current.bodyStart = offset + len(piece)
            continue
        if atLineStart and piece.startswith(b"From "):
            finish(offset)
            blankAt = None
            current = _MboxMessageBuilder(offset, offset + len(piece))
            inFromLine = not piece.endswith(b"\n")
            continue
        if current is None:  # text before the first message: kept, never served
            atLineStart = piece.endswith(b"\n")
            continue
        if atLineStart and piece == b"\n":
            if blankAt is not None:
                current.add(b"\n")
            blankAt = offset
            continue
        if blankAt is not None:
            current.add(b"\n")
            blankAt = None
        if atLineStart and _QUOTED_FROM.match(piece):
            piece = piece[1:]
        current.add(piece)
        atLineStart = piece.endswith(b"\n")
    finish(size)
    return entries

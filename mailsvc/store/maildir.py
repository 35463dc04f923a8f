"""Maildir mailboxes: one file per message, no locks.

The layout and the delivery protocol follow https://cr.yp.to/proto/maildir.html:
a mailbox is ``<path>/<mailbox>/`` with ``tmp/``, ``new/`` and ``cur/``; a
message is written under a unique name in ``tmp/``, flushed to disk, then
linked into ``new/``, where readers (POP3, mail clients) find it. Files use LF
line ends, as Postfix local(8) writes them.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import BinaryIO

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailsvc.durable import Flush, OpenFile, Steps, run_steps
from mailsvc.errors import PermanentDeliveryError
from mailsvc.interfaces import IFlushingMailboxStore, IMailboxAccess, IMailboxStoreFactory
from mailsvc.store import (
    checkMailboxName,
    deliveryErrorFor,
    headerBytes,
    lfChunks,
    storePath,
    writeAll,
)
from mailsvc.spool.groupsync import DirectorySyncer
from mailsvc.store.maildir_access import MaildirSession

_SUBDIRS = ("tmp", "new", "cur")
# Octets copied between two turns given to other work (deliverSteps).
_TURN_EVERY = 1024 * 1024
# Errors of link(2) on file systems without hard links: fall back to rename(2).
_NO_LINK_ERRNOS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK})

_counter = itertools.count(1)
_counterLock = threading.Lock()
# os.getpid() is a system call; uniqueName asks for it at each delivery. The
# process id is kept, and forgotten in a child made by fork (which has its own).
_pid: int | None = None
# How a message file is made in tmp/: a new file, never through a symlink.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# MaildirStore keeps the paths of this many mailboxes at most (then starts over).
_MAX_KEPT_PATHS = 10_000

# Group commit (mailsvc.spool.groupsync): deliveries linking into new/ at
# the same moment share the fsync of that directory.
_newDirectories = DirectorySyncer()
# Maildirs known to have tmp/ new/ cur/: no stat of them per delivery. A
# maildir removed meanwhile is made again (see MaildirStore.deliver).
_madeMaildirs: set[str] = set()


def escapeHostname(hostname: str) -> str:
    """The host name as the last part of a Maildir file name.

    ``/`` and ``:`` cannot appear in it (``:`` starts the info part of names
    in ``cur/``), so they are written as ``\\057`` and ``\\072``.
    """
    return hostname.replace("/", "\\057").replace(":", "\\072")


def uniqueName(hostname: str, now: float | None = None) -> str:
    """A new unique Maildir file name: ``<sec>.M<usec>P<pid>Q<n>.<host>``.

    Seconds and microseconds of the time, the process id and a counter
    private to this process make the name unique on this host even for many
    deliveries in the same microsecond, from many threads.
    """
    if now is None:
        now = time.time()
    seconds = int(now)
    usec = int((now - seconds) * 1_000_000)
    with _counterLock:
        n = next(_counter)
    return f"{seconds}.M{usec}P{_pid or _processId()}Q{n}.{escapeHostname(hostname)}"


def _processId() -> int:
    """This process's id (``os.getpid()``), kept until a fork."""
    global _pid
    _pid = os.getpid()
    return _pid


def _forgetProcessId() -> None:
    global _pid
    _pid = None


os.register_at_fork(after_in_child=_forgetProcessId)


@implementer(IFlushingMailboxStore, IMailboxAccess)
class MaildirStore:
    """Maildir mailboxes under the directory ``path``, one per user.

    ``hostname`` goes in the unique file names (default: this host's name).
    """

    def __init__(self, path: str, hostname: str | None = None) -> None:
        self.path = path
        self.hostname = hostname if hostname is not None else socket.gethostname()
        # mailbox -> (its maildir, its tmp/ with a slash, its new/, that with
        # a slash): names checked and paths joined once, not per delivery.
        self._paths: dict[str, tuple[str, str, str, str]] = {}

    def open(self, mailbox: str) -> MaildirSession:
        """``IMailboxAccess``: a reading session (POP3) on ``mailbox``
        (``mailsvc.store.access.MaildirSession``)."""
        return MaildirSession.open(self.path, mailbox)

    def exists(self, mailbox: str) -> bool:
        """Whether the Maildir of ``mailbox`` has been created."""
        try:
            checkMailboxName(mailbox)
        except PermanentDeliveryError:
            return False
        return os.path.isdir(os.path.join(self.path, mailbox, "new"))

    def deliver(self, mailbox: str, headers: Sequence[str], source: BinaryIO) -> str:
        """Write one message into ``mailbox``'s ``new/``; return its path.

        ``headers`` come first, then ``source`` with CRLF turned into LF.
        The file is fsync'd, linked into ``new/``, and ``new/`` is fsync'd
        (by an fsync begun after the link, maybe shared with other
        deliveries) before this returns. On failure nothing stays in
        ``tmp/`` or ``new/``.
        """
        return run_steps(self.deliverSteps(mailbox, headers, source), syncer=_newDirectories)

    def deliverSteps(self, mailbox: str, headers: Sequence[str], source: BinaryIO) -> Steps[str]:
        """``IFlushingMailboxStore``: ``deliver`` as steps (``mailsvc.durable``),
        so that a ``FlushWorker`` shares fsyncs among deliveries. A big
        message yields an empty ``Flush`` after each MB copied: the steps
        run on the reactor thread, and other sessions get their turn."""
        paths = self._paths.get(mailbox) if type(mailbox) is str else None
        if paths is None:
            paths = self._pathsOf(mailbox)
        maildir, tmpPrefix, newDir, newPrefix = paths
        head = headerBytes(headers)
        if maildir not in _madeMaildirs:
            yield from self._createOrFail(maildir)
        name = uniqueName(self.hostname)
        tmpPath = tmpPrefix + name
        newPath = newPrefix + name
        created = linked = False
        try:
            # Making the file allocates an inode: the driver does it (a flush
            # worker, in its own thread: it can take a while).
            try:
                fd = yield OpenFile(tmpPath, _CREATE_FLAGS, 0o600)
            except FileNotFoundError:  # removed since we made it: make it again
                _madeMaildirs.discard(maildir)
                yield from self._createOrFail(maildir)
                fd = yield OpenFile(tmpPath, _CREATE_FLAGS, 0o600)
            created = True
            try:
                chunks = lfChunks(source)
                # The headers and the first chunk in one write: a small
                # message (one chunk) is written by one system call.
                first = next(chunks, b"")
                writeAll(fd, head + first)
                copied = len(first)
                for chunk in chunks:
                    writeAll(fd, chunk)
                    copied += len(chunk)
                    if copied >= _TURN_EVERY:
                        copied = 0
                        yield Flush()  # a big message: the other work gets a turn
                yield Flush(files=(fd,))
            finally:
                os.close(fd)
            self._link(tmpPath, newPath)
            linked = True
            yield Flush(directories=(newDir,))
        except BaseException as e:
            _madeMaildirs.discard(maildir)  # look again next time
            if linked:
                _removeQuietly(newPath)
            if isinstance(e, OSError):
                raise deliveryErrorFor(e, f"cannot deliver to {maildir}") from e
            raise
        finally:
            if created:
                _removeQuietly(tmpPath)
        return newPath

    def _pathsOf(self, mailbox: str) -> tuple[str, str, str, str]:
        """Check ``mailbox`` and make its paths (see ``__init__``); keep them."""
        checkMailboxName(mailbox)
        maildir = os.path.join(self.path, mailbox)
        newDir = os.path.join(maildir, "new")
        paths = (maildir, os.path.join(maildir, "tmp", ""), newDir, os.path.join(newDir, ""))
        if len(self._paths) >= _MAX_KEPT_PATHS:
            self._paths.clear()  # bounded memory, whatever names come
        self._paths[mailbox] = paths
        return paths

    def _createOrFail(self, maildir: str) -> Steps[None]:
        """Make ``maildir`` and its ``tmp/ new/ cur/`` (mode 0700) if missing,
        and flush the new entries (they must survive a crash as much as the
        message); then remember it. A DeliveryError if it cannot be made."""
        try:
            made = self._makeDirectories(maildir)
            if made:
                yield Flush(directories=(maildir, self.path))
        except OSError as e:
            raise deliveryErrorFor(e, f"cannot create maildir {maildir}") from e
        _madeMaildirs.add(maildir)

    def _makeDirectories(self, maildir: str) -> bool:
        """Make what is missing of ``maildir`` and its subdirectories; True
        if anything was missing."""
        if all(os.path.isdir(os.path.join(maildir, sub)) for sub in _SUBDIRS):
            return False
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        for directory in (maildir,) + tuple(os.path.join(maildir, sub) for sub in _SUBDIRS):
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                pass
        return True

    @staticmethod
    def _link(tmpPath: str, newPath: str) -> None:
        """Give the message its name in ``new/``, never replacing a file there."""
        try:
            os.link(tmpPath, newPath)
        except OSError as e:
            if e.errno not in _NO_LINK_ERRNOS or os.path.lexists(newPath):
                raise
            os.rename(tmpPath, newPath)


def _removeQuietly(path: str) -> None:
    """Remove ``path``; it may be gone already."""
    try:
        os.unlink(path)
    except OSError:
        pass


@implementer(IPlugin, IMailboxStoreFactory)
class MaildirStoreFactory:
    """The ``maildir`` store plugin. Options: ``path`` (absolute)."""

    name = "maildir"
    description = "Maildir mailboxes: <path>/<user>/{tmp,new,cur}, one file per message"

    def makeStore(self, options: Mapping[str, object]) -> MaildirStore:
        """A ``MaildirStore`` for the ``[store]`` options.

        :raise mailsvc.errors.ConfigError: unknown option or bad ``path``.
        """
        return MaildirStore(storePath(options, self.name, frozenset({"path"})))

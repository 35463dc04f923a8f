"""Reading a Maildir for POP3 (``IMailboxSession``): new/ to cur/, flags, removal.

See ``mailsvc.store.access`` for what the sessions promise."""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import stat
from dataclasses import dataclass
from typing import BinaryIO

from zope.interface import implementer

from mailsvc.durable import fsync_directory
from mailsvc.interfaces import IMailboxSession
from mailsvc.store.access import MessageInfo, checkName, lockSession, uidFor, wireSize
# ---------------------------------------------------------------- Maildir

_INFO_SIZES = re.compile(r",([SW])=(\d+)")
_ARRIVAL = re.compile(r"(\d+)\.(?:M(\d+))?")


@dataclass
class _MaildirEntry:
    base: str  # the unique part, with any ,S= and ,W= fields
    flags: str  # the letters after ":2,"
    info: MessageInfo
    order: tuple

    @property
    def name(self) -> str:
        return f"{self.base}:2,{self.flags}"


@implementer(IMailboxSession)
class MaildirSession:
    """A reading session on one Maildir (``IMailboxSession``); see the module docstring."""

    def __init__(self, maildir: str, lockFd: int, entries: list[_MaildirEntry]) -> None:
        self.maildir = maildir
        self._cur = os.path.join(maildir, "cur")
        self._lockFd: int | None = lockFd
        self._entries = entries

    @classmethod
    def open(cls, path: str, mailbox: str) -> "MaildirSession":
        """Lock ``<path>/<mailbox>`` (made if missing), move ``new/`` to ``cur/``, list ``cur/``."""
        maildir = os.path.join(path, checkName(mailbox))
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(maildir, sub), mode=0o700, exist_ok=True)
        fd = os.open(maildir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            lockSession(fd, f"mailbox {mailbox}")
            _moveNewToCur(maildir)
            entries = _listCur(os.path.join(maildir, "cur"))
        except BaseException:
            os.close(fd)
            raise
        return cls(maildir, fd, entries)

    # ------------------------------------------------------ IMailboxSession

    def list(self) -> list[MessageInfo]:
        return [entry.info for entry in self._entries]

    def read(self, index: int) -> BinaryIO:
        entry = self._entry(index)
        try:
            return open(self._path(entry), "rb")
        except FileNotFoundError:
            return open(self._find(entry), "rb")

    def markSeen(self, index: int) -> None:
        entry = self._entry(index)
        if "S" in entry.flags:
            return
        flags = "".join(sorted(set(entry.flags + "S")))
        old = self._path(entry)
        try:
            os.rename(old, os.path.join(self._cur, f"{entry.base}:2,{flags}"))
        except FileNotFoundError:
            os.rename(self._find(entry), os.path.join(self._cur, f"{entry.base}:2,{flags}"))
        entry.flags = flags

    def delete(self, index: int) -> None:
        entry = self._entry(index)
        entry.info = dataclasses.replace(entry.info, deleted=True)

    def undelete(self) -> None:
        for entry in self._entries:
            entry.info = dataclasses.replace(entry.info, deleted=False)

    def commit(self) -> int:
        """Unlink the deleted messages; fsync ``cur/``; end the session."""
        removed, failure = 0, None
        try:
            for entry in self._entries:
                if not entry.info.deleted:
                    continue
                try:
                    try:
                        os.unlink(self._path(entry))
                    except FileNotFoundError:
                        os.unlink(self._find(entry))
                    removed += 1
                except FileNotFoundError:
                    removed += 1  # someone else removed it already
                except OSError as e:
                    failure = failure or e
            if removed:
                fsync_directory(self._cur)
        finally:
            self.close()
        if failure is not None:
            raise failure
        return removed

    def close(self) -> None:
        fd, self._lockFd = self._lockFd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    # ------------------------------------------------------ internals

    def _entry(self, index: int) -> _MaildirEntry:
        if not 0 <= index < len(self._entries):
            raise IndexError(f"no message {index}")
        return self._entries[index]

    def _path(self, entry: _MaildirEntry) -> str:
        return os.path.join(self._cur, entry.name)

    def _find(self, entry: _MaildirEntry) -> str:
        """The message's file after another reader changed its flags (same unique part)."""
        prefix = entry.base + ":"
        for name in os.listdir(self._cur):
            if name.startswith(prefix):
                entry.flags = name.partition(":2,")[2]
                return os.path.join(self._cur, name)
        raise FileNotFoundError(errno.ENOENT, "message is gone", self._path(entry))


def _moveNewToCur(maildir: str) -> None:
    """Give every message of ``new/`` its sizes and the ``:2,`` info, in ``cur/``."""
    new, cur = os.path.join(maildir, "new"), os.path.join(maildir, "cur")
    moved = False
    for name in os.listdir(new):
        if name.startswith("."):
            continue
        source = os.path.join(new, name)
        base = name.partition(":")[0]
        try:
            with open(source, "rb") as f:
                st = os.fstat(f.fileno())
                if not _isRegular(st):
                    continue
                if ",W=" not in base:
                    if ",S=" not in base:
                        base += f",S={st.st_size}"
                    base += f",W={wireSize(f)}"
            os.rename(source, os.path.join(cur, f"{base}:2,"))
            moved = True
        except FileNotFoundError:
            continue  # taken by another reader meanwhile
    if moved:
        fsync_directory(cur)
        fsync_directory(new)


def _isRegular(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode)


def _listCur(cur: str) -> list[_MaildirEntry]:
    """The messages of ``cur/``, in arrival order."""
    entries = []
    for name in os.listdir(cur):
        if name.startswith("."):
            continue
        base, _, info = name.partition(":")
        flags = info[2:] if info.startswith("2,") else ""
        path = os.path.join(cur, name)
        sizes = dict(_INFO_SIZES.findall(base))
        try:
            st = os.stat(path)
            if not _isRegular(st):
                continue
            if "W" in sizes:
                size = int(sizes["W"])
            else:
                with open(path, "rb") as f:
                    size = wireSize(f)
        except FileNotFoundError:
            continue
        arrival = _ARRIVAL.match(base)
        order = (int(arrival[1]), int(arrival[2] or 0)) if arrival else (int(st.st_mtime), 0)
        uid = uidFor(_INFO_SIZES.sub("", base))
        entries.append(_MaildirEntry(base, flags, MessageInfo(uid, size), order + (base,)))
    entries.sort(key=lambda entry: entry.order)
    return entries

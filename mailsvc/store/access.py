"""The read side of the mailbox stores: ``IMailboxAccess`` sessions for POP3.

``MaildirStore.open`` and ``MboxStore.open`` return the sessions of
``mailsvc.store.maildir_access`` and ``mailsvc.store.mbox_access``
(``mailsvc.interfaces.IMailboxSession``); this module holds what they share. Like the stores, this module does
blocking I/O and knows nothing of POP3 or Twisted; the POP3 glue calls it in a
thread.

- **One session per mailbox.** The session lock is ``flock(2)`` (exclusive,
  non-blocking) on the Maildir directory or on the mbox file. It conflicts
  with any other session, in this process or another, and is released by the
  kernel if the process dies. Delivery takes no part in it: mail keeps
  arriving while a user reads (Maildir needs no lock; an mbox delivery takes
  the dot-lock and ``lockf``, which a session holds only for a moment).
- **Maildir** (https://cr.yp.to/proto/maildir.html): opening moves every
  message of ``new/`` to ``cur/``, named ``<unique>,S=<size>,W=<wire
  size>:2,`` (Dovecot's convention: later sessions read the size from the
  name). A retrieved message gets the ``S`` (seen) flag. ``commit`` unlinks
  the deleted ones. Nothing else is ever removed.
- **mbox**: opening parses the file once, under the delivery locks, and
  remembers where each message lies; messages appended later are not in the
  session but are kept. ``commit`` takes the locks again, checks the file is
  the one parsed, writes a copy without the deleted messages (new mail
  included), fsyncs it and renames it over the mailbox: all or nothing.
  (POSIX ``lockf`` locks belong to the process and go with any descriptor
  of the file being closed; our writers also hold the dot-lock, which is
  what keeps them apart inside one process.)
- **Wire form**: sizes count the octets a POP3 client gets before
  dot-stuffing: the stored LF line ends as CRLF (``WireForm``).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import re
from dataclasses import dataclass
from typing import BinaryIO


from mailsvc.errors import PermanentDeliveryError
from mailsvc.store import CHUNK_SIZE, checkMailboxName

class MailboxLocked(Exception):
    """Another session holds the mailbox (POP3: ``-ERR [IN-USE]``)."""


@dataclass(frozen=True)
class MessageInfo:
    """One message of a session: its UIDL id, its size in wire form, whether it is marked deleted."""

    uid: str
    size: int
    deleted: bool = False


# ---------------------------------------------------------------- wire form


class WireForm:
    """Stored text (LF line ends) to wire form (CRLF), chunk by chunk.

    Every LF becomes CRLF, except one already preceded by CR (so a store
    holding CRLF is not doubled); a bare CR is passed on as it is. A CR at
    the end of a chunk is held back until the next chunk shows what follows
    it, so output never ends in the middle of a CRLF.
    """

    def __init__(self) -> None:
        self._heldCR = False

    def feed(self, chunk: bytes) -> bytes:
        """The wire form of the next chunk."""
        if self._heldCR:
            chunk = b"\r" + chunk
            self._heldCR = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._heldCR = True
        return chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")

    def end(self) -> bytes:
        """What is still held at the end of the text."""
        held, self._heldCR = self._heldCR, False
        return b"\r" if held else b""


def wireSize(source: BinaryIO) -> int:
    """The size in wire form (CRLF) of what ``source`` reads, in octets."""
    form, size = WireForm(), 0
    while chunk := source.read(CHUNK_SIZE):
        size += len(form.feed(chunk))
    return size + len(form.end())


_UID_CHARS = re.compile(r"[\x21-\x7e]{1,70}\Z")


def uidFor(name: str) -> str:
    """A UIDL id for ``name`` (rfc1939 7: 1 to 70 characters 0x21-0x7E): the
    name itself when it fits, else a hash of it, the same in every session."""
    if _UID_CHARS.match(name):
        return name
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def lockSession(fd: int, what: str) -> None:
    """The session lock: exclusive ``flock`` on ``fd``, without waiting."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise MailboxLocked(f"{what} is in use by another session") from None
        raise


def checkName(mailbox: str) -> str:
    try:
        return checkMailboxName(mailbox)
    except PermanentDeliveryError as e:
        raise ValueError(e.text) from None

"""The durable queue on disk, UUCP style: a directory per next hop.

Layout under the spool directory::

    tmp/<id>.D          data being received (not yet committed)
    <hop>/D.<id>        the message data, exactly the octets received (CRLF)
    <hop>/C.<id>        its control file (mailsvc.spool.control); the commit point
    <hop>/C.<id>.tmp    a control file being written
    <hop>/H.<id>        the control file of a message on hold: kept, not delivered
    corrupt/<hop>.C.<id>  control files recovery could not use, kept for a person
    spent/S.*           removed files kept for reuse (mailsvc.spool.recycle);
                        a new data or control file is one of them when there
                        is one, written in place, then renamed to D./C.

A message routed to several hops has one data file hard-linked into each hop
directory and one control file per hop, holding that hop's recipients.

Holding a message (``mailsvc queue hold``) renames its ``C.`` to ``H.`` in
the same directory, so ``queued()`` no longer lists it; ``release`` renames it
back. Renames of control files are serialised by a lock, so an ``update``
racing a ``hold`` either lands before it or fails: it never brings back a
``C.`` beside an ``H.``.

rfc5321 6.1: once the server says 250 after the data, it has taken
responsibility for the message, so ``commit`` returns only when data,
control and directory entries are fsync'd; a crash at any moment leaves the
message either committed whole or not at all (``recover`` sweeps the rest).

Group commit: the commit is written as steps (``SpoolWriter.commit_steps``,
``mailsvc.durable``) that yield what must be on disk. The server runs them
through its flush worker (``mailsvc.flushworker``), where one fsync of a
directory serves every commit of the round; ``commit`` drives the same steps
in the calling thread, where the directory fsyncs are shared by the threads
committing at the same moment (``mailsvc.spool.groupsync``; ``update``
shares them too). Either way a commit waits for a directory fsync begun
after its renames.

``remove`` (every recipient done) does not fsync the directory: a crash
soon after may bring the message back, and it is delivered again. That is
at-least-once delivery, as DESIGN rule 1 allows and as Postfix does; the
next directory fsync of that hop (any commit) makes the removal durable
anyway. ``delete`` (a person's decision) does fsync.

Removed files are not deleted but kept in ``spent/`` and reused for new
data and control files (``mailsvc.spool.recycle``): no file is created or
deleted per message once the spool is warm.

Everything here is blocking; callers choose the thread. One process owns a
spool directory. The writer of a message being received is
``mailsvc.spool.writer.SpoolWriter``; queue ids and hop names are in
``mailsvc.spool.common``.
"""

from __future__ import annotations

import io
import logging
import os
import pathlib
import threading
import time
from collections.abc import Callable

from zope.interface import implementer

from mailsvc.durable import fsync_directory
from mailsvc.envelope import Envelope, QueuedMessage
from mailsvc.errors import SpoolError
from mailsvc.interfaces import ISpool
from mailsvc.spool import control
from mailsvc.spool.common import HOP_RE, ID_RE, RESERVED, check_hop, check_id, new_id, spool_error, unlink_quietly
from mailsvc.spool.groupsync import DirectorySyncer
from mailsvc.spool.recycle import LIMIT, SpentFiles
from mailsvc.spool.writer import SpoolWriter, open_control, write_all

__all__ = ["FileSpool", "SpoolWriter", "check_hop", "new_id"]

_BUFFER = 64 * 1024  # of the readers open() makes
_READ_WHOLE = 64 * 1024  # data files up to this size are read whole by open()


# ---------------------------------------------------------------- reading


class _PrefixedReader(io.RawIOBase):
    """Reads ``head`` then the whole of ``file``, without copying ``file``.

    Seekable, so a reader can learn the size (``seek(0, SEEK_END)``)
    without reading the data through."""

    def __init__(self, head: bytes, file: io.RawIOBase) -> None:
        super().__init__()
        self._head = io.BytesIO(head)
        self._head_size = len(head)
        self._file = file

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._head.readinto(buffer)
        if count:
            return count
        return self._file.readinto(buffer)

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._head.tell() + self._file.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self.tell()
        elif whence == io.SEEK_END:
            offset += self._head_size + os.fstat(self._file.fileno()).st_size
        elif whence != io.SEEK_SET:
            raise ValueError(f"invalid whence: {whence!r}")
        if offset < 0:
            raise ValueError(f"negative seek position {offset}")
        self._head.seek(min(offset, self._head_size))
        self._file.seek(max(offset - self._head_size, 0))
        return offset

    def close(self) -> None:
        if not self.closed:
            try:
                self._file.close()
            finally:
                super().close()


# ---------------------------------------------------------------- spool


@implementer(ISpool)
class FileSpool:
    """The UUCP-style spool in ``directory`` (created if missing).

    ``log`` receives one ``str`` per problem found in the spool (corrupt
    control files); by default they go to the stdlib logger of this module.
    """

    def __init__(
        self,
        directory: pathlib.Path,
        log: Callable[[str], None] | None = None,
        *,
        fsync: Callable[[int], None] | None = None,
        recycle: int = LIMIT,
    ) -> None:
        self.directory = pathlib.Path(directory)
        self._log = log or logging.getLogger(__name__).warning
        # fsync(fd) for files and directories; None: os.fsync, looked up at
        # each call. Tests pass an instrumented one.
        self._fsync = fsync
        self._syncer = DirectorySyncer(fsync)  # group commit of directory fsyncs
        self._tmp = os.fspath(self.directory / "tmp")
        self._hops: dict[str, str] = {}  # hop -> its directory, known to exist
        self._hop_names: dict[str, str] = {}  # hop -> its directory, name checked
        self._active: set[str] = set()  # ids being written or committed
        self._renaming = threading.RLock()  # C./H. renames: update, hold, release, delete
        (self.directory / "tmp").mkdir(mode=0o700, parents=True, exist_ok=True)
        # Removed files kept for reuse, at most ``recycle`` (0: none).
        self._spent = SpentFiles(self.directory / "spent", recycle)

    # -------------------------------------------------------- receiving

    def newMessage(self) -> SpoolWriter:
        """Begin a message. :raise SpoolError: its temp file cannot be made."""
        while True:
            id = new_id()
            self._active.add(id)
            try:
                return SpoolWriter(self, id)
            except FileExistsError:
                self._active.discard(id)
            except OSError as e:
                self._active.discard(id)
                raise spool_error("cannot start a message", e) from e

    # -------------------------------------------------------- reading

    def recover(self) -> list[QueuedMessage]:
        """Clean up after a crash; return every committed message, oldest first.

        Removes temporary files and data files without a control file (the
        crash came before the commit point). A control file without data,
        or one that cannot be read, is logged and moved to ``corrupt/``.
        Held messages (``H.`` and their ``D.``) are kept and not returned.
        Files of messages being received now by this spool are left alone.
        """
        # A message this spool is receiving or updating stays alone. Commit
        # makes its C. visible before it leaves _active, so "not active, then
        # no C." really is a data file without a commit point.
        active = self._active
        self._spent.load()  # before any reuse: drops files a crash left with two names
        mark = self._spent.mark()
        # Every directory is fsync'd at the end: what this pass removed, and
        # what the last run removed without making it durable, is gone for
        # good; then the spent files are ready for reuse (recycle).
        temp_dir = self.directory / "tmp"
        directories = [temp_dir]
        for entry in os.scandir(temp_dir):
            if entry.name.partition(".")[0] not in active:
                unlink_quietly(pathlib.Path(entry.path))
        messages = []
        for hop, hop_dir in self._hop_dirs():
            directories.append(hop_dir)
            controls, datas, temps = self._listing(hop_dir)
            held = self._held_ids(hop_dir)
            for name in temps:
                if name[2:].partition(".")[0] not in active:
                    unlink_quietly(hop_dir / name)
            # A held message (H.) keeps its data; it is not returned.
            for id in datas - controls - held:
                if id not in active and not self._has_control(hop_dir, id):
                    unlink_quietly(hop_dir / f"D.{id}")
            for id in sorted(held - datas):
                if not (hop_dir / f"D.{id}").exists():
                    self._log(f"spool: {hop}/H.{id} has no data file D.{id}; moved to corrupt/")
                    self._move_aside(hop, f"H.{id}")
            for id in sorted(controls):
                if id not in datas and not (hop_dir / f"D.{id}").exists():
                    self._log(f"spool: {hop}/C.{id} has no data file D.{id}; moved to corrupt/")
                    self._move_aside(hop, f"C.{id}")
                    continue
                try:
                    messages.append(self._load(hop, id))
                except FileNotFoundError:
                    continue
                except ValueError as e:
                    self._log(f"spool: {e}; moved to corrupt/ with its data")
                    self._move_aside(hop, f"C.{id}")
                    self._move_aside(hop, f"D.{id}")
        for path in directories:
            fsync_directory(path)
        self._spent.settled_all(mark)
        return sorted(messages, key=lambda m: (m.id, m.hop))

    def queued(self) -> list[QueuedMessage]:
        """Every committed message, oldest first; changes nothing.

        Unreadable control files are logged and skipped.
        """
        messages = []
        for hop, hop_dir in self._hop_dirs():
            controls, datas, _ = self._listing(hop_dir)
            for id in sorted(controls & datas):
                try:
                    messages.append(self._load(hop, id))
                except FileNotFoundError:
                    continue  # removed while we looked
                except ValueError as e:
                    self._log(f"spool: {e}")
        return sorted(messages, key=lambda m: (m.id, m.hop))

    def open(self, message: QueuedMessage) -> io.BufferedReader | io.BytesIO:
        """A binary file reading the prepend headers then the data: streamed,
        or read whole at once when the data is small (``_READ_WHOLE``: most
        messages; one read, not a chain of buffered reads). Seekable.

        :raise OSError: the data file cannot be opened.
        """
        path = f"{self._hop_path(message.hop)}/D.{check_id(message.id)}"
        headers = message.envelope.prepend_headers
        head = ("\r\n".join(headers) + "\r\n").encode("utf-8", "surrogateescape") if headers else b""
        data = open(path, "rb", buffering=0)
        try:
            size = os.fstat(data.fileno()).st_size
            if size <= _READ_WHOLE:  # committed data never changes: size is all of it
                parts = [head]
                while size > 0 and (part := data.read(size)):
                    parts.append(part)
                    size -= len(part)
                data.close()
                return io.BytesIO(b"".join(parts))
        except BaseException:
            data.close()
            raise
        return io.BufferedReader(_PrefixedReader(head, data), buffer_size=_BUFFER)

    # -------------------------------------------------------- changing

    def update(self, message: QueuedMessage) -> None:
        """Atomically replace the control file of ``message``.

        :raise SpoolError: it could not be written, or the message is no
            longer in the spool.
        """
        hop_dir = self._hop_dir(message.hop)
        final = hop_dir / f"C.{check_id(message.id)}"
        temp = hop_dir / f"C.{message.id}.tmp"
        with self._renaming:  # a held message (H.) is not brought back as C.
            if not final.exists():
                raise SpoolError(f"{message.hop}/C.{message.id} is not in the spool")
            self._active.add(message.id)  # recover() leaves the temp file alone
            mark = self._spent.mark()
            path = None
            try:
                fd, path, reused = open_control(os.fspath(temp), self._spent)
                try:
                    write_all(fd, control.dump(message), reused)
                    (self._fsync or os.fsync)(fd)
                finally:
                    os.close(fd)
                os.rename(path, final)
                self._spent.forget(path)
            except OSError as e:
                if path is not None:
                    unlink_quietly(path)
                    self._spent.forget(path)
                raise spool_error(f"cannot update {message.hop}/C.{message.id}", e) from e
            finally:
                self._active.discard(message.id)
        try:  # shared with the commits and updates in flight (group commit)
            self._syncer.sync([hop_dir])
        except OSError as e:
            raise spool_error(f"cannot update {message.hop}/C.{message.id}", e) from e
        self._spent.settled([os.fspath(hop_dir)], mark)

    # -------------------------------------------------------- spent files
    # Receiver processes write new messages; this process removes them: it
    # gives them the files it removed (mailsvc.receiverprocesses).

    def give_spent(self, count: int) -> list[str]:
        """Up to ``count`` removed files, ready for reuse, for a receiver
        process of this spool (``take_spent``): their names in ``spent/``."""
        return self._spent.give_away(count)

    def take_spent(self, names) -> int:
        """Files of ``spent/`` given by the main process become reusable here."""
        return self._spent.take_in(names)

    def spent_given_unused(self, names) -> list[str]:
        """Those of the spent file ``names`` given away (``give_spent``) that
        are still unused in ``spent/``."""
        return self._spent.still_spent(names)

    def take_back_spent(self, names) -> int:
        """Files given to a receiver process that ended and did not use them
        (still in ``spent/``) are ready here again; how many."""
        return self._spent.take_in(self._spent.still_spent(names))

    def spent_ready(self) -> int:
        """How many removed files are ready for reuse now."""
        return self._spent.ready()

    def spent_pending(self) -> int:
        """How many removed files wait for their removal to be durable."""
        return len(self._spent) - self._spent.ready()

    def settle_spent(self) -> None:
        """Blocking: fsync the directories removed files left, so that they
        are ready for reuse (their removal is durable: ``spool.recycle``).
        Needed where this process commits nothing itself to do it."""
        mark = self._spent.mark()
        directories = self._spent.pending_directories()
        for directory in directories:
            fsync_directory(directory, self._fsync)
        self._spent.settled(directories, mark)

    def remove(self, message: QueuedMessage) -> None:
        """Remove ``message``: its control file first (``C.``, or ``H.`` if it
        was put on hold meanwhile), then its data.

        The directory is not fsync'd (see the module docstring): after a
        crash the message may be back, and is delivered again (at least
        once, never lost).
        """
        hop_dir = self._hop_path(message.hop)
        id = check_id(message.id)
        try:
            with self._renaming:
                for names in ((f"C.{id}", f"H.{id}"), (f"D.{id}",)):
                    for name in names:
                        try:
                            # control files have one name and are small: no look needed
                            self._discard(f"{hop_dir}/{name}", check=name[0] == "D")
                            break
                        except FileNotFoundError:
                            pass
        except OSError as e:
            raise spool_error(f"cannot remove {message.hop}/{id}", e) from e

    # -------------------------------------------------------- queue control

    def held(self) -> list[QueuedMessage]:
        """Every message on hold (``H.`` with its ``D.``), oldest first; changes nothing."""
        messages = []
        for hop, hop_dir in self._hop_dirs():
            datas = self._listing(hop_dir)[1]
            for id in sorted(self._held_ids(hop_dir) & datas):
                try:
                    messages.append(self._load(hop, id, "H"))
                except FileNotFoundError:
                    continue  # released or deleted while we looked
                except ValueError as e:
                    self._log(f"spool: {e}")
        return sorted(messages, key=lambda m: (m.id, m.hop))

    def find(self, id: str) -> list[tuple[QueuedMessage, bool]]:
        """The message ``id`` in every hop that has it: ``(message, held)`` pairs.

        ``[]`` when no hop has it. :raise ValueError: ``id`` is not a queue ID.
        """
        check_id(id)
        found = []
        for hop, hop_dir in self._hop_dirs():
            for prefix in ("C", "H"):
                if (hop_dir / f"{prefix}.{id}").exists():
                    try:
                        found.append((self._load(hop, id, prefix), prefix == "H"))
                    except FileNotFoundError:
                        continue
                    except ValueError as e:
                        self._log(f"spool: {e}")
        return found

    def size(self, message: QueuedMessage) -> int:
        """Octets in the data file of ``message`` (0 if it is gone)."""
        try:
            return os.stat(self._hop_dir(message.hop) / f"D.{check_id(message.id)}").st_size
        except FileNotFoundError:
            return 0

    def hold(self, hop: str, id: str) -> None:
        """Put a queued message on hold: rename ``C.<id>`` to ``H.<id>``.

        :raise SpoolError: it is not queued in ``hop`` (or the rename failed).
        """
        self._rename_control(hop, id, "C", "H", "hold")

    def release(self, hop: str, id: str) -> QueuedMessage:
        """Take a message off hold (``H.<id>`` back to ``C.<id>``); return it.

        :raise SpoolError: it is not on hold in ``hop`` (or the rename failed).
        """
        self._rename_control(hop, id, "H", "C", "release")
        return self._load(hop, id)

    def delete(self, hop: str, id: str) -> None:
        """Remove a message, queued or held, whatever its recipients' state.

        :raise SpoolError: ``hop`` has no such message (or it cannot be removed).
        """
        hop_dir = self._hop_dir(hop)
        check_id(id)
        with self._renaming:
            if not self._has_control(hop_dir, id):
                raise SpoolError(f"{hop}/{id} is not in the spool")
            self.remove(QueuedMessage(hop=hop, id=id, envelope=Envelope(sender="", recipients=())))
        try:  # unlike a removal after delivery, a deletion is made durable
            self._syncer.sync([hop_dir])
        except OSError as e:
            raise spool_error(f"cannot delete {hop}/{id}", e) from e

    def _rename_control(self, hop: str, id: str, old: str, new: str, action: str) -> None:
        hop_dir = self._hop_dir(hop)
        source = hop_dir / f"{old}.{check_id(id)}"
        with self._renaming:
            if not source.exists():
                state = "queued" if old == "C" else "on hold"
                raise SpoolError(f"{hop}/{id} is not {state}")
            try:
                os.rename(source, hop_dir / f"{new}.{id}")
                fsync_directory(hop_dir)
            except OSError as e:
                raise spool_error(f"cannot {action} {hop}/{id}", e) from e

    # -------------------------------------------------------- helpers

    def _discard(self, path: str | pathlib.Path, check: bool = True) -> None:
        """Keep a file no longer needed for reuse, or delete it.

        A data file still linked into another hop is deleted (the other hop
        keeps the data). ``check=False``: ``path`` is known to be a small
        file with no other name. :raise FileNotFoundError: there is no ``path``.
        """
        if not self._spent.keep(path, check):
            os.unlink(path)

    def _hop_path(self, hop: str, create: bool = False) -> str:
        """The directory of ``hop`` as text, made if ``create`` (remembered once made)."""
        path = self._hops.get(hop)
        if path is None:
            if not create:
                # Its name checked once (another process may make it: the
                # receiver processes write, this one removes).
                path = self._hop_names.get(hop)
                if path is None:
                    if len(self._hop_names) >= 1024:
                        self._hop_names.clear()
                    path = self._hop_names[hop] = os.fspath(self._hop_dir(hop))
                return path
            path = self._hops[hop] = os.fspath(self._hop_dir(hop, create))
        return path

    def _hop_dir(self, hop: str, create: bool = False) -> pathlib.Path:
        path = self.directory / check_hop(hop)
        if create and not path.is_dir():
            path.mkdir(mode=0o700, exist_ok=True)
            fsync_directory(self.directory)
        return path

    def _hop_dirs(self) -> list[tuple[str, pathlib.Path]]:
        hops = []
        for entry in os.scandir(self.directory):
            name = entry.name
            if name.lower() not in RESERVED and HOP_RE.fullmatch(name) and entry.is_dir():
                hops.append((name, pathlib.Path(entry.path)))
        return sorted(hops)

    @staticmethod
    def _listing(hop_dir: pathlib.Path) -> tuple[set[str], set[str], list[str]]:
        """The ids with a C., the ids with a D., and the names of temp files."""
        controls, datas, temps = set(), set(), []
        for name in os.listdir(hop_dir):
            if name.endswith(".tmp"):
                temps.append(name)
            elif name[:2] in ("C.", "D.") and ID_RE.fullmatch(name[2:]):
                (controls if name[0] == "C" else datas).add(name[2:])
        return controls, datas, temps

    @staticmethod
    def _held_ids(hop_dir: pathlib.Path) -> set[str]:
        """The ids with an ``H.`` (held) control file."""
        return {
            name[2:] for name in os.listdir(hop_dir) if name.startswith("H.") and ID_RE.fullmatch(name[2:])
        }

    @staticmethod
    def _has_control(hop_dir: pathlib.Path, id: str) -> bool:
        return (hop_dir / f"C.{id}").exists() or (hop_dir / f"H.{id}").exists()

    def _load(self, hop: str, id: str, prefix: str = "C") -> QueuedMessage:
        data = (self.directory / hop / f"{prefix}.{id}").read_bytes()
        return control.load(data, hop, id)

    def _move_aside(self, hop: str, name: str) -> None:
        corrupt = self.directory / "corrupt"
        corrupt.mkdir(mode=0o700, exist_ok=True)
        target = corrupt / f"{hop}.{name}"
        if target.exists():
            target = corrupt / f"{hop}.{name}.{time.time_ns()}"
        try:
            os.rename(self.directory / hop / name, target)
        except FileNotFoundError:
            return
        fsync_directory(corrupt)
        fsync_directory(self.directory / hop)

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
spool directory.
"""

from __future__ import annotations

import errno
import io
import itertools
import logging
import os
import pathlib
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from zope.interface import implementer

from mailsvc.durable import Flush, Steps, fsync_directory, run_steps
from mailsvc.envelope import Envelope, QueuedMessage, Recipient
from mailsvc.errors import SpoolError
from mailsvc.interfaces import IMessageWriter, ISpool
from mailsvc.spool import control
from mailsvc.spool.groupsync import DirectorySyncer
from mailsvc.spool.recycle import LIMIT, SpentFiles

_HOP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_RESERVED = frozenset({"tmp", "corrupt", "spent"})
_FULL = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code)
_BUFFER = 64 * 1024
_READ_WHOLE = 64 * 1024  # data files up to this size are read whole by open()

# ---------------------------------------------------------------- names

_BASE32 = "0123456789abcdefghijklmnopqrstuv"  # base32hex, lower case: sorts as ASCII
_counter = itertools.count(secrets.randbelow(32**4))
_counter_lock = threading.Lock()


def _base32(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 32)
        digits.append(_BASE32[digit])
    return "".join(reversed(digits))


def new_id() -> str:
    """A fresh queue ID: 20 characters of ``[0-9a-v]``, sortable by time.

    Microseconds since the epoch (11 digits), then a per-process counter
    (4 digits, starting at random), then 25 random bits (5 digits): unique
    across restarts and across processes sharing a clock.
    """
    with _counter_lock:
        count = next(_counter) % 32**4
    return (
        _base32(time.time_ns() // 1000, 11) + _base32(count, 4) + _base32(secrets.randbits(25), 5)
    )


def check_hop(hop: str) -> str:
    """Return ``hop`` if it is safe as a directory name; raise ValueError if not.

    A hop name is 1-200 of letters, digits, ``.``, ``_`` and ``-``, starting
    with a letter or digit, and is not ``tmp``, ``corrupt`` or ``spent``.
    """
    if not isinstance(hop, str) or not _HOP_RE.fullmatch(hop) or hop.lower() in _RESERVED:
        raise ValueError(f"not a usable hop name: {hop!r}")
    return hop


def _check_id(id: str) -> str:
    if not isinstance(id, str) or not _ID_RE.fullmatch(id):
        raise ValueError(f"not a queue id: {id!r}")
    return id


# ---------------------------------------------------------------- file helpers


def _spool_error(text: str, error: OSError) -> SpoolError:
    return SpoolError(f"{text}: {error}", temporary_full=error.errno in _FULL)


def _open_control(temp: str, spent: SpentFiles) -> tuple[int, str, bool]:
    """Open a file to write a control file in: a ready spent one, written in
    place (``mailsvc.spool.recycle``), or else a new one at ``temp``. Its
    descriptor, its path, and True if it is a spent one."""
    taken = spent.open()
    if taken is not None:
        return taken[0], taken[1], True
    return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), temp, False


def _write_all(fd: int, data: bytes, recycled: bool) -> None:
    """Write ``data`` from offset 0 of ``fd``; cut a reused file to its length."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    if recycled:
        os.ftruncate(fd, len(data))  # nothing of the old content stays


def _unlink_quietly(path: pathlib.Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


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


# ---------------------------------------------------------------- writer


@implementer(IMessageWriter)
class SpoolWriter:
    """A message being received: streams its data to ``tmp/<id>.D``.

    Made by ``FileSpool.newMessage``; the data never sits whole in memory.
    """

    def __init__(self, spool: FileSpool, id: str) -> None:
        self.id = id
        self.size = 0
        self._spool = spool
        self._done = False
        # A ready spent file, written in place and cut to size at commit;
        # else a new file in tmp/.
        taken = spool._spent.open()
        self._recycled = taken is not None
        if taken is not None:
            fd, self._path = taken
        else:
            self._path = f"{spool._tmp}/{id}.D"  # paths as text: cheaper than pathlib here
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._file = open(fd, "wb", buffering=_BUFFER)

    def write(self, data: bytes) -> None:
        """Append ``data``. :raise SpoolError: it could not be written."""
        if self._done:
            raise ValueError(f"message {self.id} is already committed or aborted")
        try:
            self._file.write(data)
        except OSError as e:
            raise _spool_error(f"cannot write message {self.id}", e) from e
        self.size += memoryview(data).nbytes

    def commit(
        self, envelope: Envelope, routes: Mapping[str, Sequence[Recipient]]
    ) -> list[QueuedMessage]:
        """Make the message durable under every hop of ``routes``.

        Hops with no recipient are skipped. An ``envelope`` without
        ``received_at`` gets the current time. :raise SpoolError: nothing
        was committed and nothing is left behind.
        """
        return run_steps(self.commit_steps(envelope, routes), self._spool._fsync, self._spool._syncer)

    def commit_steps(
        self, envelope: Envelope, routes: Mapping[str, Sequence[Recipient]]
    ) -> Steps[list[QueuedMessage]]:
        """``commit`` as steps (``mailsvc.durable``): for a ``FlushWorker``,
        which shares the fsyncs of commits in flight together."""
        if self._done:
            raise ValueError(f"message {self.id} is already committed or aborted")
        hops = [(check_hop(hop), tuple(rcpts)) for hop, rcpts in routes.items() if rcpts]
        if not hops:
            raise ValueError(f"message {self.id} has no recipient to commit")
        if not envelope.received_at:
            envelope = envelope.evolve(received_at=time.time())
        messages = [
            QueuedMessage(hop=hop, id=self.id, envelope=envelope.evolve(recipients=rcpts))
            for hop, rcpts in hops
        ]
        written: list[str] = []  # removed in reverse order on failure
        try:
            yield from self._commit(messages, written)
        except OSError as e:
            self._undo(written)
            if e.errno == errno.ENOENT:
                self._spool._hops.clear()  # a hop directory removed behind our back?
            raise _spool_error(f"cannot commit message {self.id}", e) from e
        except BaseException:
            self._undo(written)
            raise
        finally:
            self._done = True
            self._spool._active.discard(self.id)
        return messages

    def _commit(self, messages: list[QueuedMessage], written: list[str]) -> Steps[None]:
        spool = self._spool
        spent = spool._spent
        self._file.flush()
        if self._recycled:
            os.ftruncate(self._file.fileno(), self.size)  # nothing of the old content stays
        dirs = [spool._hop_path(m.hop, create=True) for m in messages]
        controls = []  # (path written, final name, open descriptor, a spent file)
        try:
            for message, hop_dir in zip(messages, dirs):
                fd, path, reused = _open_control(f"{hop_dir}/C.{self.id}.tmp", spent)
                written.append(path)
                controls.append((path, f"{hop_dir}/C.{self.id}", fd, reused))
                _write_all(fd, control.dump(message), reused)
            first = f"{dirs[0]}/D.{self.id}"
            written.append(first)
            os.rename(self._path, first)  # no C. names it yet: a crash leaves no commit
            if self._recycled:
                spent.forget(self._path)
            for hop_dir in dirs[1:]:
                written.append(f"{hop_dir}/D.{self.id}")
                os.link(first, written[-1])
            # Data and control files are on disk, and so are the data's
            # directory entries, before any C. appears: a C. is the commit
            # point and must never name missing data. (The names the files
            # leave, in tmp/ or spent/, may come back after a crash beside
            # the new ones: recovery sweeps tmp/, and drops a spent name
            # with two links.)
            stage = dirs if self._recycled else [*dirs, spool._tmp]
            mark = spent.mark()
            yield Flush(files=[self._file.fileno(), *(c[2] for c in controls)], directories=stage)
            spent.settled(stage, mark)
        finally:
            self._file.close()
            for control_file in controls:
                os.close(control_file[2])
        for path, final, _, reused in controls:
            written.append(final)
            os.rename(path, final)
            if reused:
                spent.forget(path)
        mark = spent.mark()
        yield Flush(directories=dirs)  # the commit point is durable: 250 may be said
        spent.settled(dirs, mark)

    def _undo(self, written: list[str]) -> None:
        try:
            self._file.close()
        except OSError:
            pass
        for path in [*reversed(written), self._path]:
            _unlink_quietly(path)
            self._spool._spent.forget(path)  # spent files written in place are lost
        for path in {os.path.dirname(p) for p in [*written, self._path]}:
            try:
                fsync_directory(path)
            except OSError:
                pass

    def abort(self) -> None:
        """Remove what was written. Safe to call twice, or after commit (no-op)."""
        if self._done:
            return
        self._done = True
        self._spool._active.discard(self.id)
        try:
            self._file.close()
        except OSError:
            pass
        if self._recycled:
            self._spool._spent.release(self._path)  # a spent file it was, a spent file it stays
            return
        try:
            self._spool._discard(self._path)
        except FileNotFoundError:
            pass  # gone already: a commit that failed half-way moved it (recovery sweeps it)


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
                raise _spool_error("cannot start a message", e) from e

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
                _unlink_quietly(pathlib.Path(entry.path))
        messages = []
        for hop, hop_dir in self._hop_dirs():
            directories.append(hop_dir)
            controls, datas, temps = self._listing(hop_dir)
            held = self._held_ids(hop_dir)
            for name in temps:
                if name[2:].partition(".")[0] not in active:
                    _unlink_quietly(hop_dir / name)
            # A held message (H.) keeps its data; it is not returned.
            for id in datas - controls - held:
                if id not in active and not self._has_control(hop_dir, id):
                    _unlink_quietly(hop_dir / f"D.{id}")
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
        path = f"{self._hop_path(message.hop)}/D.{_check_id(message.id)}"
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
        final = hop_dir / f"C.{_check_id(message.id)}"
        temp = hop_dir / f"C.{message.id}.tmp"
        with self._renaming:  # a held message (H.) is not brought back as C.
            if not final.exists():
                raise SpoolError(f"{message.hop}/C.{message.id} is not in the spool")
            self._active.add(message.id)  # recover() leaves the temp file alone
            mark = self._spent.mark()
            path = None
            try:
                fd, path, reused = _open_control(os.fspath(temp), self._spent)
                try:
                    _write_all(fd, control.dump(message), reused)
                    (self._fsync or os.fsync)(fd)
                finally:
                    os.close(fd)
                os.rename(path, final)
                self._spent.forget(path)
            except OSError as e:
                if path is not None:
                    _unlink_quietly(path)
                    self._spent.forget(path)
                raise _spool_error(f"cannot update {message.hop}/C.{message.id}", e) from e
            finally:
                self._active.discard(message.id)
        try:  # shared with the commits and updates in flight (group commit)
            self._syncer.sync([hop_dir])
        except OSError as e:
            raise _spool_error(f"cannot update {message.hop}/C.{message.id}", e) from e
        self._spent.settled([os.fspath(hop_dir)], mark)

    def remove(self, message: QueuedMessage) -> None:
        """Remove ``message``: its control file first (``C.``, or ``H.`` if it
        was put on hold meanwhile), then its data.

        The directory is not fsync'd (see the module docstring): after a
        crash the message may be back, and is delivered again (at least
        once, never lost).
        """
        hop_dir = self._hop_path(message.hop)
        id = _check_id(message.id)
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
            raise _spool_error(f"cannot remove {message.hop}/{id}", e) from e

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
        _check_id(id)
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
            return os.stat(self._hop_dir(message.hop) / f"D.{_check_id(message.id)}").st_size
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
        _check_id(id)
        with self._renaming:
            if not self._has_control(hop_dir, id):
                raise SpoolError(f"{hop}/{id} is not in the spool")
            self.remove(QueuedMessage(hop=hop, id=id, envelope=Envelope(sender="", recipients=())))
        try:  # unlike a removal after delivery, a deletion is made durable
            self._syncer.sync([hop_dir])
        except OSError as e:
            raise _spool_error(f"cannot delete {hop}/{id}", e) from e

    def _rename_control(self, hop: str, id: str, old: str, new: str, action: str) -> None:
        hop_dir = self._hop_dir(hop)
        source = hop_dir / f"{old}.{_check_id(id)}"
        with self._renaming:
            if not source.exists():
                state = "queued" if old == "C" else "on hold"
                raise SpoolError(f"{hop}/{id} is not {state}")
            try:
                os.rename(source, hop_dir / f"{new}.{id}")
                fsync_directory(hop_dir)
            except OSError as e:
                raise _spool_error(f"cannot {action} {hop}/{id}", e) from e

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
            path = os.fspath(self._hop_dir(hop, create))
            if create:
                self._hops[hop] = path
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
            if name.lower() not in _RESERVED and _HOP_RE.fullmatch(name) and entry.is_dir():
                hops.append((name, pathlib.Path(entry.path)))
        return sorted(hops)

    @staticmethod
    def _listing(hop_dir: pathlib.Path) -> tuple[set[str], set[str], list[str]]:
        """The ids with a C., the ids with a D., and the names of temp files."""
        controls, datas, temps = set(), set(), []
        for name in os.listdir(hop_dir):
            if name.endswith(".tmp"):
                temps.append(name)
            elif name[:2] in ("C.", "D.") and _ID_RE.fullmatch(name[2:]):
                (controls if name[0] == "C" else datas).add(name[2:])
        return controls, datas, temps

    @staticmethod
    def _held_ids(hop_dir: pathlib.Path) -> set[str]:
        """The ids with an ``H.`` (held) control file."""
        return {
            name[2:] for name in os.listdir(hop_dir) if name.startswith("H.") and _ID_RE.fullmatch(name[2:])
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

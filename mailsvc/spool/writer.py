"""A message being received into the spool: ``SpoolWriter``, made by
``FileSpool.newMessage``.

The data streams to a spent file written in place (``mailsvc.spool.recycle``)
or to ``tmp/<id>.D``; ``commit_steps`` makes it durable under every hop of
its routes (the commit protocol is described in ``mailsvc.spool.filespool``).
Blocking; no Twisted.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from zope.interface import implementer

from mailsvc.durable import Flush, Steps, fsync_directory, run_steps
from mailsvc.envelope import Envelope, QueuedMessage, Recipient
from mailsvc.interfaces import IMessageWriter
from mailsvc.spool import control
from mailsvc.spool.common import check_hop, spool_error, unlink_quietly
from mailsvc.spool.recycle import SpentFiles

if TYPE_CHECKING:
    from mailsvc.spool.filespool import FileSpool

BUFFER = 64 * 1024  # of the writer's file object


def open_control(temp: str, spent: SpentFiles) -> tuple[int, str, bool]:
    """Open a file to write a control file in: a ready spent one, written in
    place (``mailsvc.spool.recycle``), or else a new one at ``temp``. Its
    descriptor, its path, and True if it is a spent one."""
    taken = spent.open()
    if taken is not None:
        return taken[0], taken[1], True
    return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), temp, False


def write_all(fd: int, data: bytes, recycled: bool) -> None:
    """Write ``data`` from offset 0 of ``fd``; cut a reused file to its length."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    if recycled:
        os.ftruncate(fd, len(data))  # nothing of the old content stays


@implementer(IMessageWriter)
class SpoolWriter:
    """A message being received: streams its data to a ready spent file,
    written in place, or else to a new ``tmp/<id>.D``.

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
        self._file = open(fd, "wb", buffering=BUFFER)

    def write(self, data: bytes) -> None:
        """Append ``data``. :raise SpoolError: it could not be written."""
        if self._done:
            raise ValueError(f"message {self.id} is already committed or aborted")
        try:
            self._file.write(data)
        except OSError as e:
            raise spool_error(f"cannot write message {self.id}", e) from e
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
            raise spool_error(f"cannot commit message {self.id}", e) from e
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
                fd, path, reused = open_control(f"{hop_dir}/C.{self.id}.tmp", spent)
                written.append(path)
                controls.append((path, f"{hop_dir}/C.{self.id}", fd, reused))
                write_all(fd, control.dump(message), reused)
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
            unlink_quietly(path)
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

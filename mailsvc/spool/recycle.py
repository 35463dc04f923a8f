"""Spent spool files kept for reuse, so a busy spool neither creates nor
deletes a file per message.

Why: every message used to cost the spool two new files (its data and its
control file) and, once delivered, two deletions. Creating a file allocates
an inode and deleting one frees it with its data blocks; on ext4 without a
journal (the benchmark machine) each allocation also scans past every inode
of the block group freed in the last minutes, so a create, write and unlink
of a small file took 0.4-0.5 ms of CPU there against 0.05 ms to rename a
spent file into place and overwrite it (bench/RESULTS.md; about a third of
the server's CPU went to ``ext4_create``).

So a removed control or data file is renamed into ``spent/`` (when it is
small, not shared with another hop, and the pool has room) instead of
being unlinked. A new data or control file is a spent one, written in place
under its name in ``spent/`` from offset 0 and cut to the length written
(``ftruncate``), then renamed to its name in the spool when it is complete:
one rename per file, and nothing of the old content remains.

Crash safety, the two old names of a reused file:

* Its name before it was spent (``<hop>/D.<id>`` of a delivered message):
  a removal is not made durable at once (delivery is at-least-once), so
  after a crash that name may come back, with its control file. If the file
  had been overwritten by then, the old message would come back holding
  another one's octets. So a kept file is *pending* until a directory fsync
  of its old directory has begun after it was kept (``settled``: every
  commit fsyncs its hop directories, so under load that is the next round);
  only then is it ready to be taken. ``load`` (at start) makes every file
  pending until the spool's recovery has fsync'd every directory
  (``settled_all``).
* Its name in ``spent/``: leaving ``spent/`` is not made durable either, so
  a crash may leave a committed file under its spool name and in ``spent/``
  (two links). ``load`` drops every spent file with more than one link, and
  anything that is not a small regular file.

Blocking, thread-safe. One process owns a spool and is the only one to take
spent files; other processes (the ``mailsvc queue`` command) may add to
``spent/`` too: names are unique. With receiver processes, the owner gives
ready files away to them (``give_away``, ``take_in``): a name is given once,
and a receiver only takes what it was given.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import secrets
import stat
import threading
from collections.abc import Iterable

from mailsvc.spool.common import unlink_quietly

LIMIT = 1024  # spent files kept at most
MAX_SIZE = 64 * 1024  # larger files are deleted: their blocks are better freed

_counter = itertools.count()
_OPEN_IN_PLACE = os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW


class SpentFiles:
    """The pool of spent files in ``directory`` (``<spool>/spent``).

    :param limit: the most files kept; 0 keeps none (every removal unlinks).
    """

    def __init__(self, directory: pathlib.Path, limit: int = LIMIT) -> None:
        self.directory = pathlib.Path(directory)
        self._dir = os.fspath(directory) + os.sep  # names are joined to it as text
        self.limit = limit
        self._ready: list[str] = []  # names that may be taken
        # (sequence number, name, directory it left; None: any) of files kept
        # before a directory fsync made their leaving durable
        self._pending: list[tuple[int, str, str | None]] = []
        self._kept = 0  # sequence number of the next file kept
        self._busy: set[str] = set()  # taken: being written in place
        self._lock = threading.Lock()
        self._prefix = f"S.{os.getpid()}.{secrets.token_hex(4)}."
        self._made = False  # directory made (at the first keep: reading a spool makes nothing)

    def __len__(self) -> int:
        with self._lock:
            return len(self._ready) + len(self._pending)

    def load(self) -> None:
        """Read ``directory`` afresh (on recovery): keep each small regular
        file with one link, up to ``limit``, as pending until ``settled_all``;
        delete the other files. Files taken now are left alone."""
        keep: list[str] = []
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            entries = []
        with self._lock:
            busy = set(self._busy)
        for entry in entries:
            if entry.name in busy:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                continue  # not ours: left alone, never used
            if len(keep) < self.limit and stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size <= MAX_SIZE:
                keep.append(entry.name)
            else:
                unlink_quietly(entry.path)
        with self._lock:
            self._ready = []
            self._pending = [(self._kept, name, None) for name in keep]
            self._kept += 1

    def open(self) -> tuple[int, str] | None:
        """Take a ready spent file and open it for writing in place, at
        offset 0: its descriptor and path; None if none is ready.

        The caller writes it whole, cuts it to the length written, and then
        renames it away (``forget``) or gives it back (``release``).
        :raise OSError: it could not be opened for another reason than
            being gone (then it is no longer in the pool).
        """
        while True:
            with self._lock:
                if not self._ready:
                    return None
                name = self._ready.pop()
                self._busy.add(name)
            path = self._dir + name
            try:
                return os.open(path, _OPEN_IN_PLACE), path
            except FileNotFoundError:
                self.forget(path)  # removed behind our back: try the next one
            except OSError:
                self.forget(path)
                raise

    def release(self, path: str) -> None:
        """Give back a file taken with ``open`` and not renamed away: it
        never had another name since, so it is ready at once."""
        name = os.path.basename(path)
        with self._lock:
            if name in self._busy:
                self._busy.discard(name)
                self._ready.append(name)

    def forget(self, path: str) -> None:
        """A file taken with ``open`` is no longer the pool's (renamed away, deleted)."""
        with self._lock:
            self._busy.discard(os.path.basename(path))

    def keep(self, path: str | pathlib.Path, check: bool = True) -> bool:
        """Move the spent file ``path`` into the pool if it is small, has no
        other name and the pool has room; False: the caller deletes it.
        It is pending until its directory is ``settled``.

        ``check=False`` skips the look at the file, for one known to be a
        small regular file with one name (a control file).

        :raise FileNotFoundError: there is no ``path``.
        """
        if not self.limit:
            return False
        if check:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size > MAX_SIZE:
                return False
        with self._lock:
            if len(self._ready) + len(self._pending) >= self.limit:
                return False
            name = f"{self._prefix}{next(_counter)}"
        if not self._made:
            self.directory.mkdir(mode=0o700, exist_ok=True)
            self._made = True
        path = os.fspath(path)
        os.rename(path, self._dir + name)
        with self._lock:
            self._pending.append((self._kept, name, os.path.dirname(path)))
            self._kept += 1
        return True

    def mark(self) -> int:
        """Where the pool stands: pass it to ``settled`` after a directory
        fsync begun after this call."""
        with self._lock:
            return self._kept

    def settled(self, directories: Iterable[str], mark: int) -> None:
        """``directories`` were fsync'd by an fsync begun after ``mark``:
        files kept from them before ``mark`` are ready."""
        directories = set(directories)
        with self._lock:
            if not self._pending:
                return
            still = []
            for entry in self._pending:
                seq, name, source = entry
                if seq < mark and source in directories:
                    self._ready.append(name)
                else:
                    still.append(entry)
            self._pending = still

    def give_away(self, count: int) -> list[str]:
        """Up to ``count`` ready files leave the pool: their names, for
        another process of the spool to ``take_in`` (``mailsvc.receiverprocesses``).
        Each name is given once; what becomes of it is no longer this pool's."""
        with self._lock:
            given = self._ready[-count:] if count > 0 else []
            del self._ready[len(self._ready) - len(given):]
        return given

    def take_in(self, names: Iterable[str]) -> int:
        """Files of this spool's ``spent/`` given by the process that kept
        them (``give_away``: ready, their removal durable) become ready here.
        Names with a path in them are ignored. Returns how many were taken."""
        names = [n for n in names if n and os.sep not in n and n not in (".", "..")]
        with self._lock:
            self._ready.extend(names)
        return len(names)

    def still_spent(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` (given away) that are still in ``spent/``: not
        used by the process they were given to, since a file it used was
        renamed away, and names are never used again. Blocking (a stat each)."""
        return [n for n in names if n and os.sep not in n and os.path.lexists(self._dir + n)]

    def ready(self) -> int:
        """How many files may be taken now."""
        with self._lock:
            return len(self._ready)

    def pending_directories(self) -> set[str]:
        """The directories that pending files left (to fsync, then ``settled``)."""
        with self._lock:
            return {source for _, _, source in self._pending if source is not None}

    def settled_all(self, mark: int) -> None:
        """Every directory of the spool was fsync'd after ``mark``: every
        file kept before it is ready."""
        with self._lock:
            self._ready.extend(name for seq, name, _ in self._pending if seq < mark)
            self._pending = [entry for entry in self._pending if entry[0] >= mark]

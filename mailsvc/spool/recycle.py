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
being unlinked, and a new data or control file is a spent one renamed to
its new name and overwritten from offset 0; the writer then cuts it to the
length written (``ftruncate``), so nothing of the old content remains. A
file is never written in place while it has another name.

Crash safety: a name taken from ``spent/`` must not come back after a crash
beside the name the file was given, or the next reuse would overwrite a
committed message. So a commit that took a spent file has ``spent/``
fsync'd together with its hop directories before its control file appears
(``SpoolWriter._commit``). A removal is not made durable (delivery is
at-least-once), so a crash may leave a delivered message's file under both
names: ``load`` (on recovery) drops every spent file with more than one
link, and anything that is not a small regular file.

Blocking, thread-safe. One process owns a spool; other processes (the
``mailsvc queue`` command) may add to ``spent/`` too: names are unique.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import secrets
import stat
import threading

LIMIT = 1024  # spent files kept at most
MAX_SIZE = 64 * 1024  # larger files are deleted: their blocks are better freed

_counter = itertools.count()


class SpentFiles:
    """The pool of spent files in ``directory`` (``<spool>/spent``).

    :param limit: the most files kept; 0 keeps none (every removal unlinks).
    """

    def __init__(self, directory: pathlib.Path, limit: int = LIMIT) -> None:
        self.directory = pathlib.Path(directory)
        self._dir = os.fspath(directory) + os.sep  # names are joined to it as text
        self.limit = limit
        self._names: list[str] = []  # files in directory this process may take
        self._lock = threading.Lock()
        self._prefix = f"S.{os.getpid()}.{secrets.token_hex(4)}."
        self._made = False  # directory made (at the first keep: reading a spool makes nothing)

    def __len__(self) -> int:
        with self._lock:
            return len(self._names)

    def load(self) -> None:
        """Read ``directory`` afresh (on recovery): keep each small regular
        file with one link, up to ``limit``; delete the other files."""
        keep: list[str] = []
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                continue  # not ours: left alone, never used
            if len(keep) < self.limit and stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size <= MAX_SIZE:
                keep.append(entry.name)
            else:
                _unlink_quietly(entry.path)
        with self._lock:
            self._names = keep

    def take(self, path: str | pathlib.Path) -> bool:
        """Rename a spent file to ``path`` (a fresh name); False if there is none.

        The caller overwrites it from offset 0 and truncates it to its new
        length. :raise OSError: the rename failed for another reason than
        the spent file being gone.
        """
        while True:
            with self._lock:
                if not self._names:
                    return False
                name = self._names.pop()
            try:
                os.rename(self._dir + name, path)
                return True
            except FileNotFoundError:
                continue  # removed behind our back: try the next one

    def keep(self, path: str | pathlib.Path, check: bool = True) -> bool:
        """Move the spent file ``path`` into the pool if it is small, has no
        other name and the pool has room; False: the caller deletes it.

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
            if len(self._names) >= self.limit:
                return False
            name = f"{self._prefix}{next(_counter)}"
        if not self._made:
            self.directory.mkdir(mode=0o700, exist_ok=True)
            self._made = True
        os.rename(path, self._dir + name)
        with self._lock:
            self._names.append(name)
        return True


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

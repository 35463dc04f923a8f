"""Durable file work written as steps, so that many callers can share fsyncs.

The spool's commit and the Maildir delivery each wait for the disk two or
three times (their files, then the directory entries that name them). Written
as a plain blocking function, each caller waits alone, in a thread of its
own. Written as *steps*, a generator that ``yield``\\s a ``Flush`` each time it
needs files or directories on stable storage, the waiting is left to a
driver, which may do it for many callers at once:

* ``run_steps`` (here) drives one generator in the calling thread: each
  ``Flush`` is done at once (directories through a ``DirectorySyncer`` when
  given one, so concurrent threads still share them). Blocking.
* ``mailsvc.flushworker.FlushWorker`` advances the steps on the reactor
  thread and hands their flushes to one thread, in rounds: each round
  fsyncs each file and each directory named in it once, then the jobs
  resume (group commit, as a database does it).

A step generator is resumed with ``None`` once its ``Flush`` is done, or has
the ``OSError`` of a failed fsync of one of *its* files or directories thrown
in at its ``yield``; its return value is the result of the whole job. A step
may also yield an ``OpenFile``: the driver opens the file (making one can be
slow) and resumes the step with the descriptor.

No Twisted here: the stores use this module too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterable
from typing import TypeVar

T = TypeVar("T")

_DIRECTORY_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


class Flush:
    """What a step waits for: ``files`` (open file descriptors) and
    ``directories`` (paths) flushed to stable storage by fsyncs begun after
    the ``yield``. An empty one only gives other work a turn (a long copy
    yields one now and then)."""

    __slots__ = ("files", "directories")

    def __init__(self, files: Iterable[int] = (), directories: Iterable[str] = ()) -> None:
        self.files = tuple(files)
        self.directories = tuple(directories)

    def __repr__(self) -> str:
        return f"Flush(files={self.files!r}, directories={self.directories!r})"


class OpenFile:
    """What a step asks for: ``os.open(path, flags, mode)`` done by the
    driver; the step is resumed with the descriptor (or has the ``OSError``
    thrown in). For opens that may be slow: making a file allocates an inode
    (on ext4 without a journal that scans past every inode freed in the last
    minutes: ~0.8 ms on the benchmark machine), which a ``FlushWorker`` does
    in its own thread, off the reactor."""

    __slots__ = ("path", "flags", "mode")

    def __init__(self, path: str, flags: int, mode: int = 0o600) -> None:
        self.path = path
        self.flags = flags
        self.mode = mode

    def __repr__(self) -> str:
        return f"OpenFile({self.path!r}, {self.flags:#o}, {self.mode:#o})"


Steps = Generator["Flush | OpenFile", object, T]


def fsync_directory(path: str, fsync: Callable[[int], None] | None = None) -> None:
    """fsync the directory ``path`` (``fsync`` defaults to ``os.fsync``, looked up per call)."""
    fd = os.open(path, _DIRECTORY_FLAGS)
    try:
        (fsync or os.fsync)(fd)
    finally:
        os.close(fd)


def run_steps(steps: Steps[T], fsync: Callable[[int], None] | None = None, syncer=None) -> T:
    """Drive ``steps`` to its end in this thread; return its result.

    Each ``Flush`` is done at once: its files fsync'd one by one, then its
    directories (by ``syncer.sync``, a ``mailsvc.spool.groupsync.
    DirectorySyncer``, when given: shared with other threads). A failed fsync
    (any exception) is thrown into the generator, so that it cleans up;
    whatever it raises is raised here.
    """
    error: BaseException | None = None
    value = None
    while True:
        try:
            flush = steps.send(value) if error is None else steps.throw(error)
        except StopIteration as done:
            return done.value
        error = value = None
        if isinstance(flush, OpenFile):
            try:
                value = os.open(flush.path, flush.flags, flush.mode)
            except Exception as e:
                error = e
            continue
        try:
            for fd in flush.files:
                (fsync or os.fsync)(fd)
            if flush.directories:
                if syncer is not None:
                    syncer.sync(flush.directories)
                else:
                    for directory in flush.directories:
                        fsync_directory(directory, fsync)
        except Exception as e:
            error = e


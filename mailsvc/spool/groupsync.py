"""Group commit of directory fsyncs: concurrent callers share each fsync.

A new name in a directory (a rename, a link) survives a crash only once the
directory itself is fsync'd. When many threads commit at once, each used to
fsync the same directory on its own; here they share: ``sync(dirs)`` waits
for an fsync of each directory that *began after the call*, so it covers
every entry the caller made there before calling, and one fsync covers every
caller that was waiting when it began.

There is no timer. The first caller to find no round running runs one at
once, on its own thread, for itself and everyone already waiting (a lone
caller is never delayed); callers arriving while a round runs wait for the
next round, which the first of them to wake runs for all of them. So batches
form only while an fsync is in progress, as in a database's group commit,
and a busy spool does one fsync per directory per round instead of one per
caller.

A failed fsync fails every caller of that round that named the directory
(each gets its own ``OSError``); callers of the round that named only other
directories are not affected. Everything here is blocking.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable

from mailsvc.durable import fsync_directory

__all__ = ["DirectorySyncer", "fsync_directory"]


class _Request:
    """One caller of ``sync``: what it waits for, and its own wake-up lock
    (held until the caller is done or is to lead the next round)."""

    __slots__ = ("directories", "done", "error", "lead", "wake")

    def __init__(self, directories: frozenset[str]) -> None:
        self.directories = directories
        self.done = False
        self.lead = False
        self.error: BaseException | None = None
        self.wake = threading.Lock()
        self.wake.acquire()


class DirectorySyncer:
    """Makes directory entries durable, one fsync per directory per round,
    shared by every caller waiting when the round begins.

    :param fsync: called with the file descriptor of each directory to
        flush; default ``os.fsync`` (looked up at each call). Tests pass an
        instrumented one.

    ``rounds`` and ``requests`` count the rounds run and the ``sync`` calls
    served (for tests and benchmarks: requests / rounds is the batch size).

    Each waiting caller sleeps on a lock of its own and is woken once: when
    its round is over, or to lead the next round (the first caller waiting
    when a round ends leads the next). No caller is woken for nothing.
    """

    def __init__(self, fsync: Callable[[int], None] | None = None) -> None:
        self._fsync = fsync
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._running = False  # a round is running, or its leader is being woken
        self.rounds = 0
        self.requests = 0

    @property
    def waiting(self) -> int:
        """Callers waiting for a round that has not begun yet."""
        with self._lock:
            return len(self._pending)

    def sync(self, directories: Iterable[str | os.PathLike]) -> None:
        """Return once each of ``directories`` was fsync'd by an fsync begun
        after this call. :raise OSError: the fsync (or the open) of one of
        them failed in that round."""
        request = _Request(frozenset(os.fspath(d) for d in directories))
        if not request.directories:
            return
        with self._lock:
            self._pending.append(request)
            request.lead = not self._running
            self._running = True
        if not request.lead:
            request.wake.acquire()  # until our round is over, or we are to lead
        if not request.done:
            self._lead()
        if request.error is not None:
            raise request.error

    def _lead(self) -> None:
        """Run one round for every request pending now (the leader's among
        them), wake them, and hand the lead to the first caller waiting."""
        with self._lock:
            batch, self._pending = self._pending, []
        try:
            failures = self._round(batch)
        except BaseException as error:  # not an OSError of one directory: fail them all
            failures = {d: error for request in batch for d in request.directories}
            raise
        finally:
            with self._lock:
                self.rounds += 1
                self.requests += len(batch)
                successor = self._pending[0] if self._pending else None
                self._running = successor is not None
            for request in batch:
                for directory in sorted(request.directories):
                    if directory in failures:
                        request.error = _copy(failures[directory])
                        break
                request.done = True
                if not request.lead:
                    request.wake.release()
            if successor is not None:
                successor.lead = True
                successor.wake.release()

    def _round(self, batch: list[_Request]) -> dict[str, BaseException]:
        """fsync each directory named in ``batch`` once; return the failures."""
        failures: dict[str, BaseException] = {}
        for directory in sorted(set().union(*(r.directories for r in batch))):
            try:
                fsync_directory(directory, self._fsync)
            except OSError as error:
                failures[directory] = error
        return failures


def _copy(error: BaseException) -> BaseException:
    """A fresh exception per waiting caller: raising one object in several
    threads would tangle their tracebacks."""
    if isinstance(error, OSError):
        if error.errno is not None and error.filename is not None:
            return type(error)(error.errno, error.strerror, error.filename)
        return type(error)(*error.args)
    return RuntimeError(f"directory sync failed: {error!r}")

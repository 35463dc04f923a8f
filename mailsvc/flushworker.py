"""One thread for the durable file work of the spool and the Maildir store.

Jobs are step generators (``mailsvc.durable``): the spool's commit, a Maildir
delivery, a removal. ``FlushWorker.submit(steps)`` returns a Deferred of the
job's result. The worker thread runs in rounds:

1. take every job submitted since the last round;
2. advance each new or resumed job to its next ``Flush`` (its file work:
   writes, renames, links; a few tens of microseconds);
3. fsync every file named in the round, then every directory named in the
   round, each once: one directory fsync serves every job of the round that
   made an entry there (group commit);
4. resume those jobs in the next round, with the ``OSError`` of a failed
   fsync of one of their own files or directories thrown in;
5. hand the finished jobs' results to the reactor thread with one
   ``callFromThread`` for the whole round.

There is no timer: a lone job is never delayed, and batches form while a
round's fsyncs are in progress. Why one thread and not a pool: with a pool,
each commit and each delivery was a hand-off to a thread of its own, and the
threads and the reactor passed the GIL back and forth (about 150 futex calls
and 110 context switches per message, bench/RESULTS.md); here a round is one
wake-up and one hand-back, however many jobs it carries.

Jobs must not block for long (every job of the round waits for the slowest):
mailbox stores of third parties, which may block as they like, still run in
the reactor's thread pool.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from twisted.internet import defer
from twisted.python.failure import Failure

from mailsvc.durable import Flush, Steps, call_steps, fsync_directory


class FlushWorker:
    """Runs step jobs in one thread, sharing their fsyncs by rounds.

    :param reactor: results are delivered on its thread (``callFromThread``).
    :param fsync: called with each file and directory descriptor to flush;
        default ``os.fsync`` (looked up at each call). Tests pass an
        instrumented one.

    ``rounds``, ``jobs`` and ``flushes`` count the rounds that flushed
    something, the jobs finished and the fsync calls made (for tests and
    benchmarks: ``jobs / rounds`` is the batch size).
    """

    def __init__(self, reactor, fsync: Callable[[int], None] | None = None, *,
                 name: str = "mailsvc-flush") -> None:
        self._reactor = reactor
        self._fsync = fsync
        self._name = name
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._incoming: list[tuple[Steps, defer.Deferred]] = []
        self._sleeping = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.rounds = 0
        self.jobs = 0
        self.flushes = 0

    def submit(self, steps: Steps) -> defer.Deferred:
        """Run ``steps`` in the worker; a Deferred of its result (or failure).

        Call from the reactor thread. After ``stop`` the Deferred fails at once.
        """
        d = defer.Deferred()
        with self._lock:
            if self._stopping:
                steps.close()
                d.errback(RuntimeError("the flush worker is stopped"))
                return d
            self._incoming.append((steps, d))
            if self._sleeping:
                self._work.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        return d

    def run(self, f: Callable, *args) -> defer.Deferred:
        """``submit`` a plain, short blocking call ``f(*args)``."""
        return self.submit(call_steps(f, *args))

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the jobs submitted so far, then end the thread (blocking:
        waits at most ``timeout`` seconds). Results of jobs finished meanwhile
        are still handed to the reactor (they fire if it still runs)."""
        with self._lock:
            self._stopping = True
            self._work.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ---------------------------------------------------------- the thread

    def _run(self) -> None:
        runnable: list[tuple[Steps, defer.Deferred, BaseException | None]] = []
        while True:
            with self._lock:
                while not self._incoming and not runnable and not self._stopping:
                    self._sleeping = True
                    self._work.wait()
                self._sleeping = False
                if not self._incoming and not runnable:
                    self._thread = None
                    return  # stopping, and nothing left
                incoming, self._incoming = self._incoming, []
            runnable.extend((steps, d, None) for steps, d in incoming)
            waiting: list[tuple[Steps, defer.Deferred, Flush]] = []
            finished: list[tuple[defer.Deferred, object]] = []
            for steps, d, error in runnable:
                try:
                    flush = steps.send(None) if error is None else steps.throw(error)
                except StopIteration as done:
                    finished.append((d, done.value))
                except BaseException:
                    finished.append((d, Failure()))
                else:
                    waiting.append((steps, d, flush))
            runnable = []
            if waiting:
                failures = self._flush([flush for _, _, flush in waiting])
                for steps, d, flush in waiting:
                    runnable.append((steps, d, _failure_of(flush, failures)))
            if finished:
                self.jobs += len(finished)
                self._reactor.callFromThread(_fire, finished)

    def _flush(self, flushes: list[Flush]) -> dict:
        """fsync every file, then every directory of ``flushes``, each once;
        return the failures by ``("file", fd)`` / ``("directory", path)``."""
        fsync = self._fsync or os.fsync
        failures: dict = {}
        files = dict.fromkeys(fd for flush in flushes for fd in flush.files)
        directories = dict.fromkeys(d for flush in flushes for d in flush.directories)
        # Any exception fails the jobs that named the file or directory (it
        # is thrown into them, so they clean up); the thread goes on.
        for fd in files:
            try:
                fsync(fd)
            except Exception as error:
                failures["file", fd] = error
        for directory in directories:
            try:
                fsync_directory(directory, self._fsync)
            except Exception as error:
                failures["directory", directory] = error
        self.rounds += 1
        self.flushes += len(files) + len(directories)
        return failures


def _failure_of(flush: Flush, failures: dict) -> Exception | None:
    """A fresh copy of the first failure among ``flush``'s own files and
    directories, or None: each job gets its own exception object (an error
    other than an OSError is wrapped in a RuntimeError)."""
    if not failures:
        return None
    for key in [*(("file", fd) for fd in flush.files), *(("directory", d) for d in flush.directories)]:
        error = failures.get(key)
        if error is not None:
            if not isinstance(error, OSError):
                return RuntimeError(f"flush failed: {error!r}")
            if error.errno is None:
                return type(error)(*error.args)
            extra = () if error.filename is None else (error.filename,)
            return type(error)(error.errno, error.strerror, *extra)
    return None


def _fire(finished: list[tuple[defer.Deferred, object]]) -> None:
    """On the reactor thread: the results of one round."""
    for d, result in finished:
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)


"""Group commit for the spool and the Maildir store: one thread that only fsyncs.

Jobs are step generators (``mailsvc.durable``): the spool's commit, a Maildir
delivery. ``FlushWorker.submit(steps)`` returns a Deferred of the job's
result. The job's own file work (writes, renames, links: page-cache work
that never waits for the disk) runs on the reactor thread, where the job is
advanced to each ``Flush`` it yields; the flushes go to one flush thread,
which runs in rounds:

1. take every request queued since the last round;
2. open the files asked for (``OpenFile``: making a file allocates an
   inode, which may take a while), then fsync each file named in the
   flushes, then each directory, each once: one directory fsync serves
   every job of the round that made an entry there (group commit);
3. hand the whole round back to the reactor thread with one
   ``callFromThread``; there each job resumes (with the ``OSError`` of a
   failed fsync of one of *its* files or directories thrown in, or with the
   descriptor it asked for) up to its next request or its end.

The requests made during one reactor iteration are handed to the thread
together when the iteration's events are all handled (``callLater(0)``):
a round has the whole iteration's work, and a lone job waits for nothing
but the end of that iteration. More batches form while a round's fsyncs
are in progress. (Handing each request over at once made rounds of one or
two jobs, and the thread took the GIL for each: 4.5% more CPU per message,
bench/RESULTS.md.)

Why so: with a thread per commit and per delivery (the reactor's pool), the
threads and the reactor passed the GIL back and forth at every system call
(about 150 futex calls and 110 context switches per message,
bench/RESULTS.md); a worker thread doing the file work itself waited for the
GIL at each of its dozen calls per job. The flush thread holds the GIL only
between two fsyncs, and the reactor thread is woken once per round.

Jobs must not block other than by yielding a request: they run on the
reactor thread. Mailbox stores of third parties, which may block as they
like, run in the reactor's thread pool instead.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from twisted.internet import defer
from twisted.python.failure import Failure

from mailsvc.durable import Flush, OpenFile, Steps, fsync_directory


class FlushWorker:
    """Advances step jobs on the reactor thread; fsyncs their flushes in
    one thread, by rounds.

    :param reactor: the reactor whose thread calls ``submit`` and resumes
        the jobs (``callLater(0)`` to hand requests over, ``callFromThread``
        to hand rounds back).
    :param fsync: called with each file and directory descriptor to flush;
        default ``os.fsync`` (looked up at each call). Tests pass an
        instrumented one.

    ``rounds``, ``jobs`` and ``flushes`` count the rounds run, the jobs
    finished and the fsync calls made (for tests and benchmarks).
    """

    def __init__(self, reactor, fsync: Callable[[int], None] | None = None, *,
                 name: str = "mailsvc-flush") -> None:
        self._reactor = reactor
        self._fsync = fsync
        self._name = name
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queued: list[tuple[Steps, defer.Deferred, Flush | OpenFile]] = []
        self._outbox: list[tuple[Steps, defer.Deferred, Flush | OpenFile]] = []  # reactor thread only
        self._sleeping = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.rounds = 0
        self.jobs = 0
        self.flushes = 0

    def submit(self, steps: Steps) -> defer.Deferred:
        """Run ``steps``; a Deferred of its result (or failure).

        Call from the reactor thread: the job runs there up to its first
        ``Flush`` before this returns. After ``stop`` the Deferred fails at once.
        """
        d = defer.Deferred()
        if self._stopping:
            steps.close()
            d.errback(RuntimeError("the flush worker is stopped"))
            return d
        self._advance([(steps, d, None, None)])
        return d

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the flushes queued so far, then end the thread (blocking:
        waits at most ``timeout`` seconds). Jobs resumed after that fail.
        Call from the reactor thread."""
        self._hand_over()
        with self._lock:
            self._stopping = True
            self._work.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ---------------------------------------------------------- reactor thread

    def _advance(self, jobs: list[tuple[Steps, defer.Deferred, object, BaseException | None]]) -> None:
        """Resume each job (with a value, or an error thrown in) and run it to
        its next request, ``Flush`` or ``OpenFile`` (queued), or its end (fired)."""
        flushes = []
        finished = []
        for steps, d, value, error in jobs:
            try:
                flush = steps.send(value) if error is None else steps.throw(error)
            except StopIteration as done:
                finished.append((d, done.value))
            except BaseException:
                finished.append((d, Failure()))
            else:
                flushes.append((steps, d, flush))
        if flushes:
            stopped = self._stopping
            if not stopped:
                # Handed to the thread once per reactor iteration, when its
                # events are all handled: the round then has them all.
                first = not self._outbox
                self._outbox.extend(flushes)
                if first:
                    self._reactor.callLater(0, self._hand_over)
            if stopped:
                for steps, d, _ in flushes:
                    steps.close()
                    finished.append((d, Failure(RuntimeError("the flush worker is stopped"))))
        self.jobs += len(finished)
        for d, result in finished:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def _hand_over(self) -> None:
        """Queue the requests of this reactor iteration for the flush thread."""
        outbox, self._outbox = self._outbox, []
        if not outbox:
            return
        with self._lock:
            self._queued.extend(outbox)
            if self._sleeping:
                self._work.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def _resume(self, batch: list, outcomes: list) -> None:
        """On the reactor thread: a round is done; resume its jobs."""
        self._advance([(steps, d, value, error) for (steps, d, _), (value, error) in zip(batch, outcomes)])

    # ---------------------------------------------------------- flush thread

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queued and not self._stopping:
                    self._sleeping = True
                    self._work.wait()
                self._sleeping = False
                if not self._queued:
                    self._thread = None
                    return  # stopping, and nothing left
                batch, self._queued = self._queued, []
            outcomes = self._round([request for _, _, request in batch])
            self._reactor.callFromThread(self._resume, batch, outcomes)

    def _round(self, requests: list) -> list[tuple[object, BaseException | None]]:
        """Do the opens, then the flushes of one round; for each request,
        what its job is resumed with: ``(value, None)`` or ``(None, error)``."""
        outcomes: list = [(None, None)] * len(requests)
        flushes = []
        for index, request in enumerate(requests):
            if isinstance(request, OpenFile):
                try:
                    outcomes[index] = (os.open(request.path, request.flags, request.mode), None)
                except Exception as error:
                    outcomes[index] = (None, error)
            else:
                flushes.append((index, request))
        if flushes:
            failures = self._flush([flush for _, flush in flushes])
            for index, flush in flushes:
                outcomes[index] = (None, _failure_of(flush, failures))
        self.rounds += 1
        return outcomes

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

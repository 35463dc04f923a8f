"""Group commit of directory fsyncs (mailsvc.spool.groupsync): sharing, ordering, failures.

No test here measures time: they check which fsyncs run, in which order,
and for whom, with an fsync that records its calls (and, where a test needs
a round to last, one that waits on an event).
"""

import errno
import itertools
import os
import threading

import pytest

from mailsvc.spool.groupsync import DirectorySyncer, fsync_directory
from threaded import WAIT, run_threads, wait_until


class Recorder:
    """An fsync that records (path, thread, start seq, end seq) for each call.

    ``seq()`` hands out numbers from the same counter, so a test can place
    its own events (a call made, a call returned) among the fsyncs.
    """

    def __init__(self, gate=None, fail=None):
        self.calls = []
        self._count = itertools.count()
        self._lock = threading.Lock()
        self.gate = gate  # gate(path, index): may block the fsync
        self.fail = fail  # fail(path, index) -> OSError | None

    def seq(self):
        with self._lock:
            return next(self._count)

    def __call__(self, fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        start = self.seq()
        with self._lock:
            index = len(self.calls)
            self.calls.append(None)
        if self.gate is not None:
            self.gate(path, index)
        error = self.fail(path, index) if self.fail is not None else None
        if error is None:
            os.fsync(fd)
        self.calls[index] = (path, threading.get_ident(), start, self.seq())
        if error is not None:
            raise error


@pytest.fixture
def dirs(tmp_path):
    """Three directories to sync."""
    made = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        made.append(str(tmp_path / name))
    return made


def test_lone_caller_runs_its_round_at_once_on_its_own_thread(dirs):
    """A caller alone is never made to wait for company: its sync runs one
    round right away, in the calling thread, fsyncing each directory once."""
    recorder = Recorder()
    syncer = DirectorySyncer(recorder)
    syncer.sync([dirs[0], dirs[1], dirs[0]])
    assert sorted(path for path, _, _, _ in recorder.calls) == sorted(dirs[:2])
    assert {thread for _, thread, _, _ in recorder.calls} == {threading.get_ident()}
    assert (syncer.rounds, syncer.requests) == (1, 1)


def test_no_directory_no_round(dirs):
    """sync([]) returns at once without an fsync."""
    recorder = Recorder()
    syncer = DirectorySyncer(recorder)
    syncer.sync([])
    assert recorder.calls == [] and syncer.rounds == 0


def test_callers_arriving_during_a_round_share_the_next_one(dirs):
    """While one round's fsync runs, every caller that arrives waits; then one
    round with one fsync per directory serves all of them."""
    release = threading.Event()
    recorder = Recorder(gate=lambda path, index: index == 0 and release.wait(WAIT))
    syncer = DirectorySyncer(recorder)
    first = threading.Thread(target=syncer.sync, args=([dirs[0]],))
    first.start()
    wait_until(lambda: recorder.calls)  # the first round has begun

    def later(i):
        if i == 0:
            wait_until(lambda: syncer.waiting == 10)
            release.set()
            return None
        return syncer.sync([dirs[0], dirs[1]] if i % 2 else [dirs[0]])

    results = run_threads(11, later)
    first.join(WAIT)
    assert results == [None] * 11
    assert syncer.rounds == 2 and syncer.requests == 11
    # round 1: the first caller's directory; round 2: each directory once for ten callers
    assert [path for path, _, _, _ in recorder.calls] == [dirs[0], dirs[0], dirs[1]]


def test_every_sync_is_covered_by_an_fsync_begun_after_it(dirs):
    """Many threads syncing at once: each returns only after an fsync of each
    of its directories that began after it called and ended before it returned."""
    recorder = Recorder()
    syncer = DirectorySyncer(recorder)
    spans = []

    def caller(i):
        for round_ in range(20):
            wanted = [dirs[(i + round_) % 3], dirs[i % 2]]
            called = recorder.seq()
            syncer.sync(wanted)
            spans.append((wanted, called, recorder.seq()))

    assert run_threads(8, caller) == [None] * 8
    assert len(spans) == 160
    for wanted, called, returned in spans:
        for directory in wanted:
            assert any(
                path == directory and called < start and end < returned
                for path, _, start, end in recorder.calls
            ), (directory, called, returned)
    assert syncer.requests == 160
    assert len(recorder.calls) <= 3 * syncer.rounds  # at most one fsync per directory per round


def test_failed_fsync_fails_every_caller_of_that_round_that_named_it(dirs):
    """An fsync error reaches every caller of the round that asked for that
    directory, each with its own OSError; callers of the same round that
    named only other directories succeed; the next round works again."""
    release = threading.Event()

    def gate(path, index):
        if index == 0:
            release.wait(WAIT)

    def fail(path, index):
        if index > 0 and path == dirs[1] and not fail.done:
            fail.done = True
            return OSError(errno.EIO, "Input/output error")
        return None

    fail.done = False
    recorder = Recorder(gate=gate, fail=fail)
    syncer = DirectorySyncer(recorder)
    first = threading.Thread(target=syncer.sync, args=([dirs[2]],))
    first.start()
    wait_until(lambda: recorder.calls)

    def later(i):
        if i == 0:
            wait_until(lambda: syncer.waiting == 6)
            release.set()
            return None
        return syncer.sync([dirs[1], dirs[0]] if i <= 3 else [dirs[0]])

    results = run_threads(7, later)
    first.join(WAIT)
    failed = results[1:4]
    assert all(isinstance(e, OSError) and e.errno == errno.EIO for e in failed)
    assert len({id(e) for e in failed}) == 3  # one exception object per caller
    assert results[4:] == [None, None, None]
    syncer.sync([dirs[1]])  # the directory can be synced again
    assert syncer.rounds == 3


def test_an_unexpected_error_in_a_round_does_not_strand_the_others(dirs):
    """If the round's leader is hit by something other than an OSError, it
    raises that, and the callers sharing its round get an error too, not a hang."""

    class Boom(BaseException):
        pass

    release = threading.Event()

    def gate(path, index):
        if index == 0:
            release.wait(WAIT)
        elif index == 1:
            raise Boom()

    recorder = Recorder(gate=gate)
    syncer = DirectorySyncer(recorder)
    first = threading.Thread(target=syncer.sync, args=([dirs[0]],))
    first.start()
    wait_until(lambda: recorder.calls)

    def later(i):
        if i == 0:
            wait_until(lambda: syncer.waiting == 3)
            release.set()
            return None
        return syncer.sync([dirs[0]])

    results = run_threads(4, later)
    first.join(WAIT)
    errors = results[1:]
    assert sum(isinstance(e, Boom) for e in errors) == 1
    assert sum(isinstance(e, RuntimeError) for e in errors) == 2
    syncer.sync([dirs[0]])  # still usable


def test_fsync_directory_uses_os_fsync_by_default(dirs, monkeypatch):
    """Without an fsync given, the one in os at call time is used (so tests
    that replace os.fsync reach the spool's directory fsyncs too)."""
    seen = []
    monkeypatch.setattr(os, "fsync", seen.append)
    fsync_directory(dirs[0])
    DirectorySyncer().sync([dirs[1]])
    assert len(seen) == 2

"""The flush worker: step jobs run in one thread, their fsyncs shared by rounds.

A fake reactor collects what the worker hands back with ``callFromThread``;
the test thread runs it, as the reactor thread would. An instrumented fsync
records what was flushed, and may hold the worker inside an fsync so that
jobs pile up for the next round. Spool commits and Maildir deliveries run
through a real worker and are checked for DESIGN rule 1 with the same record
as the group-commit tests of the spool.
"""

import errno
import io
import os
import queue
import threading
from pathlib import Path

import pytest
from twisted.internet import defer

from mailsvc.durable import Flush, OpenFile, run_steps
from mailsvc.flushworker import FlushWorker
from mailsvc.spool import FileSpool
from mailsvc.store.maildir import MaildirStore
from test_spool_groupcommit import BOB, ENVELOPE, FAR, FsyncRecord, check_durable
from threaded import WAIT


class ThreadReactor:
    """``callFromThread`` into a queue that the test thread runs."""

    def __init__(self):
        self.calls = queue.Queue()

    def callFromThread(self, f, *args):
        self.calls.put((f, args))

    def callLater(self, delay, f, *args):
        """The worker asks for "once this iteration's events are handled":
        at once here, unless ``iteration`` collects such calls."""
        assert delay == 0
        if self.iteration is None:
            f(*args)
        else:
            self.iteration.append((f, args))

    iteration = None  # a list: calls waiting for the end of the current iteration

    def end_iteration(self):
        calls, self.iteration = self.iteration, []
        for f, args in calls:
            f(*args)

    def run_until(self, d: defer.Deferred):
        """Run handed-back calls until ``d`` has fired; return its result or raise its failure."""
        results = []
        d.addBoth(results.append)
        while not results:
            f, args = self.calls.get(timeout=WAIT)
            f(*args)
        result = results[0]
        if isinstance(result, Exception) or hasattr(result, "raiseException"):
            result.raiseException()
        return result


class Fsyncs:
    """An fsync recording the path of each descriptor, optionally held."""

    def __init__(self):
        self.paths = []
        self.hold = None  # threading.Event: the next fsync waits for it
        self.holding = threading.Event()
        self.fail = {}  # path -> errno

    def __call__(self, fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        hold, self.hold = self.hold, None
        if hold is not None:
            self.holding.set()
            hold.wait(WAIT)
        self.paths.append(path)
        if path in self.fail:
            raise OSError(self.fail[path], os.strerror(self.fail[path]), path)


@pytest.fixture
def reactor():
    return ThreadReactor()


@pytest.fixture
def worker(reactor):
    fsyncs = Fsyncs()
    w = FlushWorker(reactor, fsyncs)
    w.fsyncs = fsyncs
    yield w
    w.stop()


def write_job(path, data, log):
    """Steps: write ``data`` to a new file, flush it and its directory, rename it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        log.append(("flush", path))
        yield Flush(files=[fd], directories=[os.path.dirname(path)])
        log.append(("flushed", path))
    finally:
        os.close(fd)
    os.rename(path, path + ".done")
    yield Flush(directories=[os.path.dirname(path)])
    return path + ".done"


def test_a_job_runs_its_flushes_in_order_and_returns_on_the_reactor(reactor, worker, tmp_path):
    log = []
    d = worker.submit(write_job(str(tmp_path / "a"), b"hello", log))
    assert reactor.run_until(d) == str(tmp_path / "a.done")
    assert (tmp_path / "a.done").read_bytes() == b"hello"
    # file, then its directory; then the directory again after the rename
    assert worker.fsyncs.paths == [str(tmp_path / "a"), str(tmp_path), str(tmp_path)]
    assert log == [("flush", str(tmp_path / "a")), ("flushed", str(tmp_path / "a"))]
    assert (worker.rounds, worker.jobs) == (2, 1)


def test_requests_of_one_reactor_iteration_go_to_the_thread_together(reactor, worker, tmp_path):
    """Jobs submitted during one reactor iteration reach the flush thread
    only once the iteration's events are handled, all together: one round
    fsyncs their five files and their directory once."""
    reactor.iteration = []
    jobs = [worker.submit(write_job(str(tmp_path / f"m{i}"), b"x", [])) for i in range(5)]
    assert worker.rounds == 0 and worker.fsyncs.paths == []  # nothing handed over yet
    reactor.end_iteration()
    reactor.iteration = None
    for d in jobs:
        reactor.run_until(d)
    files = sorted(str(tmp_path / f"m{i}") for i in range(5))
    assert sorted(worker.fsyncs.paths[:5]) == files
    assert worker.fsyncs.paths[5] == str(tmp_path)
    assert worker.rounds == 2 and worker.fsyncs.paths.count(str(tmp_path)) == 2  # the renames: one round too


def test_jobs_arriving_during_a_round_share_the_next_rounds_fsyncs(reactor, worker, tmp_path):
    """While the flush thread is held inside an fsync, ten jobs arrive: the
    next round flushes their ten files and their common directory once, and
    their second flushes share one round too."""
    release = threading.Event()
    worker.fsyncs.hold = release
    first = worker.submit(write_job(str(tmp_path / "first"), b"1", []))
    assert worker.fsyncs.holding.wait(WAIT)
    later = [worker.submit(write_job(str(tmp_path / f"m{i}"), b"x", [])) for i in range(10)]
    release.set()
    for d in [first, *later]:
        reactor.run_until(d)
    directory_fsyncs = [p for p in worker.fsyncs.paths if p == str(tmp_path)]
    # round 1: first's file; round 2: the ten files; then the second flushes:
    # first's and the ten others', in one or two rounds (22 without sharing)
    assert worker.rounds in (3, 4) and len(directory_fsyncs) == worker.rounds
    assert worker.jobs == 11
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["first.done", *(f"m{i}.done" for i in range(10))])


def test_a_failed_file_fsync_fails_only_the_job_that_owns_the_file(reactor, worker, tmp_path):
    release = threading.Event()
    worker.fsyncs.hold = release
    blocker = worker.submit(write_job(str(tmp_path / "blocker"), b"", []))
    assert worker.fsyncs.holding.wait(WAIT)
    worker.fsyncs.fail[str(tmp_path / "bad")] = errno.EIO
    bad = worker.submit(write_job(str(tmp_path / "bad"), b"x", []))
    good = worker.submit(write_job(str(tmp_path / "good"), b"y", []))
    release.set()
    reactor.run_until(blocker)
    with pytest.raises(OSError) as raised:
        reactor.run_until(bad)
    assert raised.value.errno == errno.EIO and raised.value.filename == str(tmp_path / "bad")
    assert reactor.run_until(good) == str(tmp_path / "good.done")


def test_a_failed_directory_fsync_fails_every_job_that_named_it(reactor, worker, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    release = threading.Event()
    worker.fsyncs.hold = release
    blocker = worker.submit(write_job(str(tmp_path / "blocker"), b"", []))
    assert worker.fsyncs.holding.wait(WAIT)
    worker.fsyncs.fail[str(tmp_path / "a")] = errno.EIO
    in_a = [worker.submit(write_job(str(tmp_path / "a" / f"m{i}"), b"x", [])) for i in range(3)]
    in_b = worker.submit(write_job(str(tmp_path / "b" / "m"), b"x", []))
    release.set()
    reactor.run_until(blocker)
    errors = []
    for d in in_a:
        with pytest.raises(OSError) as raised:
            reactor.run_until(d)
        errors.append(raised.value)
    assert all(e.errno == errno.EIO for e in errors)
    assert len({id(e) for e in errors}) == 3  # each job its own exception
    assert reactor.run_until(in_b) == str(tmp_path / "b" / "m.done")


def test_an_fsync_that_breaks_otherwise_fails_its_job_not_the_thread(reactor, tmp_path):
    """Not an OSError (a bug below us): the job that named the file gets a
    RuntimeError thrown in (and cleans up); the worker keeps serving."""
    fsyncs = Fsyncs()
    broken = str(tmp_path / "broken")
    real = fsyncs.__call__

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == broken:
            raise ValueError("not an OSError")
        real(fd)

    worker = FlushWorker(reactor, fsync)
    try:
        with pytest.raises(RuntimeError, match="not an OSError"):
            reactor.run_until(worker.submit(write_job(broken, b"x", [])))
        assert reactor.run_until(worker.submit(write_job(str(tmp_path / "ok"), b"y", []))) == str(tmp_path / "ok.done")
    finally:
        worker.stop()


def test_an_exception_in_a_job_fails_it_and_the_worker_goes_on(reactor, worker, tmp_path):
    def broken():
        yield Flush()
        raise ValueError("broken job")

    d = worker.submit(broken())
    with pytest.raises(ValueError, match="broken job"):
        reactor.run_until(d)
    assert reactor.run_until(worker.submit(write_job(str(tmp_path / "after"), b"x", []))) == str(tmp_path / "after.done")


def test_stop_finishes_queued_flushes_then_fails_what_comes_after(reactor, tmp_path):
    """stop() waits for the flushes queued so far; a job that would flush
    again afterwards, and a job submitted afterwards, fail (their steps are
    closed: no 250 is ever said for them)."""
    fsyncs = Fsyncs()
    release = threading.Event()
    fsyncs.hold = release
    worker = FlushWorker(reactor, fsyncs)
    jobs = [worker.submit(write_job(str(tmp_path / f"m{i}"), b"x", [])) for i in range(3)]
    assert fsyncs.holding.wait(WAIT)
    stopper = threading.Thread(target=worker.stop)
    stopper.start()
    release.set()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    assert {str(tmp_path / f"m{i}") for i in range(3)} <= set(fsyncs.paths)  # all flushed
    for d in jobs:
        with pytest.raises(RuntimeError, match="stopped"):
            reactor.run_until(d)
    with pytest.raises(RuntimeError, match="stopped"):
        reactor.run_until(worker.submit(write_job(str(tmp_path / "late"), b"x", [])))
    assert not (tmp_path / "late").exists()


def open_job(path):
    """Steps: have the driver make a file, write to it; (fd was given, error)."""
    try:
        fd = yield OpenFile(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    except FileNotFoundError as error:
        return ("no directory", error.filename)
    try:
        os.write(fd, b"made by the driver")
        yield Flush(files=[fd])
    finally:
        os.close(fd)
    return ("written", path)


def test_the_driver_makes_the_files_a_job_asks_for(reactor, worker, tmp_path):
    """OpenFile: the flush thread opens the file (making one can be slow) and
    the job gets the descriptor back; a failed open is thrown into the job."""
    path = str(tmp_path / "made")
    assert reactor.run_until(worker.submit(open_job(path))) == ("written", path)
    assert Path(path).read_bytes() == b"made by the driver"
    assert os.stat(path).st_mode & 0o777 == 0o640
    missing = str(tmp_path / "nowhere" / "x")
    assert reactor.run_until(worker.submit(open_job(missing))) == ("no directory", missing)
    # and the same steps driven in the calling thread
    other = str(tmp_path / "other")
    assert run_steps(open_job(other)) == ("written", other)
    assert run_steps(open_job(missing)) == ("no directory", missing)


def test_run_steps_drives_a_job_in_the_calling_thread(tmp_path):
    fsyncs = Fsyncs()
    assert run_steps(write_job(str(tmp_path / "a"), b"x", []), fsyncs) == str(tmp_path / "a.done")
    assert fsyncs.paths == [str(tmp_path / "a"), str(tmp_path), str(tmp_path)]
    fsyncs.fail[str(tmp_path / "b")] = errno.EIO
    with pytest.raises(OSError):
        run_steps(write_job(str(tmp_path / "b"), b"x", []), fsyncs)


# ------------------------------------------------------------ the real jobs


def test_spool_commits_through_the_worker_are_each_durable(reactor, tmp_path):
    """40 commits submitted at once, to one hop or two: each is durable in
    the order DESIGN rule 1 asks before its Deferred fires, and they share
    directory fsyncs."""
    spool_dir = tmp_path / "spool"
    record = FsyncRecord(spool_dir)
    spool = FileSpool(spool_dir, fsync=record)
    worker = FlushWorker(reactor, record)
    try:
        pending = []
        for i in range(40):
            writer = spool.newMessage()
            record.created[writer.id] = record.seq()
            writer.write(b"Subject: x\r\n\r\nbody\r\n")
            routes = {"local": (BOB,), "relay": (FAR,)} if i % 4 == 0 else {"local": (BOB,)}
            pending.append(worker.submit(writer.commit_steps(ENVELOPE, routes)))
        for d in pending:
            messages = reactor.run_until(d)
            returned = record.seq()
            for message in messages:
                check_durable(record, message, spool_dir / message.hop, returned)
        assert len(spool.recover()) == 50
        assert worker.rounds < 40  # shared: without sharing, 2 rounds per commit
    finally:
        worker.stop()


def test_maildir_deliveries_through_the_worker(reactor, tmp_path):
    store = MaildirStore(str(tmp_path / "mail"), hostname="mx.example.test")
    fsyncs = Fsyncs()
    worker = FlushWorker(reactor, fsyncs)
    try:
        pending = [
            worker.submit(store.deliverSteps("bob", ["Delivered-To: bob"], io.BytesIO(b"Subject: %d\r\n\r\nhi\r\n" % i)))
            for i in range(20)
        ]
        paths = [reactor.run_until(d) for d in pending]
    finally:
        worker.stop()
    new = tmp_path / "mail" / "bob" / "new"
    assert sorted(paths) == sorted(str(p) for p in new.iterdir())
    assert not list((tmp_path / "mail" / "bob" / "tmp").iterdir())
    contents = sorted(Path(p).read_bytes() for p in paths)
    assert contents == sorted(b"Delivered-To: bob\nSubject: %d\n\nhi\n" % i for i in range(20))
    # each file flushed (under its tmp/ name), new/ flushed after the links
    assert sum(1 for p in fsyncs.paths if "/bob/tmp/" in p) == 20
    assert fsyncs.paths[-1] == str(new)


def test_a_big_maildir_delivery_gives_other_work_turns(tmp_path):
    """The steps run on the reactor thread: a 3 MB message yields empty
    flushes while it is copied (a turn for the other sessions), then the
    flush of its file, then that of new/; it arrives whole."""
    store = MaildirStore(str(tmp_path / "mail"), hostname="mx.example.test")
    body = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n"
    body += (b"y" * 998 + b"\r\n") * 3100  # ~3 MB
    steps = store.deliverSteps("bob", ["Delivered-To: bob"], io.BytesIO(body))
    kinds = []
    request = next(steps)
    try:
        while True:
            if isinstance(request, OpenFile):  # the file is made by the driver
                kinds.append("open")
                request = steps.send(os.open(request.path, request.flags, request.mode))
                continue
            flush = request
            kinds.append("turn" if not (flush.files or flush.directories) else "files" if flush.files else "dirs")
            request = steps.send(None)
    except StopIteration as done:
        path = done.value
    # the new maildir's directories flushed, its file made, turns, the file, new/
    assert kinds[:2] == ["dirs", "open"]
    assert kinds.count("turn") >= 2 and kinds[-2:] == ["files", "dirs"]
    assert "turn" not in kinds[-2:]
    assert Path(path).read_bytes() == b"Delivered-To: bob\n" + body.replace(b"\r\n", b"\n")

"""Group commit in the file spool: concurrent commits share directory fsyncs
and each still returns only once its files and directory entries are durable.

The spool is given an fsync that records, for every call, which file or
directory it flushed and, for a directory, its entries when the fsync began
and when it ended. From that record the tests check DESIGN rule 1 for every
commit: data and control files flushed, the data's directory entry flushed
before the control file (the commit point) appears, and the control file's
entry flushed before commit returns. Nothing here measures time.
"""

import errno
import itertools
import os
import threading

import pytest

from mailsvc.envelope import Envelope, Recipient, RecipientState
from mailsvc.errors import SpoolError
from mailsvc.spool import FileSpool
from threaded import WAIT, run_threads, wait_until

ENVELOPE = Envelope(sender="alice@example.test", recipients=(), received_at=1763891234.5)
BOB = Recipient("bob@example.test", "bob@example.test", "bob")
FAR = Recipient("dave@far.example")


class FsyncRecord:
    """An fsync recording what it flushed, on one sequence shared with the test."""

    def __init__(self, root):
        self.root = root  # the spool: every directory in it is listed at each fsync's end
        self.files = []  # (path, seq, inode)
        # (path, start seq, its entries at start, end seq, its entries at end,
        #  {name: entries at end} of every directory of the spool)
        self.dirs = []
        self._count = itertools.count()
        self._lock = threading.Lock()
        self.before_dir_fsync = None  # hook(index): may block or raise
        self.threads = []  # the thread of each directory fsync
        self.created = {}  # queue id -> seq once its writer (tmp/<id>.D) exists

    def seq(self):
        with self._lock:
            return next(self._count)

    def __call__(self, fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if not os.path.isdir(path):
            os.fsync(fd)
            self.files.append((path, self.seq(), os.fstat(fd).st_ino))
            return
        with self._lock:
            index = len(self.dirs)
            self.dirs.append(None)
        self.threads.append(threading.get_ident())
        start, before = self.seq(), set(os.listdir(path))
        try:
            if self.before_dir_fsync is not None:
                self.before_dir_fsync(index)
            os.fsync(fd)
        finally:
            end = self.seq()
            spool = {d.name: set(os.listdir(d)) for d in self.root.iterdir() if d.is_dir()}
            self.dirs[index] = (path, start, before, end, set(os.listdir(path)), spool)


def commit_one(spool, record, routes):
    """Write and commit a message; return (messages, seq when commit returned)."""
    writer = spool.newMessage()
    record.created[writer.id] = record.seq()
    writer.write(b"Subject: x\r\n\r\nbody\r\n")
    messages = writer.commit(ENVELOPE, routes)
    return messages, record.seq()


def check_durable(record, message, hop_dir, returned, recycled=False):
    """DESIGN rule 1 for one committed message, from the fsync record; with
    ``recycled``, its files were spent ones, written in place."""
    data, ctl = f"D.{message.id}", f"C.{message.id}"
    dirs = [d for d in record.dirs if d is not None and d[0] == str(hop_dir)]
    # The data and control files' octets were flushed, under whatever name
    # they had then (tmp/<id>.D, C.<id>.tmp, or a name in spent/: no C.
    # named them yet). Files are known by their inodes (in their life since
    # the writer was made: a reused file had others before).
    created = record.created[message.id]
    fsyncs = [(path, seq, ino) for path, seq, ino in record.files if seq > created]
    data_fsyncs = [seq for _, seq, ino in fsyncs if ino == (hop_dir / data).stat().st_ino]
    ctl_fsyncs = [(path, seq) for path, seq, ino in fsyncs if ino == (hop_dir / ctl).stat().st_ino]
    assert data_fsyncs, f"data of {message.id} never fsync'd"
    assert ctl_fsyncs, f"control file of {message.id} never fsync'd"
    assert all(path != str(hop_dir / ctl) for path, _ in ctl_fsyncs), "flushed under its final name"
    if recycled:
        assert all(path.startswith(str(hop_dir.parent / "spent")) for path, _ in ctl_fsyncs)
    # The data's entry was made durable before the control file appeared:
    # a directory fsync began with D. present and ended with C. still absent.
    staged = [end for _, start, before, end, after, _ in dirs if data in before and ctl not in after]
    assert staged, f"D. of {message.id} not flushed before its C. appeared"
    # ... and the octets were flushed before the control file appeared (it
    # was still absent when a later directory fsync ended).
    assert max(data_fsyncs) < max(staged)
    assert max(seq for _, seq in ctl_fsyncs) < max(staged)
    # A new data file's departure from tmp/ was durable too. (A reused file's
    # departure from spent/ need not be: a spent name that comes back after
    # a crash beside the new one is dropped by recovery, two links.)
    if not recycled:
        spool_dir, hop = hop_dir.parent, hop_dir.name
        assert any(
            path == str(spool_dir / "tmp") and created < start and f"{message.id}.D" not in before and ctl not in spool[hop]
            for path, start, before, _, _, spool in filter(None, record.dirs)
        ), f"tmp/ not flushed for {message.id} before its C. appeared"
    # The commit point was durable before commit returned.
    assert any(ctl in before and end < returned for _, start, before, end, _, _ in dirs), (
        f"C. of {message.id} not flushed before commit returned"
    )


def files_in(root):
    """Every file under ``root``, as paths relative to it, but those in
    ``spent/``: removed files kept for reuse, no message's any more."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "spent"
    )


def test_lone_commit_flushes_in_order_without_waiting(tmp_path):
    """One commit alone: data and control files flushed, then two directory
    rounds of its own, run at once in its thread: the hop and tmp/ (D.
    entries), then the hop (C.)."""
    record = FsyncRecord(tmp_path)
    spool = FileSpool(tmp_path, fsync=record)
    [message], returned = commit_one(spool, record, {"local": (BOB,)})
    check_durable(record, message, tmp_path / "local", returned)
    assert (spool._syncer.rounds, spool._syncer.requests) == (2, 2)
    assert [d[0] for d in record.dirs] == [str(tmp_path / name) for name in ("local", "tmp", "local")]
    assert {thread for thread in record.threads} == {threading.get_ident()}


def test_many_threads_committing_at_once_are_each_durable(tmp_path):
    """16 threads x 6 commits, to one hop or two: every commit returns only
    after its files and directory entries are durable, in the right order."""
    record = FsyncRecord(tmp_path)
    spool = FileSpool(tmp_path, fsync=record)

    def committer(i):
        done = []
        for n in range(6):
            routes = {"local": (BOB,), "relay": (FAR,)} if (i + n) % 4 == 0 else {"local": (BOB,)}
            done.append(commit_one(spool, record, routes))
        return done

    results = run_threads(16, committer)
    checked = 0
    for result in results:
        assert isinstance(result, list), result
        for messages, returned in result:
            for message in messages:
                check_durable(record, message, tmp_path / message.hop, returned)
                checked += 1
    assert checked > 96
    assert len(spool.recover()) == checked


def test_commits_waiting_together_share_one_directory_fsync(tmp_path):
    """While a directory fsync runs, the commits that reach the same point
    wait for the next one, and that single fsync serves all of them."""
    record = FsyncRecord(tmp_path)
    spool = FileSpool(tmp_path, fsync=record)
    release = threading.Event()

    def hold_first(index):
        if index == 0:
            release.wait(WAIT)

    record.before_dir_fsync = hold_first

    def committers(i):
        if i == 9:  # once the eight later commits wait, let the first round end
            wait_until(lambda: spool._syncer.waiting >= 8)
            release.set()
            return None
        if i:  # the eight later commits start while the first one's round runs
            wait_until(lambda: record.dirs)
        return commit_one(spool, record, {"local": (BOB,)})

    results = run_threads(10, committers)
    for result in results[:9]:
        [message], returned = result
        check_durable(record, message, tmp_path / "local", returned)
    # 9 commits need 18 directory syncs; 8 of them shared round 2.
    assert spool._syncer.requests == 18
    assert spool._syncer.rounds <= 18 - 7


def test_failed_shared_fsync_fails_every_commit_of_that_round(tmp_path):
    """When the directory fsync shared by a round fails, each commit in that
    round raises SpoolError and leaves no file; the other commits are queued
    whole, and recovery finds exactly them."""
    record = FsyncRecord(tmp_path)
    spool = FileSpool(tmp_path, fsync=record)
    release = threading.Event()

    def hook(index):
        if index == 0:  # round 1: the first commit's hop, then tmp/
            release.wait(WAIT)
        elif index == 2:  # round 2's first directory fsync
            raise OSError(errno.EIO, "Input/output error")

    record.before_dir_fsync = hook

    def committers(i):
        if i == 8:
            wait_until(lambda: spool._syncer.waiting >= 7)
            release.set()
            return None
        if i:
            wait_until(lambda: record.dirs)
        return commit_one(spool, record, {"local": (BOB,)})

    results = run_threads(9, committers)[:8]
    failed = [r for r in results if isinstance(r, SpoolError)]
    committed = [r for r in results if not isinstance(r, BaseException)]
    assert len(failed) + len(committed) == 8
    assert len(failed) >= 7  # all of round 2 (the first commit may have been in it too)
    assert all(not e.temporary_full for e in failed)
    ids = sorted(messages[0].id for messages, _ in committed)
    assert files_in(tmp_path) == sorted(f"local/{kind}.{id}" for id in ids for kind in "CD")
    assert sorted(m.id for m in FileSpool(tmp_path).recover()) == ids


def test_update_shares_the_syncer_and_flushes_after_its_rename(tmp_path):
    """update() writes and flushes the new control file, renames it over the
    old one, then waits for a directory fsync begun after the rename."""
    record = FsyncRecord(tmp_path)
    spool = FileSpool(tmp_path, fsync=record)
    [message], _ = commit_one(spool, record, {"local": (BOB,)})
    rounds = spool._syncer.rounds
    changed = message.evolve(envelope=message.envelope.evolve(recipients=(BOB.evolve(attempts=1),)))
    spool.update(changed)
    assert spool._syncer.rounds == rounds + 1
    _, start, before, _, _, _ = record.dirs[-1]
    assert f"C.{message.id}.tmp" not in before  # began after the rename
    assert record.files[-1][0] == str(tmp_path / "local" / f"C.{message.id}.tmp")
    assert record.files[-1][2] == (tmp_path / "local" / f"C.{message.id}").stat().st_ino
    assert record.files[-1][1] < start
    assert spool.queued() == [changed]


def test_update_reports_a_failed_directory_fsync(tmp_path):
    """If the shared directory fsync after an update fails, update raises
    SpoolError (the runner keeps the old state in mind and retries later)."""
    record = FsyncRecord(tmp_path)
    spool = FileSpool(tmp_path, fsync=record)
    [message], _ = commit_one(spool, record, {"local": (BOB,)})

    def fail(index):
        raise OSError(errno.ENOSPC, "No space left on device")

    record.before_dir_fsync = fail
    with pytest.raises(SpoolError) as info:
        spool.update(message.evolve(envelope=message.envelope.evolve(recipients=(BOB.evolve(attempts=1),))))
    assert info.value.temporary_full
    assert files_in(tmp_path) == [f"local/C.{message.id}", f"local/D.{message.id}"]


def test_remove_after_delivery_skips_the_directory_fsync_delete_does_not(tmp_path):
    """remove() (all recipients done) does not flush the directory: at-least-once,
    a crash may bring the message back. delete() (a person's decision) flushes."""
    record = FsyncRecord(tmp_path)
    spool = FileSpool(tmp_path, fsync=record)
    [first], _ = commit_one(spool, record, {"local": (BOB,)})
    [second], _ = commit_one(spool, record, {"local": (BOB,)})
    dir_fsyncs = len(record.dirs)
    spool.remove(first.evolve(envelope=first.envelope.evolve(
        recipients=(BOB.evolve(state=RecipientState.DELIVERED),))))
    assert len(record.dirs) == dir_fsyncs
    spool.delete("local", second.id)
    assert len(record.dirs) == dir_fsyncs + 1
    assert files_in(tmp_path) == []


def test_remove_takes_a_held_control_file(tmp_path):
    """remove() of a message put on hold meanwhile takes its H. and its data."""
    spool = FileSpool(tmp_path)
    writer = spool.newMessage()
    writer.write(b"x\r\n")
    [message] = writer.commit(ENVELOPE, {"local": (BOB,)})
    spool.hold("local", message.id)
    spool.remove(message)
    assert files_in(tmp_path) == []


def test_commits_reusing_spent_files_are_durable_too(tmp_path):
    """Once removed messages left spent files, and a commit made their
    removal durable, new commits reuse them, written in place: each such
    commit is as durable as one with new files, and its data is exactly
    what it wrote."""
    record = FsyncRecord(tmp_path)
    spool = FileSpool(tmp_path, fsync=record)
    for messages, _ in [commit_one(spool, record, {"local": (BOB,)}) for _ in range(16)]:
        spool.remove(messages[0])
    assert len(spool._spent) == 32  # a data and a control file each
    inodes = {os.stat(p).st_ino for p in (tmp_path / "spent").iterdir()}
    [settling], _ = commit_one(spool, record, {"local": (BOB,)})  # new files: none is ready yet
    assert not {os.stat(tmp_path / "local" / f"{kind}.{settling.id}").st_ino for kind in "DC"} & inodes

    results = run_threads(8, lambda i: commit_one(spool, record, {"local": (BOB,)}))
    for result in results:
        [message], returned = result
        check_durable(record, message, tmp_path / "local", returned, recycled=True)
        assert (tmp_path / "local" / f"D.{message.id}").read_bytes() == b"Subject: x\r\n\r\nbody\r\n"
        assert os.stat(tmp_path / "local" / f"D.{message.id}").st_ino in inodes
        assert os.stat(tmp_path / "local" / f"C.{message.id}").st_ino in inodes
    assert len(spool._spent) == 16

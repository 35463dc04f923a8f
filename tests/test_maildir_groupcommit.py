"""Maildir delivery with group commit: concurrent deliveries share the fsync
of ``new/``, and each still returns only once its file and its ``new/``
entry are durable. os.fsync is replaced by one that records what it
flushed; nothing here measures time."""

import errno
import io
import itertools
import os
import threading

import pytest

from mailsvc.errors import TemporaryDeliveryError
from mailsvc.store import maildir
from mailsvc.store.maildir import MaildirStore
from threaded import WAIT, run_threads, wait_until

HEADERS = ["Return-Path: <a@example.test>", "Delivered-To: bob@example.test"]


class FsyncRecord:
    """os.fsync, recording files and directories (entries when it began) on a shared sequence."""

    def __init__(self, real):
        self.real = real
        self.files = []  # (path, seq)
        self.dirs = []  # (path, start, entries at start, end)
        self._count = itertools.count()
        self._lock = threading.Lock()
        self.hook = None  # hook(index) before a directory fsync: may block or raise

    def seq(self):
        with self._lock:
            return next(self._count)

    def __call__(self, fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if not os.path.isdir(path):
            self.real(fd)
            self.files.append((path, self.seq()))
            return
        with self._lock:
            index = len(self.dirs)
            self.dirs.append(None)
        start, before = self.seq(), set(os.listdir(path))
        try:
            if self.hook is not None:
                self.hook(index)
            self.real(fd)
        finally:
            self.dirs[index] = (path, start, before, self.seq())


@pytest.fixture
def record(monkeypatch):
    """The recording fsync, installed as os.fsync for the test."""
    recorder = FsyncRecord(os.fsync)
    monkeypatch.setattr(os, "fsync", recorder)
    return recorder


def deliver(store, record, mailbox, text):
    """Deliver one message; return (path, seq when deliver returned)."""
    path = store.deliver(mailbox, HEADERS, io.BytesIO(text))
    return path, record.seq()


def test_concurrent_deliveries_are_each_durable(tmp_path, record):
    """12 threads x 5 deliveries into two mailboxes: each file was flushed,
    and a new/ fsync begun after its link ended before deliver returned."""
    store = MaildirStore(str(tmp_path), hostname="mx.example.test")
    store.deliver("bob", HEADERS, io.BytesIO(b"warm\r\n"))  # maildirs exist

    def deliverer(i):
        return [deliver(store, record, ("bob", "carol")[(i + n) % 2], b"x\r\n") for n in range(5)]

    results = run_threads(12, deliverer)
    for result in results:
        assert isinstance(result, list), result
        for path, returned in result:
            name, new = os.path.basename(path), os.path.dirname(path)
            flushed = [seq for p, seq in record.files if os.path.basename(p) == name]
            assert flushed, f"{name} never fsync'd"
            covering = [
                start for p, start, before, end in record.dirs if p == new and name in before and end < returned
            ]
            assert covering and max(flushed) < max(covering)
    assert len(os.listdir(tmp_path / "bob" / "new")) + len(os.listdir(tmp_path / "carol" / "new")) == 61


def test_deliveries_waiting_together_share_one_fsync_of_new(tmp_path, record):
    """Deliveries that reach new/ while its fsync runs wait for the next one,
    and that single fsync serves them all."""
    store = MaildirStore(str(tmp_path), hostname="mx.example.test")
    store.deliver("bob", HEADERS, io.BytesIO(b"warm\r\n"))
    record.dirs.clear()
    release = threading.Event()
    record.hook = lambda index: index == 0 and release.wait(WAIT)

    def deliverer(i):
        if i == 7:
            wait_until(lambda: maildir._newDirectories.waiting >= 6)
            release.set()
            return None
        if i:
            wait_until(lambda: record.dirs)
        return deliver(store, record, "bob", b"y\r\n")

    results = run_threads(8, deliverer)
    assert all(isinstance(r, tuple) for r in results[:7])
    new = str(tmp_path / "bob" / "new")
    assert [p for p, _, _, _ in record.dirs] == [new, new]  # 7 deliveries, 2 fsyncs of new/


def test_failed_shared_fsync_of_new_fails_each_delivery_of_the_round(tmp_path, record):
    """When the shared fsync of new/ fails, every delivery waiting on it
    raises a temporary error and takes its file back out of new/."""
    store = MaildirStore(str(tmp_path), hostname="mx.example.test")
    warm = store.deliver("bob", HEADERS, io.BytesIO(b"warm\r\n"))
    record.dirs.clear()
    release = threading.Event()

    def hook(index):
        if index == 0:
            release.wait(WAIT)
        elif index == 1:
            raise OSError(errno.EIO, "Input/output error")

    record.hook = hook

    def deliverer(i):
        if i == 6:
            wait_until(lambda: maildir._newDirectories.waiting >= 5)
            release.set()
            return None
        if i:
            wait_until(lambda: record.dirs)
        return deliver(store, record, "bob", b"z\r\n")

    results = run_threads(7, deliverer)[:6]
    assert results[0][0].startswith(str(tmp_path))
    assert all(isinstance(r, TemporaryDeliveryError) and r.status == "4.3.0" for r in results[1:])
    assert sorted(os.listdir(tmp_path / "bob" / "new")) == sorted(os.path.basename(p) for p in (warm, results[0][0]))
    assert os.listdir(tmp_path / "bob" / "tmp") == []


def test_maildir_removed_after_a_delivery_is_made_again(tmp_path):
    """Maildirs are remembered once made (no stat per delivery); one removed
    meanwhile, whole or only its new/, is made again by the next deliveries."""
    import shutil

    store = MaildirStore(str(tmp_path), hostname="mx.example.test")
    store.deliver("bob", HEADERS, io.BytesIO(b"one\r\n"))
    shutil.rmtree(tmp_path / "bob")
    second = store.deliver("bob", HEADERS, io.BytesIO(b"two\r\n"))
    assert os.listdir(tmp_path / "bob" / "new") == [os.path.basename(second)]
    shutil.rmtree(tmp_path / "bob" / "new")
    with pytest.raises(TemporaryDeliveryError):
        store.deliver("bob", HEADERS, io.BytesIO(b"three\r\n"))  # new/ gone: this one fails
    third = store.deliver("bob", HEADERS, io.BytesIO(b"three\r\n"))  # and the next one makes it
    assert os.listdir(tmp_path / "bob" / "new") == [os.path.basename(third)]
    assert os.listdir(tmp_path / "bob" / "tmp") == []

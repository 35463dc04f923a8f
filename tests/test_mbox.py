"""Tests for mailsvc.store.mbox: From lines, mboxrd quoting, locking, truncation on failure."""

from __future__ import annotations

import errno
import io
import mailbox
import os
import re
import stat
import subprocess
import sys
import threading
import time

import pytest
from zope.interface.verify import verifyObject

from mailsvc.errors import ConfigError, PermanentDeliveryError, TemporaryDeliveryError
from mailsvc.interfaces import IMailboxStore, IMailboxStoreFactory
from mailsvc.store.mbox import MboxrdQuoter, MboxStore, MboxStoreFactory, fromLine

NOW = 1700000000.0
HEADERS = ["Return-Path: <sender@example.org>", "Delivered-To: alice@example.test"]
WIRE = b"Subject: hi\r\nFrom: sender@example.org\r\n\r\nline one\r\n\r\nlast\r\n"


def headBytes(headers=HEADERS):
    """The header lines as the store writes them."""
    return b"".join(h.encode() + b"\n" for h in headers)


def unquote(data: bytes) -> bytes:
    """Undo mboxrd quoting: one ">" less on each line matching ^>+From ."""
    return re.sub(rb"(?m)^>(>*From )", rb"\1", data)


class OneByteReader(io.RawIOBase):
    """A source that returns one octet per read."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._data.read(1)


@pytest.fixture
def store(tmp_path):
    """An mbox store in a fresh directory, with a fixed clock and short lock wait."""
    return MboxStore(str(tmp_path / "mail"), lockTimeout=0.2, clock=lambda: NOW)


def contents(store, mailbox="alice"):
    """The bytes of a mailbox file."""
    with open(os.path.join(store.path, mailbox), "rb") as f:
        return f.read()


def test_verifyObject():
    """The store and its factory provide their interfaces."""
    assert verifyObject(IMailboxStore, MboxStore("/nonexistent"))
    assert verifyObject(IMailboxStoreFactory, MboxStoreFactory())


def test_exactContent(store):
    """From line, headers, message with LF, then one empty line; mode 0600."""
    path = store.deliver("alice", HEADERS, io.BytesIO(WIRE))
    assert path == os.path.join(store.path, "alice")
    date = time.asctime(time.localtime(NOW)).encode()
    expected = b"From sender@example.org " + date + b"\n" + headBytes() + WIRE.replace(b"\r\n", b"\n") + b"\n"
    assert contents(store) == expected
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert store.exists("alice") and not store.exists("bob")
    assert not os.path.exists(path + ".lock")


@pytest.mark.parametrize(
    "headers, sender",
    [
        (["Return-Path: <a@b.example>"], b"a@b.example"),
        (["Return-Path: <>"], b"MAILER-DAEMON"),
        (["return-path:<x@y>"], b"x@y"),
        (["Delivered-To: a@b"], b"MAILER-DAEMON"),
        (['Return-Path: <"a b"@c.example>'], b'"a_b"@c.example'),
    ],
)
def test_fromLineSender(headers, sender):
    """The From line names the Return-Path sender, MAILER-DAEMON for <> or none."""
    line = fromLine(headers, NOW)
    assert line == b"From " + sender + b" " + time.asctime(time.localtime(NOW)).encode() + b"\n"


@pytest.mark.parametrize(
    "text, quoted",
    [
        (b"From me\n", b">From me\n"),
        (b">From me\n", b">>From me\n"),
        (b">>>From x\n", b">>>>From x\n"),
        (b"From\n", b"From\n"),
        (b"Fromage\n", b"Fromage\n"),
        (b" From x\n", b" From x\n"),
        (b"x From y\n", b"x From y\n"),
        (b">> From\n", b">> From\n"),
        (b"a\nFrom b\nFrom c", b"a\n>From b\n>From c"),
        (b"Fro", b"Fro"),
        (b">>", b">>"),
        (b"", b""),
        (b"\n\nFrom \n", b"\n\n>From \n"),
    ],
)
@pytest.mark.parametrize("step", [1, 2, 3, 1000])
def test_mboxrdQuoter(text, quoted, step):
    """Lines matching ^>*From get one more '>', however the text is cut into chunks."""
    quoter = MboxrdQuoter()
    out = b"".join(quoter.feed(text[i : i + step]) for i in range(0, len(text), step)) + quoter.end()
    assert out == quoted
    assert quoter.endsWithNewline == (not text or text.endswith(b"\n"))


def test_fromQuotingAndReadBack(store):
    """Python's mailbox.mbox reads back each message; unquoted, it is the message sent."""
    body1 = b"Subject: one\r\n\r\nFrom the top\r\n>From quoted\r\nplain\r\n"
    body2 = b"Subject: two\r\n\r\nno final newline"
    store.deliver("alice", HEADERS, OneByteReader(body1))
    store.deliver("alice", ["Return-Path: <>"], io.BytesIO(body2))
    raw = contents(store)
    assert b"\n>From the top\n>>From quoted\n" in raw
    box = mailbox.mbox(os.path.join(store.path, "alice"), create=False)
    try:
        keys = box.keys()
        assert len(keys) == 2
        first, second = (box.get_bytes(key) for key in keys)
        assert unquote(first) == headBytes() + body1.replace(b"\r\n", b"\n")
        assert unquote(second) == b"Return-Path: <>\n" + body2.replace(b"\r\n", b"\n") + b"\n"
        assert box.get_message(keys[0]).get_from().startswith("sender@example.org ")
        assert box.get_message(keys[1]).get_from().startswith("MAILER-DAEMON ")
        assert box.get_message(keys[0])["Subject"] == "one"
    finally:
        box.close()


def test_appendsToExistingFile(store):
    """A second delivery appends; the first message is untouched."""
    store.deliver("alice", HEADERS, io.BytesIO(WIRE))
    first = contents(store)
    store.deliver("alice", HEADERS, io.BytesIO(WIRE))
    assert contents(store) == first * 2


def test_concurrentDeliveriesAreSerialised(tmp_path):
    """Threads delivering to one mbox at once each get a whole message in the file."""
    store = MboxStore(str(tmp_path / "mail"), lockTimeout=30, clock=lambda: NOW)

    def work(n):
        for i in range(10):
            body = b"Subject: %d-%d\r\n\r\nFrom body %d\r\n" % (n, i, i) * 50
            store.deliver("alice", HEADERS, io.BytesIO(body))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    box = mailbox.mbox(os.path.join(store.path, "alice"), create=False)
    try:
        subjects = sorted(box.get_message(key)["Subject"] for key in box.keys())
    finally:
        box.close()
    assert subjects == sorted(f"{n}-{i}" for n in range(4) for i in range(10))


def test_dotLockHeldIsBusy(store):
    """A fresh <file>.lock held by another writer gives 4.2.0 after a short wait."""
    os.makedirs(store.path)
    lock = os.path.join(store.path, "alice.lock")
    open(lock, "w").close()
    with pytest.raises(TemporaryDeliveryError) as caught:
        store.deliver("alice", HEADERS, io.BytesIO(WIRE))
    assert caught.value.status == "4.2.0"
    assert os.path.exists(lock)  # not ours: left alone
    assert not os.path.exists(os.path.join(store.path, "alice"))


def test_staleDotLockIsBroken(store):
    """A dot-lock older than the stale age was left by a crash and is removed."""
    os.makedirs(store.path)
    lock = os.path.join(store.path, "alice.lock")
    open(lock, "w").close()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    store.deliver("alice", HEADERS, io.BytesIO(WIRE))
    assert not os.path.exists(lock)
    assert contents(store).startswith(b"From sender@example.org ")


def test_lockfHeldByAnotherProcessIsBusy(store):
    """A lockf lock held by another process gives 4.2.0, and the file is unchanged."""
    os.makedirs(store.path)
    path = os.path.join(store.path, "alice")
    with open(path, "wb") as f:
        f.write(b"From x Thu Jan  1 00:00:00 1970\n\nold\n\n")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            "f = open(sys.argv[1], 'ab')\n"
            "fcntl.lockf(f, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
            path,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(TemporaryDeliveryError) as caught:
            store.deliver("alice", HEADERS, io.BytesIO(WIRE))
        assert caught.value.status == "4.2.0"
        assert contents(store) == b"From x Thu Jan  1 00:00:00 1970\n\nold\n\n"
        assert not os.path.exists(path + ".lock")
    finally:
        holder.stdin.close()
        holder.wait()
        holder.stdout.close()
    store.deliver("alice", HEADERS, io.BytesIO(WIRE))  # free again


def test_failureTruncatesBack(store, monkeypatch):
    """ENOSPC at fsync gives 4.3.1 and the file is cut back to its old length."""
    store.deliver("alice", HEADERS, io.BytesIO(WIRE))
    before = contents(store)
    realFsync = os.fsync
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        realFsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(TemporaryDeliveryError) as caught:
        store.deliver("alice", HEADERS, io.BytesIO(WIRE * 1000))
    assert caught.value.status == "4.3.1"
    assert contents(store) == before
    assert not os.path.exists(os.path.join(store.path, "alice.lock"))


def test_sourceErrorMidwayTruncatesBack(store):
    """A source failing after some data was written leaves the file as it was."""
    store.deliver("alice", HEADERS, io.BytesIO(WIRE))
    before = contents(store)

    class Failing(io.RawIOBase):
        def __init__(self):
            self.reads = 0

        def readable(self):
            return True

        def read(self, size=-1):
            self.reads += 1
            if self.reads > 3:
                raise OSError(errno.EIO, "Input/output error")
            return b"From data\r\n" * 100

    with pytest.raises(TemporaryDeliveryError) as caught:
        store.deliver("alice", HEADERS, Failing())
    assert caught.value.status == "4.3.0"
    assert contents(store) == before


@pytest.mark.parametrize("mailbox", ["", "a/b", "..", ".x", "a\0b"])
def test_invalidMailboxNamesArePermanent(store, mailbox):
    """Names that are not plain file names are refused with 5.1.3."""
    with pytest.raises(PermanentDeliveryError) as caught:
        store.deliver(mailbox, HEADERS, io.BytesIO(WIRE))
    assert caught.value.status == "5.1.3"
    assert not store.exists(mailbox)


def test_symlinkMailboxIsRefused(store, tmp_path):
    """A mailbox file that is a symlink is not followed (4.3.0, fixable)."""
    os.makedirs(store.path)
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    os.symlink(target, os.path.join(store.path, "alice"))
    with pytest.raises(TemporaryDeliveryError):
        store.deliver("alice", HEADERS, io.BytesIO(WIRE))
    assert target.read_bytes() == b""


def test_factory(tmp_path):
    """makeStore takes path and lock_timeout; other options and bad values are named."""
    factory = MboxStoreFactory()
    assert factory.name == "mbox"
    store = factory.makeStore({"path": str(tmp_path), "lock_timeout": 2})
    assert isinstance(store, MboxStore) and store.lockTimeout == 2.0
    assert factory.makeStore({"path": str(tmp_path)}).lockTimeout > 0
    with pytest.raises(ConfigError, match=r"\[store\] mode: unknown option"):
        factory.makeStore({"path": str(tmp_path), "mode": "0644"})
    with pytest.raises(ConfigError, match=r"\[store\] lock_timeout"):
        factory.makeStore({"path": str(tmp_path), "lock_timeout": True})
    with pytest.raises(ConfigError, match=r"\[store\] path"):
        factory.makeStore({"path": "mail"})

"""Tests for mailsvc.store.maildir: layout, exact content, unique names, failures."""

from __future__ import annotations

import errno
import io
import os
import stat
import threading

import pytest
from zope.interface.verify import verifyObject

from mailsvc.errors import ConfigError, PermanentDeliveryError, TemporaryDeliveryError
from mailsvc.interfaces import IMailboxStore, IMailboxStoreFactory
from mailsvc.store import lfChunks
from mailsvc.store.maildir import MaildirStore, MaildirStoreFactory, escapeHostname, uniqueName

HEADERS = ["Return-Path: <sender@example.org>", "Delivered-To: alice@example.test"]
WIRE = b"Subject: hi\r\nFrom: sender@example.org\r\n\r\nline one\r\n\r\nFrom the start\r\nlast\r\n"
EXPECTED = b"\n".join(h.encode() for h in HEADERS) + b"\n" + WIRE.replace(b"\r\n", b"\n")


class OneByteReader(io.RawIOBase):
    """A source that returns one octet per read, so every CRLF is split across reads."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._data.read(1)


@pytest.fixture
def store(tmp_path):
    """A Maildir store in a fresh directory."""
    return MaildirStore(str(tmp_path / "mail"), hostname="host.example")


def listing(store, mailbox, sub):
    """The names in one of the Maildir's subdirectories."""
    return sorted(os.listdir(os.path.join(store.path, mailbox, sub)))


def test_verifyObject():
    """The store and its factory provide their interfaces."""
    assert verifyObject(IMailboxStore, MaildirStore("/nonexistent"))
    assert verifyObject(IMailboxStoreFactory, MaildirStoreFactory())


def test_deliverWritesExactContentIntoNew(store):
    """The file in new/ is the headers, LF-ended, then the message with CRLF made LF."""
    path = store.deliver("alice", HEADERS, io.BytesIO(WIRE))
    assert os.path.dirname(path) == os.path.join(store.path, "alice", "new")
    with open(path, "rb") as f:
        assert f.read() == EXPECTED
    assert listing(store, "alice", "tmp") == []
    assert listing(store, "alice", "cur") == []
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_firstDeliveryCreatesMaildirMode0700(store):
    """tmp/, new/ and cur/ are made on first delivery, mode 0700; exists() tells."""
    assert not store.exists("alice")
    store.deliver("alice", HEADERS, io.BytesIO(WIRE))
    assert store.exists("alice")
    for sub in ("", "tmp", "new", "cur"):
        mode = os.stat(os.path.join(store.path, "alice", sub)).st_mode
        assert stat.S_IMODE(mode) == 0o700


def test_crlfSplitAcrossReads(store):
    """A source giving one octet per read still has every CRLF turned into LF."""
    path = store.deliver("alice", HEADERS, OneByteReader(WIRE))
    with open(path, "rb") as f:
        assert f.read() == EXPECTED


@pytest.mark.parametrize(
    "wire, chunk, expected",
    [
        (b"a\r\nb\r\n", 2, b"a\nb\n"),
        (b"a\r\nb\r\n", 3, b"a\nb\n"),
        (b"abc\r", 4, b"abc\r"),  # a CR at the very end with no LF stays a CR
        (b"\r\n\r\n", 1, b"\n\n"),
        (b"", 4, b""),
        (b"x" * 10 + b"\r\n", 4, b"x" * 10 + b"\n"),
    ],
)
def test_lfChunks(wire, chunk, expected):
    """lfChunks converts CRLF to LF whatever the chunk boundaries."""
    assert b"".join(lfChunks(io.BytesIO(wire), chunk)) == expected


def test_noHeaders(store):
    """With no header lines, the file is exactly the message in LF form."""
    path = store.deliver("alice", [], io.BytesIO(WIRE))
    with open(path, "rb") as f:
        assert f.read() == WIRE.replace(b"\r\n", b"\n")


def test_largeMessageStreams(store):
    """A message bigger than several chunks arrives whole and exact."""
    wire = b"".join(b"line %d of a long message\r\n" % i for i in range(20000))
    path = store.deliver("alice", HEADERS, io.BytesIO(wire))
    with open(path, "rb") as f:
        assert f.read().split(b"\n", 2)[2] == wire.replace(b"\r\n", b"\n")


def test_uniqueNamesUnderManyDeliveries(store):
    """Many deliveries from several threads give as many distinct files."""
    paths = []
    lock = threading.Lock()

    def work():
        for _ in range(50):
            path = store.deliver("alice", HEADERS, io.BytesIO(WIRE))
            with lock:
                paths.append(path)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(paths)) == 200
    assert len(listing(store, "alice", "new")) == 200
    assert listing(store, "alice", "tmp") == []


def test_uniqueNameForm():
    """Names are <sec>.M<usec>P<pid>Q<n>.<host>, the host with / and : escaped."""
    name = uniqueName("a/b:c", now=1700000000.25)
    prefix = f"1700000000.M250000P{os.getpid()}Q"
    assert name.startswith(prefix)
    assert name.endswith(".a\\057b\\072c")
    assert name[len(prefix) :].split(".", 1)[0].isdigit()
    assert uniqueName("h", now=1.0) != uniqueName("h", now=1.0)
    assert escapeHostname("x.y") == "x.y"


def test_fsyncFailureIsTemporaryFullAndLeavesNothing(store, monkeypatch):
    """ENOSPC while flushing gives 4.3.1; tmp/ stays empty and new/ unchanged."""
    first = store.deliver("alice", HEADERS, io.BytesIO(WIRE))

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(TemporaryDeliveryError) as caught:
        store.deliver("alice", HEADERS, io.BytesIO(WIRE))
    assert caught.value.status == "4.3.1"
    assert listing(store, "alice", "tmp") == []
    assert listing(store, "alice", "new") == [os.path.basename(first)]


def test_directoryFsyncFailureRemovesNewFile(store, monkeypatch):
    """If new/ cannot be flushed after the link, the new file is taken back."""
    store.deliver("alice", HEADERS, io.BytesIO(WIRE))
    before = listing(store, "alice", "new")
    realFsync = os.fsync
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:  # the file first, then the new/ directory
            raise OSError(errno.EIO, "Input/output error")
        realFsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(TemporaryDeliveryError) as caught:
        store.deliver("alice", HEADERS, io.BytesIO(WIRE))
    assert caught.value.status == "4.3.0"
    assert listing(store, "alice", "new") == before
    assert listing(store, "alice", "tmp") == []


def test_sourceErrorLeavesNothing(store):
    """An error reading the source removes the tmp file and is reported as temporary."""

    class Broken(io.RawIOBase):
        def readable(self):
            return True

        def read(self, size=-1):
            raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(TemporaryDeliveryError) as caught:
        store.deliver("alice", HEADERS, Broken())
    assert caught.value.status == "4.3.0"
    assert listing(store, "alice", "tmp") == []
    assert listing(store, "alice", "new") == []


def test_unwritableMaildirIsTemporary(store, monkeypatch):
    """EACCES creating the tmp file is 4.3.0, not a permanent failure."""
    store.deliver("alice", HEADERS, io.BytesIO(WIRE))
    realOpen = os.open

    def denyingOpen(path, flags, *args, **kwargs):
        if "/tmp/" in str(path)[len(store.path) :]:
            raise OSError(errno.EACCES, "Permission denied")
        return realOpen(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denyingOpen)
    with pytest.raises(TemporaryDeliveryError) as caught:
        store.deliver("alice", HEADERS, io.BytesIO(WIRE))
    assert caught.value.status == "4.3.0"


@pytest.mark.parametrize("mailbox", ["", "a/b", "..", "a..b", ".hidden", "a\0b", "."])
def test_invalidMailboxNamesArePermanent(store, mailbox):
    """Names that are not plain file names are refused with 5.1.3 and nothing is made."""
    with pytest.raises(PermanentDeliveryError) as caught:
        store.deliver(mailbox, HEADERS, io.BytesIO(WIRE))
    assert caught.value.status == "5.1.3"
    assert not store.exists(mailbox)
    assert not os.path.exists(store.path)


def test_headerWithLineEndIsRefused(store):
    """A header line holding a line end is a caller bug, refused before writing."""
    with pytest.raises(ValueError):
        store.deliver("alice", ["X-Bad: a\nInjected: b"], io.BytesIO(WIRE))


def test_factory(tmp_path):
    """makeStore takes an absolute path; unknown options and bad paths are named."""
    factory = MaildirStoreFactory()
    assert factory.name == "maildir"
    store = factory.makeStore({"path": str(tmp_path)})
    assert isinstance(store, MaildirStore) and store.path == str(tmp_path)
    with pytest.raises(ConfigError, match=r"\[store\] colour: unknown option"):
        factory.makeStore({"path": str(tmp_path), "colour": "blue"})
    with pytest.raises(ConfigError, match=r"\[store\] path"):
        factory.makeStore({"path": "relative/mail"})
    with pytest.raises(ConfigError, match=r"\[store\] path"):
        factory.makeStore({})

"""The quick paths of local delivery give what the general paths give.

Local delivery of a small message to one recipient has shortcuts (one read,
one write, kept paths, kept lookups); these tests show that the octets, the
names, the errors and the answers are the same as without them.
"""

from __future__ import annotations

import io
import os
import re
from types import MappingProxyType

import pytest
from twisted.internet import defer
from twisted.logger import Logger

from mailsvc.config import LocalConfig
from mailsvc.delivery import router
from mailsvc.delivery.local import LocalDeliveryAgent
from mailsvc.directory import ConfigDirectory
from mailsvc.durable import run_steps
from mailsvc.envelope import Recipient
from mailsvc.errors import PermanentDeliveryError, TemporaryDeliveryError
from mailsvc.spool import FileSpool
from mailsvc.store import CHUNK_SIZE, headerBytes, lfChunks, writeAll
from mailsvc.store import maildir
from mailsvc.store.maildir import MaildirStore, uniqueName
from test_local_agent import ENVELOPE, result_of

HEADERS = ["Return-Path: <alice@example.test>", "Delivered-To: bob@example.test"]
BOB = Recipient("bob@example.test", "bob@example.test", "bob")


class Dribble(io.RawIOBase):
    """A source giving at most ``step`` octets per read: the general path."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = io.BytesIO(data)
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._data.readinto(memoryview(buffer)[: self._step])


WIRES = [
    b"",
    b"a\r\nb\r\n",
    b"no line end",
    b"ends in CR\r",
    b"bare\rCR\r\n",
    b"x" * (CHUNK_SIZE - 2) + b"\r\n",  # exactly one chunk: the general path
    b"x" * (CHUNK_SIZE - 1) + b"\r\n",  # the CRLF split across two chunks
    b"y" * (CHUNK_SIZE - 3) + b"\r\n",  # one octet short of a chunk
    b"line\r\n" * 30000,
]


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("wrap", [io.BytesIO, lambda data: io.BufferedReader(io.BytesIO(data))])
def test_lfChunks_quick_path_gives_the_same_octets(wire, wrap):
    """A buffered source (one read for a small message) and a dribbling one
    (many reads) give the same octets, CRLF made LF and nothing else."""
    expected = wire.replace(b"\r\n", b"\n")
    assert b"".join(lfChunks(wrap(wire))) == expected
    assert b"".join(lfChunks(Dribble(wire, 7))) == expected


class CountingRaw(io.RawIOBase):
    """A raw file over ``data`` that counts its reads."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)
        self.reads = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.reads += 1
        return self._data.readinto(buffer)


class SpyBytesIO(io.BytesIO):
    """A BytesIO subclass recording the sizes asked of read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.asked: list[int] = []

    def read(self, size=-1):
        self.asked.append(size)
        return super().read(size)


def test_lfChunks_reads_a_small_buffered_message_once():
    """Under a BufferedReader (what FileSpool.open gives), a message smaller
    than a chunk takes one read: the buffer's two reads of the raw file (the
    data, then its end), no third one. Other sources, subclasses included,
    are read until a read gives nothing."""
    raw = CountingRaw(b"Subject: x\r\n\r\nhi\r\n")
    assert b"".join(lfChunks(io.BufferedReader(raw))) == b"Subject: x\n\nhi\n"
    assert raw.reads == 2
    spy = SpyBytesIO(b"hi\r\n")
    assert b"".join(lfChunks(spy)) == b"hi\n"
    assert spy.asked == [CHUNK_SIZE, CHUNK_SIZE]


def test_headerBytes_same_octets_and_errors():
    """Headers become LF-ended UTF-8 lines; a line end inside a line is
    refused; a line that cannot be encoded fails as it alone would."""
    assert headerBytes(HEADERS) == b"".join(h.encode() + b"\n" for h in HEADERS)
    assert headerBytes(tuple(HEADERS)) == headerBytes(iter(HEADERS)) == headerBytes(HEADERS)
    assert headerBytes([]) == headerBytes(iter(())) == b""
    assert headerBytes(["Delivered-To: jos\u00e9@example.test"]) == "Delivered-To: jos\u00e9@example.test\n".encode()
    with pytest.raises(ValueError, match="line end"):
        headerBytes(["A: b", "C: d\r\nE: f"])
    bad = "Return-Path: <\udcff@example.test>"
    with pytest.raises(UnicodeEncodeError) as alone:
        bad.encode("utf-8")
    with pytest.raises(UnicodeEncodeError) as raised:
        headerBytes(["Delivered-To: bob@example.test", bad])
    assert str(raised.value) == str(alone.value)


def test_writeAll_finishes_short_writes(tmp_path, monkeypatch):
    """When the system writes less than asked, the rest follows."""
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data)[:3]))
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        writeAll(fd, b"0123456789")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"0123456789"


@pytest.mark.parametrize("size", [0, 100, CHUNK_SIZE - 80, CHUNK_SIZE, 3 * CHUNK_SIZE + 5])
def test_maildir_file_from_the_spool_is_exact(tmp_path, size):
    """Through the real spool, the file in new/ is the delivery headers, the
    prepended headers, then the data, each CRLF made LF, whatever its size."""
    spool = FileSpool(tmp_path / "spool")
    data = b"Subject: s\r\n\r\n" + (b"z" * 70 + b"\r\n") * (size // 72) + b"end\r"
    writer = spool.newMessage()
    writer.write(data)
    [message] = writer.commit(ENVELOPE, {"local": (BOB,)})
    store = MaildirStore(str(tmp_path / "mail"), hostname="mx.test")
    with spool.open(message) as source:
        path = run_steps(store.deliverSteps("bob", HEADERS, source))
    expected = b"".join(h.encode() + b"\n" for h in [*HEADERS, *ENVELOPE.prepend_headers]) + data.replace(b"\r\n", b"\n")
    with open(path, "rb") as f:
        assert f.read() == expected
    assert os.listdir(tmp_path / "mail" / "bob" / "tmp") == []


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_unique_name_has_the_pid_of_the_process_after_fork():
    """The process id is kept, but a child made by fork names its files with its own."""
    assert f"P{os.getpid()}Q" in uniqueName("h")
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.write(writing, f"{os.getpid()} {uniqueName('h')}".encode())
        finally:
            os._exit(0)
    os.close(writing)
    with os.fdopen(reading, "rb") as f:
        child, name = f.read().decode().split()
    os.waitpid(pid, 0)
    assert int(child) == pid and f"P{pid}Q" in name
    assert f"P{os.getpid()}Q" in uniqueName("h")


def test_unique_name_form_is_unchanged():
    """<sec>.M<usec>P<pid>Q<n>.<host>, the host escaped."""
    assert re.fullmatch(rf"1700000000\.M250000P{os.getpid()}Q\d+\.a\\057b\\072c", uniqueName("a/b:c", now=1700000000.25))


@pytest.mark.parametrize("mailbox", ["", ".hidden", "a/b", "a..b", "nul\0", ["bob"], b"bob", 7])
def test_bad_mailbox_names_are_refused_every_time(tmp_path, mailbox):
    """Known mailboxes' paths are kept; a bad name is never kept and is
    refused (5.1.3) at each delivery, whatever its type."""
    store = MaildirStore(str(tmp_path), hostname="mx.test")
    store.deliver("bob", HEADERS, io.BytesIO(b"x\r\n"))
    for _ in range(2):
        with pytest.raises(PermanentDeliveryError) as raised:
            store.deliver(mailbox, HEADERS, io.BytesIO(b"x\r\n"))
        assert raised.value.status == "5.1.3"


def test_kept_paths_are_bounded(tmp_path, monkeypatch):
    """The paths kept per mailbox never pass the bound."""
    monkeypatch.setattr(maildir, "_MAX_KEPT_PATHS", 3)
    store = MaildirStore(str(tmp_path), hostname="mx.test")
    for n in range(7):
        store.deliver(f"user{n}", HEADERS, io.BytesIO(b"x\r\n"))
        assert len(store._paths) <= 3
    assert sorted(os.listdir(tmp_path)) == [f"user{n}" for n in range(7)]


def test_maildir_removed_after_a_delivery_is_made_again(tmp_path):
    """A maildir removed between two deliveries is made again (its paths are
    kept, not its existence)."""
    store = MaildirStore(str(tmp_path), hostname="mx.test")
    store.deliver("bob", HEADERS, io.BytesIO(b"one\r\n"))
    for sub in ("tmp", "new", "cur"):
        for name in os.listdir(tmp_path / "bob" / sub):
            os.unlink(tmp_path / "bob" / sub / name)
        os.rmdir(tmp_path / "bob" / sub)
    os.rmdir(tmp_path / "bob")
    path = store.deliver("bob", HEADERS, io.BytesIO(b"two\r\n"))
    with open(path, "rb") as f:
        assert f.read().endswith(b"\ntwo\n")


def _agent(tmp_path, store, recipients=(BOB,)):
    spool = FileSpool(tmp_path / "spool")
    writer = spool.newMessage()
    writer.write(b"Subject: hi\r\n\r\nhello\r\n")
    [message] = writer.commit(ENVELOPE, {"local": tuple(recipients)})
    events = []
    agent = LocalDeliveryAgent(
        store, spool, defer.maybeDeferred, log=Logger(observer=events.append),
        run_steps=lambda steps: defer.maybeDeferred(run_steps, steps),
    )
    return agent, message, events


def test_one_recipient_results_through_the_steps(tmp_path):
    """One recipient: delivered gives {address: None}; a failing store gives
    {address: error}, errors mapped as for many recipients."""
    store = MaildirStore(str(tmp_path / "mail"), hostname="mx.test")
    agent, message, _ = _agent(tmp_path, store)
    assert result_of(agent.deliver(message)) == {"bob@example.test": None}
    [name] = os.listdir(tmp_path / "mail" / "bob" / "new")
    assert (tmp_path / "mail" / "bob" / "new" / name).read_bytes() == (
        b"Return-Path: <alice@example.test>\nDelivered-To: bob@example.test\n"
        b"Received: from client by mail.example.test\nSubject: hi\n\nhello\n"
    )

    class Broken(MaildirStore):
        def deliverSteps(self, mailbox, headers, source):
            raise KeyError("surprise")
            yield

    agent, message, events = _agent(tmp_path / "2", Broken(str(tmp_path / "mail2")))
    [(address, error)] = result_of(agent.deliver(message)).items()
    assert address == "bob@example.test"
    assert isinstance(error, TemporaryDeliveryError) and error.status == "4.3.0"
    assert str(error) == "4.3.0 internal error: KeyError: 'surprise'"
    assert any("failed unexpectedly" in e.get("log_format", "") for e in events)


def test_one_recipient_without_mailbox(tmp_path):
    """One recipient with no mailbox: {address: 5.1.1 error} at once."""
    store = MaildirStore(str(tmp_path / "mail"), hostname="mx.test")
    agent, message, _ = _agent(tmp_path, store, [Recipient("x@example.test")])
    [(address, error)] = result_of(agent.deliver(message)).items()
    assert address == "x@example.test"
    assert isinstance(error, PermanentDeliveryError) and error.status == "5.1.1"


LOCAL = LocalConfig(
    domains=("example.test",),
    users=MappingProxyType({"alice": "Alice", "bob": ""}),
    aliases=MappingProxyType({"postmaster": ("alice",), "team": ("alice", "bob")}),
)


def test_directory_keeps_known_answers_only():
    """resolve gives the same answers again; only known names are kept, so
    unknown addresses do not grow the directory."""
    directory = ConfigDirectory(LOCAL)
    first = directory.resolve("Team@Example.Test")
    assert [m.mailbox for m in first] == ["alice", "bob"]
    assert directory.resolve("team@example.test.") == first
    assert directory.resolve("bob@example.test")[0].address == "bob@example.test"
    for n in range(50):
        assert directory.resolve(f"nobody{n}@example.test") == ()
    assert len(directory._resolved) == 2


def test_router_recipients_are_the_same_and_bounded(monkeypatch):
    """find_recipients answers as before; kept recipients stay bounded."""
    monkeypatch.setattr(router, "_made", {})
    monkeypatch.setattr(router, "_MAX_MADE", 4)
    directory = ConfigDirectory(LOCAL)
    assert router.find_recipients(directory, "team@example.test", "orig@x.test") == [
        Recipient("alice@example.test", "orig@x.test", "alice"),
        Recipient("bob@example.test", "orig@x.test", "bob"),
    ]
    for n in range(20):
        found = router.find_recipients(directory, "bob@example.test", f"o{n}@x.test")
        assert found == [Recipient("bob@example.test", f"o{n}@x.test", "bob")]
        assert len(router._made) <= 4
    assert router.find_recipients(directory, "x@far.test") == [Recipient("x@far.test", "x@far.test")]


def test_routes_of_one_recipient():
    """One recipient in a tuple is routed as the general path routes it."""
    r = router.Router({"site.example": "uucp.site"})
    for recipient in (BOB, Recipient("x@site.example"), Recipient("y@far.test")):
        assert r.routes((recipient,)) == r.routes([recipient]) == {r.hop_for(recipient): (recipient,)}

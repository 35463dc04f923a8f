"""The file spool: atomic commit, crash recovery, streaming, control files."""

import errno
import io
import os
import re
import subprocess
import sys
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from mailsvc.envelope import Envelope, QueuedMessage, Recipient, RecipientState
from mailsvc.errors import SpoolError
from mailsvc.interfaces import IMessageWriter, ISpool
from mailsvc.spool import FileSpool, control, filespool
from mailsvc.spool import writer as writer_module

ENVELOPE = Envelope(
    sender="alice@example.test",
    recipients=(),
    parameters=(("BODY", "8BITMIME"),),
    helo="client.example.test",
    client_address="192.0.2.1",
    protocol="ESMTP",
    received_at=1763891234.123456,
    prepend_headers=("Received: from client.example.test ([192.0.2.1]) by mail.example.test",),
)
BOB = Recipient("bob@example.test", "Bob@example.test", "bob")
CAROL = Recipient("carol@example.test", "carol@example.test", "carol")
FAR = Recipient("dave@far.example")
DATA = b"Subject: hello\r\n\r\nline one\r\n.dot\r\nbare\rcr and bare\nlf \x00\xff\r\n"


def files_in(root):
    """Every file under ``root``, as paths relative to it, but those in
    ``spent/``: removed files kept for reuse, no message's any more."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "spent"
    )


def queue(spool, data=DATA, routes=None, envelope=ENVELOPE):
    """Write and commit one message; return its QueuedMessages."""
    writer = spool.newMessage()
    writer.write(data)
    return writer.commit(envelope, routes or {"local": (BOB,)})


def test_implements_interfaces(tmp_path):
    """FileSpool provides ISpool and its writers IMessageWriter."""
    spool = FileSpool(tmp_path)
    writer = spool.newMessage()
    assert verifyObject(ISpool, spool)
    assert verifyObject(IMessageWriter, writer)
    writer.abort()


def test_commit_then_recover_sees_it(tmp_path):
    """A committed message is found again by recover() and queued(), after a restart."""
    [message] = queue(FileSpool(tmp_path))
    assert message.hop == "local"
    assert message.envelope.recipients == (BOB,)
    assert message.envelope.sender == ENVELOPE.sender
    restarted = FileSpool(tmp_path)
    assert restarted.recover() == [message]
    assert restarted.queued() == [message]
    assert files_in(tmp_path) == [f"local/C.{message.id}", f"local/D.{message.id}"]


def test_data_is_byte_exact(tmp_path):
    """D. holds exactly the octets written; open() prepends the headers in CRLF form."""
    spool = FileSpool(tmp_path)
    writer = spool.newMessage()
    for i in range(0, len(DATA), 7):
        writer.write(DATA[i : i + 7])
    assert writer.size == len(DATA)
    [message] = writer.commit(ENVELOPE, {"local": (BOB,)})
    assert (tmp_path / "local" / f"D.{message.id}").read_bytes() == DATA
    with spool.open(message) as f:
        assert f.read() == ENVELOPE.prepend_headers[0].encode() + b"\r\n" + DATA


def test_open_without_headers_reads_only_data(tmp_path):
    """With no prepend headers, open() reads the data alone, in small reads too."""
    spool = FileSpool(tmp_path)
    [message] = queue(spool, envelope=ENVELOPE.evolve(prepend_headers=()))
    with spool.open(message) as f:
        chunks = iter(lambda: f.read(5), b"")
        assert b"".join(chunks) == DATA


@pytest.mark.parametrize("data", [DATA, DATA * 2000], ids=["small, read whole", "big, streamed"])
def test_open_is_seekable_across_headers_and_data(tmp_path, data):
    """The reader tells its size without reading through (seek to the end:
    the relay's SIZE= of a big message), and reads right from any position,
    in the prepended headers or in the data."""
    spool = FileSpool(tmp_path)
    [message] = queue(spool, data=data)
    whole = ENVELOPE.prepend_headers[0].encode() + b"\r\n" + data
    with spool.open(message) as f:
        assert f.seekable()
        assert f.readline() == ENVELOPE.prepend_headers[0].encode() + b"\r\n"
        assert f.seek(0, io.SEEK_END) == len(whole)
        assert f.read() == b""
        for position in (0, 3, len(whole) - len(data), len(whole) - 2):
            f.seek(position)
            assert f.read() == whole[position:]
        f.seek(5)
        f.seek(4, io.SEEK_CUR)
        assert f.tell() == 9 and f.read(4) == whole[9:13]


def test_open_with_several_headers(tmp_path):
    """Several prepend headers come out in order, each ended by CRLF."""
    spool = FileSpool(tmp_path)
    env = ENVELOPE.evolve(prepend_headers=("A: 1", "B: tab\there"))
    [message] = queue(spool, envelope=env)
    with spool.open(message) as f:
        assert f.read() == b"A: 1\r\nB: tab\there\r\n" + DATA


def test_two_hops_share_data_by_hard_link(tmp_path):
    """A message for two hops has one data file linked twice and a C. per hop."""
    spool = FileSpool(tmp_path)
    local, relay = queue(spool, routes={"local": (BOB, CAROL), "relay": (FAR,)})
    assert (local.hop, relay.hop) == ("local", "relay")
    assert local.id == relay.id
    assert local.envelope.recipients == (BOB, CAROL)
    assert relay.envelope.recipients == (FAR,)
    a = os.stat(tmp_path / "local" / f"D.{local.id}")
    b = os.stat(tmp_path / "relay" / f"D.{relay.id}")
    assert (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)
    assert a.st_nlink == 2
    assert sorted(spool.queued(), key=lambda m: m.hop) == [local, relay]
    spool.remove(local)
    assert (tmp_path / "relay" / f"D.{relay.id}").read_bytes() == DATA


def test_empty_hops_are_skipped(tmp_path):
    """A hop with no recipient gets no files; no recipient at all is refused."""
    spool = FileSpool(tmp_path)
    [message] = queue(spool, routes={"local": (BOB,), "relay": ()})
    assert message.hop == "local"
    assert not (tmp_path / "relay").exists()
    writer = spool.newMessage()
    with pytest.raises(ValueError):
        writer.commit(ENVELOPE, {"local": ()})
    writer.abort()
    assert files_in(tmp_path) == [f"local/C.{message.id}", f"local/D.{message.id}"]


def test_missing_arrival_time_is_stamped(tmp_path):
    """An envelope without received_at gets the commit time (the retry deadline counts from it)."""
    [message] = queue(FileSpool(tmp_path), envelope=ENVELOPE.evolve(received_at=0.0))
    assert message.envelope.received_at > 1e9


@pytest.mark.parametrize("hop", ["", "tmp", "corrupt", "TMP", "../x", "a/b", ".hidden", "-x", "a b", "é"])
def test_unsafe_hop_names_are_refused(tmp_path, hop):
    """Hop names must be safe, non-reserved directory names."""
    spool = FileSpool(tmp_path)
    writer = spool.newMessage()
    writer.write(DATA)
    with pytest.raises(ValueError):
        writer.commit(ENVELOPE, {hop: (BOB,)})
    writer.abort()
    assert files_in(tmp_path) == []


def test_hop_names_like_domains_are_fine(tmp_path):
    """Hops such as hold.customer.example are accepted."""
    [message] = queue(FileSpool(tmp_path), routes={"hold.customer-1.example": (FAR,)})
    assert (tmp_path / "hold.customer-1.example" / f"C.{message.id}").exists()


def two_hop_call_count(tmp_path, monkeypatch, name):
    """How many times a two-hop commit calls os.<name>."""
    calls = []
    real = getattr(os, name)
    spool = FileSpool(tmp_path / "probe")
    writer = spool.newMessage()
    writer.write(DATA)
    monkeypatch.setattr(os, name, lambda *args: calls.append(args) or real(*args))
    writer.commit(ENVELOPE, {"local": (BOB,), "relay": (FAR,)})
    monkeypatch.setattr(os, name, real)
    return len(calls)


@pytest.mark.parametrize(
    "name, code, full",
    [("fsync", errno.ENOSPC, True), ("fsync", errno.EIO, False), ("rename", errno.EDQUOT, True), ("link", errno.EIO, False)],
)
def test_commit_failure_at_any_step_leaves_nothing(tmp_path, monkeypatch, name, code, full):
    """Whichever os.<name> call of a commit fails, SpoolError says whether the
    disk is full and no file of the message is left in the spool."""
    total = two_hop_call_count(tmp_path, monkeypatch, name)
    assert total >= 1
    real = getattr(os, name)
    for failing in range(total):
        root = tmp_path / f"{name}{failing}"
        spool = FileSpool(root)
        writer = spool.newMessage()
        writer.write(DATA)
        calls = []

        def flaky(*args, failing=failing, calls=calls):
            calls.append(args)
            if len(calls) - 1 == failing:
                raise OSError(code, os.strerror(code))
            return real(*args)

        monkeypatch.setattr(os, name, flaky)
        with pytest.raises(SpoolError) as info:
            writer.commit(ENVELOPE, {"local": (BOB,), "relay": (FAR,)})
        monkeypatch.setattr(os, name, real)
        assert info.value.temporary_full is full
        assert files_in(root) == [], f"call {failing} of os.{name}"
        writer.abort()  # still safe
        assert FileSpool(root).recover() == []


class FullFile:
    """A file whose writes fail with ENOSPC once ``limit`` octets are written."""

    def __init__(self, real, limit):
        self.real = real
        self.limit = limit

    def write(self, data):
        if self.limit < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.limit -= len(data)
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_write_failure_raises_spool_error(tmp_path, monkeypatch):
    """A write that fails for lack of space raises SpoolError(temporary_full=True);
    abort() then removes the partial file."""
    monkeypatch.setattr(writer_module, "open", lambda *a, **k: FullFile(open(*a, **k), 10), raising=False)
    spool = FileSpool(tmp_path)
    writer = spool.newMessage()
    writer.write(b"0123456789")
    with pytest.raises(SpoolError) as info:
        writer.write(b"x")
    assert info.value.temporary_full
    assert writer.size == 10
    writer.abort()
    assert files_in(tmp_path) == []


def test_abort_removes_temp_file_and_is_idempotent(tmp_path):
    """abort() removes the temp file; calling it again, or after commit, does nothing."""
    spool = FileSpool(tmp_path)
    writer = spool.newMessage()
    writer.write(DATA)
    assert files_in(tmp_path) == [f"tmp/{writer.id}.D"]
    writer.abort()
    writer.abort()
    assert files_in(tmp_path) == []
    [message] = queue(spool)
    before = files_in(tmp_path)
    assert before == [f"local/C.{message.id}", f"local/D.{message.id}"]


def test_writer_refuses_use_after_commit(tmp_path):
    """A committed writer cannot be written or committed again; abort is a no-op."""
    spool = FileSpool(tmp_path)
    writer = spool.newMessage()
    writer.commit(ENVELOPE, {"local": (BOB,)})
    with pytest.raises(ValueError):
        writer.write(b"more")
    with pytest.raises(ValueError):
        writer.commit(ENVELOPE, {"local": (BOB,)})
    writer.abort()
    assert len(spool.queued()) == 1


def test_recover_removes_uncommitted_writer_after_crash(tmp_path):
    """A writer that wrote but never committed (crash) leaves a temp file that
    recover() on the next start removes."""
    script = (
        "import os, sys, pathlib\n"
        "from mailsvc.spool import FileSpool\n"
        "writer = FileSpool(pathlib.Path(sys.argv[1])).newMessage()\n"
        "writer.write(b'x' * 100000)\n"
        "print(writer.id, flush=True)\n"
        "os._exit(9)\n"
    )
    child = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert child.returncode == 9, child.stderr
    assert files_in(tmp_path) == [f"tmp/{child.stdout.strip()}.D"]
    assert FileSpool(tmp_path).recover() == []
    assert files_in(tmp_path) == []


def test_recover_spares_writers_of_the_same_spool(tmp_path):
    """recover() leaves alone a message this spool object is receiving right now."""
    spool = FileSpool(tmp_path)
    writer = spool.newMessage()
    writer.write(DATA)
    assert spool.recover() == []
    [message] = writer.commit(ENVELOPE, {"local": (BOB,)})
    assert spool.recover() == [message]


def test_recover_removes_data_without_control_and_temp_files(tmp_path):
    """A D. without C. (crash before the commit point) and stray *.tmp files are removed."""
    spool = FileSpool(tmp_path)
    [message] = queue(spool)
    hop_dir = tmp_path / "local"
    (hop_dir / "D.0000orphan").write_bytes(DATA)
    (hop_dir / "C.0000half.tmp").write_bytes(b"version 1\n")
    assert FileSpool(tmp_path).recover() == [message]
    assert files_in(tmp_path) == [f"local/C.{message.id}", f"local/D.{message.id}"]


def test_recover_moves_control_without_data_to_corrupt(tmp_path):
    """A C. without D. is logged and moved aside to corrupt/, and recovery goes on."""
    logged = []
    spool = FileSpool(tmp_path, log=logged.append)
    lost, kept = queue(spool), queue(spool)
    os.unlink(tmp_path / "local" / f"D.{lost[0].id}")
    assert spool.recover() == kept
    assert files_in(tmp_path) == [
        f"corrupt/local.C.{lost[0].id}",
        f"local/C.{kept[0].id}",
        f"local/D.{kept[0].id}",
    ]
    assert len(logged) == 1 and f"local/C.{lost[0].id}" in logged[0]


def test_recover_moves_unreadable_control_and_its_data_to_corrupt(tmp_path):
    """A C. that cannot be parsed is moved to corrupt/ with its data, for a person to look at."""
    logged = []
    spool = FileSpool(tmp_path, log=logged.append)
    [message] = queue(spool)
    control_file = tmp_path / "local" / f"C.{message.id}"
    control_file.write_bytes(control_file.read_bytes()[:-10])
    assert spool.queued() == []
    assert spool.recover() == []
    assert files_in(tmp_path) == [f"corrupt/local.C.{message.id}", f"corrupt/local.D.{message.id}"]
    assert "truncated" in logged[-1]


def test_update_and_remove(tmp_path):
    """update() replaces the recipients' state durably; remove() deletes C. and D."""
    spool = FileSpool(tmp_path)
    [message] = queue(spool, routes={"local": (BOB, CAROL)})
    changed = message.evolve(
        envelope=message.envelope.evolve(
            recipients=(
                BOB.evolve(state=RecipientState.DELIVERED, attempts=1),
                CAROL.evolve(attempts=1, next_attempt=1763891534.5, last_error="452 4.2.2 over quota"),
            )
        )
    )
    spool.update(changed)
    assert FileSpool(tmp_path).queued() == [changed]
    assert files_in(tmp_path) == [f"local/C.{message.id}", f"local/D.{message.id}"]
    spool.remove(changed)
    assert files_in(tmp_path) == []
    spool.remove(changed)  # already gone: fine
    with pytest.raises(SpoolError):
        spool.update(changed)
    assert files_in(tmp_path) == []


def test_update_failure_keeps_old_state(tmp_path, monkeypatch):
    """If update() cannot write, it raises SpoolError and the old C. stays intact."""
    spool = FileSpool(tmp_path)
    [message] = queue(spool)
    changed = message.evolve(envelope=message.envelope.evolve(recipients=(BOB.evolve(attempts=3),)))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SpoolError) as info:
        spool.update(changed)
    monkeypatch.undo()
    assert info.value.temporary_full
    assert spool.queued() == [message]
    assert files_in(tmp_path) == [f"local/C.{message.id}", f"local/D.{message.id}"]


def test_ids_are_unique_and_safe(tmp_path):
    """Many ids in a row are all different, safe as file names, and grow with time."""
    ids = [filespool.new_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-v]{20}", i) for i in ids)
    spool = FileSpool(tmp_path)
    writers = [spool.newMessage() for _ in range(200)]
    assert len({w.id for w in writers}) == 200
    for w in writers:
        w.abort()
    # The first 11 characters are the time in microseconds: they sort as time.
    assert ids[0][:11] <= ids[-1][:11] <= filespool.new_id()[:11]


def test_streaming_50_megabytes_keeps_memory_small(tmp_path):
    """Writing 50 MB in 64 KB chunks, and reading it back, never holds the
    message in memory (DESIGN rule 3)."""
    chunk = bytes(range(256)) * 256  # 64 KiB
    count = 50 * 16  # 50 MiB
    spool = FileSpool(tmp_path)
    tracemalloc.start()
    try:
        writer = spool.newMessage()
        for _ in range(count):
            writer.write(chunk)
        [message] = writer.commit(ENVELOPE, {"local": (BOB,)})
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        total = 0
        with spool.open(message) as f:
            while block := f.read(65536):
                total += len(block)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert writer.size == count * len(chunk)
    assert total == len(ENVELOPE.prepend_headers[0]) + 2 + count * len(chunk)
    assert write_peak < 1_000_000
    assert read_peak < 1_000_000


# ---------------------------------------------------------------- control files


def test_control_file_is_readable_text(tmp_path):
    """The control file is grep-able text, one field per line, ending in 'end'."""
    [message] = queue(FileSpool(tmp_path), routes={"local": (BOB,)})
    text = (tmp_path / "local" / f"C.{message.id}").read_text("utf-8")
    lines = text.splitlines()
    assert lines[0] == "version 1"
    assert f"id {message.id}" in lines
    assert "sender <alice@example.test>" in lines
    assert "received-at 1763891234.123456" in lines
    assert "parameter BODY 8BITMIME" in lines
    assert "header Received: from client.example.test ([192.0.2.1]) by mail.example.test" in lines
    assert (
        "recipient state=pending attempts=0 next=0.0 address=<bob@example.test>"
        " original=<Bob@example.test> mailbox=bob error="
    ) in lines
    assert lines[-1] == "end"


def test_null_sender_and_escapes():
    """The null sender is written <>; spaces, '=', '+' and non-ASCII are escaped in fields."""
    message = QueuedMessage(
        "local",
        "abc",
        ENVELOPE.evolve(
            sender="",
            recipients=(Recipient("j\u00f6rg@example.test", last_error="452 4.2.2 a=b+c"),),
        ),
    )
    text = control.dump(message).decode("ascii")
    assert "sender <>\n" in text
    assert "address=<j+C3+B6rg@example.test>" in text
    assert "error=452+204.2.2+20a+3Db+2Bc" in text
    assert control.load(control.dump(message), "local", "abc") == message


def good_control():
    """The control file of a small message, as bytes."""
    return control.dump(QueuedMessage("local", "abc", ENVELOPE.evolve(recipients=(BOB, CAROL))))


def test_every_truncation_is_detected():
    """A control file cut anywhere raises a ValueError naming the file."""
    data = good_control()
    for cut in range(len(data)):
        with pytest.raises(ValueError, match=r"local/C\.abc"):
            control.load(data[:cut], "local", "abc")


@pytest.mark.parametrize(
    "old, new, line",
    [
        (b"version 1", b"version 2", 1),
        (b"sender <alice@example.test>", b"sender alice@example.test", 3),
        (b"received-at 1763891234.123456", b"received-at soon", 4),
        (b"protocol ESMTP", b"protokoll ESMTP", 7),
        (b"attempts=0", b"attempts=-1", 10),
        (b"state=pending", b"state=lost", 10),
        (b"mailbox=bob", b"mailbox=b+zz", 10),
        (b"mailbox=bob ", b"", 10),
        (b"error=\n", b"error= colour=blue\n", 10),
        (b"end\n", b"end\nrecipient x\n", 13),
    ],
)
def test_corrupt_lines_are_named(old, new, line):
    """A corrupt control file raises a ValueError naming the file and the line."""
    data = good_control()
    assert old in data
    with pytest.raises(ValueError, match=rf"local/C\.abc: line {line}:"):
        control.load(data.replace(old, new, 1), "local", "abc")


@pytest.mark.parametrize(
    "text, problem",
    [
        ("a+zz", "bad escape '+zz'"),
        ("a+2b", "bad escape '+2b'"),  # upper-case hex only, as escape() writes
        ("a+2", "bad escape '+2'"),
        ("+", "bad escape '+'"),
        ("a\tb", "unescaped control character '\\t'"),
        ("a\x7f+2B", "unescaped control character '\\x7f'"),
        ("+zz\x00", "bad escape '+zz'"),  # the first fault is named
        ("\x00+zz", "unescaped control character '\\x00'"),
        ("+C3", "escaped octets are not UTF-8"),
    ],
)
def test_bad_escapes_are_refused(text, problem):
    with pytest.raises(ValueError) as raised:
        control.unescape(text)
    assert str(raised.value).startswith(problem)


def test_escapes_decode_to_what_was_escaped():
    assert control.unescape("+2B0000 +C3+A9t+C3+A9 +2B41") == "+0000 été +41"
    assert control.unescape("plain text, no escape") == "plain text, no escape"


def test_wrong_id_and_missing_fields_are_refused():
    """A control file for another id, or without a required field, is refused."""
    data = good_control()
    with pytest.raises(ValueError, match="holds id"):
        control.load(data, "local", "xyz")
    with pytest.raises(ValueError, match="missing helo"):
        control.load(data.replace(b"helo client.example.test\n", b""), "local", "abc")
    with pytest.raises(ValueError, match="not UTF-8"):
        control.load(b"\xff" + data, "local", "abc")


# Any str at all, lone surrogates included (surrogateescape'd octets).
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=30)
TIMES = st.floats(allow_nan=False, allow_infinity=False)
RECIPIENTS = st.builds(
    Recipient,
    address=ANY_TEXT,
    original=ANY_TEXT,
    mailbox=ANY_TEXT,
    state=st.sampled_from(RecipientState),
    attempts=st.integers(0, 10**9),
    next_attempt=TIMES,
    last_error=ANY_TEXT,
)
ENVELOPES = st.builds(
    Envelope,
    sender=ANY_TEXT,
    recipients=st.lists(RECIPIENTS, max_size=4).map(tuple),
    parameters=st.lists(st.tuples(ANY_TEXT.filter(bool), ANY_TEXT), max_size=3).map(tuple),
    helo=ANY_TEXT,
    client_address=ANY_TEXT,
    protocol=ANY_TEXT,
    received_at=TIMES,
    prepend_headers=st.lists(ANY_TEXT, max_size=3).map(tuple),
)


@given(
    hop=st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True).filter(lambda h: h not in ("tmp", "corrupt")),
    id=st.from_regex(r"[0-9a-v]{1,20}", fullmatch=True),
    envelope=ENVELOPES,
)
def test_control_round_trip(hop, id, envelope):
    """load(dump(m)) == m for every message; the file is ASCII, one line per field."""
    message = QueuedMessage(hop, id, envelope)
    data = control.dump(message)
    assert data.isascii()
    assert data.count(b"\n") == 8 + len(envelope.parameters) + len(envelope.prepend_headers) + len(
        envelope.recipients
    )
    assert control.load(data, hop, id) == message


def test_control_file_keeps_notify_and_reads_files_without_it():
    """rfc3461 NOTIFY round-trips; a control file from before the field existed still loads."""
    from mailsvc.spool import control

    r = Recipient("a@example.test", original="A@old.test", mailbox="a", notify="SUCCESS,DELAY")
    message = QueuedMessage("local", "abc", Envelope(sender="s@x.test", recipients=(r,), received_at=1.0))
    data = control.dump(message)
    assert b" notify=SUCCESS,DELAY" in data
    assert control.load(data, "local", "abc") == message
    old = data.replace(b" notify=SUCCESS,DELAY", b"")
    assert control.load(old, "local", "abc").envelope.recipients[0].notify == ""

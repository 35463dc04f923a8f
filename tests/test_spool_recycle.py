"""Spent spool files reused (mailsvc.spool.recycle): exact contents, shared
data files left alone, crash leftovers dropped, bounds kept."""

import os

from mailsvc.envelope import Envelope, Recipient, RecipientState
from mailsvc.spool import FileSpool
from mailsvc.spool.recycle import MAX_SIZE, SpentFiles

ENVELOPE = Envelope(sender="alice@example.test", recipients=(), received_at=1763891234.5)
BOB = Recipient("bob@example.test", "bob@example.test", "bob")
FAR = Recipient("dave@far.example")


def queue(spool, data, routes=None, envelope=ENVELOPE):
    """Write and commit one message; return its QueuedMessages."""
    writer = spool.newMessage()
    writer.write(data)
    return writer.commit(envelope, routes or {"local": (BOB,)})


def done(message):
    """``message`` with every recipient delivered."""
    recipients = tuple(r.evolve(state=RecipientState.DELIVERED) for r in message.envelope.recipients)
    return message.evolve(envelope=message.envelope.evolve(recipients=recipients))


def spent(root):
    """The names in ``root/spent``."""
    return sorted(os.listdir(root / "spent"))


def test_reused_files_hold_exactly_the_new_message(tmp_path):
    """A long message removed, then a short one: the short one reuses the
    long one's files and reads back exactly, control file included."""
    spool = FileSpool(tmp_path)
    [long] = queue(spool, b"x" * 5000 + b"\r\n", envelope=ENVELOPE.evolve(sender="a" * 300 + "@example.test"))
    spool.remove(done(long))
    assert len(spent(tmp_path)) == 2
    [short] = queue(spool, b"hi\r\n")
    assert spent(tmp_path) == []
    assert (tmp_path / "local" / f"D.{short.id}").read_bytes() == b"hi\r\n"
    assert FileSpool(tmp_path).queued() == [short]
    with spool.open(short) as f:
        assert f.read() == b"hi\r\n"


def test_data_shared_by_two_hops_is_kept_until_the_last_goes(tmp_path):
    """A data file linked into two hops is not reused while the other hop
    still has it; the second removal makes it spent."""
    spool = FileSpool(tmp_path)
    local, relay = queue(spool, b"both\r\n", routes={"local": (BOB,), "relay": (FAR,)})
    spool.remove(done(local))
    assert len(spent(tmp_path)) == 1  # the control file only
    [other] = queue(spool, b"other\r\n")  # takes the spent control file
    assert (tmp_path / "relay" / f"D.{relay.id}").read_bytes() == b"both\r\n"
    spool.remove(done(relay))
    assert len(spent(tmp_path)) == 2
    assert (tmp_path / "local" / f"D.{other.id}").read_bytes() == b"other\r\n"


def test_big_files_are_deleted_not_kept(tmp_path):
    """A data file over the size limit is deleted on removal (its blocks freed)."""
    spool = FileSpool(tmp_path)
    [big] = queue(spool, b"y" * (MAX_SIZE + 1))
    spool.remove(done(big))
    assert len(spent(tmp_path)) == 1  # its control file


def test_the_pool_is_bounded_and_can_be_off(tmp_path):
    """At most ``recycle`` files are kept; recycle=0 keeps none and makes no
    spent/; nor does a spool only read (spent/ is made at the first removal)."""
    FileSpool(tmp_path / "read").queued()
    assert sorted(p.name for p in (tmp_path / "read").iterdir()) == ["tmp"]
    spool = FileSpool(tmp_path / "a", recycle=3)
    for message in [queue(spool, b"m\r\n")[0] for _ in range(4)]:
        spool.remove(done(message))
    assert len(spent(tmp_path / "a")) == 3
    off = FileSpool(tmp_path / "b", recycle=0)
    [message] = queue(off, b"m\r\n")
    off.remove(done(message))
    assert not (tmp_path / "b" / "spent").exists()
    assert sorted(p.name for p in (tmp_path / "b").rglob("*") if p.is_file()) == []


def test_aborted_writer_gives_its_file_back(tmp_path):
    """An aborted message's temporary file becomes spent, and the next
    message reuses it, cut to its own length."""
    spool = FileSpool(tmp_path)
    writer = spool.newMessage()
    writer.write(b"z" * 3000)
    writer.abort()
    assert len(spent(tmp_path)) == 1
    [message] = queue(spool, b"ok\r\n")
    assert (tmp_path / "local" / f"D.{message.id}").read_bytes() == b"ok\r\n"


def test_recovery_drops_spent_names_a_crash_left_on_live_files(tmp_path):
    """A crash after a removal may leave a delivered message's file under its
    hop name and in spent/ (two links): recovery drops the spent name, so a
    later message can never overwrite the one that came back."""
    spool = FileSpool(tmp_path)
    [message] = queue(spool, b"keep me\r\n")
    (tmp_path / "spent").mkdir(exist_ok=True)
    os.link(tmp_path / "local" / f"D.{message.id}", tmp_path / "spent" / "S.crash.1")
    os.link(tmp_path / "local" / f"C.{message.id}", tmp_path / "spent" / "S.crash.2")
    (tmp_path / "spent" / "S.fine").write_bytes(b"old")
    (tmp_path / "spent" / "S.dir").mkdir()
    restarted = FileSpool(tmp_path)
    assert restarted.recover() == [message]
    assert spent(tmp_path) == ["S.dir", "S.fine"]  # a directory is left alone, never used
    assert len(restarted._spent) == 1
    [new] = queue(restarted, b"new\r\n")
    assert (tmp_path / "local" / f"D.{message.id}").read_bytes() == b"keep me\r\n"
    assert (tmp_path / "local" / f"D.{new.id}").read_bytes() == b"new\r\n"


def test_a_spent_file_gone_behind_our_back_is_skipped(tmp_path):
    """If a spent file disappears (another process, a person), taking one
    moves on to the next, or makes a new file."""
    pool = SpentFiles(tmp_path / "spent")
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(b"x")
        assert pool.keep(tmp_path / name)
    for path in (tmp_path / "spent").iterdir():
        path.unlink()
    assert pool.take(tmp_path / "target") is False
    assert len(pool) == 0
    spool = FileSpool(tmp_path / "spool")
    [message] = queue(spool, b"fresh\r\n")
    assert (tmp_path / "spool" / "local" / f"D.{message.id}").read_bytes() == b"fresh\r\n"

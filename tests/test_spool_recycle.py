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


def inodes(spool_dir, message):
    """The inodes of ``message``'s data and control files."""
    hop_dir = spool_dir / message.hop
    return {(hop_dir / f"{kind}.{message.id}").stat().st_ino for kind in "DC"}


def test_reused_files_hold_exactly_the_new_message(tmp_path):
    """A long message removed, then a short one: the short one reuses the
    long one's files and reads back exactly, control file included."""
    spool = FileSpool(tmp_path)
    [long] = queue(spool, b"x" * 5000 + b"\r\n", envelope=ENVELOPE.evolve(sender="a" * 300 + "@example.test"))
    old = inodes(tmp_path, long)
    spool.remove(done(long))
    assert len(spent(tmp_path)) == 2
    [between] = queue(spool, b"between\r\n")  # its commit makes the removal durable
    [short] = queue(spool, b"hi\r\n")
    assert spent(tmp_path) == []
    assert inodes(tmp_path, short) == old
    assert (tmp_path / "local" / f"D.{short.id}").read_bytes() == b"hi\r\n"
    assert FileSpool(tmp_path).queued() == [between, short]
    with spool.open(short) as f:
        assert f.read() == b"hi\r\n"


def test_a_removed_file_is_reused_only_once_its_removal_is_durable(tmp_path):
    """A delivered message's removal is not fsync'd at once: after a crash
    its names may come back. Its files are not overwritten by a new message
    until a directory fsync of its hop has begun after the removal (here:
    the next commit's); else the old message could come back holding the
    new one's octets."""
    spool = FileSpool(tmp_path)
    [first] = queue(spool, b"first\r\n")
    old = inodes(tmp_path, first)
    spool.remove(done(first))
    writer = spool.newMessage()  # begun before any fsync of local/ since the removal
    writer.write(b"second\r\n")
    [second] = writer.commit(ENVELOPE, {"local": (BOB,)})
    assert not inodes(tmp_path, second) & old
    [third] = queue(spool, b"third\r\n")  # second's commit fsync'd local/: ready now
    assert inodes(tmp_path, third) == old
    assert (tmp_path / "local" / f"D.{third.id}").read_bytes() == b"third\r\n"


def test_pending_files_settle_only_for_their_directory_and_time(tmp_path):
    """The pool's bookkeeping: a file kept from one directory is ready after
    an fsync of that directory begun after it was kept, not of another one,
    nor of one begun before."""
    pool = SpentFiles(tmp_path / "spent")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_bytes(b"x")
    early = pool.mark()
    assert pool.keep(tmp_path / "a" / "f")
    pool.settled([str(tmp_path / "a")], early)  # an fsync begun before the keep
    assert pool.open() is None
    late = pool.mark()
    assert pool.keep(tmp_path / "b" / "f")
    pool.settled([str(tmp_path / "b")], late)  # b's file was kept after the mark
    assert pool.open() is None
    pool.settled([str(tmp_path / "a")], late)
    taken = pool.open()
    assert taken is not None
    os.close(taken[0])
    assert pool.open() is None  # b's file is still pending
    assert len(pool) == 1


def test_data_shared_by_two_hops_is_kept_until_the_last_goes(tmp_path):
    """A data file linked into two hops is not reused while the other hop
    still has it; the second removal makes it spent."""
    spool = FileSpool(tmp_path)
    local, relay = queue(spool, b"both\r\n", routes={"local": (BOB,), "relay": (FAR,)})
    spool.remove(done(local))
    assert len(spent(tmp_path)) == 1  # the control file only
    queue(spool, b"settle\r\n")
    [other] = queue(spool, b"other\r\n")  # takes the spent control file
    assert len(spent(tmp_path)) == 0
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
    """An aborted message's file becomes spent (a new one, once tmp/ was
    fsync'd; a spent one at once), and a later message reuses it, cut to
    its own length."""
    spool = FileSpool(tmp_path)
    writer = spool.newMessage()
    writer.write(b"z" * 3000)
    writer.abort()
    assert len(spent(tmp_path)) == 1
    queue(spool, b"settle\r\n")  # a new file's commit fsyncs tmp/ too
    writer = spool.newMessage()
    writer.write(b"y" * 3000)
    assert spent(tmp_path) == [os.path.basename(writer._path)]  # written in place
    writer.abort()
    assert len(spent(tmp_path)) == 1
    [message] = queue(spool, b"ok\r\n")
    assert spent(tmp_path) == []
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
    mark = pool.mark() + 2
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(b"x")
        assert pool.keep(tmp_path / name)
    pool.settled([str(tmp_path)], mark)
    for path in (tmp_path / "spent").iterdir():
        path.unlink()
    assert pool.open() is None
    assert len(pool) == 0
    spool = FileSpool(tmp_path / "spool")
    [message] = queue(spool, b"fresh\r\n")
    assert (tmp_path / "spool" / "local" / f"D.{message.id}").read_bytes() == b"fresh\r\n"


# ------------------------------------------------ given to receiver processes

def test_removed_files_are_given_to_a_receiver_only_once_their_removal_is_durable(tmp_path):
    """The main process removes, a receiver process writes (mailsvc.receiverprocesses):
    a removed file goes to the receiver only after settle_spent has fsync'd
    the directory it left, each name once; the receiver's new message is
    written in it, exactly."""
    synced = []

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        os.fsync(fd)

    main = FileSpool(tmp_path, fsync=fsync)
    receiver = FileSpool(tmp_path, recycle=0)
    [old] = queue(main, b"x" * 3000 + b"\r\n")
    files = inodes(tmp_path, old)
    main.remove(done(old))
    assert main.spent_pending() == 2 and main.give_spent(10) == []  # not durable yet
    synced.clear()
    main.settle_spent()
    assert synced == [str(tmp_path / "local")]
    assert main.spent_pending() == 0 and main.spent_ready() == 2
    names = main.give_spent(10)
    assert sorted(names) == spent(tmp_path) and main.spent_ready() == 0 and main.give_spent(10) == []
    assert receiver.take_spent(names + ["../escape", "a/b", ""]) == 2
    [new] = queue(receiver, b"hi\r\n")
    assert inodes(tmp_path, new) == files and spent(tmp_path) == []
    assert (tmp_path / "local" / f"D.{new.id}").read_bytes() == b"hi\r\n"
    assert FileSpool(tmp_path).queued() == [new]


def test_files_given_to_a_receiver_that_ended_come_back_unless_used(tmp_path):
    """A receiver process ends: the spent files it was given and did not use
    (still in spent/) are the main process's again, the used ones not."""
    from types import SimpleNamespace

    from twisted.python.failure import Failure

    from mailsvc.receiverprocesses import ReceiverProcesses

    main = FileSpool(tmp_path)
    for message in [queue(main, b"x\r\n")[0] for _ in range(3)]:
        main.remove(done(message))
    main.settle_spent()
    assert main.spent_ready() == 6
    given = []
    side = SimpleNamespace(given=0, given_names=set(), callRemote=lambda command, names: given.extend(names))
    processes = ReceiverProcesses(None, 1, "x.toml", [], main, None, None)
    processes.feed(side, spare=0, received=0)
    assert sorted(given) == spent(tmp_path) and main.spent_ready() == 0
    receiver = FileSpool(tmp_path, recycle=0)
    receiver.take_spent(given)
    [used] = queue(receiver, b"hi\r\n")  # takes two of the six
    processes.ended(SimpleNamespace(number=1, side=side), Failure(RuntimeError("killed")))
    assert main.spent_ready() == 4 and len(spent(tmp_path)) == 4
    unused = {(tmp_path / "spent" / name).stat().st_ino for name in spent(tmp_path)}
    [again] = queue(main, b"again\r\n")  # the main process reuses two of them
    assert inodes(tmp_path, again) < unused and len(spent(tmp_path)) == 2
    assert {m.id for m in FileSpool(tmp_path).queued()} == {used.id, again.id}


def test_a_receiver_without_given_files_makes_new_ones(tmp_path):
    receiver = FileSpool(tmp_path, recycle=0)
    [message] = queue(receiver, b"hello\r\n")
    receiver.remove(done(message))  # it keeps nothing: recycle=0
    assert receiver.spent_ready() == 0 and not (tmp_path / "spent").exists()

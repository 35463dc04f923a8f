"""Queue control: the spool's hold/release/delete, the runner's flush and
suspend, the AMP commands in memory (iosim), and the real UNIX socket."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task
from twisted.logger import Logger, formatEvent
from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial import unittest as trial
from zope.interface.verify import verifyObject

from mailsvc import control
from mailsvc.delivery.runner import QueueRunner
from mailsvc.envelope import Envelope, Recipient, RecipientState
from mailsvc.errors import SpoolError
from mailsvc.interfaces import ISpool
from mailsvc.spool import FileSpool, RetrySchedule

T0 = 1_763_891_234.0
LATER = T0 + 3600
BOB = Recipient("bob@example.test", "bob@example.test", "bob")
FAR = Recipient("dave@far.example", "dave@far.example")
ENVELOPE = Envelope(sender="alice@example.test", recipients=(), received_at=T0)


def files_in(root: Path) -> list[str]:
    """Every file under ``root``, relative to it, but spent files kept for
    reuse (``spent/``, mailsvc.spool.recycle): they are no message's."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "spent"
    )


def commit(spool, routes=None, data=b"Subject: x\r\n\r\nbody\r\n"):
    """Queue one message; return its QueuedMessages (one per hop)."""
    writer = spool.newMessage()
    writer.write(data)
    return writer.commit(ENVELOPE, routes or {"local": (BOB,)})


def fired(d):
    """The result of a Deferred that has already fired (a Failure re-raised)."""
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


# ---------------------------------------------------------------- the spool


def test_spool_provides_the_extended_interface(tmp_path):
    """FileSpool still provides ISpool, with the queue-control methods added."""
    assert verifyObject(ISpool, FileSpool(tmp_path))


def test_hold_renames_control_file_and_hides_the_message(tmp_path):
    """hold() renames C.<id> to H.<id>: queued() no longer lists the message,
    held() does, find() reports it held; the data stays."""
    spool = FileSpool(tmp_path)
    [message] = commit(spool)
    spool.hold("local", message.id)
    assert files_in(tmp_path) == [f"local/D.{message.id}", f"local/H.{message.id}"]
    assert spool.queued() == []
    assert spool.held() == [message]
    assert spool.find(message.id) == [(message, True)]
    with pytest.raises(SpoolError):
        spool.hold("local", message.id)  # no longer queued


def test_recover_keeps_held_messages_and_their_data(tmp_path):
    """recover() after a restart neither returns a held message nor deletes
    its H. or D. file."""
    spool = FileSpool(tmp_path)
    [held] = commit(spool)
    [queued] = commit(spool)
    spool.hold("local", held.id)
    assert FileSpool(tmp_path).recover() == [queued]
    assert f"local/D.{held.id}" in files_in(tmp_path)
    assert f"local/H.{held.id}" in files_in(tmp_path)
    assert FileSpool(tmp_path).held() == [held]


def test_recover_moves_held_control_without_data_aside(tmp_path):
    """An H. file whose data is gone is useless: recovery moves it to corrupt/."""
    spool = FileSpool(tmp_path)
    [message] = commit(spool)
    spool.hold("local", message.id)
    os.unlink(tmp_path / "local" / f"D.{message.id}")
    logged = []
    assert FileSpool(tmp_path, log=logged.append).recover() == []
    assert files_in(tmp_path) == [f"corrupt/local.H.{message.id}"]
    assert "no data file" in logged[0]


def test_release_brings_it_back(tmp_path):
    """release() renames H. back to C. and returns the message; releasing a
    message that is not held is refused."""
    spool = FileSpool(tmp_path)
    [message] = commit(spool)
    spool.hold("local", message.id)
    assert spool.release("local", message.id) == message
    assert spool.queued() == [message]
    assert spool.held() == []
    with pytest.raises(SpoolError):
        spool.release("local", message.id)


def test_update_of_a_held_message_fails_and_does_not_resurrect_it(tmp_path):
    """A delivery that ends after the hold cannot save its state: update()
    raises SpoolError and no C. appears beside the H."""
    spool = FileSpool(tmp_path)
    [message] = commit(spool)
    spool.hold("local", message.id)
    tried = message.evolve(envelope=message.envelope.evolve(recipients=(BOB.evolve(attempts=1),)))
    with pytest.raises(SpoolError):
        spool.update(tried)
    assert files_in(tmp_path) == [f"local/D.{message.id}", f"local/H.{message.id}"]


def test_remove_of_a_held_message_removes_everything(tmp_path):
    """remove() (every recipient done) also removes an H. left by a hold during
    the last delivery, so no control file outlives its data."""
    spool = FileSpool(tmp_path)
    [message] = commit(spool)
    spool.hold("local", message.id)
    spool.remove(message)
    assert files_in(tmp_path) == []


def test_delete_removes_queued_or_held_and_refuses_unknown(tmp_path):
    """delete() removes C. or H. with the D.; a second delete is refused."""
    spool = FileSpool(tmp_path)
    [queued] = commit(spool)
    [held] = commit(spool)
    spool.hold("local", held.id)
    spool.delete("local", queued.id)
    spool.delete("local", held.id)
    assert files_in(tmp_path) == []
    with pytest.raises(SpoolError):
        spool.delete("local", held.id)


def test_find_and_size(tmp_path):
    """find() lists every hop of an ID with its held flag; size() is the data's size;
    a malformed ID raises ValueError."""
    spool = FileSpool(tmp_path)
    local, relay = commit(spool, {"local": (BOB,), "relay": (FAR,)}, data=b"12345")
    spool.hold("relay", relay.id)
    assert spool.find(local.id) == [(local, False), (relay, True)]
    assert spool.find("0" * 20) == []
    assert spool.size(local) == 5
    with pytest.raises(ValueError):
        spool.find("../etc")


# ---------------------------------------------------------------- the runner


def make_runner(tmp_path, answer=None):
    """A running QueueRunner over a FileSpool, a Clock and a recording agent."""
    clock = task.Clock()
    clock.advance(T0)
    spool = FileSpool(tmp_path)
    calls = []
    pending: list[defer.Deferred] = []

    class Agent:
        def deliver(self, message):
            calls.append(message)
            if answer == "wait":
                d = defer.Deferred()
                pending.append(d)
                return d
            return defer.succeed({r.address: None for r in message.envelope.recipients})

    events = []
    runner = QueueRunner(
        spool, {"local": Agent(), "relay": Agent()}, clock,
        RetrySchedule(first=300, maximum=3600, give_up_after=432000),
        scan_interval=60, log=Logger(observer=events.append),
    )
    return SimpleNamespace(clock=clock, spool=spool, calls=calls, pending=pending, runner=runner, events=events)


def later(spool, routes=None):
    """Queue a message whose recipients are due only in an hour."""
    routes = routes or {"local": (BOB,)}
    routes = {hop: tuple(r.evolve(next_attempt=LATER, attempts=1) for r in rs) for hop, rs in routes.items()}
    return commit(spool, routes)


def test_flush_tries_now_what_is_not_yet_due(tmp_path):
    """flush() enqueues a message whose next attempt is an hour away; it is
    delivered at once and removed; flush fires with the count."""
    t = make_runner(tmp_path)
    [message] = later(t.spool)
    t.runner.start()
    assert t.calls == []
    assert fired(t.runner.flush()) == 1
    assert [m.id for m in t.calls] == [message.id]
    assert files_in(tmp_path) == []


def test_flush_with_a_predicate_tries_only_matches(tmp_path):
    """flush(predicate): only matching messages are tried (here: by domain)."""
    t = make_runner(tmp_path)
    [local] = later(t.spool)
    [far] = later(t.spool, {"relay": (FAR,)})
    t.runner.start()
    assert fired(t.runner.flush(control.recipient_in("FAR.example."))) == 1
    assert [(m.hop, m.id) for m in t.calls] == [("relay", far.id)]
    assert t.spool.queued() == [local]


def test_flush_when_stopped_does_nothing(tmp_path):
    """A runner that is not running flushes nothing."""
    t = make_runner(tmp_path)
    later(t.spool)
    assert fired(t.runner.flush()) == 0
    assert t.calls == []


def test_suspended_message_is_not_scheduled_until_resumed(tmp_path):
    """suspend() drops the timer and keeps flush and submit away; resume() undoes it."""
    t = make_runner(tmp_path)
    [message] = later(t.spool)
    t.runner.start()
    t.runner.suspend("local", message.id)
    t.runner.submit(message)
    assert fired(t.runner.flush()) == 0
    t.clock.advance(7200)
    assert t.calls == []
    t.runner.resume("local", message.id)
    assert fired(t.runner.flush()) == 1
    assert len(t.calls) == 1


def test_hold_during_delivery_is_not_undone(tmp_path):
    """A message held while its delivery is in flight stays held: the runner's
    update is refused, logged as information, and no C. reappears."""
    t = make_runner(tmp_path, answer="wait")
    [message] = commit(t.spool)
    t.runner.start()
    assert len(t.calls) == 1  # in flight
    q = control.QueueControl(t.spool, t.runner)
    assert fired(q.hold(message.id)) == ["local"]
    t.pending[0].callback({BOB.address: control_error()})
    assert files_in(tmp_path) == [f"local/D.{message.id}", f"local/H.{message.id}"]
    text = [formatEvent(e) for e in t.events]
    assert any("held or deleted during delivery" in line for line in text), text
    assert not any(e.get("log_failure") for e in t.events)
    t.clock.advance(7200)
    assert len(t.calls) == 1


def control_error():
    """A temporary delivery error, so the runner wants to save a new state."""
    from mailsvc.errors import TemporaryDeliveryError

    return TemporaryDeliveryError("try later", "4.0.0")


# ---------------------------------------------------------------- AMP, in memory


def connected(tmp_path):
    """An AMP client wired to a ControlProtocol in memory; returns (client, pump, runner bits)."""
    t = make_runner(tmp_path)
    factory = control.ControlServerFactory(control.QueueControl(t.spool, t.runner))
    client, server, pump = iosim.connectedServerAndClient(lambda: factory.buildProtocol(None), amp.AMP)
    return client, pump, t


def ask(client, pump, command, **arguments):
    """Call ``command`` over the in-memory connection; the answer or the error raised."""
    results = []
    client.callRemote(command, **arguments).addBoth(results.append)  # before the answer comes
    pump.flush()
    assert results, "no answer"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def test_amp_flush_hold_release_delete(tmp_path):
    """Every command over AMP: flush counts, hold renames, release undoes,
    delete removes; each answers the hops it acted on."""
    client, pump, t = connected(tmp_path)
    first, second = later(t.spool, {"local": (BOB,), "relay": (FAR,)}), later(t.spool)
    t.runner.start()
    message_id = first[0].id
    assert ask(client, pump, control.Hold, id=message_id) == {"hops": ["local", "relay"]}
    assert {f"local/H.{message_id}", f"relay/H.{message_id}", f"local/D.{message_id}"} <= set(files_in(tmp_path))
    assert f"local/C.{message_id}" not in files_in(tmp_path)
    assert ask(client, pump, control.Hold, id=message_id) == {"hops": ["local", "relay"]}  # idempotent
    assert ask(client, pump, control.Flush) == {"count": 1}  # only the other one
    assert [m.id for m in t.calls] == [second[0].id]
    assert ask(client, pump, control.Release, id=message_id) == {"hops": ["local", "relay"]}
    assert ask(client, pump, control.Flush, domain="example.test") == {"count": 1}
    assert ask(client, pump, control.Delete, id=message_id) == {"hops": ["relay"]}
    assert files_in(tmp_path) == []


def test_amp_flush_one_id(tmp_path):
    """Flush with an id tries that message only (what sendmail asks for)."""
    client, pump, t = connected(tmp_path)
    [a], [b] = later(t.spool), later(t.spool)
    t.runner.start()
    assert ask(client, pump, control.Flush, id=b.id) == {"count": 1}
    assert [m.id for m in t.calls] == [b.id]


@pytest.mark.parametrize("command", [control.Hold, control.Release, control.Delete])
@pytest.mark.parametrize("bad_id", ["0000000000000000000a", "../../x"])
def test_amp_unknown_id_is_a_clear_error(tmp_path, command, bad_id):
    """An ID no hop has, or one that is not an ID at all, answers UnknownMessage."""
    client, pump, _ = connected(tmp_path)
    with pytest.raises(control.UnknownMessage) as caught:
        ask(client, pump, command, id=bad_id)
    assert bad_id in str(caught.value)


def test_amp_release_of_a_queued_message_is_refused(tmp_path):
    """Release of a message that is not held answers NotHeld."""
    client, pump, t = connected(tmp_path)
    [message] = later(t.spool)
    with pytest.raises(control.NotHeld):
        ask(client, pump, control.Release, id=message.id)


# ---------------------------------------------------------------- the real socket


class RealSocketTests(trial.TestCase):
    """ControlService on the real reactor and a real UNIX socket."""

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        # Not self.mktemp(): it is relative to the current directory (the
        # repository under pytest), and a UNIX socket path must stay short.
        self.root = Path(tempfile.mkdtemp(prefix="mailsvc-control-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        self.path = self.root / "run" / "ctl.sock"
        self.spool = FileSpool(self.root / "spool")
        self.runner = SimpleNamespace(flush=lambda predicate=None: defer.succeed(7))

    def start(self):
        """Start a ControlService (spool calls in the reactor thread)."""
        svc = control.ControlService(self.spool, self.runner, self.path, self.reactor)
        svc.factory.control.run_blocking = defer.maybeDeferred  # no thread pool to leave behind
        svc.startService()
        self.addCleanup(svc.stopService)
        return svc

    @defer.inlineCallbacks
    def test_listens_with_mode_0600_and_answers(self):
        """The socket's directory is created, the socket is mode 0600, a client
        call gets its answer, and stopping removes the socket."""
        svc = self.start()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.path.parent).st_mode), 0o700)
        answer = yield control.call(self.reactor, self.path, control.Flush)
        self.assertEqual(answer, {"count": 7})
        yield svc.stopService()
        self.assertFalse(self.path.exists())

    @defer.inlineCallbacks
    def test_stale_socket_is_replaced(self):
        """A socket file left by a crash (nobody listening) is replaced at start."""
        self.path.parent.mkdir()
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(self.path))
        stale.close()  # the file stays, nobody listens
        self.start()
        answer = yield control.call(self.reactor, self.path, control.Flush)
        self.assertEqual(answer, {"count": 7})

    @defer.inlineCallbacks
    def test_unknown_id_over_the_socket(self):
        """An unknown ID arrives at the client as UnknownMessage."""
        self.start()
        with self.assertRaises(control.UnknownMessage):
            yield control.call(self.reactor, self.path, control.Hold, id="0000000000000000000a")

    @defer.inlineCallbacks
    def test_no_server_is_unreachable(self):
        """Without a listener, the client says the server cannot be reached,
        naming the socket; a leftover socket file makes no difference."""
        with self.assertRaises(control.ServerUnreachable) as caught:
            yield control.call(self.reactor, self.path, control.Flush)
        self.assertIn(f"cannot reach the server at {self.path}: is it running?", str(caught.exception))
        self.path.parent.mkdir()
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(self.path))
        stale.close()
        with self.assertRaises(control.ServerUnreachable):
            yield control.call(self.reactor, self.path, control.Flush)

    def test_a_regular_file_is_not_replaced(self):
        """A file that is not a socket at the path is left alone and the
        error is logged naming the config key; the service still starts."""
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.path.parent.mkdir()
        self.path.write_text("precious")
        svc = self.start()
        self.assertIsNone(svc.port)
        self.assertEqual(self.path.read_text(), "precious")
        text = [formatEvent(e) for e in events if e.get("log_namespace") == "mailsvc.control"]
        self.assertTrue(any("[server] control_socket: cannot listen on" in line for line in text), text)

"""Local delivery: one copy per recipient into an IMailboxStore, errors mapped."""

import errno

import pytest
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailsvc.delivery.local import LocalDeliveryAgent
from mailsvc.delivery.runner import QueueRunner
from mailsvc.envelope import Envelope, Recipient, RecipientState
from mailsvc.errors import PermanentDeliveryError, TemporaryDeliveryError
from mailsvc.interfaces import IDeliveryAgent, IMailboxStore, IMessageWriter, ISpool
from mailsvc.spool import FileSpool, RetrySchedule

DATA = b"Subject: hi\r\n\r\nhello\r\n"
ENVELOPE = Envelope(
    sender="alice@example.test",
    recipients=(),
    received_at=1763891234.0,
    prepend_headers=("Received: from client by mail.example.test",),
)
BOB = Recipient("bob@example.test", "Bob@example.test", "bob")
TEAM_BOB = Recipient("team@example.test", "team@example.test", "bob")
CAROL = Recipient("carol@example.test", "carol@example.test", "carol")


@implementer(IMailboxStore)
class FakeStore:
    """Records each delivery (mailbox, headers, octets); raises what ``fail`` says."""

    def __init__(self, fail=None):
        self.fail = fail or {}
        self.calls = []
        self.sources = []

    def deliver(self, mailbox, headers, source):
        self.sources.append(source)
        self.calls.append((mailbox, list(headers), source.read()))
        if mailbox in self.fail:
            raise self.fail[mailbox]
        return f"/var/mail/{mailbox}/new/{len(self.calls)}"

    def exists(self, mailbox):
        return True


def make(tmp_path, recipients, fail=None, envelope=ENVELOPE, run_blocking=defer.maybeDeferred):
    """A spool holding one message for ``recipients``, a fake store, and the agent."""
    spool = FileSpool(tmp_path)
    writer = spool.newMessage()
    writer.write(DATA)
    [message] = writer.commit(envelope, {"local": tuple(recipients)})
    store = FakeStore(fail)
    events = []
    agent = LocalDeliveryAgent(store, spool, run_blocking, log=Logger(observer=events.append))
    return spool, store, agent, message, events


def result_of(d):
    """The result of a Deferred that has already fired."""
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def test_interfaces_are_provided(tmp_path):
    """The agent, the spool and its writer provide their interfaces."""
    spool, store, agent, _, _ = make(tmp_path, [BOB])
    writer = spool.newMessage()
    assert verifyObject(IDeliveryAgent, agent)
    assert verifyObject(ISpool, spool)
    assert verifyObject(IMessageWriter, writer)
    assert verifyObject(IMailboxStore, store)
    writer.abort()


def test_each_recipient_gets_its_own_copy(tmp_path):
    """Each pending recipient gets the whole message with its own Return-Path and Delivered-To."""
    spool, store, agent, message, _ = make(tmp_path, [BOB, CAROL])
    assert result_of(agent.deliver(message)) == {BOB.address: None, CAROL.address: None}
    whole = b"Received: from client by mail.example.test\r\n" + DATA
    assert store.calls == [
        ("bob", ["Return-Path: <alice@example.test>", "Delivered-To: bob@example.test"], whole),
        ("carol", ["Return-Path: <alice@example.test>", "Delivered-To: carol@example.test"], whole),
    ]
    assert all(source.closed for source in store.sources)


def test_aliases_to_one_mailbox_keep_their_delivered_to(tmp_path):
    """Two addresses leading to one mailbox are two copies, each with its Delivered-To."""
    _, store, agent, message, _ = make(tmp_path, [BOB, TEAM_BOB])
    result_of(agent.deliver(message))
    assert [headers[1] for _, headers, _ in store.calls] == [
        "Delivered-To: bob@example.test",
        "Delivered-To: team@example.test",
    ]


def test_null_sender_return_path(tmp_path):
    """A bounce (null sender) is stored with Return-Path: <>."""
    _, store, agent, message, _ = make(tmp_path, [BOB], envelope=ENVELOPE.evolve(sender=""))
    result_of(agent.deliver(message))
    assert store.calls[0][1][0] == "Return-Path: <>"


def test_only_pending_recipients_are_delivered(tmp_path):
    """Recipients already delivered or failed are skipped, and absent from the result."""
    done = CAROL.evolve(state=RecipientState.DELIVERED)
    _, store, agent, message, _ = make(tmp_path, [BOB, done])
    assert result_of(agent.deliver(message)) == {BOB.address: None}
    assert [call[0] for call in store.calls] == ["bob"]


def test_no_mailbox_is_permanent_5_1_1(tmp_path):
    """A recipient without a local mailbox fails permanently with 5.1.1; the store is not called."""
    _, store, agent, message, _ = make(tmp_path, [Recipient("nobody@example.test")])
    error = result_of(agent.deliver(message))["nobody@example.test"]
    assert isinstance(error, PermanentDeliveryError)
    assert error.status == "5.1.1"
    assert store.calls == []


@pytest.mark.parametrize(
    "raised", [TemporaryDeliveryError("lock held", "4.2.0"), PermanentDeliveryError("mailbox disabled", "5.2.1")]
)
def test_store_delivery_errors_pass_through(tmp_path, raised):
    """DeliveryErrors from the store are the recipient's result as they are."""
    _, _, agent, message, _ = make(tmp_path, [BOB, CAROL], fail={"bob": raised})
    results = result_of(agent.deliver(message))
    assert results == {BOB.address: raised, CAROL.address: None}


@pytest.mark.parametrize(
    "code, status",
    [(errno.ENOSPC, "4.3.1"), (errno.EDQUOT, "4.3.1"), (errno.EACCES, "4.3.0"), (errno.EIO, "4.3.0")],
)
def test_os_errors_are_temporary(tmp_path, code, status):
    """Storage OSErrors defer the recipient: 4.3.1 when full (rfc3463), else 4.3.0."""
    _, _, agent, message, _ = make(tmp_path, [BOB], fail={"bob": OSError(code, "trouble")})
    error = result_of(agent.deliver(message))[BOB.address]
    assert isinstance(error, TemporaryDeliveryError)
    assert error.status == status


def test_unexpected_exception_is_temporary_and_logged(tmp_path):
    """A bug in the store defers the recipient (4.3.0) and logs the traceback."""
    _, _, agent, message, events = make(tmp_path, [BOB, CAROL], fail={"bob": KeyError("oops")})
    results = result_of(agent.deliver(message))
    assert isinstance(results[BOB.address], TemporaryDeliveryError)
    assert results[BOB.address].status == "4.3.0"
    assert results[CAROL.address] is None
    [failure] = [e["log_failure"] for e in events if "log_failure" in e]
    assert failure.check(KeyError)


def test_missing_data_file_is_temporary(tmp_path):
    """If the spool's data cannot be opened, the recipient is deferred, not lost."""
    spool, store, agent, message, _ = make(tmp_path, [BOB])
    (tmp_path / "local" / f"D.{message.id}").unlink()
    error = result_of(agent.deliver(message))[BOB.address]
    assert isinstance(error, TemporaryDeliveryError) and error.status == "4.3.0"
    assert store.calls == []


def test_works_with_asynchronous_run_blocking(tmp_path):
    """With a run_blocking that answers later (like a thread pool), results wait for it."""
    clock = task.Clock()
    later = lambda f, *args: task.deferLater(clock, 1, f, *args)  # noqa: E731
    _, store, agent, message, _ = make(tmp_path, [BOB, CAROL], run_blocking=later)
    results = []
    agent.deliver(message).addCallback(results.append)
    clock.advance(1)
    assert results == [] and len(store.calls) == 1  # one at a time
    clock.advance(1)
    assert results == [{BOB.address: None, CAROL.address: None}]


def test_runner_with_local_agent_end_to_end(tmp_path):
    """Runner + LocalDeliveryAgent + FileSpool: a submitted message lands in the
    store and leaves the spool; a full disk defers it until there is room."""
    full = {"carol": OSError(errno.ENOSPC, "No space left on device")}
    spool, store, agent, message, _ = make(tmp_path, [BOB, CAROL], fail=full)
    clock = task.Clock()
    clock.advance(message.envelope.received_at)
    runner = QueueRunner(spool, {"local": agent}, clock, RetrySchedule(), log=Logger(observer=lambda e: None))
    runner.start()  # recovers the message and tries it at once
    [saved] = spool.queued()
    assert [r.state for r in saved.envelope.recipients] == [RecipientState.DELIVERED, RecipientState.PENDING]
    assert saved.envelope.recipients[1].last_error.startswith("4.3.1 ")
    full.clear()
    clock.advance(300)
    assert [call[0] for call in store.calls] == ["bob", "carol", "carol"]
    assert spool.queued() == []

"""The short ways of the queue runner's per-message path (one local recipient,
delivered at the first attempt) give what the general ways give."""

import dataclasses

import pytest
from twisted.internet import defer, task
from twisted.logger import Logger, formatEvent
from zope.interface import implementer

from mailsvc.delivery.local import LocalDeliveryAgent
from mailsvc.delivery.runner import QueueRunner
from mailsvc.envelope import Delivered, Envelope, QueuedMessage, Recipient, RecipientState
from mailsvc.errors import PermanentDeliveryError, TemporaryDeliveryError
from mailsvc.interfaces import IDeliveryAgent
from mailsvc.spool import FileSpool, RetrySchedule

T0 = 1_763_891_234.0
SCHEDULE = RetrySchedule(first=300, maximum=3600, give_up_after=432000)
BOB = Recipient("bob@example.test", "Bob@example.test", "bob")
ENVELOPE = Envelope(
    sender="alice@example.test",
    recipients=(),
    received_at=T0,
    prepend_headers=("Received: from client by mail.example.test",),
)

# A value of each class with every field away from its default.
FULL_RECIPIENT = Recipient(
    address="bob@example.test",
    original="Bob@example.test",
    mailbox="bob",
    state=RecipientState.FAILED,
    attempts=3,
    next_attempt=T0 + 60,
    last_error="451 4.3.0 try later",
    notify="SUCCESS,DELAY",
    warned=True,
)
FULL_ENVELOPE = Envelope(
    sender="alice@example.test",
    recipients=(FULL_RECIPIENT,),
    parameters=(("BODY", "8BITMIME"),),
    helo="client.example.test",
    client_address="192.0.2.1",
    protocol="ESMTPS",
    received_at=T0,
    prepend_headers=("Received: from client",),
)
FULL_MESSAGE = QueuedMessage(hop="relay", id="ID1", envelope=FULL_ENVELOPE)


@pytest.mark.parametrize("value", [FULL_RECIPIENT, FULL_ENVELOPE, FULL_MESSAGE], ids=type)
def test_evolve_is_dataclasses_replace(value):
    """``evolve`` gives what ``dataclasses.replace`` gives, whichever field changes."""
    other = {
        str: "changed",
        int: 7,
        float: 1.5,
        bool: False,
        tuple: (),
        RecipientState: RecipientState.PENDING,
        Envelope: ENVELOPE,
    }
    assert value.evolve() == dataclasses.replace(value) == value
    for f in dataclasses.fields(value):
        new = other[type(getattr(value, f.name))]
        changed = value.evolve(**{f.name: new})
        assert changed == dataclasses.replace(value, **{f.name: new})
        assert getattr(changed, f.name) == new
        assert type(changed) is type(value)


@pytest.mark.parametrize("value", [FULL_RECIPIENT, FULL_ENVELOPE, FULL_MESSAGE], ids=type)
def test_evolve_refuses_unknown_fields(value):
    """As ``replace``: a field the class does not have is a TypeError."""
    with pytest.raises(TypeError):
        value.evolve(no_such_field=1)


@implementer(IDeliveryAgent)
class RecordingAgent:
    """Answers ``answers[address]`` for each recipient shown; records what it is shown."""

    def __init__(self, answers=None):
        self.answers = answers or {}
        self.calls = []

    def deliver(self, message):
        self.calls.append(message)
        return defer.succeed({r.address: self.answers.get(r.address) for r in message.envelope.recipients})


def make_runner(tmp_path, agent, **options):
    clock = task.Clock()
    clock.advance(T0)
    spool = FileSpool(tmp_path / "spool")
    events = []
    runner = QueueRunner(
        spool, {"local": agent}, clock, SCHEDULE, log=Logger(observer=events.append), **options
    )
    runner.start()
    return clock, spool, runner, events


def commit(spool, recipients):
    writer = spool.newMessage()
    writer.write(b"Subject: test\r\n\r\nhello\r\n")
    [message] = writer.commit(ENVELOPE, {"local": tuple(recipients)})
    return message


def test_first_attempt_shows_the_message_itself(tmp_path):
    """Every recipient pending: the agent is shown the message as queued (frozen; no copy)."""
    agent = RecordingAgent()
    _, spool, runner, events = make_runner(tmp_path, agent)
    message = commit(spool, [BOB])
    runner.submit(message)
    assert agent.calls == [message]
    assert agent.calls[0] is message
    assert spool.queued() == []
    assert [formatEvent(e) for e in events][-1] == (
        f"delivered id={message.id} to=<bob@example.test> hop=local"
    )
    assert events[-1]["attempts"] == 1


def test_later_attempt_shows_only_pending_recipients(tmp_path):
    """A recipient already done is not shown again: the agent gets a copy without it."""
    carol = Recipient("carol@example.test", "carol@example.test", "carol")
    agent = RecordingAgent({"carol@example.test": TemporaryDeliveryError("busy", "4.3.0")})
    clock, spool, runner, _ = make_runner(tmp_path, agent)
    runner.submit(commit(spool, [BOB, carol]))
    clock.advance(SCHEDULE.first)
    [first, second] = agent.calls
    assert [r.address for r in first.envelope.recipients] == ["bob@example.test", "carol@example.test"]
    assert [r.address for r in second.envelope.recipients] == ["carol@example.test"]
    assert second.envelope.evolve(recipients=()) == first.envelope.evolve(recipients=())


def test_one_pass_over_recipients_makes_every_report_in_order(tmp_path):
    """Failed, delivered, relayed and delayed recipients of one message: one
    report per group, in that order, and the state saved as before."""
    names = ["fail", "done", "relay", "passed", "late", "quiet"]
    recipients = [Recipient(f"{n}@example.test", mailbox=n, notify="SUCCESS,FAILURE,DELAY") for n in names]
    agent = RecordingAgent(
        {
            "fail@example.test": PermanentDeliveryError("no such user", "5.1.1"),
            "done@example.test": Delivered.DELIVERED,
            "relay@example.test": Delivered.RELAYED,
            "passed@example.test": Delivered.PASSED_ON,
            "late@example.test": TemporaryDeliveryError("busy", "4.3.0"),
            "quiet@example.test": None,
        }
    )
    reports = []

    def reporter(message, group, action):
        reports.append((action, [r.address for r in group]))
        return []

    clock = task.Clock()
    clock.advance(T0 + 2000)  # past delay_warning_after
    spool = FileSpool(tmp_path / "spool")
    runner = QueueRunner(
        spool, {"local": agent}, clock, SCHEDULE, log=Logger(observer=lambda e: None),
        reporter=reporter, delay_warning_after=1000,
    )
    runner.start()
    runner.submit(commit(spool, recipients))
    assert reports == [
        ("failed", ["fail@example.test"]),
        ("delivered", ["done@example.test", "quiet@example.test"]),
        ("relayed", ["relay@example.test"]),
        ("delayed", ["late@example.test"]),
    ]
    [saved] = spool.queued()
    states = {r.address: (r.state, r.attempts, r.warned) for r in saved.envelope.recipients}
    assert states == {
        "fail@example.test": (RecipientState.FAILED, 1, False),
        "done@example.test": (RecipientState.DELIVERED, 1, False),
        "relay@example.test": (RecipientState.DELIVERED, 1, False),
        "passed@example.test": (RecipientState.DELIVERED, 1, False),
        "late@example.test": (RecipientState.PENDING, 1, True),
        "quiet@example.test": (RecipientState.DELIVERED, 1, False),
    }


class FakeStore:
    """Records each delivery; raises ``fail`` when given."""

    def __init__(self, fail=None):
        self.fail = fail
        self.calls = []

    def deliver(self, mailbox, headers, source):
        self.calls.append((mailbox, list(headers), source.read()))
        if self.fail is not None:
            raise self.fail
        return f"/var/mail/{mailbox}/new/1"

    def exists(self, mailbox):
        return True


def local_setup(tmp_path, recipient=BOB, fail=None, run_blocking=defer.maybeDeferred):
    spool = FileSpool(tmp_path / "spool")
    message = commit(spool, [recipient])
    store = FakeStore(fail)
    agent = LocalDeliveryAgent(store, spool, run_blocking, log=Logger(observer=lambda e: None))
    return store, agent, message


def result_of(d):
    results = []
    d.addBoth(results.append)
    [result] = results
    return result


def test_local_one_recipient_delivered(tmp_path):
    """One recipient: the agent's answer is ``{address: None}``, with the usual headers."""
    store, agent, message = local_setup(tmp_path)
    assert result_of(agent.deliver(message)) == {"bob@example.test": None}
    assert store.calls == [
        (
            "bob",
            ["Return-Path: <alice@example.test>", "Delivered-To: bob@example.test"],
            b"Received: from client by mail.example.test\r\nSubject: test\r\n\r\nhello\r\n",
        )
    ]


def test_local_one_recipient_errors_are_mapped(tmp_path):
    """One recipient whose store fails: the error is mapped, never an errback."""
    _, agent, message = local_setup(tmp_path, fail=OSError(28, "No space left on device"))
    [(address, error)] = result_of(agent.deliver(message)).items()
    assert address == "bob@example.test"
    assert isinstance(error, TemporaryDeliveryError) and error.status == "4.3.1"


def test_local_one_recipient_without_mailbox(tmp_path):
    """One recipient with no local mailbox: 5.1.1, the store is not called."""
    store, agent, message = local_setup(tmp_path, recipient=Recipient("x@example.test"))
    [error] = result_of(agent.deliver(message)).values()
    assert isinstance(error, PermanentDeliveryError) and error.status == "5.1.1"
    assert store.calls == []


def test_local_one_recipient_run_blocking_raising_is_an_errback(tmp_path):
    """A ``run_blocking`` that raises at once: ``deliver`` still returns a
    failed Deferred (as with several recipients), it does not raise."""

    def broken(f, *args):
        raise RuntimeError("no threads left")

    _, agent, message = local_setup(tmp_path, run_blocking=broken)
    d = agent.deliver(message)
    failure = result_of(d)
    assert failure.check(RuntimeError)

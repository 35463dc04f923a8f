"""Bounces: failed recipients become an rfc3464 report queued to the sender."""

from __future__ import annotations

import email
import email.policy
import io

from twisted.internet import defer, task
from zope.interface import implementer

from mailsvc.delivery.bounce import DOUBLE_BOUNCE, Bouncer, outcome_of
from mailsvc.delivery.local import LocalDeliveryAgent
from mailsvc.delivery.runner import QueueRunner
from mailsvc.envelope import Envelope, Recipient, RecipientState
from mailsvc.errors import PermanentDeliveryError
from mailsvc.interfaces import IMailboxStore
from mailsvc.spool.filespool import FileSpool
from mailsvc.spool.schedule import RetrySchedule
from test_protocol import TableDirectory

ORIGINAL = b"From: carol@example.test\r\nSubject: the report\r\n\r\nbody\r\n"


@implementer(IMailboxStore)
class RecordingStore:
    """Keeps delivered messages in memory; mailboxes in ``refuse`` fail for good."""

    def __init__(self, refuse=()):
        self.refuse = set(refuse)
        self.messages: dict[str, list[bytes]] = {}

    def deliver(self, mailbox, headers, source):
        if mailbox in self.refuse:
            raise PermanentDeliveryError("mailbox disabled", "5.2.1")
        data = "\r\n".join(headers).encode() + b"\r\n" + source.read()
        self.messages.setdefault(mailbox, []).append(data)
        return mailbox

    def exists(self, mailbox):
        return mailbox in self.messages


def queue(spool, sender, *mailboxes, parameters=()):
    writer = spool.newMessage()
    writer.write(ORIGINAL)
    recipients = tuple(Recipient(f"{m}@example.test", mailbox=m) for m in mailboxes)
    envelope = Envelope(sender=sender, recipients=recipients, parameters=parameters, received_at=1_790_000_000.0)
    return writer.commit(envelope, {"local": recipients})[0]


def system(tmp_path, refuse=()):
    clock = task.Clock()
    clock.advance(1_790_000_000)
    spool = FileSpool(tmp_path / "spool")
    store = RecordingStore(refuse)
    directory = TableDirectory(users=("alice", "bob", "carol"), aliases={"postmaster": ["alice"]})
    bouncer = Bouncer(spool, directory, "mx.test", submit=lambda m: runner.submit(m), now=clock.seconds)
    runner = QueueRunner(
        spool, {"local": LocalDeliveryAgent(store, spool, defer.maybeDeferred)}, clock, RetrySchedule(), reporter=bouncer.report
    )
    runner.start()
    return spool, store, runner


def report_of(data: bytes):
    """The rfc3464 report inside a stored copy (after Return-Path/Delivered-To)."""
    return email.message_from_bytes(data, policy=email.policy.default)


def test_permanent_failure_bounces_to_a_local_sender(tmp_path):
    """bob's mailbox refuses: carol gets a multipart/report naming bob, status 5.2.1."""
    spool, store, runner = system(tmp_path, refuse={"bob"})
    runner.submit(queue(spool, "carol@example.test", "alice", "bob"))
    assert len(store.messages["alice"]) == 1
    [bounce] = store.messages["carol"]
    report = report_of(bounce)
    assert report["Return-Path"] == "<>"
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    text, status, returned = report.iter_parts()
    fields = status.get_payload()[1]
    assert fields["Final-Recipient"] == "rfc822; bob@example.test"
    assert fields["Action"] == "failed" and fields["Status"] == "5.2.1"
    assert "mailbox disabled" in fields["Diagnostic-Code"]
    assert "Subject: the report" in returned.get_content()
    assert spool.queued() == []


def test_null_sender_failure_goes_to_postmaster_once(tmp_path):
    """A report that fails goes to postmaster (a double bounce); if that fails, it is only logged."""
    spool, store, runner = system(tmp_path, refuse={"bob"})
    runner.submit(queue(spool, "", "bob"))
    [double] = store.messages["alice"]  # postmaster -> alice
    assert "bob@example.test" in double.decode()
    spool2, store2, runner2 = system(tmp_path / "second", refuse={"bob"})
    runner2.submit(queue(spool2, "", "bob", parameters=((DOUBLE_BOUNCE, "yes"),)))
    assert store2.messages == {} and spool2.queued() == []


def test_outcome_reads_status_and_remote_host_from_the_error():
    """'5.1.1 host mx.remote.test said: 550 ...' → status 5.1.1, remote MTA mx.remote.test."""
    r = Recipient("x@remote.test", last_error="5.1.1 host mx.remote.test said: 550 5.1.1 no such user", state=RecipientState.FAILED)
    outcome = outcome_of(r)
    assert (outcome.status, outcome.remote_mta, outcome.diagnostic) == ("5.1.1", "mx.remote.test", "550 5.1.1 no such user")
    assert outcome_of(Recipient("y@z.test", last_error="")).status == "5.0.0"


def queue_with_notify(spool, sender, mailbox, notify, original=""):
    writer = spool.newMessage()
    writer.write(ORIGINAL)
    r = Recipient(f"{mailbox}@example.test", original=original, mailbox=mailbox, notify=notify)
    envelope = Envelope(sender=sender, recipients=(r,), received_at=1_790_000_000.0)
    return writer.commit(envelope, {"local": (r,)})[0]


def test_notify_never_suppresses_the_bounce(tmp_path):
    """rfc3461 4.1: NOTIFY=NEVER: the failure is recorded, no report is sent."""
    spool, store, runner = system(tmp_path, refuse={"bob"})
    runner.submit(queue_with_notify(spool, "carol@example.test", "bob", "NEVER"))
    assert store.messages == {} and spool.queued() == []


def test_notify_success_sends_a_delivered_report(tmp_path):
    """NOTIFY=SUCCESS on a local delivery: the sender gets Action: delivered, with the ORCPT."""
    spool, store, runner = system(tmp_path)
    runner.submit(queue_with_notify(spool, "carol@example.test", "bob", "SUCCESS", original="Bob@old.test"))
    assert len(store.messages["bob"]) == 1
    [report] = store.messages["carol"]
    fields = report_of(report).get_payload()[1].get_payload()[1]
    assert fields["Action"] == "delivered" and fields["Status"] == "2.0.0"
    assert fields["Original-Recipient"] == "rfc822; Bob@old.test"


def test_default_notify_sends_no_success_report(tmp_path):
    """Without NOTIFY, a delivery sends nothing back (rfc3461 4.1 default: FAILURE,DELAY)."""
    spool, store, runner = system(tmp_path)
    runner.submit(queue(spool, "carol@example.test", "bob"))
    assert list(store.messages) == ["bob"]


def test_success_report_follows_the_agents_answer(tmp_path):
    """rfc3461 5.2: a relay without DSN gives a 'relayed' report; a DSN-capable
    next hop took the request over, so we send none."""
    from mailsvc.envelope import Delivered

    for answer, expected in [(Delivered.RELAYED, [("relayed", ["x@far.test"])]), (Delivered.PASSED_ON, [])]:
        clock = task.Clock()
        spool = FileSpool(tmp_path / answer.value)
        reports = []

        class Agent:
            def deliver(self, message):
                return defer.succeed({r.address: answer for r in message.envelope.recipients})

        runner = QueueRunner(spool, {"relay": Agent()}, clock, RetrySchedule(),
                             reporter=lambda m, rs, action: reports.append((action, [r.address for r in rs])))
        runner.start()
        writer = spool.newMessage()
        writer.write(ORIGINAL)
        r = Recipient("x@far.test", notify="SUCCESS")
        runner.submit(writer.commit(Envelope(sender="carol@example.test", recipients=(r,), received_at=1.0), {"relay": (r,)})[0])
        assert reports == expected and spool.queued() == []


def test_delay_warning_is_sent_once(tmp_path):
    """rfc3464 Action: delayed, once, when a recipient is still pending after
    delay_warning_after; the flag survives in the control file."""
    clock = task.Clock()
    clock.advance(1_790_000_000)
    spool = FileSpool(tmp_path / "spool")
    reports = []

    class Busy:
        def deliver(self, message):
            from mailsvc.errors import TemporaryDeliveryError

            return defer.succeed({r.address: TemporaryDeliveryError("busy", "4.2.0") for r in message.envelope.recipients})

    runner = QueueRunner(spool, {"relay": Busy()}, clock, RetrySchedule(first=600, maximum=600),
                         reporter=lambda m, rs, action: reports.append((action, [r.address for r in rs])),
                         delay_warning_after=1000)
    runner.start()
    writer = spool.newMessage()
    writer.write(ORIGINAL)
    r = Recipient("x@far.test")
    runner.submit(writer.commit(Envelope(sender="carol@example.test", recipients=(r,), received_at=clock.seconds()), {"relay": (r,)})[0])
    assert reports == []  # first try: not late yet
    clock.advance(600)  # second try at 600 s: still not late
    assert reports == []
    clock.advance(600)  # third try at 1200 s: late, warn
    assert reports == [("delayed", ["x@far.test"])]
    assert spool.queued()[0].envelope.recipients[0].warned
    clock.advance(600)  # fourth try: already warned
    assert reports == [("delayed", ["x@far.test"])]


def test_delay_report_says_when_retries_end(tmp_path):
    """The delayed report carries Will-Retry-Until = arrival + give_up_after."""
    spool = FileSpool(tmp_path / "spool")
    store = RecordingStore()
    directory = TableDirectory(users=("carol",), aliases={"postmaster": ["carol"]})
    queued = []
    bouncer = Bouncer(spool, directory, "mx.test", submit=queued.append, now=lambda: 1_790_014_400.0, give_up_after=432000)
    writer = spool.newMessage()
    writer.write(ORIGINAL)
    r = Recipient("x@far.test", last_error="4.4.1 host mx.far.test said: 421 4.4.1 try later")
    message = writer.commit(Envelope(sender="carol@example.test", recipients=(r,), received_at=1_790_000_000.0), {"relay": (r,)})[0]
    result = []
    bouncer.report(message, [r], "delayed").addCallback(result.append)
    [[report]] = result
    with spool.open(report) as f:
        fields = report_of(f.read()).get_payload()[1].get_payload()[1]
    assert fields["Action"] == "delayed" and fields["Status"] == "4.4.1"
    assert fields["Will-Retry-Until"] == "Sat, 26 Sep 2026 14:13:20 +0000"  # 1_790_000_000 + 5 days

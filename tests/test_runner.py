"""The queue runner, driven by task.Clock over a real FileSpool and fake agents."""

from types import SimpleNamespace

from twisted.internet import defer, task
from twisted.logger import Logger, formatEvent
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailsvc.delivery.runner import QueueRunner
from mailsvc.envelope import Envelope, Recipient, RecipientState
from mailsvc.errors import PermanentDeliveryError, TemporaryDeliveryError
from mailsvc.interfaces import IDeliveryAgent
from mailsvc.spool import FileSpool, RetrySchedule

T0 = 1_763_891_234.0
SCHEDULE = RetrySchedule(first=300, maximum=3600, give_up_after=432000)
BOB = Recipient("bob@example.test", "bob@example.test", "bob")
CAROL = Recipient("carol@example.test", "carol@example.test", "carol")
ENVELOPE = Envelope(sender="alice@example.test", recipients=(), received_at=T0)


@implementer(IDeliveryAgent)
class FakeAgent:
    """Records each message it is given; ``answer(message)`` makes the result."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = []

    def deliver(self, message):
        self.calls.append(message)
        return defer.maybeDeferred(self.answer, message)


def deliver_all(message):
    """Every pending recipient delivered."""
    return {r.address: None for r in message.envelope.recipients}


def answer_with(error):
    """Every recipient gets ``error``."""
    return lambda message: {r.address: error for r in message.envelope.recipients}


def make(tmp_path, answer=deliver_all, **options):
    """A runner over a FileSpool in ``tmp_path`` with one fake agent for hop 'local'."""
    clock = task.Clock()
    clock.advance(T0)
    spool = FileSpool(tmp_path)
    agent = FakeAgent(answer)
    events = []
    options.setdefault("schedule", SCHEDULE)
    runner = QueueRunner(
        spool, {"local": agent}, clock, log=Logger(observer=events.append), **options
    )
    return SimpleNamespace(clock=clock, spool=spool, agent=agent, runner=runner, events=events)


def commit(spool, recipients=(BOB,), hop="local"):
    """Queue one small message; return its QueuedMessage."""
    writer = spool.newMessage()
    writer.write(b"Subject: test\r\n\r\nhello\r\n")
    [message] = writer.commit(ENVELOPE, {hop: tuple(recipients)})
    return message


def log_lines(events):
    """The formatted log lines."""
    return [formatEvent(e) for e in events]


def test_fake_agent_is_an_agent():
    """The test double provides IDeliveryAgent."""
    assert verifyObject(IDeliveryAgent, FakeAgent(deliver_all))


def test_submit_delivers_at_once_and_removes(tmp_path):
    """A submitted message goes to its agent at once; once delivered it leaves the spool."""
    t = make(tmp_path)
    t.runner.start()
    message = commit(t.spool)
    t.runner.submit(message)
    assert [m.id for m in t.agent.calls] == [message.id]
    assert t.spool.queued() == []
    assert f"delivered id={message.id} to=<bob@example.test> hop=local" in log_lines(t.events)


def test_temporary_failure_then_success_at_scheduled_retry(tmp_path):
    """A 451 defers the recipient for 5 minutes (saved in the spool); the retry delivers it."""
    answers = [answer_with(TemporaryDeliveryError("mailbox locked", "4.2.0")), deliver_all]
    t = make(tmp_path, lambda m: answers.pop(0)(m), scan_interval=10_000)
    t.runner.start()
    message = commit(t.spool)
    t.runner.submit(message)
    [saved] = t.spool.queued()
    [bob] = saved.envelope.recipients
    assert bob.state is RecipientState.PENDING
    assert (bob.attempts, bob.next_attempt, bob.last_error) == (1, T0 + 300, "4.2.0 mailbox locked")
    assert any(
        line.startswith(f"deferred id={message.id} to=<bob@example.test> hop=local")
        and "error=4.2.0 mailbox locked" in line
        for line in log_lines(t.events)
    )
    t.clock.advance(299)
    assert len(t.agent.calls) == 1
    t.clock.advance(1)
    assert len(t.agent.calls) == 2
    assert t.agent.calls[1].envelope.recipients[0].attempts == 1
    assert t.spool.queued() == []


def test_permanent_failure_marks_failed_and_removes(tmp_path):
    """A permanent error fails the recipient for good, logs it, and the message leaves the spool."""
    t = make(tmp_path, answer_with(PermanentDeliveryError("no such user", "5.1.1")))
    t.runner.start()
    message = commit(t.spool)
    t.runner.submit(message)
    assert t.spool.queued() == []
    assert f"failed id={message.id} to=<bob@example.test> hop=local error=5.1.1 no such user" in log_lines(
        t.events
    )
    t.clock.advance(SCHEDULE.give_up_after)
    assert len(t.agent.calls) == 1


def test_mixed_results_retry_only_the_deferred(tmp_path):
    """With one recipient delivered and one deferred, the retry carries only the deferred one."""

    def answer(message):
        return {
            r.address: None if r.address == BOB.address else TemporaryDeliveryError("busy")
            for r in message.envelope.recipients
        }

    t = make(tmp_path, answer)
    t.runner.start()
    t.runner.submit(commit(t.spool, (BOB, CAROL)))
    [saved] = t.spool.queued()
    states = {r.address: r.state for r in saved.envelope.recipients}
    assert states == {BOB.address: RecipientState.DELIVERED, CAROL.address: RecipientState.PENDING}
    t.clock.advance(300)
    assert [r.address for r in t.agent.calls[1].envelope.recipients] == [CAROL.address]


def test_give_up_after_the_deadline(tmp_path):
    """A recipient deferred until give_up_after fails with 4.4.7 and the message is removed."""
    schedule = RetrySchedule(first=60, maximum=120, give_up_after=600)
    t = make(tmp_path, answer_with(TemporaryDeliveryError("disk full", "4.3.1")), schedule=schedule)
    t.runner.start()
    message = commit(t.spool)
    t.runner.submit(message)
    for _ in range(20):
        t.clock.advance(60)
    # Attempts at 0, 60, 180, 300, 420, 540 and the last at the deadline, 600.
    assert len(t.agent.calls) == 7
    assert t.spool.queued() == []
    lines = log_lines(t.events)
    assert (
        f"failed id={message.id} to=<bob@example.test> hop=local"
        " error=4.4.7 gave up after 10 minutes: 4.3.1 disk full"
    ) in lines


def test_concurrency_cap(tmp_path):
    """No more than `concurrency` deliveries run at once; the others wait for a slot."""
    pending = []

    def answer(message):
        d = defer.Deferred()
        pending.append((d, message))
        return d

    t = make(tmp_path, answer, concurrency=2)
    t.runner.start()
    messages = [commit(t.spool) for _ in range(5)]
    for message in messages:
        t.runner.submit(message)
    assert len(t.agent.calls) == 2
    d, first = pending.pop(0)
    d.callback(deliver_all(first))
    assert len(t.agent.calls) == 3
    while pending:
        d, m = pending.pop(0)
        d.callback(deliver_all(m))
    assert [m.id for m in t.agent.calls] == [m.id for m in messages]
    assert t.spool.queued() == []


def test_same_message_is_never_delivered_twice_at_once(tmp_path):
    """Submitting again, or a scan, while a message is in flight starts no second delivery."""
    pending = []

    def answer(message):
        d = defer.Deferred()
        pending.append(d)
        return d

    t = make(tmp_path, answer, scan_interval=60)
    t.runner.start()
    message = commit(t.spool)
    t.runner.submit(message)
    t.runner.submit(message)
    t.clock.advance(60)  # a scan sees it due in the spool
    assert len(t.agent.calls) == 1
    pending[0].callback(deliver_all(message))
    assert t.spool.queued() == []


def test_start_recovers_and_delivers_committed_messages(tmp_path):
    """Messages committed before start (a restart) are recovered and delivered."""
    t = make(tmp_path)
    queued = [commit(t.spool), commit(t.spool)]
    t.runner.start()
    assert sorted(m.id for m in t.agent.calls) == sorted(m.id for m in queued)
    assert t.spool.queued() == []


def test_recovered_message_waits_for_its_next_attempt(tmp_path):
    """A recovered message deferred until later is tried then, not at start."""
    t = make(tmp_path)
    message = commit(t.spool)
    later = message.envelope.evolve(recipients=(BOB.evolve(attempts=1, next_attempt=T0 + 100),))
    t.spool.update(message.evolve(envelope=later))
    t.runner.start()
    assert t.agent.calls == []
    t.clock.advance(100)
    assert len(t.agent.calls) == 1


def test_scan_finds_messages_not_submitted(tmp_path):
    """A message committed without submit() is found by the periodic scan."""
    t = make(tmp_path, scan_interval=60)
    t.runner.start()
    message = commit(t.spool)
    t.clock.advance(59)
    assert t.agent.calls == []
    t.clock.advance(1)
    assert [m.id for m in t.agent.calls] == [message.id]


def test_agent_exception_defers_every_recipient(tmp_path):
    """An agent that raises is a temporary failure for every pending recipient; the runner goes on."""
    calls = []

    def answer(message):
        calls.append(message)
        if len(calls) == 1:
            raise RuntimeError("agent bug")
        return deliver_all(message)

    t = make(tmp_path, answer)
    t.runner.start()
    message = commit(t.spool, (BOB, CAROL))
    t.runner.submit(message)
    [saved] = t.spool.queued()
    for r in saved.envelope.recipients:
        assert r.state is RecipientState.PENDING
        assert r.attempts == 1
        assert "internal error: agent bug" in r.last_error
    assert any(e.get("log_failure") for e in t.events)
    t.clock.advance(300)
    assert t.spool.queued() == []


def test_agent_errback_defers(tmp_path):
    """An agent whose Deferred fails is treated like one that raised."""
    t = make(tmp_path, lambda m: defer.fail(ValueError("boom")))
    t.runner.start()
    t.runner.submit(commit(t.spool))
    [saved] = t.spool.queued()
    assert saved.envelope.recipients[0].attempts == 1
    assert "boom" in saved.envelope.recipients[0].last_error


def test_missing_result_is_a_temporary_failure(tmp_path):
    """A recipient the agent says nothing about is deferred, not lost."""
    t = make(tmp_path, lambda m: {})
    t.runner.start()
    t.runner.submit(commit(t.spool))
    [saved] = t.spool.queued()
    assert saved.envelope.recipients[0].state is RecipientState.PENDING
    assert saved.envelope.recipients[0].attempts == 1


def test_hop_without_agent_stays_queued(tmp_path):
    """A message for a hop no agent serves is logged and left pending for later scans."""
    t = make(tmp_path, scan_interval=60)
    t.runner.start()
    message = commit(t.spool, hop="relay")
    t.runner.submit(message)
    t.clock.advance(60)
    assert t.spool.queued() == [message]
    assert t.agent.calls == []
    lines = [line for line in log_lines(t.events) if "no delivery agent for hop=relay" in line]
    assert len(lines) == 2


def test_stop_cancels_timers_and_waits_for_deliveries(tmp_path):
    """stop() cancels every timer and fires only when in-flight deliveries have ended."""
    pending = []

    def answer(message):
        d = defer.Deferred()
        pending.append(d)
        return d

    t = make(tmp_path, answer)
    t.runner.start()
    message = commit(t.spool)
    t.runner.submit(message)
    stopped = t.runner.stop()
    assert t.clock.getDelayedCalls() == []
    fired = []
    stopped.addCallback(fired.append)
    assert fired == []
    pending[0].callback(deliver_all(message))
    assert fired == [None]
    assert t.spool.queued() == []
    t.runner.submit(commit(t.spool))
    assert len(t.agent.calls) == 1


def test_stop_when_idle_fires_at_once(tmp_path):
    """With nothing in flight, stop() has already fired."""
    t = make(tmp_path)
    t.runner.start()
    fired = []
    t.runner.stop().addCallback(fired.append)
    assert fired == [None]


def test_update_failure_is_logged_not_fatal(tmp_path):
    """If the spool cannot save a deferral, the runner logs it and goes on."""
    t = make(tmp_path, answer_with(TemporaryDeliveryError("busy")))
    t.runner.start()
    message = commit(t.spool)
    t.spool.remove(message)  # gone underneath: update() will fail
    t.runner.submit(message)
    assert any("spool update" in line for line in log_lines(t.events))
    t.clock.advance(600)
    assert len(t.agent.calls) == 1  # no ghost retries of a removed message


def test_slow_scan_does_not_redeliver_what_finished_meanwhile(tmp_path):
    """With spool reads in a thread, a scan that read a message before its
    delivery finished does not deliver it again from that stale copy."""
    held = []

    def run_blocking(f, *args):
        if f == t.spool.queued:  # read now, answer later, like a slow thread
            d = defer.Deferred()
            held.append((d, f(*args)))
            return d
        return defer.maybeDeferred(f, *args)

    answers = [answer_with(TemporaryDeliveryError("busy")), deliver_all, deliver_all]
    t = make(tmp_path, lambda m: answers.pop(0)(m), scan_interval=300, run_blocking=run_blocking)
    t.runner.start()
    t.runner.submit(commit(t.spool))
    # At +300 the scan (scheduled first) reads the deferred message, then
    # the retry timer delivers it and the spool forgets it.
    t.clock.advance(300)
    assert len(t.agent.calls) == 2 and t.spool.queued() == []
    [(d, stale)] = held
    assert len(stale) == 1
    d.callback(stale)
    assert len(t.agent.calls) == 2

"""The glue's cheap paths: one lazily re-armed timer, no pause for answers
that are already there, and ``policy.ask`` without a generator."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.python.failure import Failure

from mailsvc.policy import Verdict, ask
from test_protocol import SEND, Harness, lines, talk

TIMEOUT = b"421 4.4.2 Timeout exceeded; closing connection\r\n"


def test_activity_moves_the_command_deadline(tmp_path):
    """rfc5321 4.5.3.2.7: the timeout counts from the last input, however often it comes."""
    h = Harness(tmp_path, command_timeout=300, data_timeout=180)
    proto, t = h.connect()
    for _ in range(5):
        h.clock.advance(200)
        talk(proto, t, b"NOOP\r\n")
        assert len(h.clock.getDelayedCalls()) == 1
    h.clock.advance(299.5)
    assert t.value() == b"" and not t.disconnecting
    h.clock.advance(0.5)
    assert t.value() == TIMEOUT and t.disconnecting
    assert h.clock.getDelayedCalls() == []


def test_data_and_command_timeouts_switch(tmp_path):
    """rfc5321 4.5.3.2.5 / 4.5.3.2.7: DATA shortens the wait to data_timeout,
    and after end of data the command timeout counts again."""
    h = Harness(tmp_path, command_timeout=300, data_timeout=180)
    proto, t = h.connect()
    h.clock.advance(100)
    talk(proto, t, SEND)  # now in DATA: the deadline moves sooner than the armed timer
    assert len(h.clock.getDelayedCalls()) == 1
    h.clock.advance(179)
    talk(proto, t, b"line\r\n")
    h.clock.advance(179)
    assert not t.disconnecting
    out = talk(proto, t, b".\r\n")
    assert lines(out)[-1].startswith("250 2.0.0")
    h.clock.advance(299)
    assert not t.disconnecting and len(h.clock.getDelayedCalls()) == 1
    h.clock.advance(1)
    assert t.value() == TIMEOUT and t.disconnecting


def test_data_timeout_longer_than_command_timeout(tmp_path):
    """Each timeout counts in full from the last input, whichever is the longer."""
    h = Harness(tmp_path, command_timeout=60, data_timeout=600)
    proto, t = h.connect()
    h.clock.advance(59)
    talk(proto, t, SEND)  # in DATA now: 600 s from here
    h.clock.advance(599.5)
    assert t.value() == b"" and not t.disconnecting
    out = talk(proto, t, b"line\r\n.\r\n")  # back to commands: 60 s from here
    assert lines(out)[-1].startswith("250 2.0.0")
    h.clock.advance(59.5)
    assert not t.disconnecting
    h.clock.advance(0.5)
    assert t.value() == TIMEOUT and t.disconnecting
    assert h.clock.getDelayedCalls() == []


def test_only_the_data_timeout(tmp_path):
    """command_timeout 0: commands may wait for ever; data still times out."""
    h = Harness(tmp_path, command_timeout=0, data_timeout=180)
    proto, t = h.connect()
    h.clock.advance(10_000)
    talk(proto, t, SEND)
    h.clock.advance(179.5)
    assert not t.disconnecting
    h.clock.advance(0.5)
    assert t.value() == TIMEOUT and t.disconnecting


def test_no_timer_once_closed_or_disabled(tmp_path):
    """QUIT leaves no timer behind; a timeout of 0 arms none."""
    h = Harness(tmp_path, command_timeout=300)
    proto, t = h.connect()
    talk(proto, t, b"QUIT\r\n")
    assert h.clock.getDelayedCalls() == []
    h = Harness(tmp_path, command_timeout=0)
    proto, t = h.connect()
    talk(proto, t, b"NOOP\r\n")
    assert h.clock.getDelayedCalls() == []


class Counting:
    """Counts pause/resume calls on a StringTransport."""

    def __init__(self, transport):
        self.calls = []
        for name in ("pauseProducing", "resumeProducing"):
            original = getattr(transport, name)
            setattr(transport, name, lambda original=original, name=name: (self.calls.append(name), original()))


def test_synchronous_answers_do_not_pause(tmp_path):
    """Answers already there are written at once; reading never stops."""
    h = Harness(tmp_path)
    proto = h.factory.buildProtocol(None)
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    t = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    counting = Counting(t)
    proto.makeConnection(t)
    assert t.value() == b"220 mx.test ESMTP mailsvc\r\n"
    out = talk(proto, t, SEND + b"hi\r\n.\r\nQUIT\r\n")
    assert [l[:3] for l in lines(out)][-5:] == ["250", "250", "354", "250", "221"]
    assert counting.calls == []


def test_slow_connect_policy_pauses_until_greeting(tmp_path):
    """A connect hook that answers later: nothing is read until the 220."""
    waiting = []

    class SlowConnect:
        def connect(self, session):
            d = defer.Deferred()
            waiting.append(d)
            return d

    h = Harness(tmp_path, policies=[SlowConnect()])
    proto, t = h.connect()
    assert t.value() == b"" and t.producerState == "paused"
    waiting[0].callback(None)
    assert t.value() == b"220 mx.test ESMTP mailsvc\r\n" and t.producerState == "producing"


def test_failing_connect_policy_gives_421(tmp_path):
    """A connect hook that raises: 421 4.3.0, logged, the session closes."""

    class Broken:
        def connect(self, session):
            raise RuntimeError("boom")

    h = Harness(tmp_path, policies=[Broken()])
    proto, t = h.connect()
    assert t.value() == b"421 4.3.0 Local error; try again later\r\n" and t.disconnecting
    assert t.producerState == "producing"


def _result(d):
    out = []
    d.addBoth(out.append)
    assert out, "not fired"
    return out[0]


class P:
    def __init__(self, answer):
        self.answer = answer

    def helo(self, *args):
        answer = self.answer
        if isinstance(answer, Exception):
            raise answer
        return answer() if callable(answer) else answer


def test_ask_without_policies_accepts():
    verdict = _result(ask([], "helo", "x"))
    assert verdict == Verdict(None, ())


def test_ask_collects_headers_and_stops_at_refusal():
    refusal = Verdict.reject("no")
    policies = [P(None), P(Verdict.accept("A: 1")), P(lambda: defer.succeed(Verdict.accept("B: 2"))), P(Verdict.accept("C: 3"))]
    assert _result(ask(policies, "helo")) == Verdict(None, ("A: 1", "B: 2", "C: 3"))
    called = []
    after = P(lambda: called.append(1))
    assert _result(ask([P(Verdict.accept("A: 1")), P(refusal), after], "helo")) is refusal
    assert _result(ask([P(lambda: defer.succeed(refusal)), after], "helo")) is refusal
    assert called == []


def test_ask_waits_for_a_slow_policy():
    d = defer.Deferred()
    result = ask([P(lambda: d), P(Verdict.accept("B: 2"))], "helo")
    out = []
    result.addBoth(out.append)
    assert out == []
    d.callback(Verdict.accept("A: 1"))
    assert out == [Verdict(None, ("A: 1", "B: 2"))]


@pytest.mark.parametrize("first", [True, False])
def test_ask_fails_when_a_policy_raises(first):
    policies = [P(ValueError("bad"))] if first else [P(lambda: defer.succeed(None)), P(ValueError("bad"))]
    failure = _result(ask(policies, "helo"))
    assert isinstance(failure, Failure) and failure.check(ValueError)

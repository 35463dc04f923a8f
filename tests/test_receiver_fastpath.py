"""The receiver's synchronous paths: MAIL, RCPT and end of data answer without
a Deferred when the policies and the directory answer at once, and the same
way as before when one of them answers later, fails, or raises."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress

import os

import pytest
from twisted.internet import defer
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

import mailsvc.receiver as receiver_module
from mailsvc.delivery import router
from mailsvc.durable import run_steps
from mailsvc.envelope import Recipient
from mailsvc.errors import SpoolError
from mailsvc.policy import SessionInfo, Verdict
from mailsvc.receiver import ReceiverContext, ReceiverSettings, ReceivingSession
from mailsvc.smtp import events as ev
from mailsvc.smtp.replies import Reply
from test_protocol import SEND, Harness, TableDirectory, lines, talk

LOCAL_ERROR = "451 4.3.0 Local error in processing; try again later"
MESSAGE = SEND + b"hi\r\n.\r\nQUIT\r\n"
# The replies to MESSAGE after the EHLO lines: MAIL, RCPT, DATA, end of data, QUIT.
ACCEPTED = ["250", "250", "354", "250", "221"]


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def formats(events):
    return [e["log_format"] for e in events if not e["log_format"].startswith(("connect from", "disconnect from"))]


def codes(out: str) -> list[str]:
    return [line[:3] for line in lines(out) if not line.startswith("250-") and "greets" not in line and line != "250 HELP"]


class Hooks:
    """A policy answering each hook with ``answers[hook]``: a value, an
    exception to raise, or ``"later"`` (an unfired Deferred kept in ``waiting``)."""

    def __init__(self, **answers):
        self.answers = answers
        self.waiting = []
        self.calls = []

    def _answer(self, hook):
        self.calls.append(hook)
        answer = self.answers.get(hook)
        if isinstance(answer, BaseException):
            raise answer
        if answer == "later":
            d = defer.Deferred()
            self.waiting.append(d)
            return d
        return answer() if callable(answer) else answer

    def connect(self, session):
        return self._answer("connect")

    def helo(self, session, name):
        return self._answer("helo")

    def mail(self, session, sender, parameters):
        return self._answer("mail")

    def rcpt(self, session, recipient, parameters):
        return self._answer("rcpt")

    def endOfData(self, session, envelope):
        return self._answer("endOfData")


class LaterDirectory:
    """A TableDirectory whose answers come in Deferreds: already fired
    (``"fired"``) or fired by the test (``"later"``, kept in ``waiting``)."""

    def __init__(self, mode, table=None):
        self.mode = mode
        self.table = table or TableDirectory(aliases={"team": ["alice", "bob"]})
        self.waiting = []

    def _wrap(self, value):
        if self.mode == "fired":
            return defer.succeed(value)
        d = defer.Deferred()
        self.waiting.append((d, value))
        return d

    def fire_all(self):
        while self.waiting:
            d, value = self.waiting.pop(0)
            d.callback(value)

    def isLocalDomain(self, domain):
        return self._wrap(self.table.isLocalDomain(domain))

    def resolve(self, address):
        return self._wrap(self.table.resolve(address))

    def expand(self, address):
        return self._wrap(self.table.expand(address))


def session_for(directory=None, policies=(), user=None, **settings):
    context = ReceiverContext(
        settings=ReceiverSettings(hostname="mx.test", default_domain="example.test", **settings),
        directory=directory or TableDirectory(aliases={"team": ["alice", "bob"]}),
        spool=None,
        submit=None,
        run_blocking=defer.maybeDeferred,
        policies=list(policies),
    )
    return ReceivingSession(context, SessionInfo("192.0.2.7", user=user))


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "not fired"
    return out[0]


# ---------------------------------------------------------------- plain answers


def test_synchronous_answers_are_plain_values():
    """No Deferred for HELO, MAIL and RCPT when everyone answers at once."""
    session = session_for(policies=[Hooks(rcpt=Verdict.accept())])
    assert session.on_hello(ev.Hello("c.test", True)) is None
    assert session.on_mail(ev.MailFrom("carol@remote.test", {"AUTH": "<>", "SIZE": "10"})) is None
    assert session._txn.sender == "carol@remote.test" and session._txn.parameters == {"SIZE": "10"}
    assert session.on_rcpt(ev.RcptTo("team@example.test", {})) is None
    assert [r.address for r in session._txn.recipients] == ["alice@example.test", "bob@example.test"]
    refusal = session.on_rcpt(ev.RcptTo("x@far.test", {}))
    assert refusal == Reply.of(550, "5.7.1", "<x@far.test>: relay access denied")


def test_find_recipients_is_plain_and_recipients_for_a_deferred():
    directory = TableDirectory(aliases={"team": ["alice", "bob"]})
    assert router.find_recipients(directory, "nobody@example.test") is None
    assert router.find_recipients(directory, "x@Far.Test.") == [Recipient("x@Far.Test.", original="x@Far.Test.")]
    assert router.find_recipients(directory, "postmaster", "PostMaster") is None  # not in this table
    found = router.find_recipients(directory, "alice@example.test", "orig@example.test")
    assert found == [Recipient("alice@example.test", original="orig@example.test", mailbox="alice")]
    d = router.recipients_for(directory, "alice@example.test")
    assert isinstance(d, defer.Deferred) and result_of(d) == [Recipient("alice@example.test", original="alice@example.test", mailbox="alice")]


# ---------------------------------------------------------------- slow policies


@pytest.mark.parametrize("hook", ["helo", "mail", "rcpt", "endOfData"])
def test_a_slow_policy_pauses_until_it_answers(tmp_path, hook):
    """rfc2920 3.1: an unfired Deferred at any hook pauses the transport;
    later replies wait, then come in order when it fires."""
    policy = Hooks(**{hook: "later"})
    h = Harness(tmp_path, policies=[policy])
    proto, t = h.connect()
    t.clear()
    before = talk(proto, t, MESSAGE)
    assert t.producerState == "paused" and len(policy.waiting) == 1
    policy.waiting[0].callback(Verdict.accept("X-Slow: yes") if hook == "endOfData" else None)
    assert t.producerState == "producing" and t.disconnecting
    assert (codes(before) + codes(t.value().decode()))[-5:] == ACCEPTED
    [queued] = h.spool.queued()
    assert h.submitted == [queued]
    expected = ("X-Slow: yes",) if hook == "endOfData" else ()
    assert queued.envelope.prepend_headers[1:] == expected


@pytest.mark.parametrize("hook, code", [("mail", "550"), ("rcpt", "550"), ("endOfData", "550")])
def test_a_slow_refusal_is_the_reply(tmp_path, hook, code):
    policy = Hooks(**{hook: "later"})
    h = Harness(tmp_path, policies=[policy])
    proto, t = h.connect()
    t.clear()
    out = talk(proto, t, MESSAGE)
    policy.waiting[0].callback(Verdict.reject(f"no {hook}"))
    out += t.value().decode()
    assert f"{code} 5.7.1 no {hook}" in lines(out)
    assert h.spool.queued() == [] and list((tmp_path / "spool" / "tmp").iterdir()) == []


def test_slow_policies_at_every_hook_run_in_order(tmp_path):
    later = Hooks(helo="later", mail="later", rcpt="later", endOfData="later")
    after = Hooks(endOfData=Verdict.accept("X-After: 1"))
    h = Harness(tmp_path, policies=[later, after])
    proto, t = h.connect()
    t.clear()
    out = talk(proto, t, MESSAGE)
    for n in range(4):
        assert t.producerState == "paused" and len(later.waiting) == n + 1
        later.waiting[n].callback(Verdict.accept("X-Later: 1") if n == 3 else None)
        out += t.value().decode()
        t.clear()
    assert codes(out)[-5:] == ACCEPTED
    assert later.calls == ["connect", "helo", "mail", "rcpt", "endOfData"]
    assert after.calls == ["connect", "helo", "mail", "rcpt", "endOfData"]
    [queued] = h.spool.queued()
    assert queued.envelope.prepend_headers[1:] == ("X-Later: 1", "X-After: 1")


# ---------------------------------------------------------------- failures


@pytest.mark.parametrize("way", ["raise", "failed", "later"])
@pytest.mark.parametrize("hook, event", [("helo", "Hello"), ("mail", "MailFrom"), ("rcpt", "RcptTo"), ("endOfData", "DataEnd")])
def test_a_failing_policy_gives_451_and_is_logged(tmp_path, logged, hook, event, way):
    """A policy that raises, or whose Deferred fails (at once or later):
    451 4.3.0 for that command, logged, and the session goes on."""
    error = RuntimeError(f"broken {hook}")
    answer = {"raise": error, "failed": lambda: defer.fail(error), "later": "later"}[way]
    policy = Hooks(**{hook: answer})
    h = Harness(tmp_path, policies=[policy])
    writers = []
    new_message = h.spool.newMessage
    h.spool.newMessage = lambda: writers.append(new_message()) or writers[-1]
    proto, t = h.connect()
    t.clear()
    out = talk(proto, t, SEND + b"hi\r\n.\r\nNOOP\r\n")
    if way == "later":
        policy.waiting[0].errback(error)
        out += t.value().decode()
    assert LOCAL_ERROR in lines(out) and lines(out)[-1] == "250 2.0.0 Ok"
    failures = [e for e in logged if e["log_format"] == "error answering {event}"]
    assert [(e["event"], e["log_failure"].value) for e in failures] == [(event, error)]
    assert h.spool.queued() == [] and h.submitted == []
    # nothing of the message stays behind (its writer was aborted)
    assert [name for name in os.listdir(h.spool.directory / "tmp")] == []
    assert all(writer._done for writer in writers)


def test_a_failing_policy_fails_the_handler_result():
    """Called directly, a failing policy is a failed Deferred (as with inlineCallbacks)."""
    error = ValueError("bad")
    session = session_for(policies=[Hooks(mail=error, rcpt=lambda: defer.fail(error))])
    failure = result_of(session.on_mail(ev.MailFrom("a@b.test", {})))
    assert isinstance(failure, Failure) and failure.value is error
    failure = result_of(session.on_rcpt(ev.RcptTo("alice@example.test", {})))
    assert isinstance(failure, Failure) and failure.value is error
    assert session._txn.recipients == []


# ---------------------------------------------------------------- the directory


@pytest.mark.parametrize("mode", ["fired", "later"])
def test_a_directory_answering_with_deferreds(tmp_path, mode):
    """IRecipientDirectory plugins may answer with Deferreds, fired or not."""
    h = Harness(tmp_path)
    directory = h.context.directory = LaterDirectory(mode, h.context.directory)
    proto, t = h.connect()
    t.clear()
    script = SEND.replace(b"DATA\r\n", b"RCPT TO:<team@example.test>\r\nRCPT TO:<nobody@example.test>\r\nRCPT TO:<x@far.test>\r\nDATA\r\n")
    out = talk(proto, t, script + b"hi\r\n.\r\nQUIT\r\n")
    if mode == "later":
        assert t.producerState == "paused"
        for _ in range(20):
            if not directory.waiting:
                break
            directory.fire_all()
        out += t.value().decode()
    assert t.producerState == "producing"
    assert lines(out)[-7:-2] == [
        "250 2.1.5 Recipient ok",
        "250 2.1.5 Recipient ok",
        "550 5.1.1 <nobody@example.test>: no such user here",
        "550 5.7.1 <x@far.test>: relay access denied",
        "354 End data with <CR><LF>.<CR><LF>",
    ]
    [queued] = h.spool.queued()
    assert [r.address for r in queued.envelope.recipients] == ["alice@example.test", "bob@example.test"]


@pytest.mark.parametrize("mode", ["fired", "later"])
def test_recipients_for_with_a_deferred_directory(mode):
    directory = LaterDirectory(mode)
    results = [router.recipients_for(directory, a) for a in ("team@Example.Test", "nobody@example.test", "x@far.test")]
    found = router.find_recipients(directory, "alice@example.test", "orig")
    assert isinstance(found, defer.Deferred)
    directory.fire_all()
    directory.fire_all()
    assert [None if r is None else [x.address for x in r] for r in map(result_of, results)] == [
        ["alice@example.test", "bob@example.test"],
        None,
        ["x@far.test"],
    ]
    assert result_of(found) == [Recipient("alice@example.test", original="orig", mailbox="alice")]


@pytest.mark.parametrize("call", ["isLocalDomain", "resolve"])
@pytest.mark.parametrize("way", ["raise", "failure", "failed"])
def test_a_failing_directory(tmp_path, logged, call, way):
    """A directory that raises or answers with a failure: recipients_for
    fails, and RCPT gets 451 4.3.0 like any error."""
    error = KeyError(call)

    class Broken(TableDirectory):
        pass

    def broken(self, *args):
        if way == "raise":
            raise error
        return Failure(error) if way == "failure" else defer.fail(error)

    setattr(Broken, call, broken)
    failure = result_of(router.recipients_for(Broken(), "alice@example.test"))
    assert isinstance(failure, Failure) and failure.value is error
    h = Harness(tmp_path)
    h.context.directory = Broken()
    proto, t = h.connect()
    t.clear()
    out = talk(proto, t, SEND)
    assert lines(out)[-3:] == ["250 2.1.0 Sender ok", LOCAL_ERROR, "554 5.5.1 No valid recipients"]
    assert [e["log_failure"].value for e in logged if e["log_format"] == "error answering {event}"] == [error]


@pytest.mark.parametrize("mode", [None, "fired", "later"])
def test_submission_sender_must_be_owned(mode):
    """rfc6409 6.1 with a plain, fired or later directory: the user's own
    address and its aliases pass; another's gets 553; <> is not the user's."""
    table = TableDirectory(aliases={"team": ["alice", "bob"]})
    directory = table if mode is None else LaterDirectory(mode, table)
    session = session_for(directory, user="alice", require_sender_match=True)
    answers = {}
    for sender in ("alice@example.test", "team@example.test", "bob@example.test", "x@far.test", ""):
        answer = session.on_mail(ev.MailFrom(sender, {}))
        if mode == "later" and sender:
            assert isinstance(answer, defer.Deferred)
            directory.fire_all()
            directory.fire_all()
        if mode is None:
            assert not isinstance(answer, defer.Deferred)
        answers[sender] = result_of(answer) if isinstance(answer, defer.Deferred) else answer
    assert answers["alice@example.test"] is None and answers["team@example.test"] is None
    for sender in ("bob@example.test", "x@far.test", ""):
        assert answers[sender].code == 553
    assert session._txn.sender == "team@example.test"


# ---------------------------------------------------------------- commit


def failing_fsync(error):
    def fsync(fd):
        raise error

    return fsync


def outcome(steps, fsync):
    """Run commit steps with ``fsync``: (result, None) or (None, the exception)."""
    try:
        return run_steps(steps, fsync), None
    except Exception as e:
        return None, e


@pytest.mark.parametrize("full, expected", [(True, "452 4.3.1 Insufficient system storage; try again later"), (False, LOCAL_ERROR)])
@pytest.mark.parametrize("how", ["later", "raised"])
def test_spool_error_at_a_flush_worker_commit(tmp_path, logged, full, expected, how):
    """With run_steps: a SpoolError from the commit, later or at once, is 452/451, logged."""
    h = Harness(tmp_path)
    waiting = []
    fsync = failing_fsync(OSError(errno.ENOSPC if full else errno.EIO, "simulated"))

    def run_steps_later(steps):
        _, error = outcome(steps, fsync)
        if how == "raised":
            raise error
        d = defer.Deferred()
        waiting.append((d, error))
        return d

    h.context.run_steps = run_steps_later
    proto, t = h.connect()
    out = talk(proto, t, SEND + b"x\r\n.\r\nNOOP\r\n")
    if how == "later":
        assert t.producerState == "paused"
        d, error = waiting[0]
        d.errback(error)
        out += t.value().decode()
    assert lines(out)[-2:] == [expected, "250 2.0.0 Ok"]
    assert t.producerState == "producing" and h.submitted == [] and h.spool.queued() == []
    [failed] = [e for e in logged if e["log_format"].startswith("spool commit failed")]
    assert failed["log_format"] == "spool commit failed for {id}: {error}" and isinstance(failed["error"], SpoolError)
    assert failed["error"].temporary_full is full
    assert not any(e["log_format"].startswith("accepted") for e in logged)


def test_other_errors_at_commit_go_to_the_glue(tmp_path, logged):
    h = Harness(tmp_path)
    waiting = []

    def run_steps_later(steps):
        _, error = outcome(steps, failing_fsync(RuntimeError("bug")))
        d = defer.Deferred()
        waiting.append((d, error))
        return d

    h.context.run_steps = run_steps_later
    proto, t = h.connect()
    out = talk(proto, t, SEND + b"x\r\n.\r\n")
    [(d, error)] = waiting
    d.errback(error)
    out += t.value().decode()
    assert lines(out)[-1] == LOCAL_ERROR
    [failure] = [e for e in logged if e["log_format"] == "error answering {event}"]
    assert failure["event"] == "DataEnd" and isinstance(failure["log_failure"].value, RuntimeError)


def test_a_flush_worker_commit_answers_250_when_it_fires(tmp_path, logged):
    """The commit stays asynchronous: 250, the log line and submit only once it fires."""
    h = Harness(tmp_path, policies=[Hooks(endOfData=Verdict.accept("X-A: 1"))])
    waiting = []

    def run_steps_later(steps):
        d = defer.Deferred()
        waiting.append((d, steps))
        return d

    h.context.run_steps = run_steps_later
    proto, t = h.connect()
    out = talk(proto, t, MESSAGE)
    assert codes(out)[-3:] == ["250", "250", "354"] and t.producerState == "paused" and h.submitted == []
    d, steps = waiting.pop()
    d.callback(run_steps(steps))
    out = t.value().decode()
    [queued] = h.spool.queued()
    assert lines(out) == [f"250 2.0.0 Ok: queued as {queued.id}", "221 2.0.0 mx.test closing connection"]
    assert h.submitted == [queued] and queued.envelope.prepend_headers[1:] == ("X-A: 1",)
    [accepted] = [e for e in logged if e["log_format"].startswith("accepted")]
    assert {k: accepted[k] for k in ("id", "sender", "to", "client")} == {
        "id": queued.id,
        "sender": "carol@remote.test",
        "to": "<alice@example.test>",
        "client": "192.0.2.7",
    }


def test_a_write_error_is_answered_at_once(tmp_path):
    h = Harness(tmp_path)
    proto, t = h.connect()
    talk(proto, t, SEND)
    session = proto.session
    session._txn.write_error = SpoolError("full", temporary_full=True)
    answer = session.on_data_end(ev.DataEnd(size=3))
    assert answer == Reply.of(452, "4.3.1", "Insufficient system storage; try again later")


# ---------------------------------------------------------------- trusted networks


def test_is_trusted_without_networks_parses_nothing(monkeypatch):
    def no_parsing(address):
        raise AssertionError("parsed")

    context = session_for().context
    monkeypatch.setattr(receiver_module.ipaddress, "ip_address", no_parsing)
    assert context.is_trusted("192.0.2.7") is False
    assert context.is_trusted("not an address") is False
    monkeypatch.undo()
    trusting = dataclasses.replace(context, settings=dataclasses.replace(context.settings, trusted_networks=(ipaddress.ip_network("192.0.2.0/24"),)))
    assert trusting.is_trusted("192.0.2.7") is True
    assert trusting.is_trusted("198.51.100.1") is False
    assert trusting.is_trusted("not an address") is False

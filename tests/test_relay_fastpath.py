"""The relay client's shortcuts for its common case (one domain, a kept
connection, 250 everywhere) change nothing that can be seen: the slow paths
they skip still give what they gave, and timeouts fire when they did.

Uses the in-memory harness of ``test_relay_agent`` (``Relay``, scripted
peers, ``task.Clock``).
"""

from __future__ import annotations

import io

from test_relay_agent import HEADERS, NOW, PASSED_ON, RELAYED, Peer, Relay, Scripted, result_of
from test_relay_secure import auth_relay
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport

from mailsvc.clientprotocol import CHUNK_SIZE, SMTPClientProtocol
from mailsvc.clientresults import SMTPSessionError
from mailsvc.delivery.pool import ConnectionPool
from mailsvc.envelope import Recipient
from mailsvc.errors import PermanentDeliveryError, TemporaryDeliveryError
from mailsvc.smtp.client import ClientSettings
from mailsvc.smtp.client_events import Transaction
from mailsvc.smtp.reply_parser import KNOWN_REPLIES, ReplyParser
from mailsvc.smtp.stuffing import stuff_whole

EHLO = b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
GROUP_REPLIES = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"


def commands(script, verb):
    """The commands a scripted peer got that start with ``verb``."""
    return [c for c in script.get("commands", []) if c.startswith(verb)]


# ---------------------------------------------------------------- the envelope, checked once


def test_bad_recipient_fails_alone_the_others_are_sent(tmp_path):
    """A recipient address that could break the command line fails with 5.1.3
    on its own; the message goes to the others, in one transaction."""
    relay = Relay(tmp_path)
    script = relay.net.add("192.0.2.25", 25, Scripted()).script
    message = relay.queue(HEADERS + b"x\r\n", recipients=("alice@remote.test", "bad address@remote.test", "bob@remote.test"))
    results = result_of(relay.deliver(message))
    assert results["alice@remote.test"] == RELAYED and results["bob@remote.test"] == RELAYED
    error = results["bad address@remote.test"]
    assert isinstance(error, PermanentDeliveryError) and error.status == "5.1.3"
    assert error.text.startswith("bad recipient address <bad address@remote.test>: ")
    assert commands(script, "RCPT") == ["RCPT TO:<alice@remote.test>", "RCPT TO:<bob@remote.test>"]


def test_bad_sender_fails_every_recipient_5_1_7(tmp_path):
    """A sender that cannot go in MAIL FROM fails each recipient with 5.1.7; nothing is dialled."""
    relay = Relay(tmp_path)
    relay.net.add("192.0.2.25", 25, Scripted())
    message = relay.queue(HEADERS + b"x\r\n", sender="carol@exa mple.test")
    error = result_of(relay.deliver(message))["alice@remote.test"]
    assert isinstance(error, PermanentDeliveryError) and error.status == "5.1.7"
    assert error.text.startswith("bad envelope: ")
    assert relay.net.attempts == []


def test_a_parameter_that_cannot_be_repeated_is_dropped_not_the_message(tmp_path):
    """A NOTIFY value the peer must not see (a space in it) drops the DSN
    parameters; the message still goes."""
    relay = Relay(tmp_path)
    script = relay.net.add("192.0.2.25", 25, Scripted(extensions=["PIPELINING", "DSN"])).script
    envelope = relay.queue(HEADERS + b"x\r\n").envelope
    writer = relay.spool.newMessage()
    writer.write(HEADERS + b"y\r\n")
    bad = Recipient(address="alice@remote.test", notify="SUCCESS FAILURE")
    [message] = writer.commit(envelope, {"relay": (bad,)})
    assert result_of(relay.deliver(message)) == {"alice@remote.test": PASSED_ON}
    assert commands(script, "RCPT") == ["RCPT TO:<alice@remote.test>"]


def test_two_domains_are_still_sent_side_by_side(tmp_path):
    """Recipients in two domains: each gets its transaction, and the
    results come back together."""
    relay = Relay(
        tmp_path,
        mx={"remote.test": [("mx.remote.test", ["192.0.2.25"])], "other.test": [("mx.other.test", ["192.0.2.26"])]},
    )
    first = relay.net.add("192.0.2.25", 25, Scripted()).script
    second = relay.net.add("192.0.2.26", 25, Scripted()).script
    message = relay.queue(HEADERS + b"x\r\n", recipients=("alice@remote.test", "zed@other.test"))
    assert result_of(relay.deliver(message)) == {"alice@remote.test": RELAYED, "zed@other.test": RELAYED}
    assert len(first["messages"]) == 1 and len(second["messages"]) == 1


def test_reused_connection_to_our_server_byte_exact(tmp_path):
    """Three messages over one kept connection reach our server byte for byte."""
    relay = Relay(tmp_path)
    peer = relay.net.add("192.0.2.25", 25, Peer(tmp_path / "peer", relay.clock))
    messages = [relay.queue(HEADERS + b".dot\r\n" * n + b"end %d\r\n" % n) for n in range(3)]
    for message in messages:
        assert result_of(relay.deliver(message)) == {"alice@remote.test": PASSED_ON}
    assert relay.net.attempts == [("192.0.2.25", 25)]
    assert sorted(data for _, data in peer.received()) == sorted(relay.wire(m) for m in messages)


def test_password_is_still_read_for_each_message(tmp_path):
    """A route with AUTH reads its password file for each message, also
    when the connection is kept: gone since the last one, the next is
    deferred with 4.3.5. (A route without AUTH makes its settings once.)"""
    relay, script = auth_relay(tmp_path, ["PIPELINING", "AUTH PLAIN"])
    first = relay.queue(HEADERS + b"one\r\n", recipients=("someone@far.test",))
    assert result_of(relay.deliver(first)) == {"someone@far.test": RELAYED}
    (tmp_path / "smarthost.password").unlink()
    second = relay.queue(HEADERS + b"two\r\n", recipients=("someone@far.test",))
    error = result_of(relay.deliver(second))["someone@far.test"]
    assert isinstance(error, TemporaryDeliveryError) and error.status == "4.3.5"


# ---------------------------------------------------------------- the body


class WriteLog(StringTransport):
    """A transport that keeps each write apart."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, data):
        self.writes.append(data)
        super().write(data)


def open_session(clock=None, timeouts=None):
    """A client protocol past its greeting and EHLO, over a ``WriteLog``."""
    clock = clock or task.Clock()
    protocol = SMTPClientProtocol(ClientSettings("relay.example.test"), clock, timeouts)
    transport = WriteLog()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"220 sink.test ESMTP\r\n" + EHLO)
    transport.writes.clear()
    return protocol, transport


def transaction():
    """A one-recipient envelope."""
    return Transaction("carol@example.test", ("alice@remote.test",))


def test_small_body_and_its_end_go_in_one_pull():
    """A body shorter than a chunk goes, stuffed, with the end of data in
    the transport's one pull (one send on a socket, not two); the peer's
    250 finishes the transaction."""
    protocol, transport = open_session()
    body = b"Subject: x\r\n\r\n.a dot\r\nlast line\r\n"
    d = protocol.send(transaction(), io.BytesIO(body))
    protocol.dataReceived(GROUP_REPLIES)
    transport.writes.clear()
    transport.producer.resumeProducing()
    assert transport.producer is None  # done: unregistered
    assert b"".join(transport.writes) == stuff_whole(body)
    results = []
    d.addCallback(results.append)
    protocol.dataReceived(b"250 2.0.0 Ok: queued\r\n")
    assert results[0].reply.code == 250


def test_large_body_is_pulled_at_most_two_chunks_at_a_time():
    """A body of several chunks is still read as the transport asks: never
    more than two chunks per pull, the whole body stuffed in order."""
    protocol, transport = open_session()
    body = (b".x" + b"y" * 98 + b"\r\n") * (3 * CHUNK_SIZE // 102 + 7)
    protocol.send(transaction(), io.BytesIO(body))
    protocol.dataReceived(GROUP_REPLIES)
    transport.writes.clear()
    pulls = 0
    while transport.producer is not None:
        before = sum(map(len, transport.writes))
        transport.producer.resumeProducing()
        assert sum(map(len, transport.writes)) - before <= 2 * (CHUNK_SIZE + CHUNK_SIZE // 50)
        pulls += 1
    assert pulls >= 2
    assert b"".join(transport.writes) == stuff_whole(body)


# ---------------------------------------------------------------- timeouts


def test_timeout_after_restarts_fires_on_time():
    """The reply timer moves with each step (rfc5321 4.5.3.2) and fires
    exactly when its phase says: later (data-end) or sooner (rcpt) than
    the one before."""
    clock = task.Clock()
    clock.advance(NOW)
    timeouts = {"mail": 50, "rcpt": 10, "data-init": 20, "data-block": 30, "data-end": 600}
    protocol, transport = open_session(clock, timeouts)
    # Without PIPELINING: one command at a time, one phase each.
    protocol.machine.extensions.pop("PIPELINING")
    failures = []
    protocol.send(transaction(), io.BytesIO(b"x\r\n")).addErrback(failures.append)
    clock.advance(1)
    protocol.dataReceived(b"250 2.1.0 Ok\r\n")  # now the RCPT reply is due: 10 s, sooner
    clock.advance(9.5)
    assert not failures
    protocol.dataReceived(b"250 2.1.5 Ok\r\n")  # DATA: 20 s
    clock.advance(19.5)
    protocol.dataReceived(b"354 go\r\n")
    while transport.producer is not None:
        transport.producer.resumeProducing()  # body sent, end of data: 600 s, later
    clock.advance(599.5)
    assert not failures
    clock.advance(0.5)
    [failure] = failures
    failure.trap(SMTPSessionError)
    assert failure.value.reason == "timed out after 600 s waiting for the data-end reply"
    assert failure.value.data_sent


def test_rcpt_timeout_fires_after_a_sooner_restart():
    """After MAIL's reply, RCPT's shorter timeout applies from then on."""
    clock = task.Clock()
    clock.advance(NOW)
    protocol, _ = open_session(clock, {"mail": 50, "rcpt": 10})
    protocol.machine.extensions.pop("PIPELINING")
    failures = []
    protocol.send(transaction(), io.BytesIO(b"x\r\n")).addErrback(failures.append)
    clock.advance(1)
    protocol.dataReceived(b"250 2.1.0 Ok\r\n")
    clock.advance(9.999)
    assert not failures
    clock.advance(0.001)
    assert failures[0].value.reason == "timed out after 10 s waiting for the rcpt reply"


# ---------------------------------------------------------------- replies


def test_known_one_line_replies_are_the_same_as_parsed():
    """A one-line reply seen before gives an equal Reply; multi-line replies
    and the first line after a TLS discard are parsed as ever."""
    parser = ReplyParser()
    fresh = ReplyParser()
    stream = b"250 2.1.0 Ok\r\n250-first\r\n250 2.1.0 Ok\r\n250 2.1.0 Ok\r\n354 go\r\n"
    parser.feed(stream * 2)
    fresh.feed(stream)
    expected = []
    while (reply := fresh.next_reply()) is not None:
        expected.append(reply)
    got = []
    while (reply := parser.next_reply()) is not None:
        got.append(reply)
    assert got == expected * 2 and got[1].lines == ("first", "2.1.0 Ok")
    parser.feed(b"250 2.1.0 Ok\r\n")
    parser.discard()
    parser.feed(b"550 5.1.1 no\r\n")
    assert parser.next_reply().code == 550


def test_known_replies_are_bounded():
    """Distinct one-line replies (a queue id in each) are remembered only up to KNOWN_REPLIES."""
    parser = ReplyParser()
    for n in range(3 * KNOWN_REPLIES):
        parser.feed(b"250 2.0.0 Ok: queued as %d\r\n" % n)
        assert parser.next_reply().lines == (f"Ok: queued as {n}",)
    assert len(parser._known) == KNOWN_REPLIES


# ---------------------------------------------------------------- the pool


class FakeConnection:
    """What the pool needs of a client protocol."""

    def __init__(self):
        self.quits = 0
        self.closed = defer.Deferred()

    def quit(self):
        self.quits += 1
        return self.closed

    def abort(self):
        self.closed.callback(None)

    def when_closed(self):
        return self.closed


def test_connection_handed_on_at_once_sets_no_idle_timer():
    """With a caller waiting, a connection given back goes to it at once,
    no idle timer set; left idle, it gets QUIT after idle_timeout."""
    clock = task.Clock()
    pool = ConnectionPool(clock, max_connections=10, max_per_destination=1, max_uses=100, idle_timeout=5)
    first = []
    pool.acquire(("mx", 25)).addCallback(first.append)
    [slot] = first
    connection = FakeConnection()
    pool.connected(slot, connection)
    slot.uses += 1
    second = []
    pool.acquire(("mx", 25)).addCallback(second.append)
    assert second == []
    pool.release(slot, reuse=True)
    assert second == [slot] and slot.reused and clock.getDelayedCalls() == []
    pool.release(slot, reuse=True)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(4.9)
    assert connection.quits == 0
    clock.advance(0.1)
    assert connection.quits == 1

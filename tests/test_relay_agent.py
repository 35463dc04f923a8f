"""The relay agent in memory: ``RelayAgent`` and ``SMTPClientProtocol`` talking to
our real server glue (``SMTPServerFactory`` over a ``FileSpool``) or to small
scripted peers, through ``twisted.test.iosim`` pumps and a ``task.Clock``.

No sockets and no reactor: the connector hands each connection to an
``IOPump``; ``settle`` moves bytes until nothing moves; timeouts happen when a
test advances the clock.
"""

from __future__ import annotations

import email
import email.policy
import hashlib

from twisted.internet import defer, task
from twisted.internet import error as net_error
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.test import iosim
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailsvc.clientprotocol import CHUNK_SIZE, SMTPClientProtocol
from mailsvc.clientresults import SMTPSessionError
from mailsvc.relayconfig import RelayConfig, RouteConfig
from mailsvc.delivery.bounce import outcome_of
from mailsvc.delivery.downgrade import downgrade_bytes
from mailsvc.delivery.mx import Host, MXResult
from mailsvc.delivery.relay import RelayAgent
from mailsvc.envelope import Delivered, Envelope, LocalMailbox, Recipient
from mailsvc.errors import PermanentDeliveryError, TemporaryDeliveryError
from mailsvc.interfaces import IDeliveryAgent, IPolicy, IRecipientDirectory
from mailsvc.policy import Verdict
from mailsvc.protocol import SMTPServerFactory
from mailsvc.receiver import ReceiverContext, ReceiverSettings
from mailsvc.smtp.client import ClientSettings
from mailsvc.smtp.client_events import Transaction
from mailsvc.smtp.server import ServerSettings
from mailsvc.spool.filespool import FileSpool

NOW = 1_790_000_000.0
HEADERS = b"From: carol@example.test\r\nTo: alice@remote.test\r\nSubject: relay test\r\n\r\n"

PASSED_ON, RELAYED = Delivered.PASSED_ON, Delivered.RELAYED  # a success: DSN-capable peer or not


# ---------------------------------------------------------------- the peer: our server


@implementer(IRecipientDirectory)
class PeerDirectory:
    """The peer's users: alice and bob at remote.test."""

    def isLocalDomain(self, domain):
        return domain == "remote.test"

    def resolve(self, address):
        local, _, domain = address.lower().rpartition("@")
        if domain == "remote.test" and local in ("alice", "bob", "postmaster"):
            return (LocalMailbox(address.lower(), local),)
        return ()

    def expand(self, address):
        return None


@implementer(IPolicy)
class DeferRecipient:
    """A peer policy answering 451 4.7.1 to RCPT for one address."""

    def __init__(self, address):
        self.address = address

    def connect(self, session):
        return None

    def helo(self, session, name):
        return None

    def mail(self, session, sender, parameters):
        return None

    def rcpt(self, session, recipient, parameters):
        if recipient == self.address:
            return Verdict.defer("greylisted, try again later", 451, "4.7.1")
        return None

    def endOfData(self, session, envelope):
        return None


class Peer:
    """Our real server glue (``SMTPServerFactory``) over a FileSpool, for remote.test
    (offering SMTPUTF8 only when ``smtputf8`` is true)."""

    def __init__(self, path, clock, policies=(), max_message_size=10_000_000, smtputf8=False):
        self.spool = FileSpool(path)
        context = ReceiverContext(
            settings=ReceiverSettings(hostname="mx.remote.test", default_domain="remote.test"),
            directory=PeerDirectory(),
            spool=self.spool,
            submit=lambda message: None,
            run_blocking=defer.maybeDeferred,
            policies=list(policies),
            now=lambda: NOW,
        )
        self.factory = SMTPServerFactory(
            context, ServerSettings("mx.remote.test", max_message_size=max_message_size, smtputf8=smtputf8), clock=clock
        )

    def buildProtocol(self, addr):
        return self.factory.buildProtocol(addr)

    def received(self):
        """The messages the peer queued, as ``(envelope, bytes)``, its own Received: line removed."""
        out = []
        for message in self.spool.queued():
            with self.spool.open(message) as f:
                data = f.read()
            first, rest = data.split(b"\r\n", 1)
            assert first.startswith(b"Received: ") and b"by mx.remote.test" in first
            out.append((message.envelope, rest))
        return out


# ---------------------------------------------------------------- scripted peers


class ScriptedPeer(Protocol):
    """A tiny SMTP peer answering from a script, recording the commands it got.

    ``greeting`` is sent on connect (``None``: never say anything);
    ``extensions`` are its EHLO keywords; ``rcpt`` maps an address to its
    reply (default 250); ``mail`` is the MAIL reply.
    """

    def __init__(self, script):
        self.script = script
        self.buffer = b""
        self.in_data = False
        self.data = b""

    def connectionMade(self):
        greeting = self.script.get("greeting", b"220 scripted.test ESMTP")
        if greeting is not None:
            self.transport.write(greeting + b"\r\n")

    def dataReceived(self, data):
        self.buffer += data
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.data, self.buffer = self.buffer[: end + 2], self.buffer[end + 5 :]
                self.in_data = False
                self.script.setdefault("messages", []).append(self.data)
                self.transport.write(b"250 2.0.0 ok\r\n")
                continue
            if b"\r\n" not in self.buffer:
                return
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            self.script.setdefault("commands", []).append(line.decode())
            self.transport.write(self.answer(line.decode()) + b"\r\n")

    def answer(self, line):
        verb = line.split(" ", 1)[0].upper()
        if verb == "EHLO":
            keywords = self.script.get("extensions", ["PIPELINING", "SIZE 100000000", "8BITMIME"])
            lines = ["scripted.test", *keywords]
            return "\r\n".join(f"250{'-' if i < len(lines) - 1 else ' '}{text}" for i, text in enumerate(lines)).encode()
        if verb == "MAIL":
            reply = self.script.get("mail", b"250 2.1.0 ok")
            self.mail, self.accepted = reply.startswith(b"2"), 0
            return reply
        if verb == "RCPT":
            if not getattr(self, "mail", False):
                return b"503 5.5.1 MAIL first"
            address = line.partition("<")[2].partition(">")[0]
            reply = self.script.get("rcpt", {}).get(address, b"250 2.1.5 ok")
            self.accepted += reply.startswith(b"2")
            return reply
        if verb == "DATA":
            if not getattr(self, "mail", False) or not self.accepted:
                return b"503 5.5.1 no valid recipients"
            self.in_data, self.mail = True, False
            return b"354 go ahead"
        if verb == "QUIT":
            self.transport.loseConnection()
            return b"221 2.0.0 bye"
        return b"250 2.0.0 ok"


class Scripted(Factory):
    """A factory of ``ScriptedPeer``s sharing one script (which records)."""

    def __init__(self, **script):
        self.script = script

    def buildProtocol(self, addr):
        return ScriptedPeer(self.script)


class Silent(Factory):
    """A peer that accepts the connection and never says a word."""

    def buildProtocol(self, addr):
        return Protocol()


# ---------------------------------------------------------------- the network


class RecordingTransport(iosim.FakeTransport):
    """A client transport that remembers its largest single write and
    whether its protocol was told the connection is lost."""

    largest = 0
    lost = False

    def write(self, data):
        self.largest = max(self.largest, len(data))
        super().write(data)

    def reportDisconnect(self):
        self.lost = True
        super().reportDisconnect()


class MemoryNet:
    """The agent's connector: ``(host, port)`` to a peer factory, else refused.

    Every connection becomes an ``IOPump``; ``attempts`` lists each
    ``(host, port)`` dialled, ``open`` counts connections now open and
    ``most_open`` the most at once.
    """

    def __init__(self, clock):
        self.clock = clock
        self.peers = {}
        self.pumps = []
        self.attempts = []
        self.clients = []
        self.most_open = 0

    def add(self, host, port, factory):
        self.peers[(host, port)] = factory
        return factory

    def connect(self, host, port, factory):
        self.attempts.append((host, port))
        peer = self.peers.get((host, port))
        if peer is None:
            return defer.fail(net_error.ConnectionRefusedError(f"{host}:{port}"))
        client_address = IPv4Address("TCP", "192.0.2.7", 40000 + len(self.attempts))
        server_address = IPv4Address("TCP", host if host[0].isdigit() else "192.0.2.25", port)
        server = peer.buildProtocol(client_address)
        client = factory.buildProtocol(server_address)
        server_transport = iosim.FakeTransport(server, True, server_address, client_address)
        client_transport = RecordingTransport(client, False, client_address, server_address)
        self.pumps.append(iosim.connect(server, server_transport, client, client_transport, greet=False, clock=self.clock))
        self.clients.append(client_transport)
        self.most_open = max(self.most_open, self.open)
        return defer.succeed(client)

    @property
    def open(self):
        return sum(1 for transport in self.clients if not transport.lost)

    def settle(self, limit=20_000):
        """Move bytes on every connection until nothing moves."""
        for _ in range(limit):
            moved = False
            for pump in list(self.pumps):
                moved = pump.pump(advanceClock=False) or moved
            if not moved:
                return
        raise AssertionError("the connections never settled")


class FakeMX:
    """An MX resolver answering from a dict: domain -> list of (name, [addresses])."""

    def __init__(self, table):
        self.table = table
        self.asked = []

    def resolve(self, domain):
        self.asked.append(domain)
        entry = self.table[domain]
        if isinstance(entry, Exception):
            return defer.fail(entry)
        return defer.succeed(MXResult([Host(name, 10 * i, list(addresses)) for i, (name, addresses) in enumerate(entry)]))


# ---------------------------------------------------------------- the harness


class Relay:
    """Our spool with one message, an agent, a memory network and a clock."""

    def __init__(self, tmp_path, mx=None, **config):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.spool = FileSpool(tmp_path / "spool")
        self.net = MemoryNet(self.clock)
        self.mx = FakeMX(mx or {"remote.test": [("mx.remote.test", ["192.0.2.25"])]})
        defaults = dict(greeting_timeout=30, mail_timeout=30, rcpt_timeout=30, data_init_timeout=30,
                        data_block_timeout=30, data_end_timeout=60, connect_timeout=10)
        defaults.update(config)
        self.config = RelayConfig(**defaults)
        self.agent = RelayAgent(self.config, self.mx, self.net.connect, self.clock, self.spool, "relay.example.test")

    def queue(self, data, recipients=("alice@remote.test",), sender="carol@example.test", parameters=()):
        """Commit ``data`` to our spool under the relay hop; return the QueuedMessage."""
        writer = self.spool.newMessage()
        writer.write(data)
        envelope = Envelope(
            sender=sender,
            recipients=(),
            parameters=tuple(parameters),
            helo="client.example.test",
            client_address="127.0.0.1",
            received_at=NOW,
            prepend_headers=(
                "Received: from client.example.test ([127.0.0.1]) by relay.example.test (mailsvc);"
                " Thu, 21 Sep 2026 12:00:00 +0000",
            ),
        )
        [message] = writer.commit(envelope, {"relay": tuple(Recipient(address=a) for a in recipients)})
        return message

    def wire(self, message):
        """The bytes our agent sends: the prepend headers then the data."""
        with self.spool.open(message) as f:
            return f.read()

    def deliver(self, message):
        """Run the agent on ``message`` until the network is quiet; return the Deferred."""
        d = self.agent.deliver(message)
        self.net.settle()
        return d


def result_of(d):
    """The result of a Deferred that has fired (fails the test otherwise)."""
    results = []
    d.addBoth(results.append)
    assert results, "the delivery has not finished"
    if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


# ---------------------------------------------------------------- tests


def test_agent_provides_the_interface(tmp_path):
    """RelayAgent provides IDeliveryAgent."""
    relay = Relay(tmp_path)
    assert verifyObject(IDeliveryAgent, relay.agent)


def test_delivered_byte_exact_to_our_server(tmp_path):
    """A message relayed to our real server glue arrives as sent: our Received:
    line and the data, byte for byte, with the envelope intact."""
    relay = Relay(tmp_path)
    peer = relay.net.add("192.0.2.25", 25, Peer(tmp_path / "peer", relay.clock))
    message = relay.queue(HEADERS + b"Hello there.\r\n")
    assert result_of(relay.deliver(message)) == {"alice@remote.test": PASSED_ON}
    [(envelope, data)] = peer.received()
    assert data == relay.wire(message)
    assert envelope.sender == "carol@example.test"
    assert [r.address for r in envelope.recipients] == ["alice@remote.test"]
    assert envelope.helo == "relay.example.test"
    assert relay.net.open == 1  # kept for the next message to this host
    relay.clock.advance(5)
    relay.net.settle()
    assert relay.net.open == 0  # idle too long: QUIT said and the connection closed


def test_per_recipient_550_and_250(tmp_path):
    """One transaction, two recipients: the known one is delivered, the unknown
    one fails for good with the peer's words, which a bounce reads as the
    Remote-MTA and the diagnostic."""
    relay = Relay(tmp_path)
    peer = relay.net.add("192.0.2.25", 25, Peer(tmp_path / "peer", relay.clock))
    message = relay.queue(HEADERS + b"x\r\n", recipients=("alice@remote.test", "nobody@remote.test"))
    results = result_of(relay.deliver(message))
    assert results["alice@remote.test"] is PASSED_ON
    error = results["nobody@remote.test"]
    assert isinstance(error, PermanentDeliveryError) and error.status == "5.1.1"
    assert str(error) == "5.1.1 host mx.remote.test said: 550 5.1.1 <nobody@remote.test>: no such user here"
    outcome = outcome_of(Recipient("nobody@remote.test", last_error=str(error)))
    assert outcome.status == "5.1.1" and outcome.remote_mta == "mx.remote.test"
    assert outcome.diagnostic == "550 5.1.1 <nobody@remote.test>: no such user here"
    [(envelope, _)] = peer.received()
    assert [r.address for r in envelope.recipients] == ["alice@remote.test"]


def test_451_to_rcpt_is_temporary(tmp_path):
    """A 451 to one RCPT defers that recipient only; the other is delivered."""
    relay = Relay(tmp_path)
    relay.net.add("192.0.2.25", 25, Peer(tmp_path / "peer", relay.clock, policies=[DeferRecipient("bob@remote.test")]))
    message = relay.queue(HEADERS + b"x\r\n", recipients=("alice@remote.test", "bob@remote.test"))
    results = result_of(relay.deliver(message))
    assert results["alice@remote.test"] is PASSED_ON
    error = results["bob@remote.test"]
    assert isinstance(error, TemporaryDeliveryError)
    assert str(error) == "4.7.1 host mx.remote.test said: 451 4.7.1 greylisted, try again later"


def test_421_greeting_tries_the_next_address(tmp_path):
    """A peer greeting with 421 is left for the next MX, which takes the message."""
    relay = Relay(tmp_path, mx={"remote.test": [("mx1.remote.test", ["192.0.2.1"]), ("mx2.remote.test", ["192.0.2.2"])]})
    busy = relay.net.add("192.0.2.1", 25, Scripted(greeting=b"421 4.3.2 busy, come back later"))
    peer = relay.net.add("192.0.2.2", 25, Peer(tmp_path / "peer", relay.clock))
    message = relay.queue(HEADERS + b"x\r\n")
    assert result_of(relay.deliver(message)) == {"alice@remote.test": PASSED_ON}
    assert relay.net.attempts == [("192.0.2.1", 25), ("192.0.2.2", 25)]
    assert "commands" not in busy.script  # nothing was said after the 421
    assert len(peer.received()) == 1


def test_connection_refused_tries_the_second_address(tmp_path):
    """The first address of the MX refuses the connection; its second address
    (same MX host) takes the message."""
    relay = Relay(tmp_path, mx={"remote.test": [("mx.remote.test", ["192.0.2.1", "192.0.2.2"])]})
    peer = relay.net.add("192.0.2.2", 25, Peer(tmp_path / "peer", relay.clock))
    message = relay.queue(HEADERS + b"x\r\n")
    assert result_of(relay.deliver(message)) == {"alice@remote.test": PASSED_ON}
    assert relay.net.attempts == [("192.0.2.1", 25), ("192.0.2.2", 25)]
    assert len(peer.received()) == 1


def test_every_address_refused_is_temporary_4_4_1(tmp_path):
    """When no address answers, the recipient is deferred with the last reason (4.4.1)."""
    relay = Relay(tmp_path, mx={"remote.test": [("mx1.remote.test", ["192.0.2.1"]), ("mx2.remote.test", ["192.0.2.2"])]})
    message = relay.queue(HEADERS + b"x\r\n")
    error = result_of(relay.deliver(message))["alice@remote.test"]
    assert isinstance(error, TemporaryDeliveryError) and error.status == "4.4.1"
    assert str(error) == "4.4.1 connect to mx2.remote.test[192.0.2.2]:25: connection refused"


def test_mx_lookup_errors_apply_to_the_domain(tmp_path):
    """A null MX (the resolver's permanent error) fails every recipient of the domain."""
    relay = Relay(tmp_path, mx={"remote.test": PermanentDeliveryError("domain remote.test does not accept mail (null MX)", "5.1.10")})
    message = relay.queue(HEADERS + b"x\r\n", recipients=("alice@remote.test", "bob@remote.test"))
    results = result_of(relay.deliver(message))
    assert {a: str(e) for a, e in results.items()} == {
        a: "5.1.10 domain remote.test does not accept mail (null MX)" for a in ("alice@remote.test", "bob@remote.test")
    }
    assert relay.net.attempts == []


def test_554_greeting_fails_every_recipient(tmp_path):
    """A 5xx greeting fails the domain's recipients for good; no other address is tried."""
    relay = Relay(tmp_path, mx={"remote.test": [("mx1.remote.test", ["192.0.2.1"]), ("mx2.remote.test", ["192.0.2.2"])]})
    script = relay.net.add("192.0.2.1", 25, Scripted(greeting=b"554 5.7.1 no mail from you")).script
    message = relay.queue(HEADERS + b"x\r\n", recipients=("alice@remote.test", "bob@remote.test"))
    results = result_of(relay.deliver(message))
    assert all(str(e) == "5.7.1 host mx1.remote.test said: 554 5.7.1 no mail from you" for e in results.values())
    assert relay.net.attempts == [("192.0.2.1", 25)]
    assert script["commands"] == ["QUIT"]  # rfc5321 3.1: QUIT after a 554 greeting


def test_mail_refused_5xx_and_4xx(tmp_path):
    """A 5xx to MAIL fails every recipient; a 4xx to MAIL tries the next address."""
    relay = Relay(tmp_path, mx={"remote.test": [("mx1.remote.test", ["192.0.2.1"]), ("mx2.remote.test", ["192.0.2.2"])]})
    relay.net.add("192.0.2.1", 25, Scripted(mail=b"451 4.3.0 try later"))
    relay.net.add("192.0.2.2", 25, Scripted(mail=b"550 5.7.1 sender refused"))
    message = relay.queue(HEADERS + b"x\r\n")
    error = result_of(relay.deliver(message))["alice@remote.test"]
    assert isinstance(error, PermanentDeliveryError)
    assert str(error) == "5.7.1 host mx2.remote.test said: 550 5.7.1 sender refused"
    assert relay.net.attempts == [("192.0.2.1", 25), ("192.0.2.2", 25)]


def test_mail_loop_is_bounced_5_4_6_without_connecting(tmp_path):
    """101 Received: headers (plus ours) is more than max_received_headers (100): 5.4.6, no connection."""
    relay = Relay(tmp_path)
    relay.net.add("192.0.2.25", 25, Peer(tmp_path / "peer", relay.clock))
    loop = b"".join(b"Received: from hop%d.test by hop%d.test; Thu, 21 Sep 2026 12:00:00 +0000\r\n" % (i, i + 1) for i in range(101))
    message = relay.queue(loop + HEADERS + b"x\r\n")
    error = result_of(relay.deliver(message))["alice@remote.test"]
    assert isinstance(error, PermanentDeliveryError) and error.status == "5.4.6"
    assert "102 Received: headers" in error.text
    assert relay.net.attempts == [] and relay.mx.asked == []


def test_received_in_the_body_is_not_counted(tmp_path):
    """Only Received: lines of the header section count toward the loop limit."""
    relay = Relay(tmp_path, max_received_headers=3)
    peer = relay.net.add("192.0.2.25", 25, Peer(tmp_path / "peer", relay.clock))
    body = b"".join(b"Received: quoted in the body\r\n" for _ in range(10))
    message = relay.queue(HEADERS + body)
    assert result_of(relay.deliver(message)) == {"alice@remote.test": PASSED_ON}
    assert len(peer.received()) == 1


def test_8bit_message_to_a_peer_without_8bitmime_is_5_6_3(tmp_path):
    """BODY=8BITMIME, not MIME, to a peer that does not offer 8BITMIME: it
    cannot be converted (rfc6152 3), so it fails for good with 5.6.3 and
    nothing is sent; no temporary file is left behind."""
    relay = Relay(tmp_path)
    script = relay.net.add("192.0.2.25", 25, Scripted(extensions=["PIPELINING", "SIZE 1000000"])).script
    message = relay.queue(HEADERS + "Grüße\r\n".encode(), parameters=(("BODY", "8BITMIME"),))
    error = result_of(relay.deliver(message))["alice@remote.test"]
    assert isinstance(error, PermanentDeliveryError) and error.status == "5.6.3"
    assert str(error) == (
        "5.6.3 host mx.remote.test does not offer 8BITMIME and the message cannot be"
        " converted to 7-bit: 8-bit text in a message that is not MIME"
    )
    assert [c.split()[0] for c in script["commands"]] == ["EHLO"]
    assert list((relay.spool.directory / "tmp").iterdir()) == []


def test_8bit_message_and_size_are_declared(tmp_path):
    """MAIL carries SIZE (the octets sent, before stuffing) and BODY=8BITMIME when offered."""
    relay = Relay(tmp_path)
    script = relay.net.add("192.0.2.25", 25, Scripted()).script
    message = relay.queue(HEADERS + "Grüße\r\n".encode(), parameters=(("BODY", "8BITMIME"),))
    assert result_of(relay.deliver(message)) == {"alice@remote.test": RELAYED}
    size = len(relay.wire(message))
    assert f"MAIL FROM:<carol@example.test> SIZE={size} BODY=8BITMIME" in script["commands"]
    assert script["messages"] == [relay.wire(message)]


def test_too_big_for_the_peer_is_permanent(tmp_path):
    """A message over the peer's SIZE limit fails for good (rfc1870: 5.3.4)."""
    relay = Relay(tmp_path)
    relay.net.add("192.0.2.25", 25, Scripted(extensions=["SIZE 100", "8BITMIME"]))
    message = relay.queue(HEADERS + b"x" * 200 + b"\r\n")
    error = result_of(relay.deliver(message))["alice@remote.test"]
    assert isinstance(error, PermanentDeliveryError) and error.status == "5.3.4"


def test_silent_peer_times_out_after_greeting_timeout(tmp_path):
    """A peer that never greets: nothing happens until greeting_timeout, then the
    connection is dropped and the recipient deferred (4.4.2)."""
    relay = Relay(tmp_path, greeting_timeout=30)
    relay.net.add("192.0.2.25", 25, Silent())
    message = relay.queue(HEADERS + b"x\r\n")
    d = relay.deliver(message)
    relay.clock.advance(29)
    relay.net.settle()
    assert not d.called
    relay.clock.advance(1)
    relay.net.settle()
    error = result_of(d)["alice@remote.test"]
    assert isinstance(error, TemporaryDeliveryError) and error.status == "4.4.2"
    assert "timed out after 30 s waiting for the greeting reply" in error.text
    assert relay.net.open == 0


def test_connect_timeout(tmp_path):
    """A connection that never completes is given up after connect_timeout (4.4.1)."""
    relay = Relay(tmp_path, connect_timeout=10)
    relay.agent._connector = lambda host, port, factory: defer.Deferred()
    message = relay.queue(HEADERS + b"x\r\n")
    d = relay.agent.deliver(message)
    relay.clock.advance(9.9)
    assert not d.called
    relay.clock.advance(0.1)
    error = result_of(d)["alice@remote.test"]
    assert str(error) == "4.4.1 connect to mx.remote.test[192.0.2.25]:25: connection timed out"


def test_five_megabytes_streamed_byte_exact(tmp_path):
    """A 5 MB message arrives byte for byte, written in chunks of about 64 KiB
    (never the whole message at once)."""
    relay = Relay(tmp_path)
    peer = relay.net.add("192.0.2.25", 25, Peer(tmp_path / "peer", relay.clock))
    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\r\n"
    body = line * (5 * 1024 * 1024 // len(line) + 1)
    message = relay.queue(HEADERS + body)
    assert result_of(relay.deliver(message)) == {"alice@remote.test": PASSED_ON}
    [(_, data)] = peer.received()
    assert len(data) > 5 * 1024 * 1024
    assert hashlib.sha256(data).digest() == hashlib.sha256(relay.wire(message)).digest()
    assert relay.net.clients[0].largest <= 2 * CHUNK_SIZE


def test_dot_stuffing(tmp_path):
    """Lines that start with '.' (a lone dot too, and across chunk boundaries)
    arrive unchanged: stuffed on the way out, unstuffed by the peer."""
    relay = Relay(tmp_path)
    peer = relay.net.add("192.0.2.25", 25, Peer(tmp_path / "peer", relay.clock))
    start = HEADERS + b".\r\n..\r\n.hidden\r\nnot.a.dot\r\n"
    prepend = len(relay.wire(relay.queue(b"x"))) - 1  # our Received: line

    def fill(upto):
        """Lines of x up to wire offset ``upto`` (each under 1000 octets)."""
        need = upto - prepend - len(start)
        lines = []
        while need > 0:
            n = min(need, 900)
            if need - n in (1, 2):
                n -= 3
            lines.append(b"x" * (n - 2) + b"\r\n")
            need -= n
        return b"".join(lines)

    # A line "." opens the second chunk; a CRLF is cut in two by the third.
    start += fill(CHUNK_SIZE) + b".first in chunk 2\r\n"
    start += fill(2 * CHUNK_SIZE - 1) + b"\r\n.after a cut CRLF\r\n.\r\n"
    message = relay.queue(start)
    wire = relay.wire(message)
    assert wire[CHUNK_SIZE : CHUNK_SIZE + 6] == b".first"
    assert wire[2 * CHUNK_SIZE - 1 : 2 * CHUNK_SIZE + 2] == b"\r\n."
    assert result_of(relay.deliver(message)) == {"alice@remote.test": PASSED_ON}
    [(_, data)] = peer.received()
    assert data == relay.wire(message)


def test_route_tls_required_without_starttls_and_auth_without_tls_defer(tmp_path):
    """A route that requires TLS, to a peer without STARTTLS, defers with
    4.7.5 before any MAIL; a route with AUTH and opportunistic TLS defers
    too rather than send the password in clear (mailsvc.clientprotocol)."""
    tls = RouteConfig(domain="remote.test", host="mx.partner.test", tls="required")
    relay = Relay(tmp_path, routes=(tls,))
    script = relay.net.add("mx.partner.test", 25, Scripted()).script
    message = relay.queue(HEADERS + b"x\r\n")
    error = result_of(relay.deliver(message))["alice@remote.test"]
    assert isinstance(error, TemporaryDeliveryError) and error.status == "4.7.5"
    assert error.text == "mx.partner.test:25: STARTTLS not offered (TLS is required for this route)"
    assert script["commands"] == ["EHLO relay.example.test", "QUIT"]

    password = tmp_path / "password"
    password.write_text("secret\n")
    auth = RouteConfig(domain="remote.test", host="mx.partner.test", username="us", password_file=password)
    relay = Relay(tmp_path / "2", routes=(auth,))
    script = relay.net.add("mx.partner.test", 25, Scripted(extensions=["AUTH PLAIN LOGIN"])).script
    message = relay.queue(HEADERS + b"x\r\n")
    error = result_of(relay.deliver(message))["alice@remote.test"]
    assert isinstance(error, TemporaryDeliveryError) and error.status == "4.7.5"
    assert "password is not sent in clear text" in error.text
    assert script["commands"] == ["EHLO relay.example.test", "QUIT"]
    assert relay.mx.asked == []


def test_static_route_and_smarthost(tmp_path):
    """A [[relay.route]] wins over the smarthost, which wins over MX records."""
    route = RouteConfig(domain="remote.test", host="route.test", port=2525, tls="none")
    smarthost = RouteConfig(domain="*", host="smart.test", port=587, tls="opportunistic")
    relay = Relay(tmp_path, routes=(route,), smarthost=smarthost)
    relay.net.add("route.test", 2525, Peer(tmp_path / "peer", relay.clock))
    other = relay.net.add("smart.test", 587, Scripted()).script
    message = relay.queue(HEADERS + b"x\r\n", recipients=("alice@remote.test", "x@elsewhere.test"))
    results = result_of(relay.deliver(message))
    # Our server (the route) offers DSN; the scripted smarthost does not.
    assert results == {"alice@remote.test": PASSED_ON, "x@elsewhere.test": RELAYED}
    assert sorted(relay.net.attempts) == [("route.test", 2525), ("smart.test", 587)]
    assert "RCPT TO:<x@elsewhere.test>" in other["commands"]
    assert relay.mx.asked == []


def test_connection_caps(tmp_path):
    """With max_connections = 1, three domains are sent one connection at a time."""
    mx = {d: [(f"mx.{d}", [f"192.0.2.{i}"])] for i, d in enumerate(("a.test", "b.test", "c.test"), 1)}
    relay = Relay(tmp_path, mx=mx, max_connections=1)
    scripts = [relay.net.add(f"192.0.2.{i}", 25, Scripted()).script for i in (1, 2, 3)]
    message = relay.queue(HEADERS + b"x\r\n", recipients=("u@a.test", "u@b.test", "u@c.test"))
    assert result_of(relay.deliver(message)) == {"u@a.test": RELAYED, "u@b.test": RELAYED, "u@c.test": RELAYED}
    assert relay.net.most_open == 1
    assert all(len(s["messages"]) == 1 for s in scripts)


def test_lost_connection_after_end_of_data_defers(tmp_path):
    """The peer drops the connection after the end of data, before its reply:
    the recipient is deferred (it may have the message: at least once)."""
    relay = Relay(tmp_path)

    class Dropper(ScriptedPeer):
        def dataReceived(self, data):
            if self.in_data and b"\r\n.\r\n" in self.buffer + data:
                self.transport.loseConnection()
                return
            super().dataReceived(data)

    class Factory_(Scripted):
        def buildProtocol(self, addr):
            return Dropper(self.script)

    relay.net.add("192.0.2.25", 25, Factory_())
    message = relay.queue(HEADERS + b"x\r\n")
    error = result_of(relay.deliver(message))["alice@remote.test"]
    assert isinstance(error, TemporaryDeliveryError) and error.status == "4.4.2"
    assert "after the end of data" in error.text


def test_client_protocol_api_directly(tmp_path):
    """SMTPClientProtocol alone: ready fires after EHLO, send gives the replies,
    a second send on the same connection works (RSET not needed after a
    completed transaction), quit closes."""
    clock = task.Clock()
    net = MemoryNet(clock)
    script = net.add("192.0.2.25", 25, Scripted(rcpt={"b@remote.test": b"550 5.1.1 no"})).script
    from mailsvc.clientprotocol import SMTPClientFactory

    d = net.connect("192.0.2.25", 25, SMTPClientFactory(ClientSettings("me.test"), clock))
    client = result_of(d)
    net.settle()
    assert result_of(client.ready) is client and "8BITMIME" in client.extensions
    import io

    sent = client.send(Transaction("s@me.test", ("a@remote.test", "b@remote.test")), io.BytesIO(b"Subject: 1\r\n\r\nhi\r\n"))
    net.settle()
    result = result_of(sent)
    assert result.refusal is None and result.accepted == ("a@remote.test",)
    assert result.recipients["b@remote.test"].code == 550 and result.reply.code == 250
    second = client.send(Transaction("s@me.test", ("a@remote.test",)), io.BytesIO(b"Subject: 2\r\n\r\n"))
    net.settle()
    assert result_of(second).accepted == ("a@remote.test",)
    closed = client.quit()
    net.settle()
    assert result_of(closed) is None
    assert script["messages"] == [b"Subject: 1\r\n\r\nhi\r\n", b"Subject: 2\r\n\r\n"]
    assert script["commands"][-1] == "QUIT"


def test_session_error_on_lost_connection(tmp_path):
    """A connection lost before the greeting fails ``ready`` with SMTPSessionError."""
    clock = task.Clock()
    client = SMTPClientProtocol(ClientSettings("me.test"), clock)
    from twisted.internet.testing import StringTransport

    client.makeConnection(StringTransport())
    client.connectionLost(None)
    failures = []
    client.ready.addErrback(failures.append)
    assert failures and failures[0].check(SMTPSessionError)
    assert failures[0].value.transient


def test_client_connection_turns_nagle_off():
    """The end of data is a small write of its own after the body; with
    Nagle's algorithm on, it waited for the peer's delayed ACK (up to 40 ms
    a message). The client asks its TCP transport for TCP_NODELAY, and a
    transport without the option (a TLS wrapper, a pipe) is fine too."""
    from twisted.internet.testing import StringTransport

    class TCPTransport(StringTransport):
        no_delay = None

        def setTcpNoDelay(self, enabled):
            self.no_delay = enabled

    tcp = TCPTransport()
    SMTPClientProtocol(ClientSettings("me.test"), task.Clock()).makeConnection(tcp)
    assert tcp.no_delay is True
    plain = StringTransport()
    SMTPClientProtocol(ClientSettings("me.test"), task.Clock()).makeConnection(plain)
    assert plain.value() == b""  # nothing said before the greeting


def test_dsn_request_is_passed_to_a_dsn_peer(tmp_path):
    """rfc3461 5.2.1: NOTIFY and ORCPT reach a peer that offers DSN; the result says it was passed on."""
    relay = Relay(tmp_path)
    peer = relay.net.add("192.0.2.25", 25, Peer(tmp_path / "peer", relay.clock))
    message = relay.queue(HEADERS + b"x\r\n")
    r = Recipient("alice@remote.test", original="Alice@old.test", notify="SUCCESS,FAILURE")
    message = message.evolve(envelope=message.envelope.evolve(recipients=(r,)))
    assert result_of(relay.deliver(message)) == {"alice@remote.test": PASSED_ON}
    [(envelope, _)] = peer.received()
    [got] = envelope.recipients
    assert (got.notify, got.original) == ("SUCCESS,FAILURE", "Alice@old.test")


# ---------------------------------------------------------------- 8-bit downgrade (rfc6152 3)

NO_8BITMIME = ["PIPELINING", "SIZE 1000000"]
MIME_8BIT = (
    b"From: carol@example.test\r\nTo: alice@remote.test\r\nSubject: 8-bit\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
) + "Grüße aus Köln\r\n".encode()


def test_8bit_mime_message_is_downgraded_for_a_peer_without_8bitmime(tmp_path):
    """An 8-bit MIME message to a peer without 8BITMIME goes as 7-bit MIME:
    quoted-printable, our Received: line kept, no BODY, SIZE of what is sent;
    the temporary 7-bit file is gone afterwards."""
    relay = Relay(tmp_path)
    script = relay.net.add("192.0.2.25", 25, Scripted(extensions=NO_8BITMIME)).script
    message = relay.queue(MIME_8BIT, parameters=(("BODY", "8BITMIME"),))
    assert result_of(relay.deliver(message)) == {"alice@remote.test": RELAYED}
    [sent] = script["messages"]
    assert sent == downgrade_bytes(relay.wire(message)) and sent.isascii()
    assert sent.startswith(b"Received: from client.example.test ([127.0.0.1]) by relay.example.test")
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in sent
    assert f"MAIL FROM:<carol@example.test> SIZE={len(sent)}" in script["commands"]
    parsed = email.message_from_bytes(sent, policy=email.policy.compat32)
    assert parsed.get_payload(decode=True) == "Grüße aus Köln\r\n".encode()
    assert list((relay.spool.directory / "tmp").iterdir()) == []


def test_downgrade_is_made_once_per_delivery(tmp_path):
    """Two domains whose hosts both lack 8BITMIME get the same 7-bit bytes,
    converted once (one blocking call for the scan, one for the conversion)."""
    mx = {d: [(f"mx.{d}", [f"192.0.2.{i}"])] for i, d in enumerate(("remote.test", "other.test"), 1)}
    relay = Relay(tmp_path, mx=mx)
    calls = []

    def run_blocking(f, *args):
        calls.append(f.__name__)
        return defer.maybeDeferred(f, *args)

    relay.agent = RelayAgent(relay.config, relay.mx, relay.net.connect, relay.clock, relay.spool, "relay.example.test",
                             run_blocking=run_blocking)
    scripts = [relay.net.add(f"192.0.2.{i}", 25, Scripted(extensions=NO_8BITMIME)).script for i in (1, 2)]
    message = relay.queue(MIME_8BIT, recipients=("alice@remote.test", "u@other.test"), parameters=(("BODY", "8BITMIME"),))
    assert result_of(relay.deliver(message)) == {"alice@remote.test": RELAYED, "u@other.test": RELAYED}
    assert calls == ["_scan", "_convert"]
    assert scripts[0]["messages"] == scripts[1]["messages"] == [downgrade_bytes(relay.wire(message))]
    assert list((relay.spool.directory / "tmp").iterdir()) == []


def test_too_large_to_downgrade_is_5_6_3(tmp_path):
    """An 8-bit MIME message over the agent's downgrade limit is not converted: 5.6.3, nothing sent."""
    relay = Relay(tmp_path)
    relay.agent = RelayAgent(relay.config, relay.mx, relay.net.connect, relay.clock, relay.spool, "relay.example.test",
                             downgrade_limit=100)
    script = relay.net.add("192.0.2.25", 25, Scripted(extensions=NO_8BITMIME)).script
    message = relay.queue(MIME_8BIT, parameters=(("BODY", "8BITMIME"),))
    error = result_of(relay.deliver(message))["alice@remote.test"]
    assert isinstance(error, PermanentDeliveryError) and error.status == "5.6.3"
    assert "too large to convert" in error.text and "messages" not in script
    assert list((relay.spool.directory / "tmp").iterdir()) == []


def test_8bit_goes_as_it_is_to_a_peer_with_8bitmime(tmp_path):
    """The same message to a peer that offers 8BITMIME is not converted: BODY=8BITMIME, bytes as queued."""
    relay = Relay(tmp_path)
    script = relay.net.add("192.0.2.25", 25, Scripted()).script
    message = relay.queue(MIME_8BIT, parameters=(("BODY", "8BITMIME"),))
    assert result_of(relay.deliver(message)) == {"alice@remote.test": RELAYED}
    assert script["messages"] == [relay.wire(message)]
    assert any(c.endswith(" BODY=8BITMIME") for c in script["commands"])


# ---------------------------------------------------------------- connection reuse (rfc5321 3.3)


def verbs(script):
    """The command verbs a scripted peer got, in order."""
    return [command.split()[0] for command in script["commands"]]


def test_two_messages_to_our_server_share_one_connection(tmp_path):
    """Two messages one after the other to the same host: one connection
    (one connect, one EHLO), two transactions; our server glue takes both."""
    relay = Relay(tmp_path)
    peer = relay.net.add("192.0.2.25", 25, Peer(tmp_path / "peer", relay.clock))
    first, second = relay.queue(HEADERS + b"one\r\n"), relay.queue(HEADERS + b"two\r\n")
    assert result_of(relay.deliver(first)) == {"alice@remote.test": PASSED_ON}
    assert result_of(relay.deliver(second)) == {"alice@remote.test": PASSED_ON}
    assert relay.net.attempts == [("192.0.2.25", 25)]
    assert sorted(data for _, data in peer.received()) == sorted([relay.wire(first), relay.wire(second)])


def test_reuse_says_rset_after_a_refused_transaction(tmp_path):
    """The second message reuses the connection: MAIL again without EHLO,
    and RSET first when the peer may still hold the refused transaction
    (rfc5321 4.1.1.5)."""
    relay = Relay(tmp_path)
    script = relay.net.add("192.0.2.25", 25, Scripted(rcpt={"nobody@remote.test": b"550 5.1.1 no"})).script
    refused = relay.queue(HEADERS + b"one\r\n", recipients=("nobody@remote.test",))
    error = result_of(relay.deliver(refused))["nobody@remote.test"]
    assert isinstance(error, PermanentDeliveryError)
    assert result_of(relay.deliver(relay.queue(HEADERS + b"two\r\n"))) == {"alice@remote.test": RELAYED}
    assert verbs(script) == ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA"]
    assert len(relay.net.attempts) == 1


def test_max_messages_per_connection_forces_a_new_connection(tmp_path):
    """With max_messages_per_connection = 2, the third message opens a second
    connection; the first was QUIT after its second transaction."""
    relay = Relay(tmp_path, max_messages_per_connection=2)
    script = relay.net.add("192.0.2.25", 25, Scripted()).script
    for n in range(3):
        message = relay.queue(HEADERS + b"message %d\r\n" % n)
        assert result_of(relay.deliver(message)) == {"alice@remote.test": RELAYED}
    assert len(relay.net.attempts) == 2
    assert verbs(script) == ["EHLO", "MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA", "QUIT", "EHLO", "MAIL", "RCPT", "DATA"]
    assert relay.net.open == 1 and len(script["messages"]) == 3


def test_idle_connection_is_quit_after_the_idle_timeout(tmp_path):
    """An idle connection stays open for idle_timeout (5 s here), then gets
    QUIT; the next message connects again."""
    relay = Relay(tmp_path)
    script = relay.net.add("192.0.2.25", 25, Scripted()).script
    assert result_of(relay.deliver(relay.queue(HEADERS + b"one\r\n"))) == {"alice@remote.test": RELAYED}
    relay.clock.advance(4.9)
    relay.net.settle()
    assert relay.net.open == 1 and "QUIT" not in verbs(script)
    relay.clock.advance(0.1)
    relay.net.settle()
    assert relay.net.open == 0 and verbs(script)[-1] == "QUIT"
    assert result_of(relay.deliver(relay.queue(HEADERS + b"two\r\n"))) == {"alice@remote.test": RELAYED}
    assert len(relay.net.attempts) == 2


def test_idle_connection_closed_by_the_peer_leaves_the_pool(tmp_path):
    """The peer closes an idle connection: it is forgotten at once and the
    next message gets a new one."""
    relay = Relay(tmp_path)
    relay.net.add("192.0.2.25", 25, Scripted())
    assert result_of(relay.deliver(relay.queue(HEADERS + b"one\r\n"))) == {"alice@remote.test": RELAYED}
    relay.net.pumps[0].serverIO.loseConnection()
    relay.net.settle()
    assert relay.net.open == 0 and relay.agent._pool.in_use == 0
    assert result_of(relay.deliver(relay.queue(HEADERS + b"two\r\n"))) == {"alice@remote.test": RELAYED}
    assert len(relay.net.attempts) == 2


class DiesOnReuse(ScriptedPeer):
    """A scripted peer whose connection is dead for a second transaction:
    the second MAIL on a connection gets ``421`` and a close, or (``drop``)
    a close without a word, as from a peer that timed the idle session out."""

    mails = 0

    def dataReceived(self, data):
        if not self.in_data and b"MAIL FROM:" in data:
            self.mails += 1
            if self.mails == 2:
                if not self.script.get("drop"):
                    self.transport.write(b"421 4.4.2 idle too long, closing\r\n")
                self.transport.loseConnection()
                return
        super().dataReceived(data)


class DiesOnReuseFactory(Scripted):
    """Factory of ``DiesOnReuse`` peers."""

    def buildProtocol(self, addr):
        return DiesOnReuse(self.script)


def test_dead_reused_connection_is_replaced(tmp_path):
    """A kept connection that breaks at the next MAIL (421, or closed without
    a word) is replaced by a new connection to the same host, and the
    message goes through: no error, no other MX tried."""
    for drop in (False, True):
        relay = Relay(tmp_path / str(drop), mx={"remote.test": [("mx1.remote.test", ["192.0.2.1"]), ("mx2.remote.test", ["192.0.2.2"])]})
        script = relay.net.add("192.0.2.1", 25, DiesOnReuseFactory(drop=drop)).script
        first, second = relay.queue(HEADERS + b"one\r\n"), relay.queue(HEADERS + b"two\r\n")
        assert result_of(relay.deliver(first)) == {"alice@remote.test": RELAYED}
        assert result_of(relay.deliver(second)) == {"alice@remote.test": RELAYED}
        assert relay.net.attempts == [("192.0.2.1", 25), ("192.0.2.1", 25)]
        assert script["messages"] == [relay.wire(first), relay.wire(second)]
        assert relay.agent._pool.in_use == 1  # the new one, idle


def test_idle_connections_count_toward_max_connections(tmp_path):
    """With max_connections = 1, a connection kept idle for a.test is QUIT
    (and closed) before one to b.test is opened."""
    mx = {d: [(f"mx.{d}", [f"192.0.2.{i}"])] for i, d in enumerate(("a.test", "b.test"), 1)}
    relay = Relay(tmp_path, mx=mx, max_connections=1)
    a, b = (relay.net.add(f"192.0.2.{i}", 25, Scripted()).script for i in (1, 2))
    assert result_of(relay.deliver(relay.queue(HEADERS + b"x\r\n", recipients=("u@a.test",)))) == {"u@a.test": RELAYED}
    assert relay.net.open == 1
    assert result_of(relay.deliver(relay.queue(HEADERS + b"x\r\n", recipients=("u@b.test",)))) == {"u@b.test": RELAYED}
    assert verbs(a)[-1] == "QUIT" and len(b["messages"]) == 1
    assert relay.net.most_open == 1


def test_per_destination_cap_hands_the_connection_on(tmp_path):
    """With max_connections_per_destination = 1, two messages delivered at the
    same time to one host: the second waits for the first's connection and
    reuses it."""
    relay = Relay(tmp_path, max_connections_per_destination=1)
    script = relay.net.add("192.0.2.25", 25, Scripted()).script
    first = relay.agent.deliver(relay.queue(HEADERS + b"one\r\n"))
    second = relay.agent.deliver(relay.queue(HEADERS + b"two\r\n"))
    relay.net.settle()
    assert result_of(first) == result_of(second) == {"alice@remote.test": RELAYED}
    assert len(relay.net.attempts) == 1 and relay.net.most_open == 1
    assert verbs(script).count("MAIL") == 2


def test_close_quits_idle_connections(tmp_path):
    """``close()`` QUITs the idle connections and fires once they are closed;
    a message delivered afterwards does not keep its connection."""
    relay = Relay(tmp_path)
    script = relay.net.add("192.0.2.25", 25, Scripted()).script
    assert result_of(relay.deliver(relay.queue(HEADERS + b"one\r\n"))) == {"alice@remote.test": RELAYED}
    closed = relay.agent.close()
    relay.net.settle()
    assert result_of(closed) is None
    assert relay.net.open == 0 and verbs(script)[-1] == "QUIT"
    assert result_of(relay.deliver(relay.queue(HEADERS + b"two\r\n"))) == {"alice@remote.test": RELAYED}
    assert relay.net.open == 0 and verbs(script).count("QUIT") == 2


class IgnoresQuit(ScriptedPeer):
    """A scripted peer that never answers QUIT (nor closes)."""

    def dataReceived(self, data):
        if data.upper().startswith(b"QUIT"):
            return
        super().dataReceived(data)


def test_close_is_bounded_by_its_timeout(tmp_path):
    """A peer that never answers QUIT does not hold ``close()`` up for longer
    than its timeout: the connection is dropped then."""
    relay = Relay(tmp_path)

    class Factory_(Scripted):
        def buildProtocol(self, addr):
            return IgnoresQuit(self.script)

    relay.net.add("192.0.2.25", 25, Factory_())
    assert result_of(relay.deliver(relay.queue(HEADERS + b"one\r\n"))) == {"alice@remote.test": RELAYED}
    closed = relay.agent.close(timeout=2)
    relay.net.settle()
    assert not closed.called and relay.net.open == 1
    relay.clock.advance(2)
    relay.net.settle()
    assert result_of(closed) is None and relay.net.open == 0
    assert relay.agent._pool.in_use == 0

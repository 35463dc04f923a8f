"""Our client machine wired to our server machine in memory: bytes from one are
fed to the other, both pure, no sockets."""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings, strategies as st

from mailsvc.smtp import client_events as cev
from mailsvc.smtp import events as sev
from mailsvc.smtp.client import ClientConnection, ClientSettings, State, Transaction
from mailsvc.smtp.replies import Reply
from mailsvc.smtp.server import ServerSettings
from smtp_driver import Driver


class Pair:
    """A ClientConnection and a server Driver passing bytes until both are quiet.

    The client side plays the caller: on ``StartData`` it streams ``body`` in
    pieces of ``chunk_sizes`` (cycled), then ends the data.
    """

    def __init__(self, server_settings=None, answers=None, **client_settings) -> None:
        self.server = Driver(server_settings or ServerSettings("mx.test", max_message_size=200_000), answers)
        self.client = ClientConnection(ClientSettings("client.test", **client_settings))
        self.events: list[cev.ClientEvent] = []
        self.writes: list[bytes] = []  # each client write, as the server got it
        self.body = b""
        self.chunk_sizes = [4096]
        self.received: list[bytes] = []  # the data of each message the server stored
        self.pump()

    def pump(self) -> list[cev.ClientEvent]:
        """Move bytes both ways until nothing moves; return the new client events."""
        start = len(self.events)
        moved = True
        while moved:
            moved = False
            from_server = self.server.conn.data_to_send()
            if from_server:
                self.client.receive_data(from_server)
                moved = True
            while (event := self.client.next_event()) is not None:
                self.events.append(event)
                if isinstance(event, cev.StartData):
                    self._stream_body()
            from_client = self.client.data_to_send()
            if from_client:
                self.writes.append(from_client)
                before = len(self.server.of(sev.DataEnd))
                self.server.conn.receive_data(from_client)
                self.server.run()
                if len(self.server.of(sev.DataEnd)) > before:
                    self.received.append(self.server.data)
                    self.server.data = b""
                moved = True
        return self.events[start:]

    def _stream_body(self) -> None:
        sizes = itertools.cycle(self.chunk_sizes)
        offset = 0
        while offset < len(self.body):
            size = next(sizes)
            self.client.send_data(self.body[offset : offset + size])
            offset += size
        self.client.end_data()

    def send(self, transaction: Transaction, body: bytes = b"Subject: test\r\n\r\nHello.\r\n") -> list:
        """Run one transaction to its end; return its client events."""
        self.body = body
        self.client.send_message(transaction)
        return self.pump()


def tx(*recipients, **kwargs) -> Transaction:
    """alice@a.test to ``recipients`` (bob@b.test by default)."""
    return Transaction("alice@a.test", list(recipients or ["bob@b.test"]), **kwargs)


def refuse(address: str, reply: Reply):
    """A server answer for RcptTo that refuses ``address`` only."""
    return lambda event: reply if event.recipient == address else None


UNKNOWN = Reply.of(550, "5.1.1", "No such user")


def test_greeting_and_ehlo_see_the_servers_extensions():
    """The client reads our server's EHLO: PIPELINING, SIZE limit, 8BITMIME."""
    pair = Pair()
    (ready,) = pair.events
    assert isinstance(ready, cev.Ready) and ready.extended
    assert {"PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"} <= ready.extensions.keys()
    assert pair.client.max_size == 200_000


def test_whole_message_with_pipelining():
    """MAIL, RCPTs and DATA go in one write; the server stores the body; 250 for both."""
    pair = Pair()
    body = b"Subject: hi\r\n\r\n.leading dot\r\n.\r\nend\r\n"
    events = pair.send(tx("bob@b.test", "carol@c.test", size=len(body)), body)
    assert (
        b"MAIL FROM:<alice@a.test> SIZE=%d\r\nRCPT TO:<bob@b.test>\r\nRCPT TO:<carol@c.test>\r\nDATA\r\n" % len(body)
        in pair.writes
    )
    assert [type(e) for e in events] == [cev.RecipientResult, cev.RecipientResult, cev.StartData, cev.MessageResult]
    assert events[-1].reply.code == 250 and events[-1].recipients == ("bob@b.test", "carol@c.test")
    assert pair.received == [body]
    assert pair.server.of(sev.MailFrom)[0].parameters == {"SIZE": str(len(body))}


def test_whole_message_without_pipelining():
    """With pipelining turned off the same message goes one command per write."""
    pair = Pair(pipelining=False)
    events = pair.send(tx("bob@b.test", "carol@c.test"))
    assert pair.writes[1:5] == [
        b"MAIL FROM:<alice@a.test>\r\n",
        b"RCPT TO:<bob@b.test>\r\n",
        b"RCPT TO:<carol@c.test>\r\n",
        b"DATA\r\n",
    ]
    assert events[-1].reply.code == 250 and len(pair.received) == 1


def test_several_messages_with_rset_between():
    """Several transactions on one connection; after a refused DATA, RSET clears
    the server's transaction before the next MAIL (rfc5321 4.1.1.5)."""
    refusals = iter([None, Reply.of(451, "4.3.0", "Try again"), None])
    pair = Pair(answers={sev.DataCommand: lambda event: next(refusals)})
    results = []
    for number in range(3):
        body = b"Subject: %d\r\n\r\nbody %d\r\n" % (number, number)
        results.append(pair.send(tx(), body)[-1])
    assert [r.reply.code for r in results] == [250, 451, 250]
    assert pair.received == [b"Subject: 0\r\n\r\nbody 0\r\n", b"Subject: 2\r\n\r\nbody 2\r\n"]
    assert [w for w in pair.writes if w.startswith(b"RSET")] == [
        b"RSET\r\nMAIL FROM:<alice@a.test>\r\nRCPT TO:<bob@b.test>\r\nDATA\r\n"
    ]
    assert len(pair.server.of(sev.Reset)) == 1
    pair.client.quit()
    assert isinstance(pair.pump()[-1], cev.Closed)
    assert pair.server.conn.closed and pair.server.of(sev.Quit)


def test_some_recipients_refused():
    """The server answers 550 to one recipient: it gets that reply, the others the 250."""
    pair = Pair(answers={sev.RcptTo: refuse("carol@c.test", UNKNOWN)})
    events = pair.send(tx("bob@b.test", "carol@c.test", "dave@d.test"))
    results = {e.address: e.reply for e in events if isinstance(e, cev.RecipientResult)}
    assert results["carol@c.test"] == UNKNOWN
    assert events[-1].recipients == ("bob@b.test", "dave@d.test") and events[-1].reply.code == 250
    assert len(pair.received) == 1


def test_every_recipient_refused():
    """All RCPTs refused: the server's 554 to the pipelined DATA ends it; no data
    is sent; the next message starts with RSET and goes through."""
    pair = Pair(answers={sev.RcptTo: refuse("bob@b.test", UNKNOWN)})
    events = pair.send(tx())
    assert events[-1] == cev.MessageResult(Reply.of(554, "5.5.1", "No valid recipients"), ())
    assert pair.received == [] and not pair.server.of(sev.DataCommand)
    events = pair.send(tx("carol@c.test"))
    assert events[-1].reply.code == 250 and pair.writes[-2].startswith(b"RSET\r\n")


def test_data_refused():
    """The server refuses DATA (554 by policy): the accepted recipients get it."""
    refusal = Reply.of(554, "5.7.1", "Not from you")
    pair = Pair(answers={sev.DataCommand: refusal})
    events = pair.send(tx("bob@b.test", "carol@c.test"))
    assert events[-1] == cev.MessageResult(refusal, ("bob@b.test", "carol@c.test"))
    assert pair.received == [] and pair.client.state is State.READY


def test_100_kb_body_in_odd_chunks_arrives_byte_exact():
    """A 100 KB body full of dot-led lines, sent in odd chunk sizes, is stored exactly."""
    rng = random.Random(5321)
    lines = []
    while sum(map(len, lines)) < 100_000:
        text = bytes(rng.choice(b"abc .\t\x80\xff") for _ in range(rng.randrange(0, 200)))
        lines.append(text + b"\r\n")
    body = b"".join(lines)
    pair = Pair()
    pair.chunk_sizes = [1, 7, 13, 509, 4093, 2, 65_537]
    events = pair.send(tx(size=len(body), body_8bit=True), body)
    assert events[-1].reply.code == 250
    assert pair.received == [body] and pair.server.of(sev.DataEnd)[0].size == len(body)
    assert pair.server.of(sev.MailFrom)[0].parameters["BODY"] == "8BITMIME"


def test_size_over_the_advertised_limit_is_refused_by_the_client():
    """rfc1870: over the server's advertised SIZE, the client refuses the message
    itself (552 5.3.4) and the server never sees a MAIL."""
    pair = Pair(ServerSettings("mx.test", max_message_size=10_000))
    (event,) = pair.send(tx(size=10_001))
    assert isinstance(event, cev.TransactionFailed) and event.synthetic and event.reply.code == 552
    assert not pair.server.of(sev.MailFrom) and pair.client.state is State.READY


def test_server_refuses_at_mail_from_the_size_parameter():
    """The server refuses MAIL by the client's SIZE= (rfc1870 6.1, a per-sender
    limit): TransactionFailed with the server's 552, nothing else happens."""
    too_big = Reply.of(552, "5.3.4", "Message too big for you")
    quota = {sev.MailFrom: lambda e: too_big if int(e.parameters.get("SIZE", 0)) > 5000 else None}
    pair = Pair(answers=quota)
    events = pair.send(tx("bob@b.test", "carol@c.test", size=6000))
    assert events == [cev.TransactionFailed(too_big)]
    assert pair.received == [] and pair.client.state is State.READY
    events = pair.send(tx(size=100))  # a smaller one still goes, with no RSET needed
    assert events[-1].reply.code == 250 and pair.writes[-2].startswith(b"MAIL FROM:<alice@a.test> SIZE=100")


def test_server_421_mid_session():
    """The server closes with 421 (rfc5321 3.8): the client reports ConnectionFailed."""
    pair = Pair()
    pair.client.send_message(tx())
    pair.client.data_to_send()
    pair.server.conn.close(Reply.of(421, "4.3.2", "Shutting down"))
    events = pair.pump()
    assert events == [cev.ConnectionFailed(Reply.of(421, "4.3.2", "Shutting down"))] and pair.client.closed


message_lines = st.lists(
    st.one_of(st.binary(max_size=60), st.binary(max_size=60).map(lambda b: b"." + b)).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"") + b"\r\n"
    ),
    max_size=20,
)


@settings(max_examples=100, deadline=None)
@given(st.lists(message_lines, min_size=1, max_size=3), st.lists(st.integers(1, 50), min_size=1, max_size=5))
def test_any_messages_arrive_exactly(bodies, chunk_sizes):
    """Any bodies, any chunking, several per connection: the server stores each exactly."""
    pair = Pair()
    pair.chunk_sizes = chunk_sizes
    for lines in bodies:
        assert pair.send(tx(), b"".join(lines))[-1].reply.code == 250
    assert pair.received == [b"".join(lines) for lines in bodies]

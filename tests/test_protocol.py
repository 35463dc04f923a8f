"""The Twisted glue in memory: StringTransport, task.Clock, a real spool on disk."""

from __future__ import annotations

import ipaddress

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mailsvc.envelope import LocalMailbox
from mailsvc.errors import SpoolError
from mailsvc.interfaces import IPolicy, IRecipientDirectory
from mailsvc.policy import Verdict
from mailsvc.protocol import SMTPServerFactory
from mailsvc.receiver import ReceiverContext, ReceiverSettings
from mailsvc.smtp.server import ServerSettings
from mailsvc.spool.filespool import FileSpool, SpoolWriter
from zope.interface.verify import verifyObject


@implementer(IRecipientDirectory)
class TableDirectory:
    """A directory from a dict: alias name → member users; users are themselves."""

    def __init__(self, users=("alice", "bob"), aliases=None, domains=("example.test",)):
        self.users, self.aliases, self.domains = set(users), dict(aliases or {}), domains

    def isLocalDomain(self, domain):
        return domain in self.domains

    def resolve(self, address):
        local, at, domain = address.lower().rpartition("@")
        if not at:
            local, domain = domain, self.domains[0]
        if local in self.users:
            return (LocalMailbox(f"{local}@{domain}", local, local.title()),)
        if local in self.aliases:
            return tuple(LocalMailbox(f"{m}@{domain}", m) for m in self.aliases[local])
        return ()

    def expand(self, address):
        local, _, domain = address.lower().rpartition("@")
        members = self.aliases.get(local)
        return None if members is None else tuple(f"{m}@{domain}" for m in members)


class Harness:
    """A factory wired to a real FileSpool, a table directory and a fake clock."""

    def __init__(self, tmp_path, policies=(), **settings):
        self.clock = task.Clock()
        self.spool = FileSpool(tmp_path / "spool")
        self.submitted = []
        receiver = dict(hostname="mx.test", default_domain="example.test")
        receiver.update({k: settings.pop(k) for k in list(settings) if k in ("vrfy", "expn", "trusted_networks")})
        self.context = ReceiverContext(
            settings=ReceiverSettings(**receiver),
            directory=TableDirectory(aliases={"team": ["alice", "bob"], "postmaster": ["alice"]}),
            spool=self.spool,
            submit=self.submitted.append,
            run_blocking=defer.maybeDeferred,
            policies=list(policies),
            now=lambda: 1_790_000_000.0,
        )
        self.factory = SMTPServerFactory(
            self.context,
            ServerSettings("mx.test", max_message_size=settings.pop("max_message_size", 10_000)),
            clock=self.clock,
            **settings,
        )

    def connect(self, host="192.0.2.7"):
        proto = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000), hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
        proto.makeConnection(transport)
        return proto, transport


def talk(proto, transport, data: bytes) -> str:
    """Send ``data``; return and clear what the server wrote."""
    proto.dataReceived(data)
    out = transport.value().decode()
    transport.clear()
    return out


def lines(text: str) -> list[str]:
    return text.split("\r\n")[:-1]


SEND = b"EHLO c.test\r\nMAIL FROM:<carol@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"


def test_a_message_is_spooled_before_250(tmp_path):
    """End of data commits to the spool, then says 250 queued as <id>; the data is exact."""
    h = Harness(tmp_path)
    proto, t = h.connect()
    assert t.value() == b"220 mx.test ESMTP mailsvc\r\n"
    t.clear()
    out = talk(proto, t, SEND + b"Subject: hi\r\n\r\n..dot\r\n.\r\n")
    last = lines(out)[-1]
    assert last.startswith("250 2.0.0 Ok: queued as ")
    [queued] = h.spool.queued()
    assert last.endswith(queued.id) and h.submitted == [queued]
    assert queued.hop == "local"
    envelope = queued.envelope
    assert envelope.sender == "carol@remote.test"
    assert [(r.address, r.mailbox) for r in envelope.recipients] == [("alice@example.test", "alice")]
    with h.spool.open(queued) as f:
        data = f.read()
    received, body = data.split(b"\r\n", 1)
    assert body == b"Subject: hi\r\n\r\n.dot\r\n"
    assert received.startswith(b"Received: from c.test ([192.0.2.7]) by mx.test (mailsvc) with ESMTP id " + queued.id.encode())
    assert b"for <alice@example.test>; " in received


def test_server_connection_turns_nagle_off(tmp_path):
    """Replies are whole writes; a late one after an early one must not wait
    for the client's delayed ACK (TCP_NODELAY, as Postfix's smtpd)."""
    harness = Harness(tmp_path)

    class TCPTransport(StringTransport):
        no_delay = None

        def setTcpNoDelay(self, enabled):
            self.no_delay = enabled

    transport = TCPTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000), hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
    proto = harness.factory.buildProtocol(None)
    proto.makeConnection(transport)
    assert transport.no_delay is True
    assert transport.value().startswith(b"220 mx.test ESMTP")


def test_unknown_user_and_relay_are_refused(tmp_path):
    """550 5.1.1 for an unknown local user; 550 5.7.1 for a foreign domain (no open relay)."""
    h = Harness(tmp_path)
    proto, t = h.connect()
    t.clear()
    out = talk(proto, t, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<nobody@example.test>\r\nRCPT TO:<x@elsewhere.test>\r\n")
    assert lines(out)[-2:] == [
        "550 5.1.1 <nobody@example.test>: no such user here",
        "550 5.7.1 <x@elsewhere.test>: relay access denied",
    ]


def test_trusted_network_may_relay(tmp_path):
    """A client in trusted_networks may send to a foreign domain; it is spooled under 'relay'."""
    h = Harness(tmp_path, trusted_networks=(ipaddress.ip_network("192.0.2.0/24"),))
    proto, t = h.connect()
    out = talk(proto, t, b"EHLO c\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<x@elsewhere.test>\r\nDATA\r\nhi\r\n.\r\n")
    assert lines(out)[-1].startswith("250 2.0.0")
    assert [m.hop for m in h.spool.queued()] == ["relay"]


def test_postmaster_and_aliases(tmp_path):
    """<Postmaster> is accepted; an alias expands to one copy per mailbox, duplicates removed."""
    h = Harness(tmp_path)
    proto, t = h.connect()
    talk(proto, t, b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\nRCPT TO:<team@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nx\r\n.\r\n")
    [queued] = h.spool.queued()
    assert [(r.address, r.original) for r in queued.envelope.recipients] == [
        ("alice@example.test", "Postmaster"),
        ("bob@example.test", "team@example.test"),
    ]
    assert queued.envelope.sender == ""


@implementer(IPolicy)
class SlowPolicy:
    """A policy whose MAIL answer waits for the test to fire it."""

    def __init__(self):
        self.waiting = []

    def connect(self, session):
        return None

    def helo(self, session, name):
        return None

    def mail(self, session, sender, parameters):
        d = defer.Deferred()
        self.waiting.append(d)
        return d

    def rcpt(self, session, recipient, parameters):
        return None

    def endOfData(self, session, envelope):
        return Verdict.accept("X-Checked: yes")


def test_slow_policy_keeps_pipelined_replies_in_order(tmp_path):
    """rfc2920 3.1: while MAIL waits on a policy, the transport is paused and later replies wait."""
    policy = SlowPolicy()
    verifyObject(IPolicy, policy)
    h = Harness(tmp_path, policies=[policy])
    proto, t = h.connect()
    t.clear()
    out = talk(proto, t, SEND + b"hi\r\n.\r\nQUIT\r\n")
    assert lines(out) == ["250-mx.test greets c.test", "250-PIPELINING", "250-SIZE 10000", "250-8BITMIME", "250-ENHANCEDSTATUSCODES", "250-DSN", "250 HELP"]
    assert t.producerState == "paused"
    policy.waiting[0].callback(None)
    out = t.value().decode()
    assert [l[:3] for l in lines(out)] == ["250", "250", "354", "250", "221"]
    assert t.producerState == "producing" and t.disconnecting
    [queued] = h.spool.queued()
    assert queued.envelope.prepend_headers[1:] == ("X-Checked: yes",)


def test_policy_rejection_is_sent(tmp_path):
    """A policy's reject verdict is the reply, and nothing is spooled."""

    class NoMail(SlowPolicy):
        def mail(self, session, sender, parameters):
            return Verdict.reject("senders from remote.test are not welcome", 550, "5.7.1")

    h = Harness(tmp_path, policies=[NoMail()])
    proto, t = h.connect()
    out = talk(proto, t, SEND)
    assert "550 5.7.1 senders from remote.test are not welcome" in out
    assert h.spool.queued() == []


def test_connection_cap_gives_421(tmp_path):
    """Past max_connections, a new client gets 421 4.7.0 and is closed."""
    h = Harness(tmp_path, max_connections=1)
    h.connect()
    proto, t = h.connect()
    assert t.value() == b"421 4.7.0 Too many connections; try again later\r\n"
    assert t.disconnecting


def test_idle_timeout_gives_421(tmp_path):
    """rfc5321 4.5.3.2.7: a silent client gets 421 4.4.2 after command_timeout."""
    h = Harness(tmp_path, command_timeout=300, data_timeout=180)
    proto, t = h.connect()
    t.clear()
    h.clock.advance(299)
    assert t.value() == b"" and not t.disconnecting
    talk(proto, t, b"NOOP\r\n")
    h.clock.advance(299)
    assert not t.disconnecting
    h.clock.advance(2)
    assert t.value() == b"421 4.4.2 Timeout exceeded; closing connection\r\n" and t.disconnecting


def test_data_timeout_discards_the_partial_message(tmp_path):
    """A client silent in the middle of DATA gets 421 after data_timeout; nothing stays in the spool."""
    h = Harness(tmp_path, command_timeout=300, data_timeout=180)
    proto, t = h.connect()
    talk(proto, t, SEND + b"half a message\r\n")
    h.clock.advance(181)
    assert t.value().endswith(b"421 4.4.2 Timeout exceeded; closing connection\r\n")
    proto.connectionLost(None)
    assert h.spool.queued() == [] and list((tmp_path / "spool" / "tmp").iterdir()) == []


def test_shutdown_says_421_to_everyone(tmp_path):
    """On shutdown every connected client gets 421 4.3.2."""
    h = Harness(tmp_path)
    conns = [h.connect() for _ in range(3)]
    for _, t in conns:
        t.clear()
    h.factory.shutdown()
    for _, t in conns:
        assert t.value() == b"421 4.3.2 Service shutting down; try again later\r\n" and t.disconnecting


def test_lost_connection_mid_data_leaves_nothing(tmp_path):
    """A client that drops during DATA: nothing is queued, no temp file stays."""
    h = Harness(tmp_path)
    proto, t = h.connect()
    talk(proto, t, SEND + b"partial\r\n")
    proto.connectionLost(None)
    assert h.spool.queued() == [] and list((tmp_path / "spool" / "tmp").iterdir()) == []


@pytest.mark.parametrize("full, expected", [(True, "452 4.3.1 Insufficient system storage; try again later"), (False, "451 4.3.0 Local error in processing; try again later")])
def test_commit_failure_is_a_4xx_and_leaves_nothing(tmp_path, monkeypatch, full, expected):
    """A failed commit (disk full, I/O error) answers 452 4.3.1 or 451 4.3.0, never 250."""
    h = Harness(tmp_path)

    def failing_commit(self, envelope, routes):
        self.abort()
        raise SpoolError("simulated", temporary_full=full)

    monkeypatch.setattr(SpoolWriter, "commit", failing_commit)
    proto, t = h.connect()
    out = talk(proto, t, SEND + b"x\r\n.\r\nNOOP\r\n")
    assert lines(out)[-2:] == [expected, "250 2.0.0 Ok"]
    assert h.spool.queued() == []


def test_vrfy_modes(tmp_path):
    """VRFY: 250 with the name, 550 unknown, 553 unparsable; 252 in always-252; 502 when off."""
    h = Harness(tmp_path)
    proto, t = h.connect()
    t.clear()
    out = talk(proto, t, b"VRFY alice\r\nVRFY <bob@example.test>\r\nVRFY zed\r\nVRFY team\r\nVRFY @@\r\nVRFY x@elsewhere.test\r\n")
    assert lines(out) == [
        "250 2.1.5 Alice <alice@example.test>",
        "250 2.1.5 Bob <bob@example.test>",
        "550 5.1.1 <zed@example.test>: no such user here",
        "250 2.1.5 <team@example.test>",
        "553 5.1.3 Cannot parse '@@' as a user or local address",
        "553 5.1.3 Cannot parse 'x@elsewhere.test' as a user or local address",
    ]
    for mode, expected in [("always-252", "252 2.5.0 "), ("off", "502 5.5.1 VRFY disabled")]:
        proto, t = Harness(tmp_path, vrfy=mode).connect()
        t.clear()
        assert talk(proto, t, b"VRFY alice\r\n").startswith(expected)


def test_expn(tmp_path):
    """EXPN lists an alias's members when enabled, 550 for a non-list, 502 when disabled."""
    proto, t = Harness(tmp_path, expn=True).connect()
    t.clear()
    out = talk(proto, t, b"EXPN team\r\nEXPN alice\r\n")
    assert lines(out) == ["250-2.1.5 <alice@example.test>", "250 2.1.5 <bob@example.test>", "550 5.1.1 <alice@example.test>: not a mailing list"]
    proto, t = Harness(tmp_path).connect()
    t.clear()
    assert talk(proto, t, b"EXPN team\r\n") == "502 5.5.1 EXPN disabled\r\n"


def test_turn_is_refused_until_authenticated_turn_exists(tmp_path):
    """TURN: 502 5.5.1 (rfc5321 F.1 deprecates it without authentication)."""
    proto, t = Harness(tmp_path).connect()
    t.clear()
    assert talk(proto, t, b"TURN\r\n") == "502 5.5.1 TURN not available\r\n"


def test_oversize_message_is_refused_and_not_spooled(tmp_path):
    """552 after end of data for a message over the limit; the spool stays empty."""
    h = Harness(tmp_path, max_message_size=100)
    proto, t = h.connect()
    out = talk(proto, t, SEND + b"x" * 200 + b"\r\n.\r\n")
    assert lines(out)[-1] == "552 5.3.4 Message too big: the limit is 100 octets"
    assert h.spool.queued() == [] and list((tmp_path / "spool" / "tmp").iterdir()) == []


def test_dsn_parameters_reach_the_spool(tmp_path):
    """rfc3461: RET/ENVID stay in the envelope; NOTIFY and the decoded ORCPT on the recipient."""
    h = Harness(tmp_path)
    proto, t = h.connect()
    talk(proto, t, b"EHLO c\r\nMAIL FROM:<carol@remote.test> RET=FULL ENVID=abc+2B1\r\n"
                   b"RCPT TO:<alice@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Alice+40old.test\r\nDATA\r\nx\r\n.\r\n")
    [queued] = h.spool.queued()  # read back from the control file on disk
    assert queued.envelope.parameter("RET") == "FULL" and queued.envelope.parameter("ENVID") == "abc+2B1"
    [r] = queued.envelope.recipients
    assert (r.address, r.original, r.notify) == ("alice@example.test", "Alice@old.test", "SUCCESS,FAILURE")


def test_mail_for_a_domain_with_a_fixed_hop_is_accepted_from_anyone(tmp_path):
    """We are the MX of a UUCP or held site: a stranger's mail for it is not relaying."""
    from mailsvc.delivery.router import Router

    h = Harness(tmp_path)
    h.context.router = Router({"site.example": "uucp.site"})
    proto, t = h.connect()
    out = talk(proto, t, b"EHLO c\r\nMAIL FROM:<a@far.test>\r\nRCPT TO:<x@site.example>\r\nRCPT TO:<y@other.test>\r\nDATA\r\nhi\r\n.\r\n")
    assert "550 5.7.1 <y@other.test>: relay access denied" in out
    assert lines(out)[-1].startswith("250 2.0.0")
    assert [m.hop for m in h.spool.queued()] == ["uucp.site"]

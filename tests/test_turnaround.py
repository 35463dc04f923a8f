"""Turn-around in memory: our call-in client against our server for TURN and
ATRN (``iosim``, pretend TLS on and off), every refusal, a broken
connection, ETRN, the hold agent and the runner's on-demand hops."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from zope.interface.verify import verifyObject

from mailsvc.callin import CallInFailed
from mailsvc.delivery.hold import HoldAgent
from mailsvc.envelope import Envelope, QueuedMessage, Recipient, RecipientState
from mailsvc.errors import TemporaryDeliveryError
from mailsvc.interfaces import IDeliveryAgent
from mailsvc.policy import Verdict
from mailsvc.spool.schedule import RetrySchedule
from mailsvc.turnaround import ReversedSessionAgent, switch_protocol
from turn_harness import CUSTOMER, PASSWORD, Customer, Provider, RelayRecorder, connect, run


@pytest.fixture
def sides(tmp_path):
    """A provider (pretend TLS) and a customer sharing one clock."""
    provider = Provider(tmp_path / "provider", tls=True)
    return provider, Customer(tmp_path / "customer", provider.clock)


def call_in(provider, customer, factory=None, **options):
    """Run one call-in to the end; return (the call protocol, its outcome or failure)."""
    call = customer.call(**options)
    pump = connect(factory or provider.odmr, call, provider.clock)
    run(pump)
    outcome = []
    call.done.addBoth(outcome.append)
    assert outcome, "the call-in did not finish"
    return call, outcome[0]


def talk(factory, data: bytes) -> str:
    """Feed ``data`` to a fresh server connection of ``factory``; return what it said."""
    proto = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 4000),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
    proto.makeConnection(transport)
    proto.dataReceived(data)
    return transport.value().decode()


def plain(user: str, password: str = PASSWORD) -> bytes:
    import base64

    return base64.b64encode(f"\0{user}\0{password}".encode())


# ---------------------------------------------------------------- the switch


class Recorder(Protocol):
    def __init__(self):
        self.data = b""

    def dataReceived(self, data):
        self.data += data


def test_switch_protocol_on_each_transport_shape():
    """The new protocol replaces the old wherever the transport keeps it: a
    TCP connection's ``protocol``, an implicit-TLS layer's ``wrappedProtocol``,
    the TLS layer STARTTLS put under a connection; it is connected and fed
    the trailing bytes."""
    for shape in ("plain", "implicit", "starttls"):
        old, new = Protocol(), Recorder()
        transport = StringTransport()
        if shape == "plain":
            transport.protocol = old
        elif shape == "implicit":
            transport.wrappedProtocol = old
        else:
            layer = Protocol()
            layer.wrappedProtocol = old
            transport.protocol = layer
        old.makeConnection(transport)
        switch_protocol(old, new, b"220 hello\r\n")
        assert new.transport is transport and new.data == b"220 hello\r\n"
        held = {"plain": lambda: transport.protocol, "implicit": lambda: transport.wrappedProtocol,
                "starttls": lambda: transport.protocol.wrappedProtocol}[shape]()
        assert held is new


def test_switch_protocol_refuses_an_unknown_transport():
    """A transport that does not hold the old protocol anywhere known is an error, not a silent no-op."""
    old = Protocol()
    old.makeConnection(StringTransport())
    with pytest.raises(RuntimeError):
        switch_protocol(old, Recorder())


# ---------------------------------------------------------------- ATRN and TURN, end to end


@pytest.mark.parametrize("tls", [True, False])
def test_atrn_delivers_the_held_mail(tmp_path, tls):
    """ATRN by the owner: EHLO, (STARTTLS,) AUTH PLAIN, ATRN, 250; the roles
    reverse and every message held for the customer's domains goes across;
    each leaves the hold hop once the customer said 250. Other sites' mail stays."""
    provider = Provider(tmp_path / "p", tls=tls)
    customer = Customer(tmp_path / "c", provider.clock)
    first = provider.hold_mail("u@customer.example")
    provider.hold_mail("v@other.example", "x@elsewhere.example")
    call, outcome = call_in(provider, customer, starttls=tls)
    assert outcome.quit and not outcome.no_mail
    assert call.machine.tls_active is tls and call.server.machine.tls is tls
    assert len(customer.received) == 2
    assert provider.held() == []
    assert [m.envelope.recipients[0].address for m in provider.held("hold.elsewhere")] == ["x@elsewhere.example"]
    bodies = customer.messages()
    assert all(b"Kept for you." in body and b"Received: from far.test by provider.test" in body for body in bodies)
    # The customer's own Received: line says how it came: from the provider, over ESMTP(S).
    stamps = [m.envelope.prepend_headers[0] for m in customer.spool.queued()]
    assert all(("with ESMTPS" if tls else "with ESMTP ") in s and "from provider.test" in s for s in stamps)
    assert first not in customer.received  # a new queue ID on the customer's side


@pytest.mark.parametrize("tls", [True, False])
def test_turn_delivers_the_held_mail(tmp_path, tls):
    """TURN (rfc821) on an SMTP listener, after AUTH: the same reversal."""
    provider = Provider(tmp_path / "p", tls=tls)
    customer = Customer(tmp_path / "c", provider.clock)
    provider.hold_mail("u@customer.example")
    _, outcome = call_in(provider, customer, factory=provider.smtp, command="TURN", starttls=tls)
    assert outcome.quit and len(customer.received) == 1 and provider.held() == []


def test_atrn_for_some_domains_only(sides):
    """ATRN other.example delivers that domain's mail and keeps customer.example's."""
    provider, customer = sides
    provider.hold_mail("u@customer.example")
    provider.hold_mail("v@other.example")
    _, outcome = call_in(provider, customer, domains=("other.example",))
    assert outcome.quit and len(customer.received) == 1
    assert [m.envelope.recipients[0].address for m in provider.held()] == ["u@customer.example"]


def test_customer_refusals_are_kept_or_failed(sides):
    """Per recipient: the customer's 550 fails that recipient for good (no
    longer held), its 250 delivers the other; a 4xx would keep it held."""
    provider, customer = sides
    provider.hold_mail("u@customer.example", "nobody@customer.example")
    _, outcome = call_in(provider, customer)
    assert outcome.quit and len(customer.received) == 1
    assert provider.held() == []  # nobody@ failed (550 5.1.1), u@ delivered


class HangSecond:
    """A customer policy that never answers the end of data of the second message."""

    def __init__(self):
        self.seen = 0
        self.pending = None

    def connect(self, *a): return None  # noqa: E704
    def helo(self, *a): return None  # noqa: E704
    def mail(self, *a): return None  # noqa: E704
    def rcpt(self, *a): return None  # noqa: E704

    def endOfData(self, *a):
        self.seen += 1
        if self.seen == 2:
            self.pending = defer.Deferred()
            return self.pending
        return Verdict()


def test_connection_lost_mid_delivery_keeps_what_was_not_acknowledged(tmp_path):
    """The connection breaks after the second message's data, before the
    customer's 250: the first (acknowledged) leaves the hold hop, the
    second stays held for the next call-in (at least once, never lost)."""
    provider = Provider(tmp_path / "p")
    policy = HangSecond()
    customer = Customer(tmp_path / "c", provider.clock, policies=(policy,))
    provider.hold_mail("u@customer.example", body=b"Subject: one\r\n\r\n1\r\n")
    provider.hold_mail("u@customer.example", body=b"Subject: two\r\n\r\n2\r\n")
    call = customer.call()
    pump = connect(provider.odmr, call, provider.clock)
    run(pump)
    assert len(customer.received) == 1 and not call.done.called  # waiting on the second 250
    pump.clientIO.loseConnection()
    run(pump)
    policy.pending.callback(Verdict.defer("too late"))  # the customer drops its half-received copy
    left = provider.held()
    assert len(left) == 1
    recipient = left[0].envelope.recipients[0]
    assert recipient.state is RecipientState.PENDING and recipient.attempts == 1
    assert "broke after the end of data" in recipient.last_error
    assert b"Subject: two" in provider.spool.open(left[0]).read()
    outcome = []
    call.done.addBoth(outcome.append)
    assert outcome and not outcome[0].quit  # the customer saw no QUIT
    # The next call-in brings it.
    again = Customer(tmp_path / "c2", provider.clock)
    _, second = call_in(provider, again)
    assert second.quit and len(again.received) == 1 and provider.held() == []


# ---------------------------------------------------------------- refusals


def test_turn_without_auth_is_530(sides):
    """rfc5321 F.1 / DESIGN rule 4: TURN from an unauthenticated client is refused with 530."""
    provider, _ = sides
    provider.hold_mail("u@customer.example")
    out = talk(provider.smtp, b"EHLO c.test\r\nTURN\r\n")
    assert "530 5.7.0 Authentication required: TURN is honoured only after AUTH" in out
    assert len(provider.held()) == 1


def test_atrn_without_auth_is_530(sides):
    """rfc2645 5.2.1: ATRN before AUTH gets 530."""
    provider, _ = sides
    out = talk(provider.odmr, b"EHLO c.test\r\nATRN customer.example\r\n")
    assert "530 5.7.0 Authentication required" in out


def test_turn_by_a_user_owning_nothing_is_502(sides):
    """TURN by alice, who owns no held domain: 502 (rfc821 4.3's refusal), saying why."""
    provider, _ = sides
    provider.hold_mail("u@customer.example")
    out = talk(provider.odmr.__class__(provider.smtp.context, provider.smtp.server_settings.__class__(
        "provider.test", auth_mechanisms=("PLAIN",), auth_without_tls=True), provider.clock,
        authenticator=provider.authenticator, turnaround=provider.turnaround),
        b"EHLO c.test\r\nAUTH PLAIN " + plain("alice") + b"\r\nTURN\r\n")
    assert "235 2.7.0" in out and "502 5.7.1 TURN refused: alice owns no domain whose mail is held here" in out


def test_atrn_for_a_domain_not_owned_is_450(sides):
    """rfc2645 5.2.1: a domain the login does not own → 450, and nothing is sent for any domain."""
    provider, customer = sides
    provider.hold_mail("u@customer.example")
    provider.hold_mail("x@elsewhere.example")
    call, outcome = call_in(provider, customer, domains=("customer.example", "elsewhere.example"))
    assert isinstance(outcome.value, CallInFailed) and outcome.value.status == 1
    assert "450 4.7.1 ATRN refused: custuser has no access to elsewhere.example" in str(outcome.value)
    assert len(provider.held()) == 1 and len(provider.held("hold.elsewhere")) == 1
    assert customer.received == []


def test_nothing_held_is_453(sides):
    """rfc2645 7: "453 You have no mail"; the customer quits and is content."""
    provider, customer = sides
    _, outcome = call_in(provider, customer)
    assert outcome.no_mail.startswith("453 4.2.0 You have no mail") and customer.received == []


def test_turn_with_nothing_held_is_453(sides):
    """TURN gets the same 453 when nothing waits for the user's domains."""
    provider, customer = sides
    provider.hold_mail("x@elsewhere.example")
    _, outcome = call_in(provider, customer, factory=provider.smtp, command="TURN")
    assert outcome.no_mail.startswith("453")


def test_wrong_password_is_refused(sides):
    """535 to AUTH: the call-in stops with status 1, naming the reply."""
    provider, customer = sides
    provider.hold_mail("u@customer.example")
    _, outcome = call_in(provider, customer, password="wrong")
    assert isinstance(outcome.value, CallInFailed) and "AUTH refused: 535" in str(outcome.value)
    assert len(provider.held()) == 1


def test_no_starttls_means_no_password(tmp_path):
    """The password goes over TLS only: a provider without STARTTLS is left at once."""
    provider = Provider(tmp_path / "p", tls=False)
    customer = Customer(tmp_path / "c", provider.clock)
    provider.hold_mail("u@customer.example")
    _, outcome = call_in(provider, customer, starttls=True)
    assert isinstance(outcome.value, CallInFailed) and "offers no STARTTLS" in str(outcome.value)


def test_factory_without_turnaround_still_refuses_turn(tmp_path):
    """A listener built without a turn-around answers TURN 502 as before."""
    from test_protocol import Harness

    proto, t = Harness(tmp_path).connect()
    t.clear()
    proto.dataReceived(b"TURN\r\n")
    assert t.value() == b"502 5.5.1 TURN not available\r\n"


# ---------------------------------------------------------------- ETRN


@pytest.fixture
def etrn_provider(tmp_path):
    """A provider whose relay agent is a recorder, with a route for customer.example only."""
    relay = RelayRecorder()
    provider = Provider(tmp_path / "p", relay_agent=relay, routed=["customer.example"])
    return provider, relay


def test_etrn_for_a_held_domain_with_a_route(etrn_provider):
    """ETRN customer.example: the held mail goes to the relay agent (the
    route), 253 with the count; it is no longer held; the release ends."""
    provider, relay = etrn_provider
    provider.hold_mail("u@customer.example")
    provider.hold_mail("v@customer.example", "w@other.example")
    out = talk(provider.smtp, b"EHLO c.test\r\nETRN customer.example\r\n")
    assert "253 2.0.0 OK, 2 pending messages for node customer.example started" in out
    assert sorted(r.address for m in relay.messages for r in m.envelope.recipients) == [
        "u@customer.example", "v@customer.example"]
    (left,) = provider.held()
    assert [r.address for r in left.envelope.recipients if r.state is RecipientState.PENDING] == ["w@other.example"]
    assert not provider.hold.releasing("hold.customer")


def test_etrn_for_a_held_domain_without_route_is_458(etrn_provider):
    """ETRN other.example (held, no route): 458, and call in with ATRN/TURN instead."""
    provider, relay = etrn_provider
    provider.hold_mail("w@other.example")
    out = talk(provider.smtp, b"EHLO c.test\r\nETRN other.example\r\n")
    assert "458 4.4.0 Unable to queue messages for node other.example: no route" in out
    assert relay.messages == [] and len(provider.held()) == 1


def test_etrn_replies(etrn_provider):
    """251 when nothing waits, 253 for the relay queue of a domain, @domain
    for subdomains, #queue by name, 459 for a local domain or too broad a
    node, 458 for an unknown queue, 501 for a bad name."""
    provider, relay = etrn_provider
    provider.hold_mail("z@far.test")
    provider.hold_mail("y@a.far.test")
    out = talk(provider.smtp, b"EHLO c.test\r\nETRN nothing.test\r\nETRN far.test\r\nETRN @far.test\r\n"
                              b"ETRN #relay\r\nETRN provider.test\r\nETRN @test\r\nETRN #nope\r\nETRN bad_name\r\n"
                              b"ETRN #hold.customer\r\n")
    replies = [line for line in out.split("\r\n") if line[:3].isdigit() and line[3:4] == " "][2:]  # after 220, EHLO
    # #relay finds nothing left: the first two ETRNs delivered both relay messages.
    assert [r[:3] for r in replies] == ["251", "253", "253", "251", "459", "459", "458", "501", "251"]
    assert "OK, no messages waiting for node nothing.test" in replies[0]
    assert "459 4.7.1 Node provider.test not allowed: its mail is delivered here" in replies[4]
    assert len(relay.messages) >= 2


# ---------------------------------------------------------------- hold agent and runner


def test_agents_provide_the_interface(tmp_path):
    """HoldAgent and ReversedSessionAgent are IDeliveryAgents."""
    assert verifyObject(IDeliveryAgent, HoldAgent([CUSTOMER]))
    assert verifyObject(IDeliveryAgent, ReversedSessionAgent(object(), object(), "[x]"))


def _message(*addresses, hop="hold.customer") -> QueuedMessage:
    return QueuedMessage(hop=hop, id="m1", envelope=Envelope("s@far.test", tuple(Recipient(a) for a in addresses)))


def test_hold_agent_defers_until_released():
    """Unreleased recipients get 4.4.1 "held for customer until it calls in";
    released ones go to the lent agent; after ``end`` they are held again."""
    agent = HoldAgent([CUSTOMER])
    results = []
    agent.deliver(_message("u@customer.example")).addCallback(results.append)
    error = results[0]["u@customer.example"]
    assert isinstance(error, TemporaryDeliveryError)
    assert str(error) == "4.4.1 held for customer until it calls in (TURN/ATRN/ETRN)"
    relay = RelayRecorder()
    release = agent.release("hold.customer", ["Customer.Example"], relay)
    agent.deliver(_message("u@customer.example", "v@other.example")).addCallback(results.append)
    assert results[1]["u@customer.example"] is None
    assert isinstance(results[1]["v@other.example"], TemporaryDeliveryError)
    assert [r.address for r in relay.messages[0].envelope.recipients] == ["u@customer.example"]
    agent.end(release)
    agent.deliver(_message("u@customer.example")).addCallback(results.append)
    assert isinstance(results[2]["u@customer.example"], TemporaryDeliveryError)


def test_runner_leaves_held_mail_alone_until_too_old(tmp_path):
    """On-demand hops are not tried on arrival or by scans (no attempt, no
    log line); once older than give_up_after a scan hands the message to
    the hold agent, whose deferral makes the runner give up (4.4.7)."""
    provider = Provider(tmp_path / "p", schedule=RetrySchedule(first=10, maximum=10, give_up_after=500))
    message_id = provider.hold_mail("u@customer.example")
    for message in provider.spool.queued():
        provider.runner.submit(message)
    provider.clock.advance(60)
    provider.clock.advance(60)
    (held,) = provider.held()
    assert held.id == message_id and held.envelope.recipients[0].attempts == 0
    for _ in range(10):
        provider.clock.advance(60)
    assert provider.held() == []  # failed for good: given up (a bounce when a reporter is set)


def test_runner_flush_keys_and_idle(tmp_path):
    """``flush(predicate, keys)`` notes what it started; ``idle(keys)`` fires once all of it is done."""
    provider = Provider(tmp_path / "p")
    provider.hold_mail("u@customer.example")
    lent = defer.Deferred()

    class Slow:
        def deliver(self, message):
            return lent

    release = provider.hold.release("hold.customer", ["customer.example"], Slow())
    keys = set()
    counts = []
    provider.runner.flush(lambda m: m.hop == "hold.customer", keys).addCallback(counts.append)
    assert counts == [1] and len(keys) == 1
    idle = provider.runner.idle(keys)
    assert not idle.called
    lent.callback({"u@customer.example": None})
    assert idle.called and provider.held() == []
    provider.hold.end(release)
    assert provider.runner.idle(keys).called


def test_reversed_session_agent_one_message_at_a_time(tmp_path):
    """The reversed connection carries one transaction at a time: the second
    message waits for the first to finish."""
    provider = Provider(tmp_path / "p")
    provider.hold_mail("u@customer.example")
    provider.hold_mail("v@customer.example")
    sends = []

    class Client:
        extensions = {}

        def send(self, transaction, body):
            d = defer.Deferred()
            sends.append((transaction, d))
            return d

    agent = ReversedSessionAgent(Client(), provider.spool, "[192.0.2.1]")
    one, two = provider.held()
    d1, d2 = agent.deliver(one), agent.deliver(two)
    assert len(sends) == 1
    from mailsvc.clientresults import SendResult
    from mailsvc.smtp.replies import Reply

    ok = Reply.of(250, "2.0.0", "ok")
    sends[0][1].callback(SendResult(recipients={"u@customer.example": ok}, reply=ok, accepted=("u@customer.example",)))
    assert d1.called and len(sends) == 2
    assert sends[0][0].size > 0 and sends[1][0].recipients[0][0] == "v@customer.example"
    sends[1][1].callback(SendResult(recipients={"v@customer.example": Reply.of(450, "4.2.1", "busy")}))
    results = []
    d2.addCallback(results.append)
    assert str(results[0]["v@customer.example"]).startswith("4.2.1 host [192.0.2.1] said: 450")
    assert agent.delivered == 1 and agent.kept == 1


@pytest.mark.parametrize(
    "body, need",
    [
        (b"Subject: plain\r\n\r\nGr\xc3\xbc\xc3\x9fe in the body only\r\n", ""),
        (b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nhi\r\n", "its header section is not ASCII"),
    ],
)
def test_smtputf8_held_mail_needs_it_only_with_utf8_headers(tmp_path, body, need):
    """As the relay decides it (rfc6531 3.4): a held message that came with
    SMTPUTF8 needs it only if its header section is not ASCII; the body is
    then sent from its first octet."""
    provider = Provider(tmp_path / "p")
    provider.hold_mail("u@customer.example", body=body, parameters=(("SMTPUTF8", ""),))
    sent = []

    class Client:
        extensions = {}

        def send(self, transaction, source):
            sent.append((transaction, source.read()))
            return defer.Deferred()

    [message] = provider.held()
    ReversedSessionAgent(Client(), provider.spool, "[192.0.2.1]").deliver(message)
    [(transaction, data)] = sent
    assert transaction.smtputf8_need == need
    assert data.endswith(body)


def test_clock_is_only_a_parameter():
    """The turn-around module takes its clock; it imports no reactor."""
    import mailsvc.callin
    import mailsvc.turnaround

    for module in (mailsvc.turnaround, mailsvc.callin):
        assert "reactor" not in module.__dict__
    assert task.Clock  # the tests above ran on a task.Clock


def test_shutdown_drops_reversed_sessions_and_keeps_the_mail(tmp_path):
    """Stopping the server drops a reversed connection at once; what the
    customer had not acknowledged stays held."""
    provider = Provider(tmp_path / "p")
    policy = HangSecond()
    customer = Customer(tmp_path / "c", provider.clock, policies=(policy,))
    provider.hold_mail("u@customer.example")
    provider.hold_mail("u@customer.example")
    call = customer.call()
    pump = connect(provider.odmr, call, provider.clock)
    run(pump)
    assert len(provider.turnaround.sessions) == 1 and len(customer.received) == 1
    provider.turnaround.shutdown()
    run(pump)
    policy.pending.callback(Verdict.defer("gone"))
    assert not provider.turnaround.sessions
    assert len(provider.held()) == 1


def test_mailsvc_turn_command_line_errors(tmp_path):
    """Bad use of `mailsvc turn` is status 64: a missing password file, --domains with --turn."""
    from mailsvc import callin

    config = str(Path(__file__).resolve().parent.parent / "etc" / "mailsvc.toml")
    assert callin.main(["127.0.0.1:1", "--user", "u", "--password-file", str(tmp_path / "none"),
                        "--config", config]) == 64
    password = tmp_path / "pw"
    password.write_text("x\n")
    assert callin.main(["127.0.0.1:1", "--turn", "--domains", "a.example", "--user", "u",
                        "--password-file", str(password), "--config", config]) == 64
    assert callin.main(["--user"]) == 64

"""TURN, ATRN, ETRN and AUTH PLAIN in the pure machines: tables of bytes in,
events and bytes out, and a client and a server machine reversing roles in
memory."""

from __future__ import annotations

import base64

import pytest

from mailsvc.smtp import client_events as cev
from mailsvc.smtp import events as ev
from mailsvc.smtp.client import ClientConnection, ClientSettings, State as ClientState
from mailsvc.smtp.client_events import Transaction
from mailsvc.smtp.replies import Reply
from mailsvc.smtp.server import ServerConnection, ServerSettings, State
from smtp_driver import Driver, codes

ODMR = ServerSettings("provider.test", odmr=True, auth_mechanisms=("PLAIN", "CRAM-MD5"), starttls=True,
                      challenge_auth_without_tls=True)
OK235 = Reply.of(235, "2.7.0", "Authentication successful")


def odmr_driver(answers=None) -> Driver:
    """An ODMR server machine whose AUTH always succeeds."""
    return Driver(ODMR, answers={ev.Auth: OK235, **(answers or {})})


# ---------------------------------------------------------------- server: TURN


def test_turn_accepted_turns_and_keeps_trailing_bytes():
    """250 to TURN enters TURNED: nothing after it is parsed; the bytes are
    handed on as trailing_data (h11's switched-protocol state)."""
    d = Driver()
    d.conn.data_to_send()
    d.conn.receive_data(b"EHLO c.test\r\nTURN\r\n220 customer ready\r\n")
    turns = []
    while (event := d.conn.next_event()) is not None:
        d.events.append(event)
        if isinstance(event, ev.Turn):
            turns.append(event)
            d.conn.accept()
        elif event.needs_reply:
            d.conn.accept()
    assert turns and d.conn.turned and d.conn.state is State.TURNED
    assert d.conn.data_to_send().decode().endswith("250 2.0.0 OK now reversing the connection\r\n")
    assert d.conn.trailing_data == b"220 customer ready\r\n"
    d.conn.receive_data(b"250 more\r\n")
    assert d.conn.next_event() is None
    assert d.conn.trailing_data == b"220 customer ready\r\n250 more\r\n"


def test_turn_refused_keeps_the_session():
    """A 502 to TURN (rfc821 4.3) leaves the session as it was."""
    d = Driver()
    d.conn.data_to_send()
    out = d.feed(b"EHLO c.test\r\nTURN\r\nNOOP\r\n")
    assert codes(out) == ["250", "502", "250"]
    assert not d.conn.turned and d.conn.trailing_data == b""


def test_turn_with_a_positive_reply_turns():
    """reply(250 ...) to TURN turns just as accept() does."""
    d = Driver(answers={ev.Turn: Reply.of(250, "2.0.0", "go ahead")})
    d.conn.data_to_send()
    out = d.feed(b"EHLO c.test\r\nTURN\r\nQUIT\r\n")
    assert codes(out) == ["250", "250"] and d.conn.turned
    assert d.conn.trailing_data == b"QUIT\r\n"


@pytest.mark.parametrize(("lines", "expected"), [
    (b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nTURN\r\n", "503 5.5.1 TURN is not allowed during a mail transaction"),
    (b"EHLO c.test\r\nTURN now\r\n", "501 5.5.4 TURN takes no argument"),
])
def test_turn_sequence_and_syntax(lines, expected):
    """TURN mid-transaction is 503 (rfc821 4.3's error code); with an argument 501."""
    d = Driver(answers={ev.Turn: None})
    d.conn.data_to_send()
    assert d.feed(lines).rstrip("\r\n").endswith(expected)
    assert not d.of(ev.Turn)


# ---------------------------------------------------------------- server: ATRN, ODMR


def test_odmr_ehlo_offers_atrn_and_challenge_auth_before_tls():
    """rfc2645 5.1.1: EHLO lists ATRN and AUTH; before TLS only mechanisms
    that never send the password (CRAM-MD5), PLAIN waits for TLS (538)."""
    d = odmr_driver()
    d.conn.data_to_send()
    out = d.feed(b"EHLO c.test\r\n")
    assert "250-ATRN\r\n" in out and "250-AUTH CRAM-MD5\r\n" in out and "STARTTLS" in out
    assert d.feed(b"AUTH PLAIN AGEAYg==\r\n").startswith("538 5.7.11")
    assert d.feed(b"AUTH CRAM-MD5\r\n").startswith("235")


def test_atrn_before_auth_is_530():
    """rfc2645 5.2.1: ATRN "MUST be rejected" with 530 before AUTH."""
    d = odmr_driver()
    d.conn.data_to_send()
    out = d.feed(b"EHLO c.test\r\nATRN customer.example\r\n")
    assert codes(out) == ["250", "530"] and "530 5.7.0 Authentication required" in out
    assert not d.of(ev.Atrn)


def test_atrn_domains_are_parsed():
    """ATRN's comma list becomes lower-case domains, duplicates dropped; none
    means all the customer's; a bad name is 501."""
    d = odmr_driver({ev.Atrn: Reply.of(453, "4.2.0", "You have no mail")})
    d.conn.data_to_send()
    out = d.feed(b"EHLO c.test\r\nAUTH CRAM-MD5\r\nATRN Customer.Example,other.example,customer.example\r\n"
                 b"ATRN\r\nATRN bad_domain\r\nATRN a.test,,b.test\r\n")
    assert codes(out) == ["250", "235", "453", "453", "501", "501"]
    assert [e.domains for e in d.of(ev.Atrn)] == [("customer.example", "other.example"), ()]


def test_atrn_accepted_turns():
    """250 to ATRN reverses the roles like TURN (rfc2645 5.3)."""
    d = odmr_driver()
    d.answers.pop(ev.Turn, None)
    d.conn.data_to_send()
    d.conn.receive_data(b"EHLO c.test\r\nAUTH CRAM-MD5\r\nATRN customer.example\r\n220 x\r\n")
    while (event := d.conn.next_event()) is not None:
        if isinstance(event, ev.Auth):
            d.conn.reply(OK235)
        elif event.needs_reply:
            d.conn.accept()
    assert d.conn.turned and d.conn.trailing_data == b"220 x\r\n"


def test_odmr_refuses_other_commands_with_502():
    """rfc2645 5.4: MAIL, VRFY, TURN... get 502 on the ODMR listener."""
    d = odmr_driver()
    d.conn.data_to_send()
    out = d.feed(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nVRFY x\r\nTURN\r\nETRN x.test\r\nNOOP\r\n")
    assert codes(out) == ["250", "502", "502", "502", "502", "250"]
    assert "not available on the On-Demand Mail Relay service" in out


def test_atrn_elsewhere_is_not_implemented():
    """Without ``odmr`` ATRN stays 502, and EHLO does not list it."""
    d = Driver()
    d.conn.data_to_send()
    out = d.feed(b"EHLO c.test\r\nATRN x.test\r\n")
    assert "ATRN" not in out.split("\r\n")[0:-2][-1] and codes(out) == ["250", "502"]


# ---------------------------------------------------------------- server: ETRN


def test_etrn_offered_and_parsed():
    """rfc1985: EHLO lists ETRN; ETRN node, @node, #queue become decisions;
    no node is 501; inside a transaction 503; before HELO 503."""
    d = Driver(ServerSettings("mx.test", etrn=True), answers={ev.Etrn: Reply.of(251, "2.0.0", "OK, none")})
    d.conn.data_to_send()
    assert d.feed(b"ETRN x.test\r\n").startswith("503")
    out = d.feed(b"EHLO c.test\r\nETRN Site.Example\r\nETRN @site.example\r\nETRN #relay\r\nETRN\r\nETRN @\r\n")
    assert "250-ETRN\r\n" in out
    assert codes(out) == ["250", "251", "251", "251", "501", "501"]
    assert [(e.option, e.node) for e in d.of(ev.Etrn)] == [("", "Site.Example"), ("@", "site.example"), ("#", "relay")]
    assert codes(d.feed(b"MAIL FROM:<a@b.test>\r\nETRN x.test\r\n")) == ["250", "503"]


def test_etrn_not_offered_is_502():
    """Without ``etrn`` ETRN is not implemented (502)."""
    d = Driver()
    d.conn.data_to_send()
    out = d.feed(b"EHLO c.test\r\nETRN x.test\r\n")
    assert "ETRN" not in out.split("502")[0] and codes(out) == ["250", "502"]


# ---------------------------------------------------------------- client: AUTH PLAIN, TURN, ATRN


def ready_client(extensions: bytes = b"250-AUTH PLAIN LOGIN\r\n250 ATRN\r\n") -> ClientConnection:
    """A client machine after greeting and EHLO."""
    client = ClientConnection(ClientSettings("customer.example"))
    client.receive_data(b"220 provider ready\r\n")
    assert client.next_event() is None
    client.data_to_send()
    client.receive_data(b"250-provider greets you\r\n" + extensions)
    assert isinstance(client.next_event(), cev.Ready)
    return client


def test_auth_plain_sends_an_initial_response():
    """rfc4616 2 / rfc4954 4: AUTH PLAIN base64(authzid NUL authcid NUL passwd); 235 → AuthSucceeded."""
    client = ready_client()
    client.auth_plain("custuser", "pw")
    line = client.data_to_send()
    assert line == b"AUTH PLAIN " + base64.b64encode(b"\0custuser\0pw") + b"\r\n"
    client.receive_data(b"235 2.7.0 ok\r\n")
    assert isinstance(client.next_event(), cev.AuthSucceeded) and client.state is ClientState.READY


@pytest.mark.parametrize("reply", [b"535 5.7.8 bad credentials\r\n", b"538 5.7.11 encryption required\r\n",
                                   b"454 4.7.0 try later\r\n"])
def test_auth_plain_refused(reply):
    """A refused AUTH is an AuthFailed with the reply; the machine is ready again."""
    client = ready_client()
    client.auth_plain("custuser", "pw")
    client.receive_data(reply)
    event = client.next_event()
    assert isinstance(event, cev.AuthFailed) and event.reply.code == int(reply[:3])
    assert client.state is ClientState.READY


def test_auth_plain_challenge_is_cancelled():
    """A 334 after an initial response is cancelled with ``*`` (rfc4954 4); the 501 ends it."""
    client = ready_client()
    client.auth_plain("custuser", "pw")
    client.data_to_send()
    client.receive_data(b"334 \r\n")
    assert client.next_event() is None and client.data_to_send() == b"*\r\n"
    client.receive_data(b"501 5.7.0 cancelled\r\n")
    assert isinstance(client.next_event(), cev.AuthFailed)


def test_auth_plain_needs_the_mechanism_and_a_password():
    """PLAIN must be offered; user and password must be given and hold no NUL."""
    with pytest.raises(RuntimeError):
        ready_client(b"250 AUTH CRAM-MD5\r\n").auth_plain("u", "p")
    with pytest.raises(ValueError):
        ready_client().auth_plain("u", "")
    with pytest.raises(ValueError):
        ready_client().auth_plain("u\0v", "p")


def test_client_turn_and_trailing_data():
    """TURN, 250 → Turned; what the peer sent after the 250 is trailing_data."""
    client = ready_client()
    client.turn()
    assert client.data_to_send() == b"TURN\r\n"
    assert client.timeout_phase == "data-end"  # rfc2645 5.2.1: at least 10 minutes
    client.receive_data(b"250 2.0.0 OK now reversing\r\nEHLO early.test\r\n")
    assert isinstance(client.next_event(), cev.Turned)
    assert client.next_event() is None and client.state is ClientState.TURNED
    assert client.trailing_data == b"EHLO early.test\r\n"


def test_client_atrn_refused_then_quit():
    """ATRN d1,d2 on the wire; 453 is a TurnRefused and the session goes on."""
    client = ready_client()
    client.atrn(["customer.example", "other.example"])
    assert client.data_to_send() == b"ATRN customer.example,other.example\r\n"
    client.receive_data(b"453 4.2.0 You have no mail\r\n")
    event = client.next_event()
    assert isinstance(event, cev.TurnRefused) and event.reply.code == 453
    client.quit()
    assert client.data_to_send() == b"QUIT\r\n"
    with pytest.raises(ValueError):
        ready_client().atrn(["a.test,b.test"])


# ---------------------------------------------------------------- both machines, reversed


def shuttle(client: ClientConnection, server: ServerConnection, answer) -> list:
    """Move bytes between the two machines until quiet; ``answer(event)`` answers server decisions."""
    events = []
    moving = True
    while moving:
        moving = False
        out = server.data_to_send()
        if out:
            client.receive_data(out)
            moving = True
        while (event := client.next_event()) is not None:
            events.append(event)
        out = client.data_to_send()
        if out:
            server.receive_data(out)
            moving = True
        while (event := server.next_event()) is not None:
            if event.needs_reply:
                answer(event)
    return events


def test_machines_reverse_roles_in_memory():
    """Customer client ↔ provider server: EHLO, AUTH PLAIN, ATRN, 250. Then the
    provider runs a client machine and the customer a server machine over
    the same byte stream, trailing bytes included, and a message goes across."""
    provider = ServerConnection(ServerSettings("provider.test", odmr=True, auth_mechanisms=("PLAIN",),
                                               auth_without_tls=True))
    provider.start()
    customer = ClientConnection(ClientSettings("customer.example"))

    def provider_answers(event):
        if isinstance(event, ev.Auth):
            provider.reply(OK235)
        else:
            provider.accept()

    events = shuttle(customer, provider, provider_answers)
    assert isinstance(events[-1], cev.Ready)
    customer.auth_plain("custuser", "pw")
    assert isinstance(shuttle(customer, provider, provider_answers)[-1], cev.AuthSucceeded)
    customer.atrn(["customer.example"])
    assert isinstance(shuttle(customer, provider, provider_answers)[-1], cev.Turned)
    assert provider.turned and customer.state is ClientState.TURNED

    # Reversed: the customer serves, the provider sends.
    customer_server = ServerConnection(ServerSettings("customer.example"))
    provider_client = ClientConnection(ClientSettings("provider.test"))
    provider_client.receive_data(provider.trailing_data)
    customer_server.receive_data(customer.trailing_data)
    customer_server.start()
    received = []

    def customer_answers(event):
        if isinstance(event, ev.DataEnd):
            customer_server.reply(Reply.of(250, "2.0.0", "queued"))
        else:
            customer_server.accept()

    original_next = customer_server.next_event

    def next_event():
        event = original_next()
        if isinstance(event, ev.DataChunk):
            received.append(event.data)
        return event

    customer_server.next_event = next_event
    assert isinstance(shuttle(provider_client, customer_server, customer_answers)[-1], cev.Ready)
    provider_client.send_message(Transaction("s@far.test", ["u@customer.example"]))
    events = shuttle(provider_client, customer_server, customer_answers)
    assert isinstance(events[-1], cev.StartData)
    provider_client.send_data(b"Subject: held\r\n\r\nhi\r\n")
    provider_client.end_data()
    events = shuttle(provider_client, customer_server, customer_answers)
    assert isinstance(events[-1], cev.MessageResult) and events[-1].reply.code == 250
    assert b"".join(received) == b"Subject: held\r\n\r\nhi\r\n"
    provider_client.quit()
    assert isinstance(shuttle(provider_client, customer_server, customer_answers)[-1], cev.Closed)
    assert customer_server.closed

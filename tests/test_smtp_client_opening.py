"""The pure client machine's newer paths: BDAT framing (rfc3030), AUTH PLAIN
and LOGIN exchanges (rfc4954, rfc4616), and the STARTTLS-then-AUTH opening
(``mailsvc.clientprotocol.SessionOpener``, pure logic over the machine).
Tables of server bytes in, client bytes and events out; no sockets."""

from __future__ import annotations

import base64

import pytest

from mailsvc.clientsession import OPEN, WAIT, OpeningFailed, SessionOpener, SessionSecurity
from mailsvc.smtp import client_events as ev
from mailsvc.smtp.client import NO_RECIPIENTS, ClientConnection, ClientSettings, State, Transaction
from test_smtp_client import GREETING, OK, feed, tx

CHUNKING = b"250-mx.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-8BITMIME\r\n250 SIZE 100000\r\n"
CHUNKING_ONLY = b"250-mx.test\r\n250-CHUNKING\r\n250 8BITMIME\r\n"


def ready(ehlo: bytes, **settings) -> ClientConnection:
    """A client past the greeting and ``ehlo``, its output drained."""
    conn = ClientConnection(ClientSettings("client.test", **settings))
    events = feed(conn, GREETING + ehlo)
    assert isinstance(events[-1], ev.Ready)
    conn.data_to_send()
    return conn


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


# ------------------------------------------------------------ BDAT


def test_bdat_pipelined_framing_without_dot_stuffing():
    """rfc3030 2: no DATA, no 354; each chunk is "BDAT n" and exactly n octets,
    unstuffed; the last one carries LAST; under PIPELINING the chunks do not
    wait for their replies (rfc3030 2, example 4.2)."""
    conn = ready(CHUNKING)
    conn.send_message(tx("bob@b.test", size=17))
    assert conn.data_to_send() == b"MAIL FROM:<alice@a.test> SIZE=17\r\nRCPT TO:<bob@b.test>\r\n"
    events = feed(conn, OK + OK)
    assert isinstance(events[-1], ev.StartData) and events[-1].reply is None
    assert conn.chunking and conn.data_wanted and conn.timeout_phase == "data-block"
    conn.send_data(b"Subject: x\r\n\r\n")
    assert conn.data_to_send() == b""  # held back, to go with LAST if it is the last
    conn.send_data(b".hi\r\n")
    assert conn.data_to_send() == b"BDAT 14\r\nSubject: x\r\n\r\n"
    assert conn.data_wanted  # PIPELINING: the next chunk need not wait
    conn.send_data(b"..\r\n")
    conn.end_data()
    assert conn.data_to_send() == b"BDAT 5\r\n.hi\r\nBDAT 4 LAST\r\n..\r\n"
    assert conn.state is State.DATA_END and conn.timeout_phase == "data-block"
    assert feed(conn, b"250 2.0.0 14 octets\r\n250 2.0.0 5 octets\r\n") == []
    assert conn.timeout_phase == "data-end"
    (result,) = feed(conn, b"250 2.0.0 queued as X\r\n")
    assert isinstance(result, ev.MessageResult) and result.reply.code == 250 and result.recipients == ("bob@b.test",)
    conn.send_message(tx())
    assert conn.data_to_send().startswith(b"MAIL FROM:")  # a finished BDAT transaction needs no RSET


def test_bdat_without_pipelining_waits_for_each_chunk():
    """rfc3030 2: without PIPELINING each chunk waits for the reply to the
    one before; ``data_wanted`` says when, and sending early is a caller error."""
    conn = ready(CHUNKING_ONLY)
    conn.send_message(tx())
    assert conn.data_to_send() == b"MAIL FROM:<alice@a.test>\r\n"
    feed(conn, OK)
    assert conn.data_to_send() == b"RCPT TO:<bob@b.test>\r\n"
    (_, start) = feed(conn, OK)
    assert isinstance(start, ev.StartData)
    conn.send_data(b"a" * 10)
    conn.send_data(b"b" * 10)
    assert conn.data_to_send() == b"BDAT 10\r\n" + b"a" * 10
    assert not conn.data_wanted
    with pytest.raises(RuntimeError):
        conn.send_data(b"c")
    with pytest.raises(RuntimeError):
        conn.end_data()
    assert feed(conn, b"250 2.0.0 ok\r\n") == [] and conn.data_wanted
    conn.end_data()
    # The data did not end with CRLF: one is added, as DATA would (rfc5321 4.1.1.4).
    assert conn.data_to_send() == b"BDAT 12 LAST\r\n" + b"b" * 10 + b"\r\n"
    (result,) = feed(conn, OK)
    assert isinstance(result, ev.MessageResult) and result.reply.code == 250


@pytest.mark.parametrize(
    ("chunks", "wire"),
    [
        ([], b"BDAT 0 LAST\r\n"),  # an empty message
        ([b"x\r\n"], b"BDAT 3 LAST\r\nx\r\n"),  # one chunk: LAST at once
        ([b"x\r", b"\n"], b"BDAT 2\r\nx\rBDAT 1 LAST\r\n\n"),  # a CRLF cut in two gets no second CRLF
        ([b"x"], b"BDAT 3 LAST\r\nx\r\n"),
    ],
)
def test_bdat_last_chunk(chunks, wire):
    """The last chunk carries LAST; CRLF is added only when the data does not end with one."""
    conn = ready(CHUNKING)
    conn.send_message(tx())
    feed(conn, OK + OK)
    conn.data_to_send()
    for chunk in chunks:
        conn.send_data(chunk)
    conn.end_data()
    assert conn.data_to_send() == wire


def test_refused_chunk_ends_the_transaction_and_rset_follows():
    """rfc3030 2: a 4xx/5xx to a chunk fails the transaction; no more chunks
    go; the chunks already pipelined are answered too; then the outcome is
    the first refusal, and the next transaction starts with RSET."""
    conn = ready(CHUNKING)
    conn.send_message(tx("bob@b.test", "carol@b.test"))
    feed(conn, OK + OK + OK)
    conn.data_to_send()
    for chunk in (b"1\r\n", b"2\r\n", b"3\r\n"):
        conn.send_data(chunk)
    assert conn.data_to_send() == b"BDAT 3\r\n1\r\nBDAT 3\r\n2\r\n"
    assert feed(conn, b"552 5.3.4 too big\r\n") == []
    assert conn.state is State.DATA_END and not conn.data_wanted
    with pytest.raises(RuntimeError):
        conn.send_data(b"4")
    (result,) = feed(conn, b"503 5.5.1 no transaction\r\n")
    assert isinstance(result, ev.MessageResult)
    assert result.reply.code == 552 and result.recipients == ("bob@b.test", "carol@b.test")
    assert conn.state is State.READY
    conn.send_message(tx())
    assert conn.data_to_send().startswith(b"RSET\r\nMAIL FROM:")


def test_refused_last_chunk_is_the_outcome_and_rset_follows():
    """A 5xx to BDAT LAST is the message's result; RSET before the next MAIL."""
    conn = ready(CHUNKING)
    conn.send_message(tx())
    feed(conn, OK + OK)
    conn.send_data(b"x\r\n")
    conn.end_data()
    (result,) = feed(conn, b"554 5.7.1 spam\r\n")
    assert isinstance(result, ev.MessageResult) and result.reply.code == 554
    conn.data_to_send()
    conn.send_message(tx())
    assert conn.data_to_send().startswith(b"RSET\r\n")


@pytest.mark.parametrize("ehlo", [CHUNKING, CHUNKING_ONLY])
def test_bdat_no_recipient_sends_no_chunk(ehlo):
    """With BDAT and every RCPT refused, nothing of the body goes; the
    transaction ends with "no recipient", and RSET comes first next time."""
    conn = ready(ehlo)
    conn.send_message(tx())
    events = feed(conn, OK)
    events += feed(conn, b"550 5.1.1 no such user\r\n")
    assert [type(e) for e in events] == [ev.RecipientResult, ev.MessageResult]
    assert events[-1].reply == NO_RECIPIENTS and conn.state is State.READY
    assert b"BDAT" not in conn.data_to_send()
    conn.send_message(tx())
    assert conn.data_to_send().startswith(b"RSET\r\n")


def test_bdat_mail_refused_pipelined_is_transaction_failed():
    """MAIL refused under PIPELINING: the RCPT replies mean nothing; TransactionFailed."""
    conn = ready(CHUNKING)
    conn.send_message(tx())
    events = feed(conn, b"451 4.3.0 try later\r\n503 5.5.1 no MAIL\r\n")
    assert [type(e) for e in events] == [ev.TransactionFailed] and events[0].reply.code == 451


def test_chunking_can_be_turned_off():
    """ClientSettings(chunking=False): DATA and dot-stuffing even to a CHUNKING peer."""
    conn = ready(CHUNKING, chunking=False)
    conn.send_message(tx())
    assert conn.data_to_send().endswith(b"DATA\r\n")
    feed(conn, OK + OK + b"354 go\r\n")
    conn.send_data(b".x\r\n")
    conn.end_data()
    assert conn.data_to_send() == b"..x\r\n.\r\n"


# ------------------------------------------------------------ AUTH


def test_auth_login_answers_each_challenge_in_turn():
    """AUTH LOGIN: the user name answers the first 334, the password the
    second, whatever their text says; 235 → AuthSucceeded."""
    conn = ready(b"250-mx.test\r\n250 AUTH LOGIN\r\n")
    conn.auth_login("us", "pässword")
    assert conn.data_to_send() == b"AUTH LOGIN\r\n" and conn.state is State.AUTH
    assert feed(conn, b"334 VXNlcm5hbWU6\r\n") == []
    assert conn.data_to_send() == b64("us") + b"\r\n"
    assert feed(conn, b"334 anything\r\n") == []
    assert conn.data_to_send() == b64("pässword") + b"\r\n"
    (event,) = feed(conn, b"235 2.7.0 Authentication successful\r\n")
    assert isinstance(event, ev.AuthSucceeded) and conn.state is State.READY


def test_auth_login_third_challenge_is_cancelled():
    """A third 334 is out of step: "*" cancels (rfc4954 4), and the 501 is AuthFailed."""
    conn = ready(b"250-mx.test\r\n250 AUTH LOGIN\r\n")
    conn.auth_login("us", "pw")
    conn.data_to_send()
    feed(conn, b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n334 again\r\n")
    assert conn.data_to_send().endswith(b"*\r\n")
    (event,) = feed(conn, b"501 5.7.0 cancelled\r\n")
    assert isinstance(event, ev.AuthFailed) and conn.state is State.READY


@pytest.mark.parametrize("method", ["auth_plain", "auth_login"])
def test_auth_refused_is_auth_failed(method):
    """535 5.7.8 to AUTH PLAIN (with its initial response, rfc4616) or LOGIN: AuthFailed, still READY."""
    conn = ready(b"250-mx.test\r\n250 AUTH PLAIN LOGIN\r\n")
    getattr(conn, method)("us", "pw")
    sent = conn.data_to_send()
    if method == "auth_plain":
        assert sent == b"AUTH PLAIN " + base64.b64encode(b"\0us\0pw") + b"\r\n"
    else:
        feed(conn, b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n")
    (event,) = feed(conn, b"535 5.7.8 Authentication credentials invalid\r\n")
    assert isinstance(event, ev.AuthFailed) and event.reply.enhanced == "5.7.8"


def test_auth_methods_refuse_what_is_not_offered():
    """AUTH LOGIN when only PLAIN is offered, or bad fields, are caller errors."""
    conn = ready(b"250-mx.test\r\n250 AUTH PLAIN\r\n")
    with pytest.raises(RuntimeError):
        conn.auth_login("us", "pw")
    with pytest.raises(ValueError):
        ready(b"250-mx.test\r\n250 AUTH LOGIN\r\n").auth_login("us", "p\r\nw")


# ------------------------------------------------------------ the opening


class Opening:
    """A machine and a ``SessionOpener``; ``start_tls`` only records."""

    def __init__(self, **security) -> None:
        self.machine = ClientConnection(ClientSettings("client.test"))
        self.tls_calls: list = []
        security.setdefault("tls_options", "OPTIONS" if security.get("tls", "none") != "none" else None)
        self.opener = SessionOpener(self.machine, SessionSecurity(**security), self.tls_calls.append)

    def feed(self, data: bytes) -> list[str]:
        """Feed server bytes; the opener's verdict on each opening event."""
        steps = []
        self.machine.receive_data(data)
        while (event := self.machine.next_event()) is not None:  # one at a time, as the glue does
            if isinstance(event, SessionOpener.OPENING_EVENTS):
                steps.append(self.opener.handle(event))
        return steps


EHLO_TLS = b"250-mx.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
EHLO_AFTER_TLS = b"250-mx.test\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN\r\n"


def test_opening_starttls_then_auth_plain():
    """rfc3207 then rfc4954: EHLO, STARTTLS, 220, the transport switches,
    EHLO again (everything before forgotten, rfc3207 4.2), AUTH PLAIN, 235: open."""
    o = Opening(tls="required", username="us", password="pw")
    assert o.feed(GREETING + EHLO_TLS) == [WAIT]
    assert o.machine.data_to_send() == b"EHLO client.test\r\nSTARTTLS\r\n"
    # Bytes after the 220 (a man in the middle's) are dropped with the switch.
    assert o.feed(b"220 2.0.0 go\r\n250 AUTH PLAIN\r\n") == [WAIT]
    assert o.tls_calls == ["OPTIONS"] and o.machine.tls_active
    assert o.machine.data_to_send() == b"EHLO client.test\r\n"
    assert o.feed(EHLO_AFTER_TLS) == [WAIT]
    assert o.machine.data_to_send() == b"AUTH PLAIN " + base64.b64encode(b"\0us\0pw") + b"\r\n"
    assert o.feed(b"235 2.7.0 ok\r\n") == [OPEN]
    assert o.opener.authenticated and o.opener.mechanism == "PLAIN"


def test_opening_uses_login_when_plain_is_not_offered():
    """Only LOGIN offered after TLS: the LOGIN dialogue."""
    o = Opening(tls="opportunistic", username="us", password="pw")
    o.feed(GREETING + EHLO_TLS + b"220 go\r\n")
    o.machine.data_to_send()
    assert o.feed(b"250-mx.test\r\n250 AUTH LOGIN CRAM-MD5\r\n") == [WAIT]
    assert o.machine.data_to_send() == b"AUTH LOGIN\r\n"
    o.feed(b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n")
    assert o.feed(b"235 2.7.0 ok\r\n") == [OPEN] and o.opener.mechanism == "LOGIN"


@pytest.mark.parametrize(
    ("security", "server", "kind"),
    [
        ({"tls": "required"}, GREETING + b"250-mx.test\r\n250 PIPELINING\r\n", "no-starttls"),
        ({"tls": "required"}, GREETING + EHLO_TLS + b"454 4.7.0 TLS not available\r\n", "starttls-refused"),
        ({"tls": "opportunistic", "username": "us", "password": "pw"},
         GREETING + b"250-mx.test\r\n250 AUTH PLAIN\r\n", "auth-needs-tls"),
        ({"tls": "opportunistic", "username": "us", "password": "pw"},
         GREETING + EHLO_TLS + b"454 4.7.0 TLS not available\r\n", "auth-needs-tls"),
        ({"tls": "required", "username": "us", "password": "pw"},
         [GREETING + EHLO_TLS + b"220 go\r\n", b"250-mx.test\r\n250 AUTH CRAM-MD5\r\n"], "no-auth"),
        ({"tls": "none", "username": "us", "password": "pw", "auth_without_tls": True},
         GREETING + b"250 mx.test\r\n", "no-auth"),
    ],
)
def test_opening_failures(security, server, kind):
    """What the opening refuses: TLS required but not offered or refused;
    a password without TLS; AUTH without PLAIN or LOGIN."""
    o = Opening(**security)
    with pytest.raises(OpeningFailed) as raised:
        for data in [server] if isinstance(server, bytes) else server:
            o.feed(data)
    assert raised.value.kind == kind
    assert raised.value.tls == (kind != "no-auth")
    assert b"AUTH" not in o.machine.data_to_send()


def test_opening_auth_refused_carries_the_reply():
    """535 to AUTH: OpeningFailed("auth-refused") with the peer's reply."""
    o = Opening(tls="none", username="us", password="pw", auth_without_tls=True)
    assert o.feed(GREETING + b"250-mx.test\r\n250 AUTH PLAIN\r\n") == [WAIT]  # in clear: said explicitly
    with pytest.raises(OpeningFailed) as raised:
        o.feed(b"535 5.7.8 Authentication credentials invalid\r\n")
    assert raised.value.kind == "auth-refused" and raised.value.reply.code == 535
    assert "AUTH PLAIN as us refused: 535 5.7.8" in raised.value.reason


def test_opening_opportunistic_goes_on_in_clear():
    """Opportunistic: not offered, or refused, the session is open without TLS;
    "none" never says STARTTLS even when offered."""
    assert Opening(tls="opportunistic").feed(GREETING + b"250 mx.test\r\n") == [OPEN]
    o = Opening(tls="opportunistic")
    assert o.feed(GREETING + EHLO_TLS + b"454 4.7.0 not now\r\n") == [WAIT, OPEN]
    o = Opening(tls="none")
    assert o.feed(GREETING + EHLO_TLS) == [OPEN]
    assert b"STARTTLS" not in o.machine.data_to_send()


def test_session_security_checks_itself():
    """A policy that cannot work is refused when made."""
    with pytest.raises(ValueError):
        SessionSecurity(tls="maybe")
    with pytest.raises(ValueError):
        SessionSecurity(tls="required")  # no TLS options
    with pytest.raises(ValueError):
        SessionSecurity(username="us")  # no password
    assert SessionSecurity(tls="opportunistic", tls_options=object()).without_tls().tls == "none"


def test_transaction_after_opening_is_unchanged():
    """After STARTTLS and AUTH, a message goes as usual."""
    o = Opening(tls="required", username="us", password="pw")
    o.feed(GREETING + EHLO_TLS + b"220 go\r\n")  # what follows the 220 comes over TLS
    o.feed(EHLO_AFTER_TLS)
    assert o.feed(b"235 2.7.0 ok\r\n") == [OPEN]
    o.machine.data_to_send()
    o.machine.send_message(Transaction("alice@a.test", ["bob@b.test"]))
    assert o.machine.data_to_send() == b"MAIL FROM:<alice@a.test>\r\nRCPT TO:<bob@b.test>\r\nDATA\r\n"

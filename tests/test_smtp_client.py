"""The pure client machine and its reply parser: tables of server bytes in,
client bytes and events out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from mailsvc.smtp import client_events as ev
from mailsvc.smtp.client import NO_RECIPIENTS, ClientConnection, ClientSettings, State, Transaction
from mailsvc.smtp.replies import Reply
from mailsvc.smtp.reply_parser import MAX_REPLY_LINE, MAX_REPLY_LINES, MalformedReply, ReplyParser

GREETING = b"220 mx.test ESMTP\r\n"
EHLO_FULL = (
    b"250-mx.test greets client.test\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 1000\r\n"
    b"250-8BITMIME\r\n"
    b"250-DSN\r\n"
    b"250-SMTPUTF8\r\n"
    b"250-STARTTLS\r\n"
    b"250 ENHANCEDSTATUSCODES\r\n"
)
EHLO_PLAIN = b"250-mx.test\r\n250 ENHANCEDSTATUSCODES\r\n"
OK = b"250 2.0.0 Ok\r\n"
GO = b"354 go ahead\r\n"


def feed(conn: ClientConnection, data: bytes) -> list[ev.ClientEvent]:
    """Give ``data`` to ``conn``; return every event it yields."""
    conn.receive_data(data)
    events = []
    while (event := conn.next_event()) is not None:
        events.append(event)
    return events


def ready(ehlo: bytes = EHLO_FULL, **settings) -> ClientConnection:
    """A client past the greeting and EHLO, its output drained."""
    conn = ClientConnection(ClientSettings("client.test", **settings))
    events = feed(conn, GREETING + ehlo)
    assert isinstance(events[-1], ev.Ready)
    conn.data_to_send()
    return conn


def tx(*recipients, **kwargs) -> Transaction:
    """A transaction from alice@a.test to ``recipients`` (bob@b.test by default)."""
    return Transaction("alice@a.test", list(recipients or ["bob@b.test"]), **kwargs)


# ------------------------------------------------------------ greeting, EHLO


def test_greeting_then_ehlo():
    """rfc5321 3.2: nothing is sent before the 220; then EHLO with our name."""
    conn = ClientConnection(ClientSettings("client.test"))
    assert conn.data_to_send() == b"" and conn.timeout_phase == "greeting"
    assert feed(conn, b"220 mx.test ESM") == []
    assert feed(conn, b"TP\r\n") == []
    assert conn.data_to_send() == b"EHLO client.test\r\n"
    assert conn.timeout_phase == "mail"
    (event,) = feed(conn, EHLO_FULL)
    assert event == ev.Ready(event.extensions, True, event.reply)
    assert conn.extensions["SIZE"] == "1000" and conn.max_size == 1000
    assert conn.state is State.READY and conn.timeout_phase is None


@pytest.mark.parametrize("refusal", [b"554 5.7.1 go away\r\n", b"450 busy\r\n", b"521 no mail here\r\n"])
def test_refused_greeting_waits_for_quit(refusal):
    """rfc5321 3.1: after a 554 (or other refusal) greeting only QUIT is sent."""
    conn = ClientConnection(ClientSettings("client.test"))
    (event,) = feed(conn, refusal)
    assert isinstance(event, ev.GreetingRefused) and conn.state is State.REFUSED
    assert conn.data_to_send() == b""
    with pytest.raises(RuntimeError):
        conn.send_message(tx())
    conn.quit()
    assert conn.data_to_send() == b"QUIT\r\n"
    (event,) = feed(conn, b"221 bye\r\n")
    assert isinstance(event, ev.Closed) and conn.closed


def test_421_greeting_closes():
    """A 421 greeting is a refusal after which the server hangs up."""
    conn = ClientConnection(ClientSettings("client.test"))
    (event,) = feed(conn, b"421 4.3.2 shutting down\r\n")
    assert event == ev.GreetingRefused(Reply.of(421, "4.3.2", "shutting down"))
    assert conn.closed and conn.data_to_send() == b""


@pytest.mark.parametrize("code", [b"500", b"502", b"504", b"550"])
def test_ehlo_refused_falls_back_to_helo(code):
    """rfc5321 3.2: EHLO refused with 5xx: HELO, then plain SMTP, no extensions."""
    conn = ClientConnection(ClientSettings("client.test"))
    feed(conn, GREETING)
    assert conn.data_to_send() == b"EHLO client.test\r\n"
    assert feed(conn, code + b" what?\r\n") == []
    assert conn.data_to_send() == b"HELO client.test\r\n"
    (event,) = feed(conn, b"250 mx.test\r\n")
    assert event == ev.Ready({}, False, Reply.of(250, "", "mx.test"))
    assert conn.extensions == {} and not conn.extended


def test_plain_smtp_sends_no_parameters_one_command_at_a_time():
    """After HELO: no SIZE, no pipelining, no parameters at all."""
    conn = ClientConnection(ClientSettings("client.test"))
    feed(conn, GREETING + b"502 no\r\n250 mx.test\r\n")
    conn.data_to_send()
    conn.send_message(tx(mail_params={"RET": "HDRS"}, size=10))
    assert conn.data_to_send() == b"MAIL FROM:<alice@a.test>\r\n"


@pytest.mark.parametrize(
    "replies, kind, state",
    [
        (b"451 4.3.0 later\r\n", ev.HelloRefused, State.REFUSED),
        (b"500 no\r\n550 5.7.1 not you\r\n", ev.HelloRefused, State.REFUSED),
        (b"421 4.3.2 bye\r\n", ev.ConnectionFailed, State.CLOSED),
        (b"354 what\r\n", ev.ConnectionFailed, State.CLOSED),
    ],
)
def test_hello_failures(replies, kind, state):
    """EHLO 4xx or EHLO and HELO 5xx: HelloRefused (quit only); 421 or a 3xx: closed."""
    conn = ClientConnection(ClientSettings("client.test"))
    events = feed(conn, GREETING + replies)
    assert isinstance(events[-1], kind) and conn.state is state


@pytest.mark.parametrize(
    "lines, expected",
    [
        ([b"mx"], {}),
        ([b"mx", b"SIZE 35882577", b"pipelining"], {"SIZE": "35882577", "PIPELINING": ""}),
        ([b"mx", b"AUTH PLAIN LOGIN", b"AUTH=LOGIN"], {"AUTH": "PLAIN LOGIN"}),
        ([b"mx", b"-bad", b"", b"8BITMIME"], {"8BITMIME": ""}),
        ([b"mx", b"SIZE", b"SIZE 10"], {"SIZE": ""}),
        ([b"mx", b"X-EXP  a  b "], {"X-EXP": "a  b"}),
    ],
)
def test_ehlo_keywords(lines, expected):
    """rfc5321 4.1.1.1: keywords upper-cased, parameters kept; junk lines skipped."""
    reply = b"".join(b"250-" + line + b"\r\n" for line in lines[:-1]) + b"250 " + lines[-1] + b"\r\n"
    conn = ClientConnection(ClientSettings("client.test"))
    (event,) = feed(conn, GREETING + reply)
    assert event.extensions == expected == conn.extensions


@pytest.mark.parametrize("size, limit", [("", 0), ("0", 0), ("x", 0), ("52428800", 52428800)])
def test_size_limit(size, limit):
    """rfc1870 4: "SIZE" alone or "SIZE 0" means no fixed limit."""
    conn = ready(b"250-mx\r\n250 SIZE " + size.encode() + b"\r\n")
    assert conn.max_size == limit


# ------------------------------------------------------------ MAIL parameters


@pytest.mark.parametrize(
    "transaction, mail_line",
    [
        (tx(), b"MAIL FROM:<alice@a.test>"),
        (tx(size=123), b"MAIL FROM:<alice@a.test> SIZE=123"),
        (tx(size=1000), b"MAIL FROM:<alice@a.test> SIZE=1000"),
        (tx(body_8bit=True), b"MAIL FROM:<alice@a.test> BODY=8BITMIME"),
        (tx(size=5, body_8bit=True), b"MAIL FROM:<alice@a.test> SIZE=5 BODY=8BITMIME"),
        (tx(mail_params={"ret": "HDRS", "ENVID": "QQ+2B"}), b"MAIL FROM:<alice@a.test> RET=HDRS ENVID=QQ+2B"),
        (tx(mail_params={"MT-PRIORITY": "3"}), b"MAIL FROM:<alice@a.test>"),
        (tx(mail_params={"SMTPUTF8": None}), b"MAIL FROM:<alice@a.test> SMTPUTF8"),
        (tx(mail_params={"SMTPUTF8": None}, ascii_headers=True), b"MAIL FROM:<alice@a.test> SMTPUTF8"),
        (Transaction("", ["bob@b.test"]), b"MAIL FROM:<>"),
        (Transaction("j\u00f6rg@b\u00fccher.test", ["bob@b.test"]), "MAIL FROM:<j\u00f6rg@b\u00fccher.test> SMTPUTF8".encode()),
    ],
)
def test_mail_parameters_follow_the_offer(transaction, mail_line):
    """SIZE/BODY/DSN/SMTPUTF8 are sent when offered; unknown extensions' parameters are dropped."""
    conn = ready()
    conn.send_message(transaction)
    assert conn.data_to_send().split(b"\r\n")[0] == mail_line


def test_dsn_parameters_only_with_dsn():
    """rfc3461 4: NOTIFY/ORCPT/RET/ENVID go out only to a server offering DSN."""
    transaction = tx(("bob@b.test", {"NOTIFY": "FAILURE", "ORCPT": "rfc822;bob@b.test"}), mail_params={"RET": "FULL"})
    with_dsn = ready()
    with_dsn.send_message(transaction)
    assert with_dsn.data_to_send() == (
        b"MAIL FROM:<alice@a.test> RET=FULL\r\nRCPT TO:<bob@b.test> NOTIFY=FAILURE ORCPT=rfc822;bob@b.test\r\nDATA\r\n"
    )
    without = ready(b"250-mx\r\n250 PIPELINING\r\n")
    without.send_message(transaction)
    assert without.data_to_send() == b"MAIL FROM:<alice@a.test>\r\nRCPT TO:<bob@b.test>\r\nDATA\r\n"


@pytest.mark.parametrize(
    "ehlo, transaction, code, enhanced",
    [
        (EHLO_FULL, tx(size=1001), 552, "5.3.4"),
        (b"250-mx\r\n250 PIPELINING\r\n", tx(body_8bit=True), 554, "5.6.3"),
        (b"250-mx\r\n250 8BITMIME\r\n", Transaction("alice@a.test", ["j\u00f6rg@b.test"]), 553, "5.6.7"),
        (b"250-mx\r\n250 8BITMIME\r\n", tx(mail_params={"SMTPUTF8": None}), 553, "5.6.7"),
    ],
)
def test_messages_the_server_cannot_take_are_refused_without_sending(ehlo, transaction, code, enhanced):
    """rfc1870 6.2, rfc6152 3, rfc6531 3.5: a synthetic failure, nothing written, still ready."""
    conn = ready(ehlo)
    conn.send_message(transaction)
    assert conn.data_to_send() == b""
    (event,) = feed(conn, b"")
    assert isinstance(event, ev.TransactionFailed) and event.synthetic
    assert (event.reply.code, event.reply.enhanced) == (code, enhanced)
    assert conn.state is State.READY


@pytest.mark.parametrize(
    "transaction, mail_line",
    [
        (tx(mail_params={"SMTPUTF8": None}, ascii_headers=True), b"MAIL FROM:<alice@a.test>"),
        (tx(mail_params={"SMTPUTF8": None, "RET": "HDRS"}, ascii_headers=True), b"MAIL FROM:<alice@a.test>"),
        (tx(mail_params={"SMTPUTF8": None}, ascii_headers=True, body_8bit=True), b"MAIL FROM:<alice@a.test> BODY=8BITMIME"),
    ],
)
def test_smtputf8_not_needed_is_left_out_for_a_server_without_it(transaction, mail_line):
    """rfc6531 3.4: SMTPUTF8 asked for, but the header section is ASCII
    (``ascii_headers``) and so is the envelope: the message goes to a server
    without SMTPUTF8, MAIL without the parameter."""
    conn = ready(b"250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
    conn.send_message(transaction)
    assert conn.data_to_send().split(b"\r\n")[0] == mail_line


@pytest.mark.parametrize(
    "transaction, why",
    [
        (tx(mail_params={"SMTPUTF8": None}), "its header section is not ASCII"),
        (tx("j\u00f6rg@b.test", mail_params={"SMTPUTF8": None}, ascii_headers=True), "a recipient address is not ASCII"),
        (Transaction("j\u00f6rg@a.test", ["bob@b.test"], ascii_headers=True), "the sender address is not ASCII"),
    ],
)
def test_smtputf8_needed_is_refused_saying_why(transaction, why):
    """rfc6531 3.2, 3.5: a message that needs SMTPUTF8 goes to no server without
    it: 553 5.6.7 from the machine itself, with the reason."""
    conn = ready(b"250-mx\r\n250 8BITMIME\r\n")
    conn.send_message(transaction)
    assert conn.data_to_send() == b""
    (event,) = feed(conn, b"")
    assert isinstance(event, ev.TransactionFailed) and event.synthetic
    assert str(event.reply) == f"553 5.6.7 The server does not offer SMTPUTF8, which the message needs: {why}"


def test_utf8_recipient_goes_raw_with_smtputf8():
    """rfc6531 3.2: to a server offering SMTPUTF8 the addresses go in UTF-8, as given."""
    conn = ready()
    conn.send_message(tx("j\u00f6rg@b\u00fccher.test", ascii_headers=True))
    assert conn.data_to_send().split(b"\r\n")[:2] == [
        b"MAIL FROM:<alice@a.test> SMTPUTF8",
        "RCPT TO:<j\u00f6rg@b\u00fccher.test>".encode("utf-8"),
    ]


def test_size_is_not_sent_without_the_extension():
    """rfc1870: no SIZE keyword, no SIZE parameter and no local limit."""
    conn = ready(b"250-mx\r\n250 PIPELINING\r\n")
    conn.send_message(tx(size=10**9))
    assert conn.data_to_send().startswith(b"MAIL FROM:<alice@a.test>\r\n")


# ------------------------------------------------------------ pipelining


def test_pipelined_batch_is_one_write():
    """rfc2920 3.1: MAIL, every RCPT and DATA in one group; replies matched in order."""
    conn = ready()
    conn.send_message(tx("bob@b.test", "carol@c.test", "dave@d.test", size=100))
    assert conn.data_to_send() == (
        b"MAIL FROM:<alice@a.test> SIZE=100\r\n"
        b"RCPT TO:<bob@b.test>\r\n"
        b"RCPT TO:<carol@c.test>\r\n"
        b"RCPT TO:<dave@d.test>\r\n"
        b"DATA\r\n"
    )
    assert conn.timeout_phase == "mail"
    events = feed(conn, OK + b"250 2.1.5 ok\r\n")
    assert events == [ev.RecipientResult("bob@b.test", Reply.of(250, "2.1.5", "ok"))]
    assert conn.timeout_phase == "rcpt"
    events = feed(conn, b"550 5.1.1 no such user\r\n450 4.2.1 try later\r\n")
    assert [e.accepted for e in events] == [False, False]
    assert conn.timeout_phase == "data-init"
    (event,) = feed(conn, GO)
    assert isinstance(event, ev.StartData) and conn.timeout_phase == "data-block"
    assert conn.data_to_send() == b""


def test_without_pipelining_one_command_at_a_time():
    """No PIPELINING: each command waits for the previous reply."""
    conn = ready(b"250-mx\r\n250 SIZE\r\n")
    conn.send_message(tx("bob@b.test", "carol@c.test"))
    assert conn.data_to_send() == b"MAIL FROM:<alice@a.test>\r\n"
    assert feed(conn, OK) == [] and conn.data_to_send() == b"RCPT TO:<bob@b.test>\r\n"
    feed(conn, OK)
    assert conn.data_to_send() == b"RCPT TO:<carol@c.test>\r\n"
    feed(conn, b"550 no\r\n")
    assert conn.data_to_send() == b"DATA\r\n"


def test_pipelining_can_be_turned_off():
    """ClientSettings(pipelining=False) ignores the offer."""
    conn = ready(pipelining=False)
    conn.send_message(tx())
    assert conn.data_to_send() == b"MAIL FROM:<alice@a.test>\r\n"


# ------------------------------------------------------------ outcomes


def whole_message(conn: ClientConnection, final: bytes = b"250 2.0.0 queued\r\n") -> list[ev.ClientEvent]:
    """Send one pipelined message to bob and return every event."""
    conn.send_message(tx())
    conn.data_to_send()
    events = feed(conn, OK + OK + GO)
    conn.send_data(b"Subject: hi\r\n\r\n.dot\r\n")
    conn.end_data()
    assert conn.data_to_send() == b"Subject: hi\r\n\r\n..dot\r\n.\r\n"
    assert conn.timeout_phase == "data-end"
    return events + feed(conn, final)


@pytest.mark.parametrize("final", [b"250 2.0.0 queued\r\n", b"451 4.3.0 disk\r\n", b"552 5.3.4 too big\r\n"])
def test_end_of_data_reply_applies_to_accepted_recipients(final):
    """rfc5321 4.1.1.4: one reply after the data, for every accepted recipient."""
    conn = ready()
    events = whole_message(conn, final)
    assert events[-1] == ev.MessageResult(events[-1].reply, ("bob@b.test",))
    assert events[-1].reply.code == int(final[:3])
    assert conn.state is State.READY
    conn.send_message(tx())
    assert conn.data_to_send().startswith(b"MAIL FROM:")  # no RSET after a finished transaction


def test_recipient_results_and_partial_acceptance():
    """4xx and 5xx per recipient; the message result names only the accepted ones."""
    conn = ready()
    conn.send_message(tx("a@x.test", "b@x.test", "c@x.test"))
    conn.data_to_send()
    events = feed(conn, OK + b"452 4.5.3 too many\r\n250 ok\r\n551 5.1.6 moved\r\n" + GO)
    assert [(e.address, e.reply.code) for e in events[:3]] == [("a@x.test", 452), ("b@x.test", 250), ("c@x.test", 551)]
    conn.end_data()
    assert conn.data_to_send() == b".\r\n"  # an empty message
    (result,) = feed(conn, OK)
    assert result.recipients == ("b@x.test",)


def test_data_refused_then_rset_before_next_message():
    """rfc2920 3.1: DATA properly rejected: the next transaction starts with RSET."""
    conn = ready()
    conn.send_message(tx())
    conn.data_to_send()
    events = feed(conn, OK + OK + b"451 4.3.0 not now\r\n")
    assert events[-1] == ev.MessageResult(Reply.of(451, "4.3.0", "not now"), ("bob@b.test",))
    conn.send_message(tx())
    assert conn.data_to_send().startswith(b"RSET\r\nMAIL FROM:<alice@a.test>\r\n")
    events = feed(conn, OK + OK + OK + GO)
    assert isinstance(events[-1], ev.StartData)


def test_no_recipient_pipelined_data_refused():
    """Every RCPT refused; the pipelined DATA gets 554: no data, result for nobody."""
    conn = ready()
    conn.send_message(tx())
    conn.data_to_send()
    events = feed(conn, OK + b"550 5.1.1 unknown\r\n554 5.5.1 No valid recipients\r\n")
    assert events[-1] == ev.MessageResult(Reply.of(554, "5.5.1", "No valid recipients"), ())
    assert conn.data_to_send() == b""


def test_no_recipient_but_data_accepted_sends_a_single_dot():
    """rfc2920 3.1: DATA accepted with no valid recipient: "send a single dot"."""
    conn = ready()
    conn.send_message(tx())
    conn.data_to_send()
    assert feed(conn, OK + b"550 5.1.1 unknown\r\n")[-1].accepted is False
    assert feed(conn, GO) == []
    assert conn.data_to_send() == b".\r\n" and conn.timeout_phase == "data-end"
    (event,) = feed(conn, b"554 5.5.1 nothing to do\r\n")
    assert event == ev.MessageResult(NO_RECIPIENTS, ())
    conn.send_message(tx())
    assert conn.data_to_send().startswith(b"MAIL FROM:")  # the dot ended the server's transaction


def test_no_recipient_without_pipelining_sends_no_data():
    """Without pipelining DATA is never sent when no RCPT succeeded; RSET comes next."""
    conn = ready(b"250-mx\r\n250 8BITMIME\r\n")
    conn.send_message(tx())
    conn.data_to_send()
    feed(conn, OK)
    conn.data_to_send()
    events = feed(conn, b"550 5.1.1 unknown\r\n")
    assert events[-1] == ev.MessageResult(NO_RECIPIENTS, ())
    assert conn.data_to_send() == b""
    conn.send_message(tx())
    assert conn.data_to_send() == b"RSET\r\n"
    feed(conn, OK)
    assert conn.data_to_send() == b"MAIL FROM:<alice@a.test>\r\n"


def test_mail_refused_without_pipelining():
    """MAIL refused: TransactionFailed, no RCPT sent, no RSET needed next time."""
    conn = ready(b"250-mx\r\n250 8BITMIME\r\n")
    conn.send_message(tx())
    conn.data_to_send()
    (event,) = feed(conn, b"553 5.1.8 bad sender\r\n")
    assert event == ev.TransactionFailed(Reply.of(553, "5.1.8", "bad sender"))
    assert conn.data_to_send() == b""
    conn.send_message(tx())
    assert conn.data_to_send() == b"MAIL FROM:<alice@a.test>\r\n"


@pytest.mark.parametrize(
    "data_reply, client_sends",
    [(b"503 5.5.1 need MAIL\r\n", b""), (GO, b".\r\n")],
)
def test_mail_refused_with_pipelining(data_reply, client_sends):
    """rfc2920 3.1: every status is checked; RCPT replies after a refused MAIL are
    not recipient results; a 354 anyway gets the single dot."""
    conn = ready()
    conn.send_message(tx("bob@b.test", "carol@c.test"))
    conn.data_to_send()
    events = feed(conn, b"452 4.3.1 full\r\n503 5.5.1 x\r\n503 5.5.1 x\r\n" + data_reply)
    assert conn.data_to_send() == client_sends
    if client_sends:
        assert events == []
        events = feed(conn, OK)
    assert events == [ev.TransactionFailed(Reply.of(452, "4.3.1", "full"))]
    assert conn.state is State.READY


# ------------------------------------------------------------ failures


@pytest.mark.parametrize("after", [b"", OK, OK + OK, OK + OK + GO])
def test_421_at_any_point_closes(after):
    """rfc5321 3.8: 421 answers any command and the session is over."""
    conn = ready()
    conn.send_message(tx())
    conn.data_to_send()
    events = feed(conn, after + b"421 4.4.2 timeout\r\n250 junk\r\n")
    assert events[-1] == ev.ConnectionFailed(Reply.of(421, "4.4.2", "timeout"))
    assert conn.closed and conn.timeout_phase is None
    assert feed(conn, OK) == [] and conn.data_to_send() == b""
    with pytest.raises(RuntimeError):
        conn.send_data(b"x")


@pytest.mark.parametrize(
    "replies, kind",
    [
        (b"421 4.3.2 shutting down\r\n", ev.ConnectionFailed),
        (b"250 hello?\r\n", ev.ProtocolError),
    ],
)
def test_reply_when_none_is_due(replies, kind):
    """An unsolicited 421 is the server leaving; anything else is out of step."""
    conn = ready()
    (event,) = feed(conn, replies)
    assert isinstance(event, kind) and conn.closed


@pytest.mark.parametrize(
    "replies",
    [
        OK + OK + b"250 2.0.0 not 354\r\n",  # DATA must be 354 or a failure
        OK + b"354 what\r\n",  # RCPT never 354
        b"354 what\r\n",  # MAIL never 354
    ],
)
def test_impossible_reply_codes_fail_the_connection(replies):
    """rfc5321 4.3.2: a reply the command cannot have: ConnectionFailed, closed."""
    conn = ready()
    conn.send_message(tx())
    events = feed(conn, replies)
    assert isinstance(events[-1], ev.ConnectionFailed) and conn.closed


def test_failed_rset_fails_the_connection():
    """RSET only ever succeeds (rfc5321 4.3.2)."""
    conn = ready()
    conn.send_message(tx())
    feed(conn, OK + OK + b"451 no\r\n")
    conn.send_message(tx())
    events = feed(conn, b"500 what\r\n")
    assert isinstance(events[-1], ev.ConnectionFailed)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"hello\r\n", "reply code"),
        (b"25\r\n", "reply code"),
        (b"250x\r\n", "reply code"),
        (b"2500 ok\r\n", "reply code"),
        (b"600 ok\r\n", "reply code"),
        (b"199 ok\r\n", "reply code"),
        (b"260 ok\r\n", "reply code"),
        (b"250 ok\n250 ok\r\n", "bare CR or LF"),
        (b"250 o\rk\r\n", "bare CR or LF"),
        (b"250-ok\r\n251 ok\r\n", "different codes"),
        (b"250 " + b"x" * 600 + b"\r\n", "too long"),
        (b"250 " + b"x" * 600, "too long"),
        (b"250-x\r\n" * MAX_REPLY_LINES + b"250 x\r\n", "lines"),
    ],
)
def test_malformed_replies_are_protocol_errors(data, reason):
    """Malformed server output: a ProtocolError event, the machine closed, no exception."""
    conn = ready()
    conn.send_message(tx())
    events = feed(conn, data)
    assert isinstance(events[-1], ev.ProtocolError) and reason in events[-1].reason
    assert conn.closed


# ------------------------------------------------------------ STARTTLS, QUIT


def test_starttls_forgets_everything_and_says_ehlo_again():
    """rfc3207 4.2: after 220 nothing more is read in clear; after the handshake
    buffered input is dropped, extensions forgotten, EHLO sent again."""
    conn = ready()
    conn.start_tls()
    assert conn.data_to_send() == b"STARTTLS\r\n"
    # A man in the middle appends a reply after the 220 (CVE-2011-0411 style).
    (event,) = feed(conn, b"220 2.0.0 go ahead\r\n250-injected\r\n250 AUTH PLAIN\r\n")
    assert isinstance(event, ev.TLSReady) and conn.state is State.TLS_HANDSHAKE
    assert feed(conn, b"") == []
    conn.tls_started()
    assert conn.tls_active and conn.extensions == {}
    assert conn.data_to_send() == b"EHLO client.test\r\n"
    (event,) = feed(conn, b"250-mx.test\r\n250 AUTH PLAIN\r\n")
    assert event.extensions == {"AUTH": "PLAIN"}
    with pytest.raises(RuntimeError):
        conn.start_tls()  # rfc3207 4.2: never twice


def test_starttls_refused_and_not_offered():
    """454 to STARTTLS: TLSRefused and the session goes on; not offered: caller error."""
    conn = ready()
    conn.start_tls()
    (event,) = feed(conn, b"454 4.7.0 TLS not available\r\n")
    assert isinstance(event, ev.TLSRefused) and conn.state is State.READY
    with pytest.raises(RuntimeError):
        ready(b"250-mx\r\n250 PIPELINING\r\n").start_tls()


def test_implicit_tls_setting():
    """ClientSettings(tls=True): the transport is TLS already; STARTTLS is refused locally."""
    conn = ready(tls=True)
    assert conn.tls_active
    with pytest.raises(RuntimeError):
        conn.start_tls()


@pytest.mark.parametrize("reply", [b"221 2.0.0 bye\r\n", b"500 what\r\n"])
def test_quit(reply):
    """rfc5321 4.1.1.10: QUIT, then Closed on whatever reply comes."""
    conn = ready()
    conn.quit()
    assert conn.data_to_send() == b"QUIT\r\n" and conn.timeout_phase == "mail"
    (event,) = feed(conn, reply)
    assert isinstance(event, ev.Closed) and conn.closed


# ------------------------------------------------------------ caller errors


def test_calls_in_the_wrong_state_raise():
    """Caller misuse is an exception (h11 style), not an event."""
    conn = ClientConnection(ClientSettings("client.test"))
    for call in (lambda: conn.send_message(tx()), conn.quit, conn.end_data, conn.tls_started):
        with pytest.raises(RuntimeError):
            call()
    conn = ready()
    with pytest.raises(RuntimeError):
        conn.send_data(b"too early")
    conn.send_message(tx())
    with pytest.raises(RuntimeError):
        conn.send_message(tx())


@pytest.mark.parametrize(
    "make",
    [
        lambda: Transaction("a@b.test\r\nRCPT TO:<x@y.test>", ["c@d.test"]),
        lambda: Transaction("a@b.test", ["c@d.test> NOTIFY=NEVER"]),
        lambda: Transaction("a@b.test", []),
        lambda: Transaction("a@b.test", ["nodomain"]),
        lambda: Transaction("a@b.test", [("c@d.test", {"NOTIFY": "A B"})]),
        lambda: Transaction("a@b.test", [("c@d.test", {"BAD KEY": None})]),
        lambda: Transaction("a@b.test", ["c@d.test"], mail_params={"SIZE": "10"}),
        lambda: Transaction("a@b.test", ["c@d.test"], size=-1),
        lambda: ClientSettings("two words"),
        lambda: ClientSettings("bad\r\nname"),
    ],
)
def test_malformed_envelopes_are_refused(make):
    """Transaction and ClientSettings validate themselves: no command injection."""
    with pytest.raises(ValueError):
        make()


def test_postmaster_recipient_is_allowed():
    """rfc5321 4.1.1.3: <Postmaster> without a domain is a valid recipient."""
    assert Transaction("", ["Postmaster"]).recipients == (("Postmaster", {}),)


# ------------------------------------------------------------ reply parser


def parse(data: bytes) -> list:
    """Every reply (or error) the parser finds in ``data``."""
    parser = ReplyParser()
    parser.feed(data)
    found = []
    while (item := parser.next_reply()) is not None:
        found.append(item)
    return found


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"250 2.1.5 ok\r\n", Reply(250, "2.1.5", ("ok",))),
        (b"250 2.1.5\r\n", Reply(250, "2.1.5", ("",))),
        (b"250\r\n", Reply(250, "", ("",))),
        (b"250 \r\n", Reply(250, "", ("",))),
        (b"550 4.1.1 class disagrees\r\n", Reply(550, "", ("4.1.1 class disagrees",))),
        (b"250 2.1.50ok\r\n", Reply(250, "", ("2.1.50ok",))),
        (b"250 2.1.5000 x\r\n", Reply(250, "", ("2.1.5000 x",))),
        (b"354 2.0.0 go\r\n", Reply(354, "", ("2.0.0 go",))),
        (b"550-5.1.1 no\r\n550-5.1.1 such\r\n550 5.1.1 user\r\n", Reply(550, "5.1.1", ("no", "such", "user"))),
        (b"550-5.1.1 no\r\n550 just text\r\n", Reply(550, "5.1.1", ("no", "just text"))),
        (b"220-mx\r\n220-\r\n220\r\n", Reply(220, "", ("mx", "", ""))),
        (b"250 caf\xc3\xa9 \xff\r\n", Reply(250, "", ("caf\u00e9 \ufffd",))),
    ],
)
def test_reply_parsing(data, expected):
    """rfc5321 4.2 and rfc2034 3: codes, multi-line, enhanced codes taken out of every line."""
    assert parse(data) == [expected]


def test_reply_line_of_512_octets_is_fine():
    """rfc5321 4.5.3.1.5: 512 octets with CRLF is the limit, not an error."""
    line = b"250 " + b"x" * (MAX_REPLY_LINE - 6) + b"\r\n"
    assert len(line) == MAX_REPLY_LINE
    assert parse(line)[0].lines == ("x" * (MAX_REPLY_LINE - 6),)
    assert isinstance(parse(line[:-2] + b"y\r\n")[0], MalformedReply)


def test_over_long_line_is_found_before_its_end():
    """A reply line that never ends is an error once it passes the limit: memory stays bounded."""
    parser = ReplyParser()
    parser.feed(b"250 " + b"x" * (MAX_REPLY_LINE - 7) + b"\r")
    assert parser.next_reply() is None
    parser.feed(b"x")
    assert isinstance(parser.next_reply(), MalformedReply)
    parser.feed(b"250 ok\r\n")
    assert parser.next_reply() is None and parser.buffered == 0


def test_hundred_line_reply_is_the_limit():
    """MAX_REPLY_LINES lines are accepted, one more is an error."""
    body = b"250-x\r\n" * (MAX_REPLY_LINES - 1) + b"250 x\r\n"
    assert len(parse(body)[0].lines) == MAX_REPLY_LINES


def test_ehlo_split_at_every_byte_gives_the_same_events():
    """Multi-line replies cut at every possible point come out the same."""
    wire = GREETING + EHLO_FULL
    conn = ClientConnection(ClientSettings("client.test"))
    whole = feed(conn, wire)
    for cut in range(len(wire) + 1):
        conn = ClientConnection(ClientSettings("client.test"))
        assert feed(conn, wire[:cut]) + feed(conn, wire[cut:]) == whole
    conn = ClientConnection(ClientSettings("client.test"))
    assert [e for i in range(len(wire)) for e in feed(conn, wire[i : i + 1])] == whole


_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.rstrip)
_replies = st.builds(
    lambda code, enhanced, lines: Reply(code, enhanced if enhanced[:1] == str(code)[0] else "", tuple(lines)),
    st.integers(200, 559).filter(lambda c: c % 100 < 60),
    st.sampled_from(["", "2.0.0", "4.3.1", "5.1.1", "5.7.255"]),
    st.lists(_text.filter(lambda t: not t[:1].isdigit()), min_size=1, max_size=5),
)


@settings(max_examples=200)
@given(st.lists(_replies, min_size=1, max_size=6), st.lists(st.integers(0, 2000), max_size=10))
def test_replies_round_trip_under_any_chunking(replies, cuts):
    """bytes(Reply) parsed back, cut anywhere, gives the same Replies in order."""
    wire = b"".join(bytes(r) for r in replies)
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    parser, found = ReplyParser(), []
    for start, end in zip(points, points[1:]):
        parser.feed(wire[start:end])
        while (item := parser.next_reply()) is not None:
            found.append(item)
    assert found == replies


@settings(max_examples=200)
@given(st.binary(max_size=300), st.integers(1, 40))
def test_any_server_output_never_raises(noise, write_size):
    """Fuzz: arbitrary bytes at any point give events, never an exception."""
    conn = ready()
    conn.send_message(tx("bob@b.test", "carol@c.test"))
    for start in range(0, len(noise), write_size):
        feed(conn, noise[start : start + write_size])
        conn.data_to_send()
        if conn.state is State.DATA:
            conn.send_data(b"x\r\n")
            conn.end_data()

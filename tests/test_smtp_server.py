"""The pure server machine: every command, reply code, sequence rule and limit."""

from __future__ import annotations

import pytest

from mailsvc.smtp import events as ev
from mailsvc.smtp.replies import Reply
from mailsvc.smtp.server import MAX_COMMAND_LINE, ServerSettings
from smtp_driver import READY, Driver, codes, session


def test_greeting_names_the_host_without_an_enhanced_code():
    """rfc5321 4.3.1 / rfc2034 3: 220 <host>, no status code on the greeting."""
    d = Driver(greet=False)
    d.conn.start()
    assert d.conn.data_to_send() == b"220 mx.test ESMTP mailsvc\r\n"


def test_ehlo_lists_the_extensions():
    """EHLO answers multi-line with PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES."""
    d = Driver(greet=False)
    d.conn.start()
    d.conn.data_to_send()
    out = d.feed(b"EHLO client.test\r\n")
    assert out.split("\r\n")[:-1] == [
        "250-mx.test greets client.test",
        "250-PIPELINING",
        "250-SIZE 10000",
        "250-8BITMIME",
        "250-ENHANCEDSTATUSCODES",
        "250-DSN",
        "250 HELP",
    ]


def test_helo_is_single_line_and_plain_smtp():
    """HELO answers one 250 line and the session is not extended."""
    d = Driver()
    d.conn.data_to_send()
    assert d.feed(b"HELO client.test\r\n") == "250 mx.test greets client.test\r\n"
    assert d.conn.extended is False


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"EHLO", "501 5.5.4 Syntax: EHLO hostname"),
        (b"HELO", "501 5.5.4 Syntax: HELO hostname"),
        (b"HELO two words", "501 5.5.4 Syntax: HELO hostname"),
        (b"HELO bad\x01name", "501 5.5.4 Syntax: HELO hostname"),
        (b"MAIL FROM:<a@b.test>", "503 5.5.1 Send HELO or EHLO first"),
        (b"RCPT TO:<a@b.test>", "503 5.5.1 Need MAIL before RCPT"),
        (b"DATA", "503 5.5.1 Need MAIL before DATA"),
        (b"FOO bar", "500 5.5.2 Command unrecognized: FOO"),
        (b"", "500 5.5.2 Empty command"),
        (b"NOOP", "250 2.0.0 Ok"),
        (b"NOOP with an argument", "250 2.0.0 Ok"),
        (b"RSET", "250 2.0.0 Ok"),
        (b"RSET now", "501 5.5.4 RSET takes no argument"),
        (b"QUIT now", "501 5.5.4 QUIT takes no argument"),
        (b"VRFY", "501 5.5.4 Syntax: VRFY user-or-address"),
        (b"EXPN", "501 5.5.4 Syntax: EXPN list"),
        (b"TURN x", "501 5.5.4 TURN takes no argument"),
        (b"STARTTLS", "454 4.7.0 TLS not available"),
        (b"AUTH PLAIN", "502 5.5.1 AUTH not implemented"),
        (b"HELP nonsense", "504 5.5.4 No help for 'nonsense'; try HELP"),
    ],
)
def test_replies_before_a_transaction(line, expected):
    """Each command on its own, right after the greeting, gets the RFC's reply."""
    d = Driver()
    d.conn.data_to_send()
    assert d.feed(line + b"\r\n") == expected + "\r\n"


def test_commands_are_case_insensitive():
    """rfc5321 2.4: verbs are case-insensitive."""
    d = Driver()
    out = d.feed(session(b"ehlo c.test", b"mail from:<a@b.test>", b"rcpt to:<c@d.test>", b"data"))
    assert codes(out) == ["220", "250", "250", "250", "354"]


def test_full_transaction_delivers_unstuffed_data():
    """A whole transaction: events in order, the data unstuffed, 250 queued."""
    d = Driver()
    out = d.feed(READY + b"DATA\r\nSubject: x\r\n\r\n..leading dot\r\nbody\r\n.\r\nQUIT\r\n")
    assert codes(out) == ["220", "250", "250", "250", "354", "250", "221"]
    assert "250 2.0.0 Ok: queued as TEST" in out
    assert d.data == b"Subject: x\r\n\r\n.leading dot\r\nbody\r\n"
    kinds = [type(e) for e in d.events if not isinstance(e, ev.DataChunk)]
    assert kinds == [ev.Hello, ev.MailFrom, ev.RcptTo, ev.DataCommand, ev.DataEnd, ev.Quit]
    assert d.conn.closed


def test_mail_and_rcpt_arguments_are_parsed():
    """MAIL/RCPT events carry the bare address and upper-cased parameters."""
    d = Driver()
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test> size=100 body=8bitmime\r\nRCPT TO:<Bob@Example.TEST>\r\n")
    mail = d.of(ev.MailFrom)[0]
    assert mail.sender == "a@b.test" and mail.parameters == {"SIZE": "100", "BODY": "8BITMIME"}
    assert d.of(ev.RcptTo)[0].recipient == "Bob@Example.TEST"


def test_null_sender_and_bare_postmaster():
    """<> is a valid sender (rfc5321 4.5.5); <Postmaster> a valid recipient (4.1.1.3)."""
    d = Driver()
    out = d.feed(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\n")
    assert codes(out)[-2:] == ["250", "250"]
    assert d.of(ev.MailFrom)[0].sender == ""
    assert d.of(ev.RcptTo)[0].recipient == "Postmaster"


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"MAIL FROM:a@b.test", "501 5.1.7 Syntax error: address must be in angle brackets, as <user@domain>"),
        (b"MAIL TO:<a@b.test>", "501 5.5.4 Syntax error: expected FROM:<address>"),
        (b"MAIL FROM:<a@b.test", "501 5.1.7 Syntax error: missing '>' after the address"),
        (b"MAIL FROM:<nodomain>", "501 5.1.7 Syntax error: address has no domain: nodomain"),
        (b"MAIL FROM:<a@-bad-.test>", "501 5.1.7 Syntax error: bad domain: -bad-.test"),
        (b"MAIL FROM:<a b@c.test>", "501 5.1.7 Syntax error: bad local part: a b"),
        (b"MAIL FROM:<" + b"x" * 65 + b"@b.test>", "501 5.1.7 Syntax error: local part longer than 64 octets"),
        (b"MAIL FROM:<a@b.test> SIZE=abc", "501 5.5.4 SIZE needs a number of octets"),
        (b"MAIL FROM:<a@b.test> SIZE=10001", "552 5.3.4 Message size exceeds the limit of 10000 octets"),
        (b"MAIL FROM:<a@b.test> BODY=BINARYMIME", "501 5.5.4 BODY must be 7BIT or 8BITMIME"),
        (b"MAIL FROM:<a@b.test> FOO=bar", "555 5.5.4 Unsupported MAIL parameter: FOO"),
        (b"MAIL FROM:<a@b.test> SIZE=1 SIZE=2", "501 5.5.4 Syntax error: parameter SIZE given twice"),
        (b"MAIL FROM:<a@b.test> RET=ALL", "501 5.5.4 RET must be FULL or HDRS"),
        (b"MAIL FROM:<a@b.test> ENVID=" + b"x" * 101, "501 5.5.4 ENVID must be xtext of at most 100 characters"),
        (b"MAIL FROM:<a@b.test> ENVID=a+b", "501 5.5.4 ENVID must be xtext of at most 100 characters"),
        ("MAIL FROM:<jöran@b.test>".encode(), "550 5.6.7 non-ASCII address requires SMTPUTF8"),  # rfc6531 3.5
    ],
)
def test_mail_syntax_errors(line, expected):
    """Bad MAIL arguments: 501 with what was wrong, 552 for SIZE, 555 unknown parameters."""
    d = Driver()
    d.feed(b"EHLO c.test\r\n")
    assert d.feed(line + b"\r\n") == expected + "\r\n"
    assert not d.of(ev.MailFrom)


def test_dsn_parameters_are_accepted_and_normalised():
    """rfc3461: RET and ENVID on MAIL, NOTIFY and ORCPT on RCPT; keywords upper-cased."""
    d = Driver()
    out = d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test> ret=hdrs ENVID=QQ+2B1\r\nRCPT TO:<c@d.test> notify=success,delay ORCPT=rfc822;C+40d.test\r\n")
    assert codes(out)[-2:] == ["250", "250"]
    assert d.of(ev.MailFrom)[0].parameters == {"RET": "HDRS", "ENVID": "QQ+2B1"}
    assert d.of(ev.RcptTo)[0].parameters == {"NOTIFY": "SUCCESS,DELAY", "ORCPT": "rfc822;C+40d.test"}


def test_mail_parameters_need_ehlo():
    """rfc1869 4.4: after HELO, MAIL parameters are refused."""
    d = Driver()
    d.feed(b"HELO c.test\r\n")
    assert d.feed(b"MAIL FROM:<a@b.test> SIZE=10\r\n") == "555 5.5.4 MAIL parameters need EHLO\r\n"


def test_mail_accepts_source_route_and_space_after_colon():
    """rfc5321 4.1.2 / C: a source route is accepted and dropped; 'FROM: <x>' is tolerated."""
    d = Driver()
    d.feed(b"EHLO c\r\nMAIL FROM: <@relay.test,@other.test:a@b.test>\r\n")
    assert d.of(ev.MailFrom)[0].sender == "a@b.test"


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"RCPT TO:<>", "501 5.1.3 Syntax error: the null address <> is not a recipient"),
        (b"RCPT TO:bob@example.test", "501 5.1.3 Syntax error: address must be in angle brackets, as <user@domain>"),
        (b"RCPT FROM:<bob@example.test>", "501 5.5.4 Syntax error: expected TO:<address>"),
        (b"RCPT TO:<bob@example.test> FOO=1", "555 5.5.4 Unsupported RCPT parameter: FOO"),
        (b"RCPT TO:<bob@example.test> NOTIFY=NEVER,SUCCESS", "501 5.5.4 NOTIFY must be NEVER, or a list of SUCCESS, FAILURE, DELAY"),
        (b"RCPT TO:<bob@example.test> NOTIFY=SOMETIMES", "501 5.5.4 NOTIFY must be NEVER, or a list of SUCCESS, FAILURE, DELAY"),
        (b"RCPT TO:<bob@example.test> NOTIFY=FAILURE,FAILURE", "501 5.5.4 NOTIFY must be NEVER, or a list of SUCCESS, FAILURE, DELAY"),
        (b"RCPT TO:<bob@example.test> ORCPT=bob@example.test", "501 5.5.4 ORCPT must be addr-type;xtext, as rfc822;user@domain"),
        (b"RCPT TO:<bob@example.test> ORCPT=rfc822;a+zz", "501 5.5.4 ORCPT must be addr-type;xtext, as rfc822;user@domain"),
    ],
)
def test_rcpt_syntax_errors(line, expected):
    """Bad RCPT arguments get 501 (5.1.3) or 555, and the transaction goes on."""
    d = Driver()
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    assert d.feed(line + b"\r\n") == expected + "\r\n"


def test_nested_mail_is_refused():
    """A second MAIL inside a transaction is 503 (rfc5321 4.1.4)."""
    d = Driver()
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    assert d.feed(b"MAIL FROM:<c@d.test>\r\n") == "503 5.5.1 Sender already given; RSET first\r\n"


def test_rset_ends_the_transaction():
    """After RSET, RCPT needs a new MAIL (rfc5321 4.1.1.5)."""
    d = Driver()
    d.feed(READY)
    out = d.feed(b"RSET\r\nRCPT TO:<x@y.test>\r\n")
    assert out == "250 2.0.0 Ok\r\n503 5.5.1 Need MAIL before RCPT\r\n"
    assert d.of(ev.Reset)


def test_ehlo_again_resets_the_transaction():
    """rfc5321 4.1.4: a new EHLO clears the transaction as RSET does."""
    d = Driver()
    d.feed(READY)
    out = d.feed(b"EHLO again\r\nDATA\r\n")
    assert codes(out) == ["250", "503"]


def test_data_needs_a_recipient():
    """DATA with no RCPT at all: 503; after every RCPT was refused: 554 (rfc2920 3.1)."""
    d = Driver()
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    assert d.feed(b"DATA\r\n") == "503 5.5.1 Need RCPT before DATA\r\n"
    d.answers[ev.RcptTo] = Reply.of(550, "5.1.1", "no such user")
    d.feed(b"RCPT TO:<x@y.test>\r\n")
    assert d.feed(b"DATA\r\n") == "554 5.5.1 No valid recipients\r\n"


def test_data_with_argument_is_a_syntax_error():
    """DATA takes no argument."""
    d = Driver()
    d.feed(READY)
    assert d.feed(b"DATA now\r\n") == "501 5.5.4 DATA takes no argument\r\n"


def test_refused_decisions_keep_state():
    """A refused MAIL leaves no transaction; a refused RCPT leaves the others."""
    d = Driver(answers={ev.MailFrom: Reply.of(550, "5.7.1", "go away")})
    out = d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
    assert codes(out)[-2:] == ["550", "503"]


def test_too_many_recipients():
    """rfc5321 4.5.3.1.10: past the limit, 452 4.5.3 and the earlier ones stand."""
    d = Driver(ServerSettings("mx.test", max_recipients=2))
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    out = d.feed(session(b"RCPT TO:<a@x.test>", b"RCPT TO:<b@x.test>", b"RCPT TO:<c@x.test>", b"DATA"))
    assert codes(out) == ["250", "250", "452", "354"]
    assert "452 4.5.3 Too many recipients (2 at most)" in out


def test_send_soml_saml_start_a_transaction_like_mail():
    """rfc821 3.4 SEND/SOML/SAML: accepted as MAIL (this server has no terminals)."""
    for verb in (b"SEND", b"SOML", b"SAML"):
        d = Driver()
        out = d.feed(b"EHLO c\r\n" + verb + b" FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nhi\r\n.\r\n")
        assert codes(out) == ["220", "250", "250", "250", "354", "250"]
        assert d.of(ev.MailFrom)[0].command == verb.decode()


def test_help_summary_and_topics():
    """HELP answers 214 with a summary, and per command; SEND's help says it acts as MAIL."""
    d = Driver()
    d.conn.data_to_send()
    summary = d.feed(b"HELP\r\n")
    assert summary.startswith("214-2.0.0 ") and summary.endswith("214 2.0.0 HELP <command> for more.\r\n")
    assert "as MAIL does" in d.feed(b"HELP send\r\n")
    assert d.feed(b"HELP RCPT\r\n").startswith("214 2.0.0 RCPT TO:<recipient>")


def test_vrfy_expn_turn_are_decisions():
    """VRFY, EXPN and TURN are handed to the caller with their argument."""
    d = Driver(answers={ev.Verify: Reply.of(252, "2.5.0", "maybe")})
    out = d.feed(b"VRFY alice\r\nEXPN staff\r\nTURN\r\n")
    assert codes(out)[1:] == ["252", "502", "502"]
    assert d.of(ev.Verify)[0].argument == "alice"
    assert d.of(ev.Expand)[0].argument == "staff"
    assert d.of(ev.Turn)


def test_quit_closes_and_ignores_the_rest():
    """After 221 nothing more is read (rfc5321 4.1.1.10)."""
    d = Driver()
    d.conn.data_to_send()
    out = d.feed(b"QUIT\r\nNOOP\r\n")
    assert out == "221 2.0.0 mx.test closing connection\r\n"
    assert d.conn.closed


def test_refused_greeting_allows_only_quit():
    """rfc5321 3.1: after a 554 greeting, commands get 503 until QUIT."""
    d = Driver(greet=False)
    d.conn.start(Reply.of(554, "5.7.1", "not welcome"))
    out = d.feed(b"EHLO c\r\nQUIT\r\n")
    assert out.split("\r\n")[:-1] == [
        "554 5.7.1 not welcome",
        "503 5.5.1 Service refused; only QUIT is allowed",
        "221 2.0.0 mx.test closing connection",
    ]


def test_421_greeting_closes_at_once():
    """A 421 instead of the greeting closes the session (too many connections)."""
    d = Driver(greet=False)
    d.conn.start(Reply.of(421, "4.7.0", "Too many connections"))
    assert d.conn.data_to_send() == b"421 4.7.0 Too many connections\r\n"
    assert d.conn.closed


def test_close_sends_421_and_ends():
    """close() (timeout, shutdown) writes the reply and ends the session."""
    d = Driver()
    d.feed(READY + b"DATA\r\npartial")
    d.conn.close(Reply.of(421, "4.4.2", "Timeout"))
    assert d.conn.data_to_send() == b"421 4.4.2 Timeout\r\n"
    assert d.conn.closed and d.conn.next_event() is None


# ------------------------------------------------------------------ pipelining


def test_pipelined_commands_are_answered_in_order():
    """rfc2920: a whole pipelined batch in one write gets its replies in order."""
    d = Driver()
    batch = session(
        b"EHLO c",
        b"MAIL FROM:<a@b.test>",
        b"RCPT TO:<x@y.test>",
        b"RCPT TO:<bad>",
        b"RCPT TO:<z@y.test>",
        b"DATA",
    ) + b"line\r\n.\r\nMAIL FROM:<c@d.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\nsecond\r\n.\r\nQUIT\r\n"
    out = d.feed(batch)
    assert codes(out) == ["220", "250", "250", "250", "501", "250", "354", "250", "250", "250", "354", "250", "221"]
    assert d.data == b"line\r\nsecond\r\n"


def test_machine_waits_while_a_decision_is_pending():
    """No later command is parsed until the pending decision is answered."""
    d = Driver()
    d.conn.data_to_send()
    d.conn.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
    hello = d.conn.next_event()
    assert isinstance(hello, ev.Hello)
    assert d.conn.next_event() is None and d.conn.waiting is hello
    d.conn.accept()
    assert isinstance(d.conn.next_event(), ev.MailFrom)


def test_data_end_needs_an_explicit_reply():
    """accept() is not enough at end of data: the outcome must be said."""
    d = Driver()
    d.conn.receive_data(READY + b"DATA\r\nx\r\n.\r\n")
    while not isinstance(d.conn.next_event(), ev.DataEnd):
        if d.conn.waiting is not None:
            d.conn.accept()
    with pytest.raises(RuntimeError):
        d.conn.accept()
    d.conn.reply(Reply.of(451, "4.3.0", "try later"))
    assert d.conn.data_to_send().endswith(b"451 4.3.0 try later\r\n")


# ------------------------------------------------------------------ limits


def test_command_line_limit_is_512_octets():
    """rfc5321 4.5.3.1.4: 512 octets with CRLF pass; longer gets 500 and the session stays in step."""
    d = Driver()
    d.conn.data_to_send()
    exact = b"NOOP " + b"x" * (MAX_COMMAND_LINE - 7) + b"\r\n"
    assert len(exact) == MAX_COMMAND_LINE
    assert d.feed(exact) == "250 2.0.0 Ok\r\n"
    long = b"NOOP " + b"x" * MAX_COMMAND_LINE + b"\r\n"
    assert d.feed(long + b"NOOP\r\n") == "500 5.5.2 Line too long (512 octets at most)\r\n250 2.0.0 Ok\r\n"


def test_endless_command_line_is_not_buffered():
    """A client that never sends CRLF gets one 500 and its bytes are dropped."""
    d = Driver()
    d.conn.data_to_send()
    out = ""
    for _ in range(100):
        out += d.feed(b"A" * 10_000)
    assert out == "500 5.5.2 Line too long (512 octets at most)\r\n"
    assert len(d.conn._in) < MAX_COMMAND_LINE
    assert d.feed(b"\r\nNOOP\r\n") == "250 2.0.0 Ok\r\n"


def test_command_split_across_many_writes():
    """A command may arrive one byte at a time, the CRLF split too."""
    d = Driver()
    d.conn.data_to_send()
    out = "".join(d.feed(bytes([b])) for b in b"NOOP\r\nHELO c\r\n")
    assert out == "250 2.0.0 Ok\r\n250 mx.test greets c\r\n"


def test_message_over_size_is_refused_after_end_of_data():
    """rfc1870 6.3: a message over the limit gets 552 after the final dot, never truncated."""
    d = Driver(ServerSettings("mx.test", max_message_size=100))
    d.feed(READY)
    out = d.feed(b"DATA\r\n" + b"x" * 60 + b"\r\n" + b"y" * 60 + b"\r\n.\r\nNOOP\r\n")
    assert out.split("\r\n")[-3:] == ["552 5.3.4 Message too big: the limit is 100 octets", "250 2.0.0 Ok", ""]
    assert not d.of(ev.DataEnd) and d.of(ev.DataRefused)


def test_long_text_line_refuses_the_message_and_body_is_never_a_command():
    """rfc5321 4.5.3.1.6: a 1001-octet line refuses the message; the body after it stays data."""
    d = Driver()
    d.feed(READY)
    body = b"DATA\r\n" + b"x" * 999 + b"\r\nQUIT\r\nRSET\r\n.\r\nNOOP\r\n"
    out = d.feed(body)
    assert codes(out) == ["354", "554", "250"]
    assert "554 5.6.0 Message refused: a text line is longer than 1000 octets" in out
    assert not d.of(ev.Quit)


def test_line_of_1000_octets_is_accepted():
    """998 characters and CRLF make a legal 1000-octet line."""
    d = Driver()
    d.feed(READY)
    out = d.feed(b"DATA\r\n" + b"x" * 998 + b"\r\n.\r\n")
    assert codes(out) == ["354", "250"]


# ------------------------------------------------------------------ smuggling


@pytest.mark.parametrize(
    "ending",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r"],
    ids=["LF.LF", "LF.CRLF", "CRLF.LF", "CR.CR", "CR.CRLF", "CRLF.CR"],
)
def test_smuggling_sequences_never_end_data(ending):
    """SMTP smuggling: a false end of data followed by a smuggled transaction.

    Only CRLF.CRLF ends DATA (rfc5321 4.1.1.4), so the smuggled MAIL/RCPT/DATA
    stay inside the message, which is refused for its bare line end; no second
    transaction is ever started.
    """
    d = Driver()
    d.feed(READY)
    smuggled = b"MAIL FROM:<evil@bad.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nforged\r\n"
    out = d.feed(b"DATA\r\nSubject: hi\r\n\r\nbody" + ending + smuggled + b".\r\n")
    assert codes(out) == ["354", "550"]
    assert "550 5.5.2 Message refused: bare CR or LF in message text" in out
    assert len(d.of(ev.MailFrom)) == 1 and len(d.of(ev.DataCommand)) == 1
    assert not d.of(ev.DataEnd)


def test_bare_lf_in_command_is_refused_not_split():
    """A bare LF inside a command line is not a line end: the whole line is refused."""
    d = Driver()
    d.feed(b"EHLO c\r\n")
    out = d.feed(b"MAIL FROM:<a@b.test>\nRCPT TO:<c@d.test>\r\nNOOP\r\n")
    assert out == "500 5.5.2 Bare CR or LF in command line; lines must end with CRLF\r\n250 2.0.0 Ok\r\n"
    assert not d.of(ev.MailFrom)


def test_bare_cr_in_command_is_refused():
    """A bare CR inside a command line is refused too."""
    d = Driver()
    d.conn.data_to_send()
    assert d.feed(b"NOOP\rQUIT\r\n").startswith("500 5.5.2 Bare CR or LF")
    assert not d.conn.closed


# ------------------------------------------------------------------ fuzzing

from hypothesis import given, settings, strategies as st  # noqa: E402

_WORDS = [b"EHLO x", b"HELO x", b"MAIL FROM:<a@b.c>", b"RCPT TO:<d@e.f>", b"DATA", b".", b"RSET", b"NOOP", b"QUIT",
          b"VRFY a", b"EXPN a", b"HELP", b"TURN", b"SEND FROM:<>", b"MAIL FROM:<> SIZE=5", b"..", b"\r", b"\n", b"\x00"]
_pieces = st.lists(st.one_of(st.sampled_from(_WORDS).map(lambda w: w + b"\r\n"), st.sampled_from(_WORDS), st.binary(max_size=40)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(_pieces, st.integers(min_value=1, max_value=64))
def test_any_input_gets_well_formed_replies_and_never_raises(pieces, write_size):
    """Random commands and bytes, written in random sizes: the machine never raises and
    every line it writes is a 3-digit code, a space or hyphen, and text, CRLF-ended."""
    d = Driver()
    stream = b"".join(pieces)
    out = d.conn.data_to_send()
    for start in range(0, len(stream), write_size):
        d.conn.receive_data(stream[start : start + write_size])
        d.run()
        out += d.conn.data_to_send()
    assert out.endswith(b"\r\n")
    for line in out.split(b"\r\n")[:-1]:
        assert line[:3].isdigit() and line[3:4] in (b" ", b"-"), line
        assert b"\r" not in line and b"\n" not in line

"""The pure server machine's STARTTLS, AUTH, submission and error-limit rules.

rfc3207 (STARTTLS: 220, forget everything, 454, 501), rfc4954 (AUTH: 334
challenges, ``*`` cancel, 235/535, 503 twice, 538 without TLS, the AUTH=
MAIL parameter, 530 before AUTH) and the per-session error limit.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailsvc.smtp import events as ev
from mailsvc.smtp import sasl
from mailsvc.smtp.replies import Reply
from mailsvc.smtp.server import MAX_AUTH_LINE, ServerSettings, State
from smtp_driver import Driver, codes, session

TLS = ServerSettings("mx.test", starttls=True)
AUTH = ServerSettings("mx.test", starttls=True, auth_mechanisms=("PLAIN", "LOGIN", "CRAM-MD5"))
SUBMISSION = ServerSettings("mx.test", starttls=True, auth_mechanisms=("PLAIN", "LOGIN"), auth_required=True)
OK_235 = Reply.of(235, "2.7.0", "Authentication successful")
BAD_535 = Reply.of(535, "5.7.8", "Authentication credentials invalid")
PASSWORDS = {"tim": "tanstaaftanstaaf", "alice": "wonderland"}


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def ehlo_lines(out: str) -> list[str]:
    return [line[4:] for line in out.split("\r\n") if line[:4] in ("250-", "250 ")][1:]


class SASLGlue:
    """What the Twisted glue does with AUTH decisions, in memory: runs the
    ``sasl`` exchange and checks the password against ``PASSWORDS``."""

    def __init__(self, challenge=b"<1896.697170952@postoffice.reston.mci.net>"):
        self.challenge = challenge
        self.exchange = None
        self.users: list[str] = []

    def answers(self) -> dict:
        return {ev.Auth: self.auth, ev.AuthResponse: self.response}

    def auth(self, event: ev.Auth) -> Reply:
        kinds = {"PLAIN": sasl.Plain, "LOGIN": sasl.Login, "CRAM-MD5": lambda: sasl.CramMD5(self.challenge)}
        self.exchange = kinds[event.mechanism]()
        initial = None if event.initial_response is None else sasl.decode(event.initial_response)
        return self.step(lambda: self.exchange.start(initial))

    def response(self, event: ev.AuthResponse) -> Reply:
        return self.step(lambda: self.exchange.respond(sasl.decode(event.line)))

    def step(self, run) -> Reply:
        try:
            step = run()
        except sasl.SASLError as error:
            return Reply.of(501, "5.5.2", "bad base64") if error.kind == "encoding" else BAD_535
        if isinstance(step, sasl.Challenge):
            return Reply.of(334, "", sasl.encode(step.data))
        if isinstance(step, sasl.PasswordCredentials):
            ok = PASSWORDS.get(step.authcid) == step.password
        else:
            ok = step.verify(PASSWORDS.get(step.username, "").encode())
        if ok:
            self.users.append(getattr(step, "authcid", None) or step.username)
        return OK_235 if ok else BAD_535


def auth_driver(settings=AUTH, tls=True) -> tuple[Driver, SASLGlue]:
    glue = SASLGlue()
    d = Driver(settings, glue.answers(), greet=False)
    d.conn = type(d.conn)(settings, tls=tls)
    d.conn.start()
    d.conn.data_to_send()
    return d, glue


# ------------------------------------------------------------------ STARTTLS


def test_ehlo_offers_starttls_only_before_tls():
    """rfc3207 4.2: STARTTLS is listed before the handshake and never after it."""
    d = Driver(TLS)
    assert "STARTTLS" in ehlo_lines(d.feed(b"EHLO c.test\r\n"))
    d.feed(b"STARTTLS\r\n")
    d.conn.tls_started()
    assert "STARTTLS" not in ehlo_lines(d.feed(b"EHLO c.test\r\n"))


def test_starttls_sends_220_and_resets_the_session():
    """rfc3207 4.2: 220, then after the handshake the session is new: EHLO is
    needed again, the old transaction and HELO name are gone, tls is True."""
    d = Driver(TLS)
    d.conn.data_to_send()
    out = d.feed(session(b"EHLO c.test", b"MAIL FROM:<a@b.test>", b"STARTTLS"))
    assert out.endswith("220 2.0.0 Ready to start TLS\r\n")
    assert d.conn.tls_pending and d.of(ev.StartTLS)
    d.conn.tls_started()
    assert d.conn.state is State.GREETED and d.conn.tls and d.conn.hello_name == ""
    assert d.feed(b"MAIL FROM:<a@b.test>\r\n") == "503 5.5.1 Send HELO or EHLO first\r\n"
    assert codes(d.feed(session(b"EHLO c.test", b"MAIL FROM:<a@b.test>"))) == ["250", "250"]


def test_input_after_starttls_in_the_same_write_is_discarded():
    """CVE-2011-0411: "STARTTLS\\r\\nRSET\\r\\n" in one write: the RSET is never answered."""
    d = Driver(TLS)
    d.feed(b"EHLO c.test\r\n")
    assert d.feed(b"STARTTLS\r\nRSET\r\n") == "220 2.0.0 Ready to start TLS\r\n"
    assert not d.of(ev.Reset)
    d.feed(b"NOOP\r\n")  # plain-text bytes before the switch are dropped too
    d.conn.tls_started()
    assert d.feed(b"") == ""  # nothing buffered is read after the switch
    assert d.feed(b"NOOP\r\n") == "250 2.0.0 Ok\r\n"


def test_starttls_not_available_is_454():
    """rfc3207 4: 454 4.7.0 when the server has no TLS; the session goes on."""
    d = Driver()
    d.feed(b"EHLO c.test\r\n")
    assert d.feed(b"STARTTLS\r\nNOOP\r\n") == "454 4.7.0 TLS not available\r\n250 2.0.0 Ok\r\n"


def test_starttls_with_an_argument_is_501():
    """rfc3207 4: "501 Syntax error (no parameters allowed)"."""
    d = Driver(TLS)
    d.feed(b"EHLO c.test\r\n")
    assert d.feed(b"STARTTLS now\r\n") == "501 5.5.4 Syntax: STARTTLS (no parameters allowed)\r\n"
    assert not d.conn.tls_pending


def test_starttls_twice_is_refused():
    """After TLS is active (STARTTLS or implicit TLS) STARTTLS gets 503."""
    d = Driver(TLS)
    d.feed(b"EHLO c.test\r\nSTARTTLS\r\n")
    d.conn.tls_started()
    assert d.feed(b"EHLO c.test\r\nSTARTTLS\r\n").endswith("503 5.5.1 TLS already active\r\n")
    implicit, _ = auth_driver(TLS, tls=True)
    assert implicit.feed(b"STARTTLS\r\n") == "503 5.5.1 TLS already active\r\n"


def test_a_refused_starttls_keeps_the_session():
    """The glue may refuse STARTTLS (454): nothing changes, reading goes on."""
    d = Driver(TLS, {ev.StartTLS: Reply.of(454, "4.7.0", "TLS not available due to temporary reason")})
    d.feed(b"EHLO c.test\r\n")
    assert codes(d.feed(b"STARTTLS\r\nNOOP\r\n")) == ["454", "250"]
    assert not d.conn.tls and d.conn.extended


def test_tls_started_needs_an_accepted_starttls():
    """tls_started() at any other time is a programming error."""
    d = Driver(TLS)
    with pytest.raises(RuntimeError):
        d.conn.tls_started()


# ------------------------------------------------------------------ AUTH


def test_auth_is_listed_per_settings_and_tls():
    """rfc4954 3: AUTH lists the mechanisms; before TLS only if allowed without TLS."""
    d, _ = auth_driver(tls=False)
    assert not [k for k in ehlo_lines(d.feed(b"EHLO c\r\n")) if k.startswith("AUTH")]
    d, _ = auth_driver(tls=True)
    assert "AUTH PLAIN LOGIN CRAM-MD5" in ehlo_lines(d.feed(b"EHLO c\r\n"))
    open_settings = ServerSettings("mx.test", auth_mechanisms=("CRAM-MD5",), auth_without_tls=True)
    d, _ = auth_driver(open_settings, tls=False)
    assert "AUTH CRAM-MD5" in ehlo_lines(d.feed(b"EHLO c\r\n"))


def test_auth_plain_with_initial_response():
    """rfc4954 4.1: AUTH PLAIN <base64> → 235; the session is authenticated."""
    d, glue = auth_driver()
    out = d.feed(b"EHLO c\r\nAUTH PLAIN " + b64(b"\0alice\0wonderland") + b"\r\n")
    assert out.endswith("235 2.7.0 Authentication successful\r\n")
    assert d.conn.authenticated and glue.users == ["alice"]
    assert d.of(ev.Auth)[0] == ev.Auth("PLAIN", b64(b"\0alice\0wonderland").decode())


def test_auth_plain_after_an_empty_challenge():
    """rfc4954 4.1: AUTH PLAIN alone gets "334 " (a space, no text); the next line is the response."""
    d, _ = auth_driver()
    d.feed(b"EHLO c\r\n")
    assert d.feed(b"AUTH PLAIN\r\n") == "334 \r\n"
    assert d.conn.state is State.AUTH
    assert d.feed(b64(b"alice\0alice\0wonderland") + b"\r\n") == "235 2.7.0 Authentication successful\r\n"
    assert d.of(ev.AuthResponse)


def test_auth_login_dialogue():
    """LOGIN: 334 VXNlcm5hbWU6 ("Username:"), 334 UGFzc3dvcmQ6 ("Password:"), 235."""
    d, _ = auth_driver()
    d.feed(b"EHLO c\r\n")
    assert d.feed(b"AUTH LOGIN\r\n") == "334 VXNlcm5hbWU6\r\n"
    assert d.feed(b64(b"alice") + b"\r\n") == "334 UGFzc3dvcmQ6\r\n"
    assert d.feed(b64(b"wonderland") + b"\r\n") == "235 2.7.0 Authentication successful\r\n"


def test_auth_cram_md5_exchange_rfc2195_example():
    """rfc2195 2's example: challenge <1896.697170952@postoffice.reston.mci.net>,
    answer "tim b913a602c7eda7a495b4e6e7334d3890" → 235."""
    d, glue = auth_driver()
    d.feed(b"EHLO c\r\n")
    out = d.feed(b"AUTH CRAM-MD5\r\n")
    assert out == "334 " + base64.b64encode(glue.challenge).decode() + "\r\n"
    out = d.feed(b64(b"tim b913a602c7eda7a495b4e6e7334d3890") + b"\r\n")
    assert out == "235 2.7.0 Authentication successful\r\n" and glue.users == ["tim"]


def test_auth_star_cancels_with_501():
    """rfc4954 4: "*" cancels; the server MUST answer 501; the glue is told."""
    d, _ = auth_driver()
    d.feed(b"EHLO c\r\nAUTH LOGIN\r\n")
    assert d.feed(b"*\r\n") == "501 5.7.0 Authentication cancelled\r\n"
    assert d.of(ev.AuthCancelled) and not d.conn.authenticated
    assert d.feed(b"NOOP\r\n") == "250 2.0.0 Ok\r\n"  # back to commands


def test_bad_credentials_get_535_and_the_session_goes_on():
    """rfc4954 6: 535 5.7.8; the client may try again."""
    d, _ = auth_driver()
    out = d.feed(b"EHLO c\r\nAUTH PLAIN " + b64(b"\0alice\0wrong") + b"\r\n")
    assert out.endswith("535 5.7.8 Authentication credentials invalid\r\n")
    assert not d.conn.authenticated and d.conn.state is State.READY
    assert d.feed(b"AUTH PLAIN " + b64(b"\0alice\0wonderland") + b"\r\n").startswith("235 ")


def test_bad_base64_gets_501_5_5_2():
    """rfc4954 4: a response that is not base64 fails the AUTH with 501 5.5.2."""
    d, _ = auth_driver()
    d.feed(b"EHLO c\r\nAUTH LOGIN\r\n")
    assert d.feed(b"not base64!\r\n") == "501 5.5.2 bad base64\r\n"
    assert d.conn.state is State.READY


def test_auth_twice_is_503():
    """rfc4954 4: after a successful AUTH, another AUTH gets 503."""
    d, _ = auth_driver()
    d.feed(b"EHLO c\r\nAUTH PLAIN " + b64(b"\0alice\0wonderland") + b"\r\n")
    assert d.feed(b"AUTH PLAIN " + b64(b"\0alice\0wonderland") + b"\r\n") == "503 5.5.1 Already authenticated\r\n"


@pytest.mark.parametrize(
    "commands, expected",
    [
        ([b"AUTH PLAIN"], "503 5.5.1 Send EHLO first"),
        ([b"HELO c", b"AUTH PLAIN"], "503 5.5.1 Send EHLO first"),
        ([b"EHLO c", b"MAIL FROM:<a@b.test>", b"AUTH PLAIN"], "503 5.5.1 AUTH is not allowed during a mail transaction"),
        ([b"EHLO c", b"AUTH"], "501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
        ([b"EHLO c", b"AUTH PLAIN a b"], "501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
        ([b"EHLO c", b"AUTH GSSAPI"], "504 5.5.4 Unrecognized authentication mechanism"),
    ],
)
def test_auth_sequence_and_syntax(commands, expected):
    """AUTH before EHLO or in a transaction is 503 (rfc4954 4); bad syntax 501; unknown mechanism 504."""
    d, _ = auth_driver()
    out = d.feed(session(*commands))
    assert out.split("\r\n")[-2] == expected
    assert not d.of(ev.Auth)


def test_auth_before_tls_is_538():
    """rfc4954 6: 538 5.7.11 when the mechanism needs an encrypted connection."""
    d, _ = auth_driver(tls=False)
    out = d.feed(b"EHLO c\r\nAUTH PLAIN " + b64(b"\0alice\0wonderland") + b"\r\n")
    assert out.endswith("538 5.7.11 Encryption required for requested authentication mechanism\r\n")
    assert not d.of(ev.Auth)


def test_auth_after_starttls_works_and_is_forgotten_by_a_second_handshake_never():
    """After STARTTLS, AUTH is offered and works; the session before it is gone."""
    d, _ = auth_driver(tls=False)
    d.feed(b"EHLO c\r\nSTARTTLS\r\n")
    d.conn.tls_started()
    assert "AUTH PLAIN LOGIN CRAM-MD5" in ehlo_lines(d.feed(b"EHLO c\r\n"))
    assert d.feed(b"AUTH PLAIN " + b64(b"\0alice\0wonderland") + b"\r\n").startswith("235 ")


def test_auth_response_line_limit():
    """rfc4954 4: a response longer than the buffer gets 500 5.5.6 and ends the exchange."""
    d, _ = auth_driver()
    d.feed(b"EHLO c\r\nAUTH PLAIN\r\n")
    out = d.feed(b"A" * (MAX_AUTH_LINE + 10) + b"\r\nNOOP\r\n")
    assert out == "500 5.5.6 Authentication exchange line is too long\r\n250 2.0.0 Ok\r\n"
    assert d.of(ev.AuthCancelled)
    d.feed(b"AUTH PLAIN\r\n")
    assert d.feed(b"A" * 4000 + b"\r\n").startswith("535 ")  # long but within the limit


@pytest.mark.parametrize(
    "parameter, expected",
    [
        (b"AUTH=<>", "250"),
        (b"AUTH=e+3Dmc2@example.com", "250"),
        (b"AUTH=nobody", "501"),
        (b"AUTH=", "501"),
    ],
)
def test_auth_mail_parameter(parameter, expected):
    """rfc4954 5: AUTH=<> or an xtext mailbox is accepted (even unauthenticated); else 501."""
    d, _ = auth_driver()
    out = d.feed(b"EHLO c\r\nMAIL FROM:<e=mc2@example.com> " + parameter + b"\r\n")
    assert codes(out)[-1] == expected


def test_auth_mail_parameter_needs_auth_offered():
    """Without AUTH in the EHLO list, AUTH= is an unknown parameter (555)."""
    d = Driver()
    assert codes(d.feed(b"EHLO c\r\nMAIL FROM:<a@b.test> AUTH=<>\r\n"))[-1] == "555"


def test_mail_line_may_be_500_octets_longer_with_auth():
    """rfc4954 3: the AUTH parameter makes MAIL FROM lines up to 500 octets longer."""
    d, _ = auth_driver()
    mailbox = b"x" * 60 + b"@" + b".".join([b"y" * 60] * 8) + b".test"
    line = b"MAIL FROM:<a@b.test> AUTH=" + mailbox
    assert 512 < len(line) + 2 < 1012
    assert codes(d.feed(b"EHLO c\r\n" + line + b"\r\n"))[-1] in ("250", "501")  # not 500: read whole


# ------------------------------------------------------------------ submission


@pytest.mark.parametrize("command", [b"MAIL FROM:<alice@example.test>", b"RCPT TO:<bob@example.test>", b"DATA", b"VRFY bob"])
def test_submission_needs_auth_first(command):
    """rfc6409 4.3 / rfc4954 6: mail commands before AUTH get 530 5.7.0."""
    d, _ = auth_driver(SUBMISSION)
    assert d.feed(b"EHLO c\r\n" + command + b"\r\n").endswith("530 5.7.0 Authentication required\r\n")


def test_submission_after_auth_is_a_normal_transaction():
    """Once authenticated, MAIL, RCPT and DATA go on as usual; NOOP, RSET, HELP never needed AUTH."""
    d, _ = auth_driver(SUBMISSION)
    assert codes(d.feed(session(b"EHLO c", b"NOOP", b"RSET", b"HELP"))) == ["250", "250", "250", "214"]
    d.feed(b"AUTH PLAIN " + b64(b"\0alice\0wonderland") + b"\r\n")
    out = d.feed(session(b"MAIL FROM:<alice@example.test>", b"RCPT TO:<x@far.test>", b"DATA") + b"hi\r\n.\r\n")
    assert codes(out) == ["250", "250", "354", "250"]


# ------------------------------------------------------------------ limits


def test_too_many_errors_close_the_session():
    """max_errors bad commands: the last one's reply, then 421 4.7.0, then nothing."""
    d = Driver(ServerSettings("mx.test", max_errors=3))
    d.conn.data_to_send()
    out = d.feed(b"FOO\r\nBAR\r\nNOOP\r\nRCPT TO:<a@b.test>\r\nNOOP\r\n")
    assert codes(out) == ["500", "500", "250", "503", "421"]
    assert out.endswith("421 4.7.0 Too many errors; closing connection\r\n") and d.conn.closed


def test_rejected_recipients_do_not_count_as_errors():
    """Only syntax and sequence errors count: a policy's 550 is not the client's mistake."""
    d = Driver(ServerSettings("mx.test", max_errors=2), {ev.RcptTo: Reply.of(550, "5.1.1", "no")})
    out = d.feed(session(b"EHLO c", b"MAIL FROM:<a@b.test>", *[b"RCPT TO:<x@y.test>"] * 5))
    assert codes(out)[-5:] == ["550"] * 5 and not d.conn.closed


def test_a_421_reply_to_a_decision_closes():
    """rfc5321 3.8: the glue answers AUTH with 421 (too many failures): the session ends."""
    d, _ = auth_driver()
    d.answers[ev.Auth] = Reply.of(421, "4.7.0", "Too many failed authentications")
    out = d.feed(b"EHLO c\r\nAUTH PLAIN " + b64(b"\0a\0b") + b"\r\nNOOP\r\n")
    assert out.endswith("421 4.7.0 Too many failed authentications\r\n") and d.conn.closed


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([
    b"EHLO c\r\n", b"STARTTLS\r\n", b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n", b"AUTH CRAM-MD5\r\n", b"*\r\n",
    b"AGFsaWNlAHdvbmRlcmxhbmQ=\r\n", b"=\r\n", b"!!\r\n", b"MAIL FROM:<a@b.test> AUTH=<>\r\n",
    b"RCPT TO:<c@d.test>\r\n", b"DATA\r\n", b"x\r\n.\r\n", b"RSET\r\n", b"\r\n", b"\n",
]), max_size=30), st.booleans())
def test_any_auth_and_tls_sequence_keeps_replies_well_formed(pieces, tls_on_accept):
    """Whatever the order of STARTTLS/AUTH pieces, the machine never raises and
    every reply line is well-formed."""
    glue = SASLGlue()
    d = Driver(ServerSettings("mx.test", starttls=True, auth_mechanisms=("PLAIN", "LOGIN", "CRAM-MD5"),
                              max_errors=20), glue.answers())
    out = ""
    for piece in pieces:
        out += d.feed(piece)
        if d.conn.tls_pending and tls_on_accept:
            d.conn.tls_started()
    for line in out.split("\r\n")[:-1]:
        assert line[:3].isdigit() and line[3:4] in (" ", "-"), line

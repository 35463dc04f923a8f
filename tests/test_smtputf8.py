"""SMTPUTF8 (rfc6531) on the receiving side: the machine, the config
directory, and the Twisted glue in memory (a real spool on disk)."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings, strategies as st
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from mailsvc.config import loads
from mailsvc.directory import ConfigDirectory
from mailsvc.errors import ConfigError
from mailsvc.protocol import SMTPServerFactory
from mailsvc.receiver import ReceiverContext, ReceiverSettings
from mailsvc.smtp import events as ev
from mailsvc.smtp.address import AddressError, ascii_domain, check_mailbox
from mailsvc.smtp.server import ServerSettings
from mailsvc.spool import control
from mailsvc.spool.filespool import FileSpool
from mailsvc.submission import protocol_name

from smtp_driver import Driver

JOERG = "j\u00f6rg"  # "jörg" in NFC
BUECHER = "b\u00fccher.example"  # a U-label domain
BUECHER_A = "xn--bcher-kva.example"


def utf8_driver(**settings) -> Driver:
    return Driver(ServerSettings("mx.test", max_message_size=10_000, smtputf8=True, **settings))


# ---------------------------------------------------------------- the machine


def test_ehlo_offers_smtputf8_only_when_on():
    """rfc6531 3.1: the EHLO keyword, with no parameters; off, it is not offered."""
    assert "250-SMTPUTF8\r\n" in utf8_driver().feed(b"EHLO c.test\r\n")
    assert "SMTPUTF8" not in Driver().feed(b"EHLO c.test\r\n")


def test_utf8_sender_and_recipient_with_the_parameter():
    """MAIL ... SMTPUTF8 lets both paths carry UTF-8 (rfc6531 3.3)."""
    d = utf8_driver()
    d.feed(b"EHLO c.test\r\n")
    assert d.feed(f"MAIL FROM:<{JOERG}@{BUECHER}> SMTPUTF8\r\n".encode()).startswith("250 ")
    assert d.feed(f"RCPT TO:<\u00e9l\u00e8ve@{BUECHER}>\r\n".encode()).startswith("250 ")
    assert d.feed('RCPT TO:<"quoted \u00fc"@example.test>\r\n'.encode()).startswith("250 ")
    mail = next(e for e in d.events if isinstance(e, ev.MailFrom))
    rcpts = [e.recipient for e in d.events if isinstance(e, ev.RcptTo)]
    assert mail.sender == f"{JOERG}@{BUECHER}"
    assert "SMTPUTF8" in mail.parameters
    assert rcpts == [f"\u00e9l\u00e8ve@{BUECHER}", '"quoted \u00fc"@example.test']


def test_utf8_address_without_the_parameter_is_refused():
    """rfc6531 3.5: 550 5.6.7 for MAIL, 553 5.6.7 for RCPT, when the
    transaction did not declare SMTPUTF8."""
    d = utf8_driver()
    d.feed(b"EHLO c.test\r\n")
    assert d.feed(f"MAIL FROM:<{JOERG}@example.test>\r\n".encode()) == (
        "550 5.6.7 Must declare SMTPUTF8 to send a non-ASCII address\r\n"
    )
    assert d.feed(b"MAIL FROM:<alice@example.test>\r\n").startswith("250 ")
    reply = d.feed(f"RCPT TO:<{JOERG}@example.test>\r\n".encode())
    assert reply.startswith("553 5.6.7 ")
    # After RSET a new transaction may declare it.
    d.feed(b"RSET\r\n")
    d.feed(b"MAIL FROM:<alice@example.test> SMTPUTF8\r\n")
    assert d.feed(f"RCPT TO:<{JOERG}@example.test>\r\n".encode()).startswith("250 ")
    d.feed(b"RSET\r\n")
    d.feed(b"MAIL FROM:<alice@example.test>\r\n")
    assert d.feed(f"RCPT TO:<{JOERG}@example.test>\r\n".encode()).startswith("553 5.6.7 ")


def test_utf8_address_when_smtputf8_is_off():
    """Not offered: a UTF-8 address is 550/553 5.6.7, and the parameter is unknown (555)."""
    d = Driver()
    d.feed(b"EHLO c.test\r\n")
    assert d.feed(f"MAIL FROM:<{JOERG}@example.test> SMTPUTF8\r\n".encode()).startswith("550 5.6.7 ")
    assert d.feed(b"MAIL FROM:<a@example.test> SMTPUTF8\r\n") == "555 5.5.4 Unsupported MAIL parameter: SMTPUTF8\r\n"


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"MAIL FROM:<a@example.test> SMTPUTF8=yes", "501 5.5.4 SMTPUTF8 takes no value"),
        # Octets that are not UTF-8 are never an address (U+FFFD stands for them).
        (b"MAIL FROM:<j\xf6rg@example.test> SMTPUTF8", "501 5.1.7 Syntax error: bad local part: j\\x{FFFD}rg"),
        (b"MAIL FROM:<a@b\xc3\xbc\xff.example> SMTPUTF8", "501 5.1.7 Syntax error: bad domain: b\\x{FC}\\x{FFFD}.example"),
        # C1 controls are not characters of an address.
        ("MAIL FROM:<a\u0085b@example.test> SMTPUTF8".encode(), "501 5.1.7 Syntax error: bad local part: a\\x{85}b"),
        # A U-label must be a valid IDN (rfc5891): no underscore, no leading hyphen.
        ("MAIL FROM:<a@b\u00fc_x.example> SMTPUTF8".encode(), "501 5.1.7 Syntax error: bad domain: b\\x{FC}_x.example"),
        ("MAIL FROM:<a@-b\u00fc.example> SMTPUTF8".encode(), "501 5.1.7 Syntax error: bad domain: -b\\x{FC}.example"),
        ("MAIL FROM:<a b\u00fc@example.test> SMTPUTF8".encode(), "501 5.1.7 Syntax error: bad local part: a b\\x{FC}"),
    ],
)
def test_bad_utf8_addresses(line, expected):
    """Bad UTF-8 input gets 501 with what was wrong, the reply itself in ASCII
    (rfc6531 3.7.4: no UTF-8 in replies but VRFY/EXPN's)."""
    d = utf8_driver()
    d.feed(b"EHLO c.test\r\n")
    reply = d.feed(line + b"\r\n")
    assert reply == expected + "\r\n"
    assert d.feed(b"NOOP\r\n") == "250 2.0.0 Ok\r\n"  # the session goes on


def test_a_mail_line_may_be_ten_octets_longer():
    """rfc6531 3.1 (5): MAIL lines may be 10 octets longer than 512; a line
    of 520 is read as a command (here: an unknown parameter), one of 523 is
    too long, as a line of 513 is without SMTPUTF8."""
    def reply_to(driver: Driver, length: int) -> str:
        driver.feed(b"EHLO c.test\r\n")
        head = b"MAIL FROM:<a@example.test> X="
        return driver.feed(head + b"y" * (length - len(head) - 2) + b"\r\n")

    assert reply_to(utf8_driver(), 520).startswith("555 ")
    assert reply_to(utf8_driver(), 523).startswith("500 ")
    assert reply_to(Driver(), 513).startswith("500 ")


def test_vrfy_and_expn_take_the_smtputf8_parameter():
    """rfc6531 3.7.4.2: VRFY/EXPN string [SP "SMTPUTF8"]."""
    d = utf8_driver()
    d.feed(b"EHLO c.test\r\n")
    d.feed(f"VRFY {JOERG} SMTPUTF8\r\n".encode())
    d.feed(f"VRFY {JOERG}\r\n".encode())
    d.feed(b"EXPN team smtputf8\r\n")
    verifies = [e for e in d.events if isinstance(e, (ev.Verify, ev.Expand))]
    assert verifies == [ev.Verify(JOERG, True), ev.Verify(JOERG, False), ev.Expand("team", True)]
    d.feed(b"VRFY smtputf8\r\n")  # alone, it is the name asked for
    assert d.events[-1] == ev.Verify("smtputf8", False)


def test_orcpt_of_type_utf8():
    """rfc6533 3: ORCPT=utf-8; with \\x{HEX} (or raw UTF-8 in an SMTPUTF8
    transaction); a \\x{} that is no character is 501."""
    d = utf8_driver()
    d.feed(b"EHLO c.test\r\n")
    d.feed(b"MAIL FROM:<a@example.test> SMTPUTF8\r\n")
    assert d.feed(b"RCPT TO:<alice@example.test> ORCPT=utf-8;j\\x{F6}rg@example.test\r\n").startswith("250 ")
    assert d.feed(f"RCPT TO:<bob@example.test> ORCPT=utf-8;{JOERG}@example.test\r\n".encode()).startswith("250 ")
    assert d.feed(b"RCPT TO:<bob@example.test> ORCPT=utf-8;a\\x{D800}@example.test\r\n").startswith("501 5.5.4 ")
    assert d.feed(b"RCPT TO:<bob@example.test> ORCPT=utf-8;a b\r\n").startswith("555 ")  # a space ends the value


def test_help_mail_names_smtputf8():
    assert "SMTPUTF8" in utf8_driver().feed(b"HELP MAIL\r\n")


_ADDRESS_BYTES = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"j\xc3\xb6rg@b\xc3\xbccher.example", b'"\xc3\xa9 x"@e.test', b"\xff@x.test", b"a@\xe2\x80\x8f.test"]),
)


@settings(max_examples=300, deadline=None)
@given(sender=_ADDRESS_BYTES, recipient=_ADDRESS_BYTES, declare=st.booleans(), params=st.binary(max_size=20))
def test_any_octets_in_paths_get_an_ascii_reply_and_the_session_goes_on(sender, recipient, declare, params):
    """Whatever octets a client puts in MAIL and RCPT (no CR or LF): one
    reply each, in ASCII (rfc6531 3.7.4), a code the RFCs give for them,
    and the session still answers NOOP."""
    d = utf8_driver()
    d.feed(b"EHLO c.test\r\n")
    strip = lambda b: b.replace(b"\r", b"").replace(b"\n", b"")  # noqa: E731
    mail = b"MAIL FROM:<" + strip(sender) + b">" + (b" SMTPUTF8" if declare else b"") + b" " + strip(params)
    rcpt = b"RCPT TO:<" + strip(recipient) + b">"
    for line in (mail, rcpt):
        reply = d.feed(line + b"\r\n")
        assert reply.isascii(), reply
        assert reply.count("\r\n") == 1 and reply[:3] in {"250", "500", "501", "503", "550", "552", "553", "555"}, reply
    assert d.feed(b"NOOP\r\n") == "250 2.0.0 Ok\r\n"


# ---------------------------------------------------------------- addresses


def test_ascii_domain_maps_u_labels_and_case():
    assert ascii_domain("B\u00dcCHER.Example.") == BUECHER_A
    assert ascii_domain(BUECHER) == BUECHER_A
    assert ascii_domain("Example.TEST") == "example.test"
    with pytest.raises(AddressError):
        ascii_domain("a\u00fc_b.example")


def test_check_mailbox_utf8():
    check_mailbox(f"{JOERG}@{BUECHER}", utf8=True)
    check_mailbox(f'"{JOERG} x"@example.test', utf8=True)
    with pytest.raises(AddressError) as raised:
        check_mailbox(f"{JOERG}@{BUECHER}")
    assert raised.value.status == "5.6.7"
    with pytest.raises(AddressError):
        check_mailbox("\u00e9" * 33 + "@example.test", utf8=True)  # 66 octets: over 64 (rfc5321 4.5.3.1.1)


# ---------------------------------------------------------------- config and directory


CONFIG = f"""
[local]
domains = ["example.test", "{BUECHER}"]
users = ["alice", "{JOERG}", "\u00c9LODIE"]
aliases = {{ postmaster = ["alice"], "\u00e9quipe" = ["alice", "{JOERG}"] }}
"""


@pytest.fixture
def directory(tmp_path):
    return ConfigDirectory(loads(CONFIG, tmp_path / "mailsvc.toml").local)


def test_config_keeps_utf8_users_and_a_labels(directory):
    assert BUECHER_A in directory.domains
    assert JOERG in directory.users and "\u00e9lodie" in directory.users


@pytest.mark.parametrize(
    "address",
    [
        f"{JOERG}@example.test",
        "J\u00d6RG@example.test",  # case does not matter
        unicodedata.normalize("NFD", f"{JOERG}@example.test"),  # nor the normal form
        f"{JOERG}@{BUECHER}",  # the U-label
        f"{JOERG}@{BUECHER_A}",  # and the A-label are one domain
        f"{JOERG}@B\u00dcCHER.example",
    ],
)
def test_utf8_user_found_in_every_spelling(directory, address):
    [mailbox] = directory.resolve(address)
    assert mailbox.mailbox == JOERG


def test_utf8_alias_expands(directory):
    assert [m.mailbox for m in directory.resolve("\u00c9quipe@example.test")] == ["alice", JOERG]
    assert directory.isLocalDomain(BUECHER) and directory.isLocalDomain(BUECHER_A)
    assert not directory.isLocalDomain("b\u00fc_x.example")


def test_bad_utf8_user_name_in_config(tmp_path):
    with pytest.raises(ConfigError) as raised:
        loads('[local]\nusers = ["j\u00f6rg/x"]\n', tmp_path / "mailsvc.toml")
    assert "users[0]" in str(raised.value)


def test_protocol_names():
    """rfc6531 4.3: the WITH keywords of a transaction with SMTPUTF8."""
    assert protocol_name(True, False, False, True) == "UTF8SMTP"
    assert protocol_name(True, True, False, True) == "UTF8SMTPS"
    assert protocol_name(True, False, True, True) == "UTF8SMTPA"
    assert protocol_name(True, True, True, True) == "UTF8SMTPSA"
    assert protocol_name(True, True, True, False) == "ESMTPSA"


# ---------------------------------------------------------------- the glue, in memory


class Harness:
    """The SMTP factory over a real spool, the config directory and a fake clock."""

    def __init__(self, tmp_path, *, expn=True):
        cfg = loads(CONFIG, tmp_path / "mailsvc.toml")
        self.spool = FileSpool(tmp_path / "spool")
        self.submitted = []
        self.context = ReceiverContext(
            settings=ReceiverSettings(hostname="mx.test", default_domain="example.test", expn=expn),
            directory=ConfigDirectory(cfg.local),
            spool=self.spool,
            submit=self.submitted.append,
            run_blocking=defer.maybeDeferred,
            now=lambda: 1_790_000_000.0,
        )
        self.factory = SMTPServerFactory(
            self.context, ServerSettings("mx.test", max_message_size=10_000, smtputf8=True), clock=task.Clock()
        )

    def talk(self, *lines: str) -> list[bytes]:
        proto = self.factory.buildProtocol(None)
        transport = StringTransport(
            peerAddress=IPv4Address("TCP", "192.0.2.7", 40000), hostAddress=IPv4Address("TCP", "127.0.0.1", 25)
        )
        proto.makeConnection(transport)
        replies = []
        for line in lines:
            transport.clear()
            proto.dataReceived(line.encode() + b"\r\n")
            replies.append(transport.value())
        proto.connectionLost(None)
        return replies


def test_utf8_message_is_spooled_with_its_envelope(tmp_path):
    """The envelope keeps SMTPUTF8 and the UTF-8 addresses; Received says
    UTF8SMTP and names the recipient as given; the control file round-trips."""
    h = Harness(tmp_path)
    replies = h.talk(
        "EHLO c.test",
        f"MAIL FROM:<{JOERG}@{BUECHER}> SMTPUTF8",
        f"RCPT TO:<{JOERG}@example.test>",
        "DATA",
        f"From: {JOERG}@{BUECHER}\r\nSubject: Gr\u00fc\u00dfe\r\n\r\nHall\u00f6\r\n.",
    )
    assert replies[-1].startswith(b"250 2.0.0 Ok: queued as ")
    [queued] = h.submitted
    env = queued.envelope
    assert env.sender == f"{JOERG}@{BUECHER}"
    assert ("SMTPUTF8", "") in env.parameters
    assert [r.mailbox for r in env.recipients] == [JOERG]
    assert env.prepend_headers[0].startswith("Received: from c.test ([192.0.2.7]) by mx.test (mailsvc) with UTF8SMTP id ")
    assert f"for <{JOERG}@example.test>" in env.prepend_headers[0]
    [path] = (tmp_path / "spool").rglob(f"C.{queued.id}")
    assert path.read_bytes().isascii()  # escaped (xtext) on disk
    assert control.load(path.read_bytes(), queued.hop, queued.id).envelope == env


def test_ascii_transaction_keeps_esmtp(tmp_path):
    h = Harness(tmp_path)
    h.talk("EHLO c.test", "MAIL FROM:<a@example.test>", "RCPT TO:<alice@example.test>", "DATA", "x\r\n.")
    assert " with ESMTP id " in h.submitted[0].envelope.prepend_headers[0]


def test_refusals_never_send_utf8(tmp_path):
    """An unknown UTF-8 recipient: 550 5.1.1 naming it as \\x{HEX}."""
    h = Harness(tmp_path)
    replies = h.talk("EHLO c.test", "MAIL FROM:<a@remote.test> SMTPUTF8", f"RCPT TO:<{JOERG}x@example.test>")
    assert replies[-1] == b"550 5.1.1 <j\\x{F6}rgx@example.test>: no such user here\r\n"


def test_orcpt_utf8_becomes_the_original_recipient(tmp_path):
    h = Harness(tmp_path)
    h.talk(
        "EHLO c.test",
        "MAIL FROM:<a@remote.test> SMTPUTF8",
        "RCPT TO:<alice@example.test> ORCPT=utf-8;J\\x{D6}RG@example.test",
        "DATA",
        "x\r\n.",
    )
    [recipient] = h.submitted[0].envelope.recipients
    assert recipient.original == "J\u00d6RG@example.test"


def test_vrfy_shows_utf8_only_when_asked(tmp_path):
    """rfc6531 3.7.4.2: with SMTPUTF8 the mailbox in UTF-8; without, 252 2.6.8."""
    h = Harness(tmp_path)
    with_param, without, ascii_user = h.talk(
        "EHLO c.test", f"VRFY {JOERG} SMTPUTF8", f"VRFY {JOERG}", "VRFY alice"
    )[1:]
    assert with_param == f"250 2.1.5 <{JOERG}@example.test>\r\n".encode()
    assert without.startswith(b"252 2.6.8 ") and without.isascii()
    assert ascii_user == b"250 2.1.5 <alice@example.test>\r\n"


def test_expn_shows_utf8_members_only_when_asked(tmp_path):
    h = Harness(tmp_path)
    with_param, without = h.talk("EHLO c.test", "EXPN \u00e9quipe SMTPUTF8", "EXPN \u00e9quipe")[1:]
    assert with_param == f"250-2.1.5 <alice@example.test>\r\n250 2.1.5 <{JOERG}@example.test>\r\n".encode()
    assert without.startswith(b"550 5.6.8 ") and without.isascii()

"""SMTPUTF8 (rfc6531) through the real ``twistd mailsvc`` process: Python's
smtplib (which uses SMTPUTF8 by itself when a message needs it and the
server offers it) and a raw socket for what smtplib would not send."""

from __future__ import annotations

import base64
import io
import poplib
import smtplib
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTPUTF8 as SMTPUTF8_POLICY

import pytest
import trustme

from mailsvc import passwd
from realserver import RawSMTP, RealServer, client_context, free_port, start_server  # noqa: F401 (fixtures)

JOERG = "j\u00f6rg"
BUECHER = "b\u00fccher.example"  # a local domain, configured as a U-label
USERS = ["alice", "bob", JOERG]


@pytest.fixture
def server(start_server) -> RealServer:
    return start_server(sections={"local": {"domains": ["example.test", BUECHER], "users": USERS}})


def utf8_message(recipient: str) -> EmailMessage:
    message = EmailMessage(policy=SMTPUTF8_POLICY)
    message["From"] = "Zo\u00eb <zo\u00eb@\u4f8b\u3048.test>"
    message["To"] = recipient
    message["Subject"] = "Gr\u00fc\u00dfe aus K\u00f6ln"
    message.set_content("Hall\u00f6, J\u00f6rg!\n")
    return message


def test_smtplib_sends_an_internationalized_message(server):
    """smtplib sees SMTPUTF8 in EHLO and sends MAIL ... SMTPUTF8 with the
    UTF-8 addresses; the message lands in jörg's Maildir with its UTF-8
    headers unchanged, Delivered-To in UTF-8 and Received "with UTF8SMTP"."""
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test", timeout=10) as client:
        client.ehlo()
        assert client.has_extn("smtputf8")
        assert client.send_message(utf8_message(f"{JOERG}@{BUECHER}")) == {}
    [path] = server.wait_for_mail(JOERG)
    data = path.read_bytes()
    parsed = BytesParser(policy=SMTPUTF8_POLICY).parsebytes(data)
    assert parsed["Return-Path"] == "<zo\u00eb@\u4f8b\u3048.test>"
    assert parsed["Delivered-To"] == f"{JOERG}@xn--bcher-kva.example"
    assert parsed["Subject"] == "Gr\u00fc\u00dfe aus K\u00f6ln"
    assert " with UTF8SMTP id " in parsed["Received"]
    assert "Gr\u00fc\u00dfe aus K\u00f6ln".encode() in data  # raw UTF-8 (rfc6532), not an encoded-word
    assert parsed.get_content() == "Hall\u00f6, J\u00f6rg!\n"


def test_smtplib_without_smtputf8_gets_refused_clearly(server):
    """A client that does not declare SMTPUTF8 but sends a UTF-8 address gets
    550/553 5.6.7 (rfc6531 3.5) and nothing is queued."""
    with RawSMTP(server.port) as raw:
        raw.reply()
        raw.command("EHLO client.test")
        assert raw.command(f"MAIL FROM:<{JOERG}@example.test>".encode()) == (
            550, "5.6.7 Must declare SMTPUTF8 to send a non-ASCII address"
        )
        assert raw.command("MAIL FROM:<a@remote.test>")[0] == 250
        code, text = raw.command(f"RCPT TO:<{JOERG}@example.test>".encode())
        assert (code, text[:5]) == (553, "5.6.7")
        assert raw.command("QUIT")[0] == 221
    assert server.maildir(JOERG) == []


def test_vrfy_with_and_without_smtputf8(server):
    """rfc6531 3.7.4.2: the UTF-8 mailbox in the reply only when asked for."""
    with RawSMTP(server.port) as raw:
        raw.reply()
        raw.command("EHLO client.test")
        assert raw.command(f"VRFY {JOERG} SMTPUTF8".encode()) == (250, f"2.1.5 <{JOERG}@example.test>")
        code, text = raw.command(f"VRFY {JOERG}".encode())
        assert code == 252 and text.startswith("2.6.8 ")


def test_bad_octets_do_not_break_the_session(server):
    """Octets that are not UTF-8 in an address: 501, and the session goes on."""
    with RawSMTP(server.port) as raw:
        raw.reply()
        raw.command("EHLO client.test")
        code, text = raw.command(b"MAIL FROM:<j\xf6rg@example.test> SMTPUTF8")
        assert code == 501 and text.startswith("5.1.7 ")
        assert raw.command(b"MAIL FROM:<a@remote.test> SMTPUTF8")[0] == 250
        assert raw.command(f"RCPT TO:<{JOERG}@{BUECHER}>".encode())[0] == 250
        assert raw.command("DATA")[0] == 354
        assert raw.command(b"Subject: \xe2\x9c\x93\r\n\r\nok\r\n.")[0] == 250
    [path] = server.wait_for_mail(JOERG)
    assert b"Subject: \xe2\x9c\x93\n" in path.read_bytes()


def test_smtputf8_can_be_turned_off(start_server):
    """[smtp] smtputf8 = false: not offered, and smtplib then refuses to send
    a message that needs it (rfc6531 3.2)."""
    server = start_server(sections={"smtp": {"smtputf8": False}, "local": {"users": USERS}})
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test", timeout=10) as client:
        client.ehlo()
        assert not client.has_extn("smtputf8")
        with pytest.raises(smtplib.SMTPNotSupportedError):
            client.send_message(utf8_message(f"{JOERG}@example.test"))


def test_alice_and_joerg_over_submission_and_pop3(tmp_path):
    """End to end with a UTF-8 user: Alice submits (STARTTLS + AUTH) a
    message with a UTF-8 Subject to jörg@bücher.example; Jörg logs in to
    POP3 as "JÖRG@bücher.example" (any case, the U-label of the domain),
    reads the bytes Alice sent, and answers her, logged in to submission
    with AUTH PLAIN in UTF-8 (rfc4616)."""
    ca = trustme.CA()
    pop3_port = free_port()
    server = RealServer(tmp_path / "srv", sections={
        "local": {"domains": ["example.test", BUECHER], "users": USERS},
        "pop3": {"listen": [f"tcp:{pop3_port}:interface=127.0.0.1"]},
    })
    cert = ca.issue_cert("mx.test", "127.0.0.1", common_name="mx.test")
    server.cert_file.parent.mkdir(parents=True)
    cert.private_key_pem.write_to_path(str(server.key_file))
    server.cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    server.write_config()
    for user, password in (("alice", "alice pass"), ("J\u00d6RG", "j\u00f6rg's pass")):
        assert passwd.main([user, "--config", str(server.config_path), "--stdin"],
                           stdin=io.StringIO(password + "\n")) == 0
    context = client_context(ca)
    message = (
        "From: Alice <alice@example.test>\r\nTo: J\u00f6rg <j\u00f6rg@b\u00fccher.example>\r\n"
        "Subject: \u00dcberraschung\r\nMessage-ID: <u1@example.test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
        "\r\nHallo J\u00f6rg,\r\n.punkt\r\nAlice\r\n"
    ).encode()
    server.start()
    try:
        server.wait_for_log(f"starting on {pop3_port}")
        with smtplib.SMTP("127.0.0.1", server.submission_port, local_hostname="laptop.test", timeout=10) as client:
            client.starttls(context=context)
            client.ehlo()
            client.login("alice", "alice pass")
            assert client.sendmail("alice@example.test", [f"{JOERG}@{BUECHER}"], message, mail_options=["SMTPUTF8"]) == {}
        server.wait_for_mail(JOERG)

        pop = poplib.POP3("127.0.0.1", pop3_port, timeout=10)
        try:
            pop.stls(context=context)
            pop.user(f"J\u00d6RG@{BUECHER}")
            assert pop.pass_("j\u00f6rg's pass").startswith(b"+OK")
            _, lines, _ = pop.retr(1)
        finally:
            pop.quit()
        received = b"".join(line + b"\r\n" for line in lines)
        assert received.endswith(message)
        assert b" with UTF8SMTPSA id " in received  # rfc6531 4.3: SMTPUTF8, TLS and AUTH

        answer = b"Subject: Re: \xc3\x9cberraschung\r\n\r\nDanke!\r\n"
        with smtplib.SMTP("127.0.0.1", server.submission_port, local_hostname="laptop.test", timeout=10) as client:
            client.starttls(context=context)
            client.ehlo()
            # smtplib encodes AUTH responses as ASCII: the rfc4616 message by hand.
            token = base64.b64encode(f"\0{JOERG}@{BUECHER}\0j\u00f6rg's pass".encode()).decode()
            assert client.docmd("AUTH", f"PLAIN {token}")[0] == 235
            assert client.sendmail(f"{JOERG}@{BUECHER}", ["alice@example.test"], answer, mail_options=["SMTPUTF8"]) == {}
        [path] = server.wait_for_mail("alice")
        assert path.read_bytes().endswith(b"\n\nDanke!\n")
        assert f"Return-Path: <{JOERG}@{BUECHER}>".encode() in path.read_bytes()
    finally:
        server.stop()

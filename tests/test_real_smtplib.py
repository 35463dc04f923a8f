"""Python's smtplib (and a raw socket, where smtplib would tidy the bytes)
against the real ``twistd mailsvc`` process on 127.0.0.1."""

from __future__ import annotations

import mailbox
import re
import smtplib
import time
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy

import pytest

from realserver import RawSMTP, RealServer, real_server, start_server  # noqa: F401 (fixtures)

SENDER = "x@remote.test"
HELO = "client.test"


def smtp(server: RealServer) -> smtplib.SMTP:
    """An smtplib client connected to ``server``, saying EHLO client.test."""
    return smtplib.SMTP("127.0.0.1", server.port, local_hostname=HELO, timeout=10)


def split_delivered(data: bytes, mailbox_address: str, sender: str = SENDER, helo: str = HELO) -> tuple[str, bytes]:
    """Check the three lines local delivery puts on top; return (queue id, the rest).

    The file is ``Return-Path:``, ``Delivered-To:``, the ``Received:`` line,
    then the message as sent, with LF line ends.
    """
    return_path, delivered_to, received, rest = data.split(b"\n", 3)
    assert return_path == f"Return-Path: <{sender}>".encode()
    assert delivered_to == f"Delivered-To: {mailbox_address}".encode()
    match = re.fullmatch(
        rb"Received: from " + re.escape(helo.encode()) + rb" \(\[127\.0\.0\.1\]\) by mx\.test \(mailsvc\)"
        rb" with ESMTP id ([0-9a-v]{20})( for <[^>]+>)?; .+",
        received,
    )
    assert match, received
    return match.group(1).decode(), rest


def wire(text: bytes) -> bytes:
    """A message written with LF, in wire form (CRLF)."""
    return text.replace(b"\n", b"\r\n")


def test_message_arrives_byte_exact(real_server):
    """A message to alice lands in her Maildir's new/ as sent: CRLF become LF,
    stuffed dots are removed again (lines starting with '.', a line of just
    '.', one of '..'), a text line of exactly 998 octets survives whole."""
    body = (
        b"From: X <x@remote.test>\n"
        b"To: alice@example.test\n"
        b"Subject: byte exact\n"
        b"\n"
        b".leading dot\n"
        b"..two leading dots\n"
        b".\n"
        b"..\n"
        b" . not at the start\n"
        + b"L" * 998 + b"\n"
        + b"." + b"d" * 997 + b"\n"
        b"last line\n"
    )
    with smtp(real_server) as client:
        assert client.sendmail(SENDER, ["alice@example.test"], wire(body)) == {}
    [path] = real_server.wait_for_mail("alice")
    queue_id, rest = split_delivered(path.read_bytes(), "alice@example.test")
    assert rest == body
    assert f"accepted id={queue_id} " in real_server.log()


def test_8bit_body_with_body_8bitmime(real_server):
    """With BODY=8BITMIME, octets above 127 (UTF-8 and Latin-1) are stored unchanged."""
    body = (
        b"From: x@remote.test\n"
        b"To: alice@example.test\n"
        b"Subject: 8bit\n"
        b"MIME-Version: 1.0\n"
        b"Content-Type: text/plain; charset=utf-8\n"
        b"Content-Transfer-Encoding: 8bit\n"
        b"\n"
        + "Grüße, œuvre, 日本語\n".encode("utf-8")
        + b"latin-1: \xe9\xe8\xff\n"
        + bytes(range(0x80, 0x100))
        + b"\n"
    )
    with smtp(real_server) as client:
        client.ehlo()
        assert client.has_extn("8bitmime")
        assert client.sendmail(SENDER, ["alice@example.test"], wire(body), mail_options=["BODY=8BITMIME"]) == {}
    [path] = real_server.wait_for_mail("alice")
    _, rest = split_delivered(path.read_bytes(), "alice@example.test")
    assert rest == body


def test_alias_gives_one_copy_per_mailbox(real_server):
    """send_message to the alias team: alice and bob each get exactly one copy,
    each with its own Delivered-To and the message intact."""
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = "team@example.test"
    msg["Subject"] = "for the team"
    msg.set_content("Hello team.\n.dot line\n")
    with smtp(real_server) as client:
        assert client.send_message(msg, SENDER, ["team@example.test"]) == {}
    real_server.wait_for_mail("alice")
    real_server.wait_for_mail("bob")
    real_server.wait_idle()
    for user in ("alice", "bob"):
        [path] = real_server.maildir(user)
        data = path.read_bytes()
        split_delivered(data, f"{user}@example.test")
        delivered = BytesParser(policy=default_policy).parsebytes(data)
        assert delivered.get_all("Delivered-To") == [f"{user}@example.test"]
        assert delivered["Subject"] == "for the team"
        assert delivered.get_content() == "Hello team.\n.dot line\n"
    assert real_server.maildir("carol") == []


def test_unknown_user_is_refused(real_server):
    """An unknown local user: SMTPRecipientsRefused with 550 5.1.1; nothing queued."""
    with smtp(real_server) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as caught:
            client.sendmail(SENDER, ["nobody@example.test"], b"Subject: x\r\n\r\nx\r\n")
    [(code, text)] = caught.value.recipients.values()
    assert code == 550
    assert text.startswith(b"5.1.1 ")
    assert "nobody@example.test" in caught.value.recipients
    assert real_server.spool_files() == []


def test_no_relay_to_other_domains(real_server):
    """Mail for another domain from an untrusted client: 550 5.7.1 (no open relay)."""
    with smtp(real_server) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as caught:
            client.sendmail(SENDER, ["someone@elsewhere.test"], b"Subject: x\r\n\r\nx\r\n")
    assert caught.value.recipients == {
        "someone@elsewhere.test": (550, b"5.7.1 <someone@elsewhere.test>: relay access denied")
    }
    assert real_server.spool_files() == []


def test_ehlo_features(real_server):
    """EHLO advertises PIPELINING, SIZE (with the configured limit), 8BITMIME,
    ENHANCEDSTATUSCODES; the greeting and EHLO name the host mx.test."""
    with smtp(real_server) as client:
        code, text = client.ehlo()
        assert code == 250
        assert text.splitlines()[0] == b"mx.test greets client.test"
        features = client.esmtp_features
    for keyword in ("pipelining", "size", "8bitmime", "enhancedstatuscodes"):
        assert keyword in features, features
    assert features["size"] == "26214400"


def test_vrfy_noop_help(real_server):
    """VRFY alice gives 250, VRFY of a stranger 550 5.1.1; NOOP 250; HELP 214 with the commands."""
    with smtp(real_server) as client:
        client.ehlo()
        assert client.verify("alice") == (250, b"2.1.5 <alice@example.test>")
        code, text = client.verify("nobody")
        assert (code, text[:6]) == (550, b"5.1.1 ")
        assert client.noop() == (250, b"2.0.0 Ok")
        assert b"HELO EHLO MAIL RCPT DATA" in client.help()
        code, text = client.docmd("HELP", "DATA")
        assert code == 214 and b"rfc5321 4.1.1.4" in text
        assert client.docmd("HELP", "BOGUS")[0] == 504


def test_size_limit(start_server):
    """With max_message_size = 2000: SIZE 2000 is advertised; a message declared
    bigger gets 552 5.3.4 at MAIL; one sent without SIZE gets 552 5.3.4 after its
    end; nothing is delivered or left in the spool, and the session goes on."""
    server = start_server(sections={"smtp": {"max_message_size": 2000}})
    big = b"Subject: big\r\n\r\n" + (b"0123456789" * 10 + b"\r\n") * 30
    small = b"Subject: small\r\n\r\nsmall\r\n"
    with smtp(server) as client:
        client.ehlo()
        assert client.esmtp_features["size"] == "2000"
        with pytest.raises(smtplib.SMTPSenderRefused) as caught:
            client.sendmail(SENDER, ["alice@example.test"], big)  # smtplib sends SIZE=<len>
        assert caught.value.smtp_code == 552
        assert caught.value.smtp_error.startswith(b"5.3.4 ")
        client.rset()
        # Without SIZE the server can only tell after the end of data.
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt("alice@example.test")[0] == 250
        code, text = client.data(big)
        assert code == 552 and text.startswith(b"5.3.4 "), (code, text)
        assert server.spool_files() == []
        # The session goes on.
        assert client.sendmail(SENDER, ["bob@example.test"], small) == {}
    [path] = server.wait_for_mail("bob")
    assert split_delivered(path.read_bytes(), "bob@example.test")[1] == b"Subject: small\n\nsmall\n"
    server.wait_idle()
    assert server.maildir("alice") == []
    assert server.spool_files() == []


def test_bare_lf_in_data_is_refused(real_server):
    """Data holding a bare LF (the "SMTP smuggling" shape LF.CRLF followed by
    commands) is read to its true CRLF.CRLF and refused with 550 5.5.2: no part
    is delivered, nothing after the bare LF is taken as a command, and the
    session goes on."""
    with RawSMTP(real_server.port) as raw:
        assert raw.reply()[0] == 220
        assert raw.command("EHLO raw.test")[0] == 250
        assert raw.command("MAIL FROM:<x@remote.test>")[0] == 250
        assert raw.command("RCPT TO:<alice@example.test>")[0] == 250
        assert raw.command("DATA")[0] == 354
        raw.send(
            b"Subject: smuggle\r\n\r\nhello\n.\r\n"
            b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\n"
        )
        code, text = raw.reply()
        assert code == 550 and text.startswith("5.5.2 "), (code, text)
        assert raw.command("NOOP") == (250, "2.0.0 Ok")
        assert raw.command("QUIT")[0] == 221
    assert real_server.spool_files() == []
    assert real_server.maildir("alice") == [] and real_server.maildir("bob") == []
    assert "accepted id=" not in real_server.log()


def test_998_octet_line_with_stuffed_dot_split_between_cr_and_lf(real_server):
    """rfc5321 4.5.3.1.6: a text line may hold 998 octets plus CRLF, "not
    counting the leading dot duplicated for transparency". A 998-octet line
    starting with '.' (1001 octets on the wire) is accepted and stored whole
    also when a TCP segment ends between its CR and its LF.

    The pause between the two sends only makes the split likely: if the
    segments merge, the test still passes (it cannot fail spuriously).
    """
    line = b"." + b"d" * 997
    with RawSMTP(real_server.port) as raw:
        assert raw.reply()[0] == 220
        assert raw.command("EHLO raw.test")[0] == 250
        assert raw.command("MAIL FROM:<x@remote.test>")[0] == 250
        assert raw.command("RCPT TO:<alice@example.test>")[0] == 250
        assert raw.command("DATA")[0] == 354
        raw.send(b"Subject: split\r\n\r\n." + line + b"\r")
        time.sleep(0.3)
        raw.send(b"\n.\r\n")
        code, text = raw.reply()
        assert code == 250, (code, text)
        raw.command("QUIT")
    [path] = real_server.wait_for_mail("alice")
    _, rest = split_delivered(path.read_bytes(), "alice@example.test", helo="raw.test")
    assert rest == b"Subject: split\n\n" + line + b"\n"


def test_mbox_store(start_server):
    """With [store] type = "mbox", mail goes to <mail>/alice, one mbox file that
    Python's mailbox.mbox reads: each message with its From_ line, Return-Path
    and Delivered-To; a body line starting with "From " is quoted ">From " and
    does not split the message."""
    server = start_server(store_type="mbox")
    first = b"Subject: one\r\n\r\nFrom the start\r\nbody one\r\n"
    second = b"Subject: two\r\n\r\nbody two\r\n"
    with smtp(server) as client:
        assert client.sendmail(SENDER, ["alice@example.test"], first) == {}
        assert client.sendmail("y@remote.test", ["alice@example.test"], second) == {}
    server.wait_for_log("delivered id=", count=2)
    path = server.mail_dir / "alice"
    assert path.is_file()
    assert b"\n>From the start\n" in path.read_bytes()
    box = mailbox.mbox(path, create=False)
    try:
        messages = sorted(box, key=lambda m: m["Subject"])
    finally:
        box.close()
    assert [m["Subject"] for m in messages] == ["one", "two"]
    assert [m.get_from().split()[0] for m in messages] == [SENDER, "y@remote.test"]
    assert [m["Return-Path"] for m in messages] == [f"<{SENDER}>", "<y@remote.test>"]
    assert [m["Delivered-To"] for m in messages] == ["alice@example.test"] * 2
    assert messages[0].get_payload() == ">From the start\nbody one\n"
    assert messages[1].get_payload() == "body two\n"

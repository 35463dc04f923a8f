"""SMTPUTF8 (rfc6531) in BSMTP batches (rfc2442): written for a message that
needs it, left out for one that had it but needs none of it, and read back
by the server machine."""

from __future__ import annotations

import pytest
from test_bsmtp import BOB, message, replay

from mailsvc import bsmtp
from mailsvc.envelope import Envelope, Recipient

UTF8 = (("SMTPUTF8", ""),)  # as the receiver queues MAIL ... SMTPUTF8
JOERG = Recipient("jörg@faraway.example")
ASCII_MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"
UTF8_SUBJECT = "Subject: Grüße\r\n\r\nhello\r\n".encode()


def mail_line(batch: bytes) -> bytes:
    """The MAIL line of a one-message batch."""
    [line] = [line for line in batch.split(b"\r\n") if line.startswith(b"MAIL ")]
    return line


def test_utf8_recipient_exact_bytes():
    """A UTF-8 recipient: SMTPUTF8 on MAIL, the address in raw UTF-8 on RCPT."""
    batch = bsmtp.batch_bytes("h.test", [message(ASCII_MESSAGE, recipients=(JOERG,), parameters=UTF8, size=22)])
    assert batch == (
        b"EHLO h.test\r\n"
        b"MAIL FROM:<alice@example.test> SMTPUTF8 SIZE=22\r\n"
        + "RCPT TO:<jörg@faraway.example>\r\n".encode()
        + b"DATA\r\n" + ASCII_MESSAGE + b".\r\nQUIT\r\n"
    )


@pytest.mark.parametrize(
    "data, parameters, sender, recipients, line",
    [
        # Given, and the header section is UTF-8 (rfc6532): needed.
        (UTF8_SUBJECT, UTF8, "alice@example.test", (BOB,), b"MAIL FROM:<alice@example.test> SMTPUTF8"),
        # Given, all ASCII: left out (rfc6531 3.4; rfc2442's assumed extensions only).
        (ASCII_MESSAGE, UTF8, "alice@example.test", (BOB,), b"MAIL FROM:<alice@example.test>"),
        # Given, UTF-8 only in the body: left out.
        (b"Subject: hi\r\n\r\n" + "Grüße\r\n".encode(), UTF8, "alice@example.test", (BOB,), b"MAIL FROM:<alice@example.test>"),
        # Not given, but a UTF-8 sender cannot be written without it.
        (ASCII_MESSAGE, (), "jörg@example.test", (BOB,), "MAIL FROM:<jörg@example.test> SMTPUTF8".encode()),
        # Not given, 8-bit headers (legacy mail): as before, no SMTPUTF8.
        (UTF8_SUBJECT, (("BODY", "8BITMIME"),), "alice@example.test", (BOB,), b"MAIL FROM:<alice@example.test> BODY=8BITMIME"),
        # A message with no header section at all.
        (b"\r\nGr\xc3\xbc\xc3\x9fe\r\n", UTF8, "alice@example.test", (BOB,), b"MAIL FROM:<alice@example.test>"),
    ],
)
def test_smtputf8_only_when_needed(data, parameters, sender, recipients, line):
    """SMTPUTF8 goes on MAIL exactly when the message needs it, as the relay decides it."""
    batch = bsmtp.batch_bytes("h.test", [message(data, sender=sender, recipients=recipients, parameters=parameters)])
    assert mail_line(batch) == line


def test_with_the_other_parameters():
    """SMTPUTF8 sits beside BODY, RET, ENVID and SIZE."""
    params = UTF8 + (("BODY", "8BITMIME"), ("ENVID", "abc"), ("RET", "HDRS"))
    batch = bsmtp.batch_bytes("h.test", [message(UTF8_SUBJECT, parameters=params, size=3)])
    assert mail_line(batch) == b"MAIL FROM:<alice@example.test> BODY=8BITMIME RET=HDRS ENVID=abc SMTPUTF8 SIZE=3"


def test_only_the_recipients_written_count():
    """The need is judged on the recipients of this batch's transaction: a UTF-8
    recipient of the envelope that is not written does not count."""
    envelope = Envelope(sender="alice@example.test", recipients=(BOB, JOERG), parameters=UTF8)
    assert bsmtp.mail_command(envelope, recipients=(BOB,), ascii_headers=True) == b"MAIL FROM:<alice@example.test>\r\n"
    assert bsmtp.mail_command(envelope, recipients=(JOERG,), ascii_headers=True) == (
        b"MAIL FROM:<alice@example.test> SMTPUTF8\r\n"
    )
    # Not told the header section is ASCII: taken as needing it.
    assert bsmtp.mail_command(envelope, recipients=(BOB,)) == b"MAIL FROM:<alice@example.test> SMTPUTF8\r\n"


def test_envid_gets_the_ten_more_octets_of_rfc6531():
    """rfc6531 3.1 (5): with SMTPUTF8 a MAIL line may be 10 octets longer than
    rfc5321's 512; an ENVID beyond that is still left out."""
    head = "MAIL FROM:<jörg@example.test> ENVID="
    room = 512 + 10 - 2 - len(head.encode()) - len(" SMTPUTF8")
    fits = Envelope(sender="jörg@example.test", recipients=(), parameters=(("ENVID", "x" * room),))
    line = bsmtp.mail_command(fits, recipients=(BOB,))
    assert line.endswith(b" SMTPUTF8\r\n") and b"ENVID=" in line and len(line) == 522
    too_long = Envelope(sender="jörg@example.test", recipients=(), parameters=(("ENVID", "x" * (room + 1)),))
    assert bsmtp.mail_command(too_long, recipients=(BOB,)) == "MAIL FROM:<jörg@example.test> SMTPUTF8\r\n".encode()
    ascii_sender = Envelope(sender="alice@example.test", recipients=(), parameters=(("ENVID", "x" * room),))
    assert b"ENVID" not in bsmtp.mail_command(ascii_sender, recipients=(BOB,))  # no SMTPUTF8: 512


def test_header_section_read_ahead_only_when_it_matters():
    """Only a message that had SMTPUTF8 and an ASCII envelope has its data
    pulled before its MAIL line, and only up to the header section's end."""
    pulled = []

    def chunks():
        for chunk in (b"Subject: hi\r\n", b"\r", b"\nbody\r\n", b"more\r\n"):
            pulled.append(chunk)
            yield chunk

    pieces = bsmtp.write_batch("h.test", [message(b"", chunks=chunks(), parameters=UTF8)])
    assert next(pieces).startswith(b"EHLO")
    assert next(pieces).startswith(b"MAIL FROM:<alice@example.test>\r\n")
    assert pulled == [b"Subject: hi\r\n", b"\r", b"\nbody\r\n"]
    assert b"".join(pieces) == b"Subject: hi\r\n\r\nbody\r\nmore\r\n.\r\nQUIT\r\n"

    pulled.clear()
    pieces = bsmtp.write_batch("h.test", [message(b"", chunks=chunks(), recipients=(JOERG,), parameters=UTF8)])
    assert next(pieces).startswith(b"EHLO") and b"SMTPUTF8" in next(pieces) and pulled == []


@pytest.mark.parametrize(
    "chunks, pulled, ascii",
    [
        ([b"A: b\r\n", b"\r\n", b"x"], 2, True),
        ([b"A: b\r\n\r", b"\n\xc3\xbc"], 2, True),  # the end across chunks; UTF-8 in the body
        ([b"A: \xc3\xbc", b"\r\n\r\n"], 1, False),  # known at once: no need to read on
        ([b"A: b\r\n", b"B: c\r\n"], 2, True),  # all header, no body
        ([b"A: b\n", b"\nx"], 2, True),  # bare LF line ends
        ([], 0, True),
    ],
)
def test_peek_header(chunks, pulled, ascii):
    """``peek_header`` pulls up to the first empty line and says whether what came before is ASCII."""
    got, is_ascii = bsmtp.peek_header(iter(chunks))
    assert (got, is_ascii) == (chunks[:pulled], ascii)


def test_peek_header_limit():
    """A header section longer than the limit counts as not ASCII: SMTPUTF8 is kept."""
    chunks = [b"X: " + b"a" * 10 + b"\r\n"] * 5 + [b"\r\n"]
    got, is_ascii = bsmtp.peek_header(iter(chunks), limit=40)
    assert is_ascii is False and len(got) == 3


def test_cr_or_lf_in_a_utf8_address_is_refused():
    """A UTF-8 address holding CR or LF is refused like an ASCII one."""
    with pytest.raises(bsmtp.BatchError):
        bsmtp.rcpt_command(Recipient("jörg@x\r\nDATA"))


def test_round_trip_through_a_server_machine_with_smtputf8():
    """The server machine offering SMTPUTF8 (as our rsmtp does) reads a batch
    mixing UTF-8 and ASCII messages back into the same transactions."""
    datas = [UTF8_SUBJECT, ASCII_MESSAGE, ASCII_MESSAGE]
    batch = bsmtp.batch_bytes(
        "tx.test",
        [
            message(datas[0], parameters=UTF8 + (("BODY", "8BITMIME"),)),
            message(datas[1], recipients=(JOERG,), parameters=UTF8),
            message(datas[2], parameters=UTF8),
        ],
    )
    transactions, replies = replay(batch, smtputf8=True)
    assert transactions == [
        ("alice@example.test", ["bob@faraway.example"], datas[0]),
        ("alice@example.test", ["jörg@faraway.example"], datas[1]),
        ("alice@example.test", ["bob@faraway.example"], datas[2]),
    ]
    codes = [int(l[:3]) for l in replies.split(b"\r\n") if l[:3].isdigit()]
    assert max(codes) < 400 and codes[-1] == 221


def test_ascii_message_that_had_smtputf8_passes_a_site_without_it():
    """rfc2442: a site that takes only the assumed extensions (8BITMIME, SIZE,
    NOTARY) takes a message that had SMTPUTF8 but needs none of it."""
    batch = bsmtp.batch_bytes("tx.test", [message(ASCII_MESSAGE, parameters=UTF8, size=len(ASCII_MESSAGE))])
    transactions, replies = replay(batch, smtputf8=False)
    assert transactions == [("alice@example.test", ["bob@faraway.example"], ASCII_MESSAGE)]
    assert max(int(l[:3]) for l in replies.split(b"\r\n") if l[:3].isdigit()) < 400

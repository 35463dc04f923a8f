"""The 8-bit to 7-bit conversion (``mailsvc.delivery.downgrade``), pure: bytes in, bytes out.

Every converted message is read back with the ``email`` package to show the
parts decode to the very octets they held, and checked line by line: 7-bit,
CRLF, at most 76 characters in the re-encoded bodies.
"""

from __future__ import annotations

import email
import email.policy
import io
import os

import pytest

from mailsvc.delivery.downgrade import CannotDowngrade, base64_lines, downgrade, downgrade_bytes, quoted_printable

LATIN1 = "Grüße aus Köln, ça va? Ærø.\r\n".encode("latin-1")
TOP = b"Received: from a.test by b.test; Thu, 21 Sep 2026 12:00:00 +0000\r\nFrom: carol@example.test\r\nSubject: test\r\n"


def parse(data: bytes) -> email.message.Message:
    """``data`` parsed by the email package, octets kept (compat32)."""
    return email.message_from_bytes(data, policy=email.policy.compat32)


def check_7bit(data: bytes) -> None:
    """Every octet is 7-bit, every line ends in CRLF and is at most 78 octets with it."""
    assert all(octet < 128 for octet in data)
    lines = data.split(b"\r\n")
    assert lines[-1] == b""  # ends with CRLF
    for line in lines:
        assert b"\n" not in line and b"\r" not in line
        assert len(line) + 2 <= 78, line


def convert(data: bytes, limit: int = 1 << 20) -> bytes:
    """``downgrade`` over in-memory files."""
    out = io.BytesIO()
    downgrade(io.BytesIO(data), out, limit)
    return out.getvalue()


def test_text_part_becomes_quoted_printable():
    """A latin-1 text/plain 8bit message becomes quoted-printable that decodes
    to the same octets; the other header lines are kept byte for byte."""
    header = TOP + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n"
    body = LATIN1 * 3 + b"x" * 200 + b"\r\ntrailing space \r\n=equals=\r\n"
    out = convert(header + b"\r\n" + body)
    check_7bit(out)
    assert out.startswith(header.replace(b"Content-Transfer-Encoding: 8bit", b"Content-Transfer-Encoding: quoted-printable"))
    message = parse(out)
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message.get_payload(decode=True) == body
    assert b"Gr=FC=DFe" in out and b"space=20\r\n" in out and b"=3Dequals=3D" in out


def test_binary_part_becomes_base64():
    """An image/jpeg-like part with every octet value becomes base64 and decodes back exactly."""
    payload = bytes(range(256)) * 40 + os.urandom(3000)
    message = (
        TOP + b"MIME-Version: 1.0\r\nContent-Type: image/jpeg\r\nContent-Transfer-Encoding: binary\r\n\r\n" + payload
    )
    out = convert(message + b"\r\n")
    check_7bit(out)
    parsed = parse(out)
    assert parsed["Content-Transfer-Encoding"] == "base64"
    assert parsed.get_payload(decode=True) == payload + b"\r\n"


def test_multipart_keeps_the_7bit_part_byte_identical():
    """In a multipart/mixed, the 7-bit part, the preamble, the boundaries and
    the epilogue are untouched; only the 8-bit part changes (a CTE is added)."""
    seven = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nplain old text\r\n.leading dot\r\n"
    eight = b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\n" + LATIN1
    data = (
        TOP + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"==b==\"\r\n\r\n"
        b"This is a MIME message.\r\n"
        b"--==b==\r\n" + seven + b"\r\n--==b==\r\n" + eight + b"\r\n--==b==--\r\nepilogue\r\n"
    )
    out = convert(data)
    check_7bit(out)
    assert b"--==b==\r\n" + seven + b"\r\n--==b==\r\n" in out
    assert out.startswith(data[: data.index(b"--==b==\r\n")])
    assert out.endswith(b"\r\n--==b==--\r\nepilogue\r\n")
    first, second = parse(out).get_payload()
    assert first.get_payload(decode=True) == b"plain old text\r\n.leading dot\r\n"
    assert second["Content-Transfer-Encoding"] == "quoted-printable"
    assert second.get_payload(decode=True) == LATIN1


def test_nested_message_rfc822_is_converted_inside():
    """An 8-bit message/rfc822 part is walked: its inner 8-bit parts are
    re-encoded (text to QP, the rest to base64) and the container's 8bit
    becomes 7bit (rfc2045 6.4)."""
    inner = (
        b"From: dave@example.test\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/alternative; boundary=in\r\n\r\n"
        b"--in\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\n" + LATIN1 +
        b"\r\n--in\r\nContent-Type: application/octet-stream\r\n\r\n\x00\x01\xfe\xff\r\n--in--\r\n"
    )
    data = (
        TOP + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=out\r\n\r\n"
        b"--out\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--out\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + inner +
        b"\r\n--out--\r\n"
    )
    out = convert(data)
    check_7bit(out)
    outer = parse(out)
    _, attached = outer.get_payload()
    assert attached["Content-Transfer-Encoding"] == "7bit"
    [message] = attached.get_payload()
    text, blob = message.get_payload()
    assert text["Content-Transfer-Encoding"] == "quoted-printable" and text.get_payload(decode=True) == LATIN1
    assert blob["Content-Transfer-Encoding"] == "base64" and blob.get_payload(decode=True) == b"\x00\x01\xfe\xff"


def test_7bit_message_is_copied_unchanged():
    """A message with nothing 8-bit (MIME or not) comes out byte for byte."""
    for data in (TOP + b"\r\nhello\r\n", TOP + b"MIME-Version: 1.0\r\n\r\nhello = 1\r\n"):
        assert convert(data) == data


@pytest.mark.parametrize(
    "data, reason",
    [
        (TOP + "Subject: Grüße\r\n".encode() + b"MIME-Version: 1.0\r\n\r\nx\r\n", "8-bit octets in a header field"),
        (TOP + b"\r\n" + LATIN1, "not MIME"),
        (
            TOP + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
            + "Content-Disposition: attachment; filename=\"ä.txt\"\r\n\r\nx\r\n--b--\r\n".encode(),
            "8-bit octets in a header field",
        ),
        (TOP + b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: base64\r\n\r\n\xff\r\n", "declared base64"),
        (TOP + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed\r\n\r\n\xff\r\n", "without a boundary"),
    ],
)
def test_what_cannot_be_converted(data, reason):
    """8-bit header fields (rfc2047 is not done), a non-MIME 8-bit body, 8-bit
    octets in a base64 part, a multipart without boundary: CannotDowngrade."""
    with pytest.raises(CannotDowngrade) as raised:
        downgrade_bytes(data)
    assert reason in raised.value.reason


def test_over_the_limit_is_not_converted():
    """A message larger than ``limit`` octets is refused, however simple."""
    data = TOP + b"MIME-Version: 1.0\r\n\r\n" + LATIN1 * 100
    with pytest.raises(CannotDowngrade, match="too large"):
        convert(data, limit=len(data) - 1)
    check_7bit(convert(data, limit=len(data)))


def test_encoders_keep_lines_short_and_round_trip():
    """quoted_printable and base64_lines: lines of at most 76 characters,
    never a cut =XX, bare CR and LF encoded, and exact round trips."""
    import base64
    import quopri

    body = (b"=" * 100 + b"\r\n" + bytes(range(256)) + b"\r\nbare\rcr and\nlf\r\n\t\r\n")
    qp = quoted_printable(body)
    assert all(len(line) <= 76 for line in qp.split(b"\r\n"))
    assert quopri.decodestring(qp) == body
    b64 = base64_lines(body)
    assert all(len(line) <= 76 for line in b64.split(b"\r\n"))
    assert base64.b64decode(b64) == body

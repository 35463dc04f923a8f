"""``mailsvc.submission``: the streamed header scan, the rfc6409 fix-ups, rfc3848 names."""

from __future__ import annotations

import pytest

from mailsvc.submission import HeaderScanner, missing_headers, protocol_name


def scan(message: bytes, piece: int = 7, limit: int = 65536) -> HeaderScanner:
    scanner = HeaderScanner(limit)
    for start in range(0, len(message), piece):
        scanner.feed(message[start : start + piece])
    scanner.finish()
    return scanner


@pytest.mark.parametrize("piece", [1, 3, 1000])
def test_finds_date_and_message_id_in_any_pieces(piece):
    """Field names in any case, lines split anywhere across chunks."""
    s = scan(b"Subject: x\r\nDATE: now\r\nMessage-Id: <a@b>\r\n\r\nbody\r\n", piece)
    assert s.complete and s.has("date") and s.has("message-id")


def test_the_body_is_not_looked_at():
    """A Date: line after the blank line is body, not a header."""
    s = scan(b"Subject: x\r\n\r\nDate: in the body\r\nMessage-ID: <x@y>\r\n")
    assert s.complete and not s.has("date") and not s.has("message-id")


def test_folded_lines_and_a_non_header_line():
    """Continuation lines are skipped; a line that is no header field ends the section."""
    s = scan(b"Subject: a\r\n Date: folded, not a field\r\nnot a header\r\nDate: late\r\n")
    assert s.complete and not s.has("date")


def test_headers_only_message():
    """A message that is all header (no blank line) is scanned to its end."""
    s = scan(b"Subject: x\r\nDate: now")
    assert s.complete and s.has("date")


def test_scan_is_bounded_and_adds_nothing_when_cut_short():
    """Past the limit the scan stops; no fix-up is made then (no risk of a duplicate)."""
    s = scan(b"X-Long: " + b"y" * 200 + b"\r\n" + b"Date: x\r\n\r\n", limit=100)
    assert s.truncated and not s.complete
    assert missing_headers(s, "mx.test", "ID", 0) == ()
    assert len(s._partial) == 0


def test_missing_headers_are_made():
    """rfc6409 8.3 Date (rfc5322 form) and 8.2 Message-ID (<id.random@host>)."""
    s = scan(b"Subject: x\r\n\r\nhi\r\n")
    date, message_id = missing_headers(s, "mx.test", "QUEUEID", 1_790_000_000)
    assert date == "Date: Mon, 21 Sep 2026 14:13:20 +0000"
    assert message_id.startswith("Message-ID: <QUEUEID.") and message_id.endswith("@mx.test>")
    assert missing_headers(scan(b"Date: d\r\nMessage-ID: <m@x>\r\n\r\n"), "mx.test", "Q", 0) == ()


@pytest.mark.parametrize(
    "extended, tls, auth, name",
    [(False, False, False, "SMTP"), (True, False, False, "ESMTP"), (True, True, False, "ESMTPS"),
     (True, False, True, "ESMTPA"), (True, True, True, "ESMTPSA")],
)
def test_rfc3848_protocol_names(extended, tls, auth, name):
    """rfc3848 2: the with-keyword for each combination."""
    assert protocol_name(extended, tls, auth) == name

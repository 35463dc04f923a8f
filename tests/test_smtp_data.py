"""The DATA reader: end detection, dot-unstuffing and faults across any chunking."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from mailsvc.smtp.data import MAX_LINE, DataFault, DataReader

line_text = st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
lines = st.lists(st.one_of(line_text, line_text.map(lambda b: b"." + b)), max_size=30)


def stuff(message_lines: list[bytes]) -> bytes:
    """rfc5321 4.5.2: the sender doubles a leading dot, then ends with CRLF.CRLF."""
    return b"".join((b"." + l if l.startswith(b".") else l) + b"\r\n" for l in message_lines) + b".\r\n"


def feed_in_pieces(reader: DataReader, wire: bytes, cuts: list[int]):
    """Feed ``wire`` cut at ``cuts``; return (content, rest) once the data ends."""
    content, rest = b"", None
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    for start, end in zip(points, points[1:]):
        piece, rest = reader.feed(wire[start:end])
        content += piece
        if rest is not None:
            rest += wire[end:]
            break
    return content, rest


@settings(max_examples=300)
@given(lines, st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_any_message_round_trips_under_any_chunking(message_lines, cuts):
    """Stuffed data cut anywhere comes out unstuffed, whole, and ends exactly at CRLF.CRLF."""
    reader = DataReader()
    wire = stuff(message_lines) + b"NOOP\r\n"
    content, rest = feed_in_pieces(reader, wire, cuts)
    assert content == b"".join(l + b"\r\n" for l in message_lines)
    assert rest == b"NOOP\r\n"
    assert reader.fault is None and reader.size == len(content)


@settings(max_examples=200)
@given(lines, st.sampled_from([b"\n", b"\r", b"\n.\n", b"\r.\r", b"x\ny"]), st.lists(st.integers(0, 5000), max_size=8))
def test_bare_line_ends_are_found_under_any_chunking(message_lines, bare, cuts):
    """A bare CR or LF anywhere in the body is a fault, wherever the chunks are cut."""
    reader = DataReader()
    wire = stuff(message_lines + [b"a" + bare + b"b"])
    content, rest = feed_in_pieces(reader, wire, cuts)
    assert rest == b""
    assert reader.fault is DataFault.BARE_LINE_END
    assert content == b"".join(l + b"\r\n" for l in message_lines)[: len(content)]


def test_terminator_at_the_very_start():
    """An empty message: DATA then '.' alone."""
    reader = DataReader()
    assert reader.feed(b".\r\nQUIT\r\n") == (b"", b"QUIT\r\n")


def test_terminator_split_byte_by_byte():
    """CRLF.CRLF split over five writes still ends the data once, at the right place."""
    reader = DataReader()
    out = []
    for byte in b"hello\r\n.\r\nX":
        out.append(reader.feed(bytes([byte])))
    content = b"".join(c for c, _ in out)
    ends = [r for _, r in out if r is not None]
    assert content == b"hello\r\n" and ends == [b""]


def test_long_line_across_chunks_is_a_fault_and_memory_stays_bounded():
    """A line growing over many chunks is dropped as it comes, not buffered."""
    reader = DataReader()
    for _ in range(50):
        reader.feed(b"x" * 4096)
        assert len(reader._pending) < MAX_LINE
    content, rest = reader.feed(b"\r\n.\r\n")
    assert rest == b"" and reader.fault is DataFault.LINE_TOO_LONG


def test_size_limit_stops_output_but_reading_goes_on():
    """Over max_size the reader stops handing out content and still finds the end."""
    reader = DataReader(max_size=10)
    content, rest = reader.feed(b"0123456789abc\r\nmore\r\n.\r\n")
    assert content == b"" and rest == b""
    assert reader.fault is DataFault.TOO_BIG and reader.size == 21


def test_stuffed_dot_at_chunk_start():
    """A stuffed dot that starts a chunk is removed."""
    reader = DataReader()
    c1, _ = reader.feed(b"a\r\n")
    c2, rest = reader.feed(b"..b\r\n.\r\n")
    assert c1 + c2 == b"a\r\n.b\r\n" and rest == b""


def test_longest_legal_line_with_stuffed_dot_split_between_cr_and_lf():
    """998 text octets starting with '.', stuffed to 999 on the wire, the chunk
    cut between CR and LF: legal (rfc5321 4.5.3.1.6 counts the text, not the stuffing)."""
    reader = DataReader()
    first, _ = reader.feed(b".." + b"x" * 997 + b"\r")
    second, rest = reader.feed(b"\n.\r\n")
    assert reader.fault is None and rest == b""
    assert first + second == b"." + b"x" * 997 + b"\r\n"


def test_999_text_octets_split_before_the_crlf_is_too_long():
    """One octet more than the limit, cut anywhere, is still refused."""
    for cut in (998, 999, 1000, 1001):
        reader = DataReader()
        wire = b"y" * 999 + b"\r\n.\r\n"
        reader.feed(wire[:cut])
        reader.feed(wire[cut:])
        assert reader.fault is DataFault.LINE_TOO_LONG, cut

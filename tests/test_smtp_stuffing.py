"""Dot-stuffing outgoing data: exact bytes at line starts and chunk boundaries,
and a round trip through the server's DataReader under any chunking."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from mailsvc.smtp.data import DataReader
from mailsvc.smtp.stuffing import DotStuffer, stuff_whole


def stuff_pieces(pieces: list[bytes]) -> bytes:
    """Stuff ``pieces`` one chunk at a time and terminate."""
    stuffer = DotStuffer()
    return b"".join(stuffer.stuff(p) for p in pieces) + stuffer.end()


@pytest.mark.parametrize(
    "data, wire",
    [
        (b"", b".\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),
        (b".a\r\n", b"..a\r\n.\r\n"),
        (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\r\n..b\r\n", b"a\r\n...b\r\n.\r\n"),
        (b".\r\n.\r\n", b"..\r\n..\r\n.\r\n"),
        (b"a.b\r\n", b"a.b\r\n.\r\n"),
        (b"no final line end", b"no final line end\r\n.\r\n"),
        (b"x\r\n.", b"x\r\n..\r\n.\r\n"),
        (b"a\n.b\r\n", b"a\n.b\r\n.\r\n"),
        (b"a\r.b\r\n", b"a\r.b\r\n.\r\n"),
    ],
)
def test_stuffing_table(data, wire):
    """rfc5321 4.5.2: a period at a line start is doubled (bare CR/LF do not start
    lines, rfc5321 2.3.8); the terminator adds CRLF only when the data lacks it."""
    assert stuff_whole(data) == wire


@pytest.mark.parametrize(
    "pieces, wire",
    [
        ([b".a\r\n"], b"..a\r\n.\r\n"),
        ([b"a\r\n", b".b\r\n"], b"a\r\n..b\r\n.\r\n"),
        ([b"a\r", b"\n.b\r\n"], b"a\r\n..b\r\n.\r\n"),
        ([b"a\r", b"\n", b".", b"b\r\n"], b"a\r\n..b\r\n.\r\n"),
        ([b"a", b"\r", b"\n", b"."], b"a\r\n..\r\n.\r\n"),
        ([b"", b".", b""], b"..\r\n.\r\n"),
        ([b"a\r\n", b"\n.b\r\n"], b"a\r\n\n.b\r\n.\r\n"),
        ([b"a\r", b"\r\n.b\r\n"], b"a\r\r\n..b\r\n.\r\n"),
        ([b"a\r\n", b""], b"a\r\n.\r\n"),
        ([b"a\r", b""], b"a\r\r\n.\r\n"),
    ],
)
def test_chunk_boundaries(pieces, wire):
    """The first byte of a chunk is a line start when the data so far ends in CRLF,
    including a CRLF split between two chunks."""
    assert stuff_pieces(pieces) == wire


def test_size_counts_unstuffed_octets():
    """``size`` is the message's own size, before stuffing."""
    stuffer = DotStuffer()
    stuffer.stuff(b".a\r\n")
    stuffer.stuff(b".b\r\n")
    assert stuffer.size == 8 and stuffer.at_line_start


line_text = st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
lines = st.lists(st.one_of(line_text, line_text.map(lambda b: b"." + b), st.just(b"."), st.just(b"")), max_size=30)
cuts = st.lists(st.integers(min_value=0, max_value=5000), max_size=12)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` split at ``points`` (taken modulo its length)."""
    edges = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(edges, edges[1:])]


def read_back(wire: bytes, points: list[int]) -> tuple[bytes, bytes | None]:
    """Feed ``wire`` to the server's DataReader in pieces; (content, rest)."""
    reader = DataReader()
    content, rest = b"", None
    for piece in cut(wire, points):
        if rest is not None:
            rest += piece  # after the terminator: commands, not data
            continue
        got, rest = reader.feed(piece)
        content += got
    assert reader.fault is None
    return content, rest


@settings(max_examples=400)
@given(lines, cuts, cuts)
def test_round_trip_through_the_server_reader(message_lines, send_cuts, read_cuts):
    """Any lines, stuffed in any chunking and read back in any other chunking, come
    back byte for byte, and the data ends exactly at the terminator."""
    data = b"".join(line + b"\r\n" for line in message_lines)
    wire = stuff_pieces(cut(data, send_cuts))
    assert wire == stuff_whole(data)
    content, rest = read_back(wire + b"QUIT\r\n", read_cuts)
    assert content == data and rest == b"QUIT\r\n"


@settings(max_examples=200)
@given(lines, line_text, cuts)
def test_data_without_final_crlf_gets_one(message_lines, last, send_cuts):
    """Data not ending in CRLF reads back with the CRLF the terminator added."""
    data = b"".join(line + b"\r\n" for line in message_lines) + b"x" + last
    content, rest = read_back(stuff_pieces(cut(data, send_cuts)), [])
    assert content == data + b"\r\n" and rest == b""


@settings(max_examples=200)
@given(st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b".\r\n"]), max_size=40), cuts)
def test_chunking_never_changes_the_output(tokens, send_cuts):
    """For any bytes at all (bare CR/LF included), stuffing in pieces equals stuffing whole."""
    data = b"".join(tokens)
    assert stuff_pieces(cut(data, send_cuts)) == stuff_whole(data)

"""BDAT (rfc3030 CHUNKING) in our server machine, and our client and server
machines talking BDAT to each other in memory; the chunk reader's checks.
Pure: bytes in, events and bytes out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from mailsvc.smtp import client_events as cev
from mailsvc.smtp import events as sev
from mailsvc.smtp.chunking import ChunkReader
from mailsvc.smtp.client import ClientConnection, ClientSettings, Transaction
from mailsvc.smtp.data import DataFault
from mailsvc.smtp.replies import Reply
from mailsvc.smtp.server import ServerSettings, State
from smtp_driver import READY, Driver, codes

CHUNKING = ServerSettings("mx.test", max_message_size=10_000, chunking=True)


def driver(**settings) -> Driver:
    """A server with CHUNKING (and ``settings``), past EHLO, MAIL and one RCPT."""
    options = dict(max_message_size=10_000, chunking=True)
    options.update(settings)
    d = Driver(ServerSettings("mx.test", **options))
    d.feed(READY)
    return d


# ------------------------------------------------------------ the server machine


def test_chunking_is_offered_only_when_set():
    """EHLO lists CHUNKING with ``chunking``; without it BDAT is 502 as before."""
    assert "250-CHUNKING" in Driver(CHUNKING).feed(b"EHLO c.test\r\n")
    plain = Driver(ServerSettings("mx.test"))
    assert "CHUNKING" not in plain.feed(b"EHLO c.test\r\n")
    assert plain.feed(b"BDAT 0 LAST\r\n").startswith("502 5.5.1 BDAT not implemented")


def test_chunks_make_one_message_no_stuffing():
    """rfc3030 2: the first chunk is a DataCommand decision (no 354); each
    chunk's octets become DataChunk events as they are; 250 per chunk; LAST
    ends in a DataEnd decision with the total size. A line "." is data."""
    d = driver()
    out = d.feed(b"BDAT 14\r\nSubject: x\r\n\r\n")
    assert out == "250 2.0.0 14 octets received\r\n"
    assert [type(e) for e in d.events[-2:]] == [sev.DataCommand, sev.DataChunk]
    assert d.conn.state is State.BDAT and not d.conn.in_data
    out = d.feed(b"BDAT 11 LAST\r\n.\r\n..\r\nok\r\n")
    assert out == "250 2.0.0 Ok: queued as TEST\r\n"
    assert d.data == b"Subject: x\r\n\r\n.\r\n..\r\nok\r\n"
    assert d.of(sev.DataEnd)[0].size == 25 and len(d.of(sev.DataCommand)) == 1
    assert d.conn.state is State.READY


def test_chunk_octets_may_arrive_in_any_pieces():
    """The octets of a chunk are counted across reads; a command line after
    them is a command again; in_data while inside a chunk."""
    d = driver()
    assert d.feed(b"BDAT 10 LAST\r\n0123") == ""
    assert d.conn.in_data
    assert d.feed(b"45678") == ""
    out = d.feed(b"9NOOP\r\n")
    assert codes(out) == ["250", "250"] and d.data == b"0123456789"


def test_empty_last_chunk():
    """rfc3030 2: "BDAT 0 LAST" may end the message."""
    d = driver()
    out = d.feed(b"BDAT 3\r\nx\r\nBDAT 0 LAST\r\n")
    assert codes(out) == ["250", "250"] and d.data == b"x\r\n"
    assert d.of(sev.DataEnd)[0].size == 3


@pytest.mark.parametrize(
    ("before", "reply"),
    [
        (b"EHLO c.test\r\n", "503 5.5.1 Need MAIL before BDAT"),
        (b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n", "503 5.5.1 Need RCPT before BDAT"),
    ],
)
def test_chunk_outside_a_transaction_is_read_then_refused(before, reply):
    """rfc3030 2: the octets of a BDAT that cannot be taken are read and
    discarded first; they are never read as commands."""
    d = Driver(CHUNKING)
    d.feed(before)
    out = d.feed(b"BDAT 12 LAST\r\nQUIT\r\nQUIT\r\nNOOP\r\n")
    assert out.split("\r\n")[:2] == [reply, "250 2.0.0 Ok"]
    assert d.of(sev.DataChunk) == [] and not d.conn.closed


def test_no_valid_recipient_is_554_after_the_octets():
    """Every RCPT refused: 554 5.5.1, after the chunk is discarded (rfc2920 3.1's DATA reply)."""
    d = Driver(CHUNKING, answers={sev.RcptTo: Reply.of(550, "5.1.1", "no")})
    d.feed(READY)
    assert d.feed(b"BDAT 5 LAST\r\nhello").startswith("554 5.5.1 No valid recipients")


def test_refused_first_chunk_and_the_pipelined_rest():
    """The DataCommand refused (451 spool trouble): that chunk and every
    later one are read, discarded and answered 451; RSET clears it."""
    d = driver()
    d.answers[sev.DataCommand] = Reply.of(451, "4.3.0", "spool trouble")
    out = d.feed(b"BDAT 3\r\nabcBDAT 3\r\ndefBDAT 2 LAST\r\ngh")
    assert codes(out) == ["451", "451", "451"] and d.of(sev.DataChunk) == []
    assert codes(d.feed(b"RSET\r\nMAIL FROM:<a@b.test>\r\n")) == ["250", "250"]


def test_too_big_is_refused_at_last_and_nothing_more_is_stored():
    """SIZE (rfc1870) counts every chunk: past the limit nothing more is
    handed out; 552 5.3.4 at LAST, DataRefused, the transaction is over."""
    d = driver(max_message_size=10)
    out = d.feed(b"BDAT 8\r\n12345678BDAT 8 LAST\r\n12345678")
    assert out.split("\r\n")[1] == "552 5.3.4 Message too big: the limit is 10 octets"
    assert d.data == b"12345678" and len(d.of(sev.DataRefused)) == 1
    assert d.conn.state is State.READY


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"a\nb\r\n", "550 5.5.2"),  # bare LF
        (b"a\rb\r\n", "550 5.5.2"),  # bare CR
        (b"abc\r", "550 5.5.2"),  # ends with a lone CR
        (b"x" * 999 + b"\r\n", "554 5.6.0"),  # a line of 1001 octets
    ],
)
def test_message_rules_are_those_of_data(data, reply):
    """BDAT data follows DATA's rules: CR and LF only as CRLF, lines of at
    most 1000 octets (rfc5321 2.3.8, 4.5.3.1.6); refused at LAST."""
    d = driver(max_message_size=100_000)
    out = d.feed(b"BDAT %d LAST\r\n" % len(data) + data)
    assert out.startswith(reply)


def test_data_after_bdat_and_mail_during_bdat_are_503():
    """rfc3030 2: DATA after a BDAT of the same transaction is 503; so is MAIL."""
    d = driver()
    d.feed(b"BDAT 3\r\nabc")
    assert codes(d.feed(b"DATA\r\nMAIL FROM:<x@y.test>\r\n")) == ["503", "503"]
    out = d.feed(b"BDAT 2 LAST\r\nde")
    assert codes(out) == ["250"] and d.data == b"abcde"


def test_rset_between_chunks_forgets_the_message():
    """rfc3030 2: RSET after a chunk clears every chunk sent (a Reset event)."""
    d = driver()
    d.feed(b"BDAT 3\r\nabc")
    assert codes(d.feed(b"RSET\r\n")) == ["250"]
    assert d.conn.state is State.READY and isinstance(d.events[-1], sev.Reset)
    assert codes(d.feed(b"BDAT 1 LAST\r\nx")) == ["503"]


@pytest.mark.parametrize("command", [b"BDAT", b"BDAT x", b"BDAT 5 FIRST", b"BDAT -1", b"BDAT 5 LAST more"])
def test_bdat_syntax(command):
    """rfc3030 2: BDAT chunk-size [LAST]; anything else is 501."""
    assert driver().feed(command + b"\r\n").startswith("501 5.5.4 Syntax: BDAT chunk-size [LAST]")


def test_bdat_before_auth_on_submission_is_530_after_the_octets():
    """rfc4954 6 on a submission listener: 530, the octets read and dropped first."""
    d = Driver(ServerSettings("mx.test", chunking=True, auth_mechanisms=("PLAIN",), auth_without_tls=True,
                              auth_required=True))
    d.feed(b"EHLO c.test\r\n")
    out = d.feed(b"BDAT 6 LAST\r\nNOOP\r\n")
    assert codes(out) == ["530"]


# ------------------------------------------------------------ the chunk reader


def test_chunk_reader_finds_faults_across_pieces():
    """A CRLF cut in two is fine; a line of 999 text octets cut anywhere is too long."""
    reader = ChunkReader()
    assert reader.feed(b"abc\r") == b"abc\r" and reader.feed(b"\ndef\r\n") == b"\ndef\r\n"
    assert reader.finish() is None
    reader = ChunkReader()
    reader.feed(b"x" * 500)
    reader.feed(b"x" * 499)
    assert reader.feed(b"\r\n") == b"" and reader.fault is DataFault.LINE_TOO_LONG
    reader = ChunkReader()
    reader.feed(b"x" * 998 + b"\r")
    assert reader.feed(b"\n") == b"\n" and reader.finish() is None


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(st.binary(max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b), max_size=20),
    cuts=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=10),
    extra=st.sampled_from([b"", b"\n", b"\r", b"y" * 1000]),
)
def test_chunk_reader_agrees_with_itself_under_any_cut(lines, cuts, extra):
    """The verdict on a message does not depend on how it is cut."""
    message = b"".join(line + b"\r\n" for line in lines) + extra
    whole = ChunkReader()
    whole.feed(message)
    expected = whole.finish()
    reader, offset, index = ChunkReader(), 0, 0
    while offset < len(message):
        size = cuts[index % len(cuts)]
        reader.feed(message[offset : offset + size])
        offset, index = offset + size, index + 1
    assert reader.finish() is expected
    assert reader.size == len(message)
    assert (expected is None) == (extra in (b"",))


# ------------------------------------------------------------ our client and our server


class BdatPair:
    """Our client machine and our server machine (CHUNKING on) passing bytes
    until both are quiet; the client streams ``body`` in ``chunk`` pieces
    as ``data_wanted`` allows."""

    def __init__(self, answers=None, chunk=7, **client_settings):
        self.server = Driver(ServerSettings("mx.test", max_message_size=100_000, chunking=True), answers)
        self.client = ClientConnection(ClientSettings("client.test", **client_settings))
        self.events: list = []
        self.writes: list[bytes] = []
        self.chunk = chunk
        self.received: list[bytes] = []
        self._body = b""
        self._offset = None
        self.pump()

    def pump(self):
        moved = True
        while moved:
            moved = False
            out = self.server.conn.data_to_send()
            if out:
                self.client.receive_data(out)
                moved = True
            while (event := self.client.next_event()) is not None:
                self.events.append(event)
                if isinstance(event, cev.StartData):
                    self._offset = 0
            while self._offset is not None and self.client.data_wanted:
                if self._offset >= len(self._body):
                    self.client.end_data()
                    self._offset = None
                    break
                self.client.send_data(self._body[self._offset : self._offset + self.chunk])
                self._offset += self.chunk
            sent = self.client.data_to_send()
            if sent:
                self.writes.append(sent)
                before = len(self.server.of(sev.DataEnd))
                self.server.conn.receive_data(sent)
                self.server.run()
                if len(self.server.of(sev.DataEnd)) > before:
                    self.received.append(self.server.data)
                    self.server.data = b""
                moved = True

    def send(self, body: bytes, *recipients: str):
        self._body = body
        self.client.send_message(Transaction("alice@a.test", list(recipients or ["bob@b.test"])))
        start = len(self.events)
        self.pump()
        return self.events[start:]


@pytest.mark.parametrize("pipelining", [True, False])
def test_our_client_and_server_talk_bdat(pipelining):
    """Our client sees CHUNKING and sends BDAT chunks (pipelined or one at a
    time); our server stores the message byte for byte, dots untouched."""
    pair = BdatPair(pipelining=pipelining)
    body = b"Subject: hi\r\n\r\n.leading dot\r\n.\r\n" + b"line\r\n" * 30
    events = pair.send(body, "bob@b.test", "carol@c.test")
    assert isinstance(events[-1], cev.MessageResult) and events[-1].reply.code == 250
    assert pair.received == [body]
    sent = b"".join(pair.writes)
    assert b"BDAT" in sent and b"DATA\r\n" not in sent and sent.count(b" LAST\r\n") == 1
    if not pipelining:
        # One chunk per write, each after the reply to the one before.
        assert all(w.count(b"BDAT ") <= 1 for w in pair.writes)


def test_our_client_and_server_bdat_refusal_then_next_message():
    """The server refuses the first chunk (451): the client gets 451 for the
    message, says RSET, and the next message goes."""
    answers = iter([Reply.of(451, "4.3.0", "try later"), None])
    pair = BdatPair(answers={sev.DataCommand: lambda event: next(answers)})
    first = pair.send(b"x\r\n" * 20)
    assert first[-1].reply.code == 451 and pair.received == []
    second = pair.send(b"y\r\n")
    assert second[-1].reply.code == 250 and pair.received == [b"y\r\n"]
    assert any(w.startswith(b"RSET\r\n") for w in pair.writes)


@settings(max_examples=60, deadline=None)
@given(body=st.binary(max_size=400).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"\r\n")),
       chunk=st.integers(min_value=1, max_value=64), pipelining=st.booleans())
def test_any_body_any_chunking_arrives_intact(body, chunk, pipelining):
    """Whatever the body (CRLF lines) and the chunk size, the server stores
    exactly what the client sent, plus a CRLF when it did not end with one."""
    pair = BdatPair(chunk=chunk, pipelining=pipelining)
    events = pair.send(body)
    expected = body if body.endswith(b"\r\n") or not body else body + b"\r\n"
    if any(len(line) > 998 for line in expected.split(b"\r\n")):
        assert events[-1].reply.code == 554
    else:
        assert events[-1].reply.code == 250 and pair.received == [expected]

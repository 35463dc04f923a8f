"""The BSMTP batch writer (rfc2442): exact bytes, dot-stuffing, DSN
parameters, batch limits, and a round trip through the server machine."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from mailsvc import bsmtp
from mailsvc.envelope import Envelope, Recipient
from mailsvc.smtp import events as ev
from mailsvc.smtp.replies import Reply
from mailsvc.smtp.server import ServerConnection, ServerSettings

BOB = Recipient("bob@faraway.example")
CAROL = Recipient("carol@faraway.example")


def message(data: bytes, sender="alice@example.test", recipients=(BOB,), parameters=(), chunks=None, size=None):
    """A ``BatchMessage`` for ``data`` (sent as one chunk unless ``chunks`` is given)."""
    envelope = Envelope(sender=sender, recipients=tuple(recipients), parameters=tuple(parameters))
    return bsmtp.BatchMessage(envelope, tuple(recipients), chunks if chunks is not None else [data], size)


def test_one_message_exact_bytes():
    """rfc2442: a batch is the client's half of a session: EHLO, MAIL, RCPT,
    DATA, the message, ".", QUIT, every line ending in CRLF, no replies."""
    batch = bsmtp.batch_bytes("mx.example.test", [message(b"Subject: hi\r\n\r\nhello\r\n", size=22)])
    assert batch == (
        b"EHLO mx.example.test\r\n"
        b"MAIL FROM:<alice@example.test> SIZE=22\r\n"
        b"RCPT TO:<bob@faraway.example>\r\n"
        b"DATA\r\n"
        b"Subject: hi\r\n\r\nhello\r\n"
        b".\r\n"
        b"QUIT\r\n"
    )


def test_batch_opens_with_ehlo_and_ends_with_quit():
    """The session starts with EHLO (ESMTP may be assumed, rfc2442 "Use of SMTP
    Extensions", and MAIL parameters need it) and ends with QUIT; messages
    follow one another without RSET."""
    batch = bsmtp.batch_bytes("h.test", [message(b"a\r\n"), message(b"b\r\n", sender="")])
    lines = batch.split(b"\r\n")
    assert lines[0] == b"EHLO h.test"
    assert lines[-2:] == [b"QUIT", b""]
    assert b"RSET" not in batch
    assert batch.count(b"MAIL FROM:") == 2 and b"MAIL FROM:<>\r\n" in batch


def test_dot_stuffing_and_terminator():
    """rfc5321 4.5.2: a period that starts a line is doubled; data without a
    final CRLF gets one before the terminating period (rfc5321 4.1.1.4)."""
    batch = bsmtp.batch_bytes("h.test", [message(b".\r\n..x\r\nno end")])
    body = batch.split(b"DATA\r\n", 1)[1]
    assert body == b"..\r\n...x\r\nno end\r\n.\r\nQUIT\r\n"


def test_dot_stuffing_across_chunk_boundaries():
    """A line start hidden by a chunk boundary (CR | LF.) is still stuffed."""
    batch = bsmtp.batch_bytes("h.test", [message(b"", chunks=[b"a\r", b"\n.b\r\n", b".", b"c\r\n"])])
    assert batch.split(b"DATA\r\n", 1)[1] == b"a\r\n..b\r\n..c\r\n.\r\nQUIT\r\n"


def test_dsn_and_body_parameters_are_carried():
    """rfc2442: NOTARY (rfc3461) SHOULD be used; BODY=8BITMIME, RET and ENVID
    go on MAIL, NOTIFY and ORCPT (xtext) on RCPT; SIZE when known."""
    team = Recipient("bob@faraway.example", original="team+x=y@example.test", notify="SUCCESS,FAILURE")
    batch = bsmtp.batch_bytes(
        "h.test",
        [message(b"x\r\n", recipients=(team, CAROL), parameters=(("BODY", "8BITMIME"), ("ENVID", "abc"), ("RET", "HDRS")), size=3)],
    )
    assert b"MAIL FROM:<alice@example.test> BODY=8BITMIME RET=HDRS ENVID=abc SIZE=3\r\n" in batch
    assert b"RCPT TO:<bob@faraway.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;team+2Bx+3Dy@example.test\r\n" in batch
    assert b"RCPT TO:<carol@faraway.example>\r\n" in batch


def test_orcpt_dropped_when_the_line_would_be_too_long():
    """rfc5321 4.5.3.1.4: a command line is at most 512 octets; an ORCPT that
    would overflow it is left out rather than break the batch."""
    long_original = "x" * 480 + "@example.test"
    line = bsmtp.rcpt_command(Recipient("bob@faraway.example", original=long_original))
    assert line == b"RCPT TO:<bob@faraway.example>\r\n"


def test_cr_or_lf_in_an_address_is_refused():
    """An address holding CR or LF would inject commands: refused."""
    with pytest.raises(bsmtp.BatchError):
        bsmtp.rcpt_command(Recipient("bob@x\r\nDATA"))


def test_writer_counts_messages_and_octets():
    """``BatchWriter`` keeps count of messages and octets; pieces must come in order."""
    writer = bsmtp.BatchWriter("h.test")
    out = writer.begin() + writer.message(Envelope("a@b", ()), [BOB]) + writer.data(b".x\r\n") + writer.end_message()
    out += writer.end()
    assert writer.messages == 1 and writer.octets == len(out)
    with pytest.raises(RuntimeError):
        writer.end()


def test_write_batch_is_lazy():
    """The data of a message is pulled only as the batch's pieces are consumed."""
    pulled = []

    def chunks():
        for chunk in (b"a\r\n", b"b\r\n"):
            pulled.append(chunk)
            yield chunk

    pieces = bsmtp.write_batch("h.test", [message(b"", chunks=chunks())])
    assert next(pieces).startswith(b"EHLO") and next(pieces).startswith(b"MAIL") and pulled == []
    assert next(pieces) == b"a\r\n" and pulled == [b"a\r\n"]


@pytest.mark.parametrize(
    "sizes, max_messages, max_bytes, batches",
    [
        ([], 10, 100, []),
        ([10, 10, 10], 2, 1000, [[0, 1], [2]]),
        ([40, 40, 40], 10, 100, [[0, 1], [2]]),
        ([40, 60, 1], 10, 100, [[0, 1], [2]]),
        ([500, 10, 10], 10, 100, [[0], [1, 2]]),
        ([10, 500, 10], 10, 100, [[0], [1], [2]]),
        ([1, 1, 1, 1], 1, 100, [[0], [1], [2], [3]]),
    ],
)
def test_plan_batches(sizes, max_messages, max_bytes, batches):
    """At most ``max_messages`` messages and ``max_bytes`` octets a batch, in
    order; a message larger than ``max_bytes`` travels alone."""
    assert bsmtp.plan_batches(sizes, max_messages, max_bytes) == batches


def test_plan_batches_needs_positive_limits():
    """Limits of zero make no sense."""
    with pytest.raises(ValueError):
        bsmtp.plan_batches([1], 0, 10)


def replay(batch: bytes, **settings) -> tuple[list[tuple], bytes]:
    """Feed ``batch`` to the server machine (``ServerSettings`` given by
    ``settings``), accepting every decision (250 at end of data); return
    (transactions as (sender, recipients, data), replies)."""
    machine = ServerConnection(ServerSettings("rx.test", **settings))
    machine.start()
    machine.receive_data(batch)
    transactions, current, data = [], None, []
    while (event := machine.next_event()) is not None:
        if isinstance(event, ev.MailFrom):
            current = (event.sender, [])
        elif isinstance(event, ev.RcptTo):
            current[1].append(event.recipient)
        elif isinstance(event, ev.DataChunk):
            data.append(event.data)
        if isinstance(event, ev.DataEnd):
            transactions.append((current[0], current[1], b"".join(data)))
            data = []
            machine.reply(Reply.of(250, "2.0.0", "queued"))
        elif machine.waiting is not None:
            machine.accept()
    return transactions, machine.data_to_send()


line = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
bodies = st.lists(st.one_of(line, line.map(lambda b: b"." + b), st.just(b".")), max_size=20).map(
    lambda lines: b"".join(l + b"\r\n" for l in lines)
)


@settings(max_examples=60, deadline=None)
@given(st.lists(bodies, min_size=1, max_size=4))
def test_round_trip_through_the_server_machine(datas):
    """Whatever the messages hold, the server machine reads the batch back into
    the same transactions, byte for byte, with no reply of 400 or more."""
    batch = bsmtp.batch_bytes("tx.test", [message(d, recipients=(BOB, CAROL), size=len(d)) for d in datas])
    transactions, replies = replay(batch)
    assert [t[2] for t in transactions] == datas
    assert all(t[1] == ["bob@faraway.example", "carol@faraway.example"] for t in transactions)
    codes = [int(l[:3]) for l in replies.split(b"\r\n") if l[:3].isdigit()]
    assert codes and max(codes) < 400 and codes[-1] == 221

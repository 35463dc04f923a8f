"""mailsvc.receiverprocesses in memory: a receiver's log events cross to
the main process as lines (log_line / event_of_line) and are written there
as they would have been in one process, marked with the receiver; a Queued
notice gives the queue runner the committed message."""

from __future__ import annotations

from twisted.logger import LogLevel, Logger, formatEventAsClassicLogText

from mailsvc.logobserver import classic_text, event_text
from mailsvc.receiverprocesses import event_of_line, log_line


def emitted(emit) -> dict:
    events: list[dict] = []
    emit(Logger(namespace="mailsvc.receiver", observer=lambda event: events.append(dict(event))))
    [event] = events
    return event


def crossed(event: dict, number: int = 1) -> dict:
    line = log_line(event, event_text(event))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    return event_of_line(line[:-1], number)


def test_a_line_reads_as_in_one_process_with_the_receiver_named():
    event = emitted(lambda log: log.info("accepted id={id} from=<{s}>\nsecond {x!r}", id="X1", s="a{b}c", x="ü"))
    again = crossed(event, 2)
    assert again["log_level"] is LogLevel.info and again["log_time"] == event["log_time"]
    expected = formatEventAsClassicLogText({**event, "log_system": "receiver 2 mailsvc.receiver#info"})
    assert classic_text(again) == expected == formatEventAsClassicLogText(again)


def test_a_traceback_crosses_too():
    def failing(log):
        try:
            {}["missing"]
        except KeyError:
            log.failure("commit of {id} failed", id="X2")

    event = emitted(failing)
    text = classic_text(crossed(event))
    assert "[receiver 1 mailsvc.receiver#critical] commit of X2 failed\n\tTraceback" in text
    assert "KeyError: 'missing'" in text


def test_a_set_system_is_kept():
    event = emitted(lambda log: log.info("x", log_system="pop3,4"))
    assert classic_text(crossed(event, 3)).split(" ", 1)[1] == "[receiver 3 pop3,4] x\n"


def test_a_line_that_is_not_a_log_line_is_a_warning():
    """What Python writes itself (a traceback before logging began) is kept."""
    event = event_of_line(b"Traceback (most recent call last): \xff", 4)
    assert event["log_level"] is LogLevel.warn
    assert classic_text(event).endswith("receiver process 4: Traceback (most recent call last): \ufffd\n")
    assert event_of_line(b'{"text": 1}', 4)["log_level"] is LogLevel.warn  # JSON, not ours


# ---------------------------------------------------------------- Queued

class Runner:
    def __init__(self) -> None:
        self.submitted = []

    def submit(self, message) -> None:
        self.submitted.append(message)


def committed(tmp_path, recipients=1):
    """A FileSpool holding one committed message for two hops."""
    from mailsvc.envelope import Envelope, Recipient
    from mailsvc.spool import FileSpool

    spool = FileSpool(tmp_path / "spool")
    writer = spool.newMessage()
    writer.write(b"Subject: x\r\n\r\nx\r\n")
    local = tuple(Recipient(f"u{n}@example.test", f"u{n}@example.test", f"u{n}") for n in range(recipients))
    queued = writer.commit(Envelope(sender="s@remote.test", recipients=()), {"local": local, "relay": (Recipient("d@far.test"),)})
    return spool, queued


def test_a_queued_notice_submits_the_message_of_its_hop(tmp_path):
    """The message comes with the notice: the runner gets that message."""
    from mailsvc.receiverprocesses import ReceiverProcesses, pickled

    spool, queued = committed(tmp_path)
    runner = Runner()
    main = ReceiverProcesses(None, 1, "x.toml", [], spool, runner, None)
    for message in queued:
        main.take(message.id, message.hop, pickled(message))
    assert runner.submitted == list(queued)


def test_a_message_too_big_to_send_is_read_from_the_spool(tmp_path):
    """Past MAX_MESSAGE octets the receiver sends no message; the main
    process finds it in the spool (the same one)."""
    from mailsvc.receiverprocesses import ReceiverProcesses, pickled

    spool, queued = committed(tmp_path, recipients=2000)
    [local] = [m for m in queued if m.hop == "local"]
    assert pickled(local) == b""
    runner = Runner()
    main = ReceiverProcesses(None, 1, "x.toml", [], spool, runner, None)
    main.take(local.id, "local", b"")
    assert [m.id for m in runner.submitted] == [local.id] and runner.submitted[0].hop == "local"
    assert len(runner.submitted[0].envelope.recipients) == 2000
    main.take("1j0aaaaaaaaaaaaaaaaa", "local", b"")  # gone meanwhile: nothing, no error
    assert len(runner.submitted) == 1


def test_a_receivers_output_is_logged_by_lines_in_bounded_memory():
    """Lines may come in pieces, on stdout or stderr; a line with no end is
    logged once it passes MAX_LINE octets rather than held without bound."""
    from twisted.logger import globalLogPublisher

    from mailsvc.receiverprocesses import MAX_LINE, _Receiver

    class Owner:
        reactor = type("Clock", (), {"seconds": staticmethod(lambda: 0.0)})()

    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        receiver = _Receiver(Owner(), 7)
        event = emitted(lambda log: log.info("one {x}", x=1))
        line = log_line(event, event_text(event))
        receiver.childDataReceived(2, line[:10])
        receiver.childDataReceived(1, b"stray")
        receiver.childDataReceived(2, line[10:])
        receiver.childDataReceived(1, b" text\n")
        receiver.childDataReceived(2, b"x" * (MAX_LINE + 1))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    texts = [classic_text(e).split(" ", 1)[1] for e in seen]
    assert texts[:2] == ["[receiver 7 mailsvc.receiver#info] one 1\n",
                         "[mailsvc.receiverprocesses#warn] receiver process 7: stray text\n"]
    assert len(seen) == 3 and len(seen[2]["receiver_text"]) == MAX_LINE + 1

"""A small driver for the pure server machine, shared by the machine tests."""

from __future__ import annotations

from mailsvc.smtp import events as ev
from mailsvc.smtp.replies import Reply
from mailsvc.smtp.server import ServerConnection, ServerSettings


class Driver:
    """Feeds bytes to a ServerConnection and answers its decisions.

    By default every decision is accepted, DataEnd gets ``250 queued`` and
    each AUTH step ``535 5.7.8`` (STARTTLS is accepted; the test calls
    ``conn.tls_started()`` itself); ``answers`` maps an event type to a Reply (or a function of the event
    returning a Reply or None) to answer differently.
    """

    def __init__(self, settings: ServerSettings | None = None, answers=None, greet=True) -> None:
        self.conn = ServerConnection(settings or ServerSettings("mx.test", max_message_size=10_000))
        self.answers = dict(answers or {})
        self.events: list[ev.Event] = []
        self.data = b""
        if greet:
            self.conn.start()

    def feed(self, data: bytes) -> str:
        """Send ``data``; return everything the server wrote back, decoded."""
        self.conn.receive_data(data)
        self.run()
        return self.conn.data_to_send().decode()

    def run(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is None:
                return
            self.events.append(event)
            if isinstance(event, ev.DataChunk):
                self.data += event.data
            if not event.needs_reply:
                continue
            answer = self.answers.get(type(event))
            if callable(answer):
                answer = answer(event)
            if answer is None and isinstance(event, ev.DataEnd):
                answer = Reply.of(250, "2.0.0", "Ok: queued as TEST")
            if answer is None and isinstance(event, (ev.Verify, ev.Expand, ev.Turn)):
                answer = Reply.of(502, "5.5.1", "not here")
            if answer is None and isinstance(event, (ev.Auth, ev.AuthResponse)):
                answer = Reply.of(535, "5.7.8", "Authentication credentials invalid")
            if answer is None:
                self.conn.accept()
            else:
                self.conn.reply(answer)

    def of(self, kind) -> list:
        """The events of type ``kind`` seen so far."""
        return [e for e in self.events if isinstance(e, kind)]


def codes(text: str) -> list[str]:
    """The reply codes of the final lines of each reply in ``text``."""
    return [line[:3] for line in text.split("\r\n") if len(line) > 3 and line[3] == " "]


def session(*commands: bytes) -> bytes:
    """CRLF-joined commands, ready to feed."""
    return b"".join(c + b"\r\n" for c in commands)


READY = session(b"EHLO client.test", b"MAIL FROM:<alice@example.test>", b"RCPT TO:<bob@example.test>")

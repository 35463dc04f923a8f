"""Reading a BSMTP batch (rfc2442): each of its transactions through the receiving path, into the spool.

``BatchReader`` is what ``mailsvc rsmtp`` (``mailsvc.rsmtp``) runs on its
standard input. rfc2442 "Processing": the batch is the client's half of a
session with no one to read the replies, so the processor handles every
error itself. Here the pure server machine
(``mailsvc.smtp.server.ServerConnection``) reads the batch; its decisions
are answered by a ``ReceivingSession``, as from a trusted local client,
whose blocking calls run synchronously (``defer.maybeDeferred``), so every
Deferred fires at once and no reactor runs. Every reply of 400 or more is
reported (to ``say``; ``mailsvc rsmtp`` writes it on standard error) with
the line it answers, e.g.::

    mailsvc rsmtp: line 7: RCPT TO:<nobody@example.test>: 550 5.1.1 <nobody@example.test>: no such user here

and the batch goes on: a broken transaction never stops or loses the
others. To keep the batch in step:

- a batch that does not open with HELO/EHLO gets an implicit ``EHLO`` (many
  generators write none), so MAIL and its ESMTP parameters are accepted;
- the message after a refused DATA (no valid recipient, or MAIL refused) is
  skipped up to its ``.`` line, never read as commands;
- a MAIL inside a transaction that never reached DATA drops that transaction
  (reported) and starts the new one;
- a command line ending in a bare LF is refused on its own (rfc2442 and
  rfc5321 2.3.8: CRLF ends lines);
- input after QUIT starts a new session (concatenated batches).

The ``Received:`` line says where the message came from as far as we know:
``from <EHLO name> (uucp)``, or ``from uucp`` when the batch named no one,
``with BSMTP``.

Not done: rfc2442 asks a processor to send non-delivery notifications for
refused recipients and to forward a broken batch to the postmaster; here the
errors are only reported (``mailsvc rsmtp``: on standard error and in its
exit status; ``uuxqt`` mails them to the job's requestor). A policy or
directory that answers asynchronously cannot be waited for (there is no
reactor): the batch then stops with status 75.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import BinaryIO

from twisted.internet import defer
from twisted.python.failure import Failure

from mailsvc.envelope import Envelope
from mailsvc.policy import SessionInfo
from mailsvc.receiver import SESSION_HANDLERS, ReceiverContext, ReceivingSession
from mailsvc.smtp import events as ev
from mailsvc.smtp.replies import Reply
from mailsvc.smtp.reply_parser import ReplyParser
from mailsvc.smtp.server import ServerConnection, ServerSettings, State

EX_OK, EX_DATAERR, EX_TEMPFAIL = 0, 65, 75  # BatchResult.exit_status (sysexits.h)
CHUNK = 64 * 1024  # octets of message data fed to the machine at once
PROTOCOL = "BSMTP"
IMPLICIT_HELLO = b"EHLO uucp\r\n"
MAIL_VERBS = frozenset({"MAIL", "SEND", "SOML", "SAML"})
LOCAL_ERROR = Reply.of(451, "4.3.0", "Local error in processing")


class NotSynchronous(Exception):
    """A policy or the directory answered with a Deferred that did not fire at once."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing that went wrong: the batch line it concerns and what was said."""

    line: int
    text: str
    temporary: bool = False

    def __str__(self) -> str:
        return f"line {self.line}: {self.text}" if self.line else self.text


@dataclasses.dataclass
class BatchResult:
    """What a batch gave: the queue IDs committed and the problems met."""

    queued: list[str] = dataclasses.field(default_factory=list)
    problems: list[Problem] = dataclasses.field(default_factory=list)
    transactions: int = 0  # MAIL commands accepted or not, in the batch
    lines: int = 0

    @property
    def exit_status(self) -> int:
        """0 all queued; 75 something may work later; 65 permanent errors only."""
        if not self.problems:
            return EX_OK
        if any(p.temporary for p in self.problems):
            return EX_TEMPFAIL
        return EX_DATAERR


def _show(line: bytes) -> str:
    """A command line as an error message shows it."""
    text = line.rstrip(b"\r\n").decode("utf-8", "replace")
    return text if len(text) <= 100 else text[:97] + "..."


def _verb(line: bytes) -> str:
    return line.split(b" ", 1)[0].strip(b"\r\n").decode("ascii", "replace").upper()


def received_header(hostname: str, helo: str, message_id: str, envelope: Envelope) -> str:
    """The ``Received:`` line of a message that came in a batch (rfc5321 4.4)."""
    origin = f"from {helo} (uucp)" if helo else "from uucp"
    parts = [f"Received: {origin}", f"by {hostname} (mailsvc) with {PROTOCOL} id {message_id}"]
    if len(envelope.recipients) == 1:
        # rfc5321 4.4: "for" names a single recipient only.
        recipient = envelope.recipients[0]
        parts.append(f"for <{recipient.original or recipient.address}>")
    date = format_datetime(datetime.fromtimestamp(envelope.received_at, timezone.utc))
    return " ".join(parts) + f"; {date}"


class _Writer:
    """An ``IMessageWriter`` that stamps the envelope as a batch's at commit."""

    def __init__(self, writer, reader: "BatchReader") -> None:
        self._writer = writer
        self._reader = reader

    @property
    def id(self) -> str:
        return self._writer.id

    @property
    def size(self) -> int:
        return self._writer.size

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    def abort(self) -> None:
        self._writer.abort()

    def commit(self, envelope: Envelope, routes):
        envelope = self._reader.stamp(envelope, self.id)
        queued = self._writer.commit(envelope, routes)
        self._reader.result.queued.append(self.id)
        return queued


class _Spool:
    """The spool as the session sees it: writers that stamp envelopes."""

    def __init__(self, spool, reader: "BatchReader") -> None:
        self._spool = spool
        self._reader = reader

    def newMessage(self) -> _Writer:
        return _Writer(self._spool.newMessage(), self._reader)

    def __getattr__(self, name: str):
        return getattr(self._spool, name)


class BatchReader:
    """Reads one batch from a binary file and queues its transactions.

    :param context: the ``ReceiverContext`` (its ``run_blocking`` must
        answer synchronously, e.g. ``defer.maybeDeferred``).
    :param settings: the server machine's ``ServerSettings``.
    :param say: called with each problem's text as it is found.
    :param trace: called with the machine's replies (bytes), or None.
    """

    def __init__(
        self,
        context: ReceiverContext,
        settings: ServerSettings,
        say: Callable[[str], None] = lambda text: None,
        trace: Callable[[bytes], None] | None = None,
    ) -> None:
        self.context = dataclasses.replace(context, spool=_Spool(context.spool, self))
        self.settings = settings
        self.result = BatchResult()
        self._say = say
        self._trace = trace
        self._source: BinaryIO | None = None
        self._line_start = True
        self._helo = ""  # the EHLO/HELO name the batch gave, if any
        self._txn_line = 0  # line of the MAIL of the transaction in progress

    # ---------------------------------------------------------- input

    def _read(self, limit: int = CHUNK) -> bytes:
        """The next piece of input: a whole line, or part of a long one."""
        piece = self._source.readline(limit)
        if piece:
            if self._line_start:
                self.result.lines += 1
            self._line_start = piece.endswith(b"\n")
        return piece

    @property
    def line(self) -> int:
        """The number of the line being read (1-based)."""
        return self.result.lines

    def _problem(self, line: int, text: str, temporary: bool = False) -> None:
        problem = Problem(line, text, temporary)
        self.result.problems.append(problem)
        self._say(str(problem))

    # ---------------------------------------------------------- the batch

    def read(self, source: BinaryIO) -> BatchResult:
        """Queue every transaction of the batch in ``source``; return the result."""
        self._source = source
        first = self._next_command()
        try:
            while first is not None:
                first = self._session(first)
        except NotSynchronous as e:
            self._problem(self.line, f"{e}; the rest of the batch is not read", temporary=True)
        return self.result

    def _next_command(self) -> bytes | None:
        """The next line that is not blank, or None at the end of input."""
        while True:
            line = self._read()
            if not line:
                return None
            if line.strip(b" \t\r\n"):
                return line

    def _session(self, first: bytes) -> bytes | None:
        """One session, from ``first`` to QUIT or the end of input. Returns
        the first line after QUIT (a new session), or None at the end."""
        machine = ServerConnection(self.settings)
        session = ReceivingSession(self.context, SessionInfo(client_address=""))
        session.info.trusted = True  # a local, trusted client (uuxqt runs us)
        self._helo = ""
        refusal = self._resolve(session.on_connect())
        machine.start(refusal if isinstance(refusal, Reply) else None)
        self._flush(machine, self.line, "connection")
        if machine.closed or machine.state is State.REFUSED:
            self._problem(self.line, "the batch is refused; nothing of it is queued", temporary=bool(refusal and refusal.transient))
            while self._read():
                pass
            return None
        if _verb(first) not in ("HELO", "EHLO"):
            self._synthetic(machine, session, IMPLICIT_HELLO)
        line = first
        try:
            while True:
                if not line:
                    self._end_of_input(machine)
                    return None
                self._command(machine, session, line)
                if machine.closed:  # QUIT
                    return self._next_command()
                if machine.in_data:
                    self._data(machine, session)
                line = self._read()
        finally:
            session.abort()

    def _command(self, machine: ServerConnection, session: ReceivingSession, line: bytes) -> None:
        """One command line (or the first piece of an over-long one)."""
        number = self.line
        if line.endswith(b"\n") and not line.endswith(b"\r\n"):
            # rfc5321 2.3.8: a bare LF is never a line end; refused here, on its own line.
            self._problem(number, f"{_show(line)}: refused: the line ends with a bare LF, not CRLF")
            return
        verb, shown = _verb(line), _show(line)
        if verb in MAIL_VERBS and machine.state is State.MAIL:
            self._problem(number, f"the transaction begun at line {self._txn_line} has no DATA; it is dropped")
            self._synthetic(machine, session, b"RSET\r\n")
        machine.receive_data(line)
        while not line.endswith(b"\n"):  # over-long: the machine answers 500 and skips it
            line = self._read()
            if not line:
                break
            machine.receive_data(line)
        self._pump(machine, session, number)
        self._flush(machine, number, shown or "(empty line)")
        if verb == "DATA" and not machine.in_data and not machine.closed:
            self._skip_message(machine, session, number)

    def _data(self, machine: ServerConnection, session: ReceivingSession) -> None:
        """Message data, fed in blocks of up to ``CHUNK`` octets, each block
        ending at the latest with a ``.`` line (so the machine never holds
        commands that follow the message)."""
        begun = self.line
        block: list[bytes] = []
        size = 0
        while machine.in_data:
            at_start = self._line_start
            piece = self._read()
            if not piece:
                if block:
                    machine.receive_data(b"".join(block))
                    self._pump(machine, session, self.line)
                if machine.in_data:
                    self._problem(
                        self.line,
                        f"end of input inside the message begun at line {begun} (no \".\" line); it is not queued",
                    )
                    session.abort()
                self._line_start = True  # reported here: not again as a last line without CRLF
                return
            block.append(piece)
            size += len(piece)
            if (at_start and piece == b".\r\n") or size >= CHUNK:
                machine.receive_data(b"".join(block))
                block, size = [], 0
                self._pump(machine, session, self.line)
        self._flush(machine, self.line, f"end of the message begun at line {begun}")

    def _skip_message(self, machine: ServerConnection, session: ReceivingSession, number: int) -> None:
        """DATA was refused: the message that follows is not commands; skip it."""
        while True:
            at_start = self._line_start
            piece = self._read()
            if not piece:
                self._problem(self.line, f"end of input inside the message after line {number}")
                return
            if at_start and piece == b".\r\n":
                break
        self._say(f"line {self.line}: the message of lines {number + 1} to {self.line} is skipped")
        if machine.state is State.MAIL:
            self._synthetic(machine, session, b"RSET\r\n")

    def _end_of_input(self, machine: ServerConnection) -> None:
        if not self._line_start:
            self._problem(self.line, "the last line has no CRLF; it is ignored")
        if machine.state is State.MAIL:
            self._problem(self.line, f"end of input in the transaction begun at line {self._txn_line}; it is not queued")

    def _synthetic(self, machine: ServerConnection, session: ReceivingSession, line: bytes) -> None:
        """A command of ours (implicit EHLO, RSET) that is not in the batch."""
        machine.receive_data(line)
        self._pump(machine, session, self.line, implicit=True)
        self._flush(machine, self.line, f"{_show(line)} (implicit)")

    # ---------------------------------------------------------- the machine

    def _pump(self, machine: ServerConnection, session: ReceivingSession, number: int, implicit: bool = False) -> None:
        """Hand the machine's events to the session; answer its decisions.
        ``implicit``: the input is a command of ours, not the batch's."""
        while True:
            event = machine.next_event()
            if event is None:
                return
            name = SESSION_HANDLERS.get(type(event))
            if name is None:
                if event.needs_reply:  # STARTTLS, AUTH...: nothing a batch can use
                    machine.reply(Reply.of(502, "5.5.1", "Not available in a batch"))
                continue
            try:
                result = getattr(session, name)(event)
            except Exception:
                result = Failure()
            if not event.needs_reply:
                continue
            answer = self._resolve(result)
            if machine.waiting is None:
                continue
            if isinstance(event, ev.MailFrom):
                self._txn_line = number
                self.result.transactions += 1
            if answer is None:
                machine.accept()
                if isinstance(event, ev.Hello):
                    self._helo = "" if implicit else event.name
            else:
                machine.reply(answer)

    def _resolve(self, result):
        """The value of ``result`` now: a Deferred must already have fired."""
        if isinstance(result, Failure):
            return LOCAL_ERROR
        if not isinstance(result, defer.Deferred):
            return result
        outcome: list = []
        result.addBoth(outcome.append)
        if not outcome:
            result.cancel()
            result.addErrback(lambda _: None)
            raise NotSynchronous("a policy or the recipient directory answered asynchronously; rsmtp cannot wait")
        if isinstance(outcome[0], Failure):
            return LOCAL_ERROR
        return outcome[0]

    def _flush(self, machine: ServerConnection, number: int, what: str) -> None:
        """Read the machine's replies; report each one of 400 or more."""
        out = machine.data_to_send()
        if not out:
            return
        if self._trace is not None:
            self._trace(out)
        parser = ReplyParser()
        parser.feed(out)
        while (reply := parser.next_reply()) is not None:
            if isinstance(reply, Reply) and reply.code >= 400:
                self._problem(number, f"{what}: {reply}", temporary=reply.transient)

    # ---------------------------------------------------------- envelopes

    def stamp(self, envelope: Envelope, message_id: str) -> Envelope:
        """``envelope`` as a batch's: protocol BSMTP, our ``Received:`` line
        in place of the receiver's (the first prepended header)."""
        header = received_header(self.context.settings.hostname, self._helo, message_id, envelope)
        headers = list(envelope.prepend_headers)
        if headers and headers[0].startswith("Received:"):
            headers[0] = header
        else:
            headers.insert(0, header)
        return envelope.evolve(protocol=PROTOCOL, client_address="", prepend_headers=tuple(headers))

"""The SMTP server role as a pure state machine: bytes in, events and bytes out.

Modelled on h11: ``receive_data(bytes)`` takes what the client sent,
``next_event()`` hands out what happened, ``accept()`` / ``reply()`` answer a
decision, ``data_to_send()`` gives the bytes to write. No I/O, no Twisted.

The machine itself answers what needs no outside knowledge: syntax (501),
sequence (503), unknown commands (500), limits (line length, SIZE, recipient
count), NOOP, HELP, RSET, QUIT. It asks (a ``Decision`` event) for what needs
policy: HELO/EHLO, MAIL, RCPT, DATA, end of data, VRFY, EXPN, TURN,
STARTTLS, each step of AUTH, and (when offered) ETRN and ATRN.

TURN and ATRN: a positive answer sends 250 and enters ``TURNED`` (h11's
``SWITCHED_PROTOCOL``): nothing more is parsed, and ``trailing_data`` holds
the unread bytes for the client role that takes the connection over
(``mailsvc.turnaround``).

Commands: rfc5321 4.1.1 (EHLO/HELO, MAIL, RCPT, DATA, RSET, VRFY, EXPN, HELP,
NOOP, QUIT), rfc821 4.1.1 (SEND, SOML, SAML, TURN), rfc3207 (STARTTLS),
rfc4954 (AUTH, and the AUTH= parameter of MAIL) and, with ``chunking``,
rfc3030 (BDAT).

BDAT: the first chunk of a transaction is a ``DataCommand`` decision, as
DATA is (accepting it sends nothing: there is no 354); its octets, and
every later chunk's, come out as ``DataChunk`` events, checked by
``mailsvc.smtp.chunking.ChunkReader`` (SIZE, line length, bare CR/LF, as
for DATA, never dot-stuffed); each chunk but the last gets 250 from the
machine; ``BDAT n LAST`` ends in a ``DataEnd`` decision (or a refusal and
``DataRefused``), as CRLF.CRLF does. A chunk that cannot be taken (no
transaction, no recipient, refused) is read and discarded before its
refusal (rfc3030 2), and a failed transaction's later chunks, pipelined,
get the same refusal until RSET.

STARTTLS: accepting the ``StartTLS`` decision queues 220 and enters
``TLS_PENDING``, where nothing more is read and input is dropped; once the
glue has switched the transport it calls ``tls_started()``, which discards
any buffered input and starts the session over (rfc3207 4.2; CVE-2011-0411).

AUTH: the machine checks sequence and mechanism (503, 504, 538) and hands
out an ``Auth`` decision; a ``334`` reply keeps the exchange going and each
client line comes back as an ``AuthResponse`` decision (``*`` cancels with
501, rfc4954 4); ``235`` marks the session authenticated.

Abuse limits the machine enforces itself: with ``max_errors`` set, that many
5xx replies to bad or out-of-sequence commands close the session with 421
4.7.0; with ``auth_required`` (submission, rfc6409 4.3), mail commands before
AUTH get 530 5.7.0 (rfc4954 6).
"""

from __future__ import annotations

import collections

from mailsvc.smtp import events as ev
from mailsvc.smtp.chunking import ChunkReader
from mailsvc.smtp.data import DataFault, DataReader
from mailsvc.smtp.replies import RECIPIENT_OK, SENDER_OK, START_DATA, Reply
from mailsvc.smtp.sasl import PLAINTEXT_MECHANISMS
from mailsvc.smtp.server_commands import CommandParser
from mailsvc.smtp.server_state import (  # noqa: F401 (re-exported: the machine's public names)
    AUTH_PARAMETER_ROOM,
    SMTPUTF8_PARAMETER_ROOM,
    AUTH_REQUIRED,
    ERROR_CODES,
    MAX_AUTH_LINE,
    MAX_COMMAND_LINE,
    TOO_MANY_ERRORS,
    ServerSettings,
    State,
)


# States in which next_event() reads nothing.
_NOT_PARSING = (State.CLOSED, State.NEW, State.TLS_PENDING, State.TURNED)


class ServerConnection(CommandParser):
    """One SMTP session, server side. See the module docstring."""

    def __init__(self, settings: ServerSettings, tls: bool = False) -> None:
        self.settings = settings
        self.state = State.NEW
        self.hello_name = ""
        self.extended = False  # EHLO was used
        self.tls = tls  # TLS is active (implicit TLS, rfc8314, or after STARTTLS)
        self.authenticated = False  # AUTH succeeded (rfc4954 4)
        self.errors = 0  # replies in ERROR_CODES so far
        self._in = b""
        self._out: list[bytes] = []
        self._events: collections.deque[ev.Event] = collections.deque()
        self._pending: ev.Decision | None = None
        self._discarding = False  # inside an over-long command line
        self._reader: DataReader | None = None
        self._accepted = 0  # recipients accepted in this transaction
        self._attempted = 0  # RCPT commands that passed syntax
        self.smtputf8_transaction = False  # MAIL had SMTPUTF8 (rfc6531 3.4)
        # BDAT (rfc3030): the transaction's reader; the octets of the current
        # chunk still to read (None: not inside a chunk), whether it is the
        # last; the refusal to send once a chunk is read and discarded; the
        # refusal of a failed transaction (its later chunks get it too).
        self._chunks: ChunkReader | None = None
        self._chunk_left: int | None = None
        self._chunk_size = 0
        self._chunk_last = False
        self._chunk_refusal: Reply | None = None
        self._bdat_failed: Reply | None = None
        self._bdat_asking = False  # the DataCommand pending came from BDAT

    # ---------------------------------------------------------- driving

    def start(self, refusal: Reply | None = None) -> None:
        """Send the greeting (rfc5321 4.3.1), or ``refusal`` instead.

        A 554 refusal leaves the session open for QUIT only (rfc5321 3.1); a
        421 closes it.
        """
        if self.state is not State.NEW:
            raise RuntimeError("start() called twice")
        if refusal is None:
            self._send(self.settings.greeting)
            self.state = State.GREETED
        elif refusal.code == 421:
            self.close(refusal)
        else:
            self._send(refusal)
            self.state = State.REFUSED

    def receive_data(self, data: bytes) -> None:
        """Take bytes from the client. Nothing is parsed until ``next_event``.

        While TLS is pending the bytes are dropped: they came in clear text
        after STARTTLS and must never be read as commands (rfc3207 4.2).
        """
        if self.state not in (State.CLOSED, State.TLS_PENDING):
            self._in += data  # once TURNED, kept for ``trailing_data``

    def data_to_send(self) -> bytes:
        """The bytes to write to the client now (replies, in order).

        After accepting ``StartTLS`` this holds the 220, which must be
        written in clear text before the transport switches.
        """
        out, self._out = b"".join(self._out), []
        return out

    @property
    def closed(self) -> bool:
        """True once the session is over: write what is left, then disconnect."""
        return self.state is State.CLOSED

    @property
    def waiting(self) -> ev.Decision | None:
        """The decision awaiting ``accept()`` or ``reply()``, if any."""
        return self._pending

    @property
    def tls_pending(self) -> bool:
        """True after the 220 to STARTTLS, until ``tls_started()``."""
        return self.state is State.TLS_PENDING

    @property
    def offered_mechanisms(self) -> tuple[str, ...]:
        """The SASL mechanisms AUTH takes now (rfc4954 4: plaintext ones need TLS)."""
        if self.tls or self.settings.auth_without_tls:
            return self.settings.auth_mechanisms
        if self.settings.challenge_auth_without_tls:
            # Challenge-response mechanisms never send the password (rfc2645 5.1.2).
            return tuple(m for m in self.settings.auth_mechanisms if m not in PLAINTEXT_MECHANISMS)
        return ()

    @property
    def turned(self) -> bool:
        """True after the 250 to TURN or ATRN: the roles are reversed. Write
        ``data_to_send()`` (the 250), then hand ``trailing_data`` to the client
        role that takes the connection over; this machine reads nothing more."""
        return self.state is State.TURNED

    @property
    def trailing_data(self) -> bytes:
        """Once ``turned``: the bytes received after the TURN/ATRN line, not
        parsed (like h11's ``trailing_data`` after a protocol switch)."""
        return self._in if self.state is State.TURNED else b""

    @property
    def in_data(self) -> bool:
        """True while message data is being read (after DATA, or a BDAT chunk's octets)."""
        return self.state is State.DATA or self._chunk_left is not None

    def close(self, reply: Reply) -> None:
        """End the session with ``reply`` (421 on timeout or shutdown)."""
        if self.state is State.CLOSED:
            return
        self._send(reply)
        self._enter_closed()

    def next_event(self) -> ev.Event | None:
        """The next event, or ``None`` when more input (or a reply) is needed."""
        while True:
            if self._events:
                return self._hand_out(self._events.popleft())
            if self._pending is not None or self.state in _NOT_PARSING:
                return None
            if self.state is State.DATA:
                if not self._in:
                    return None
                self._read_data()
                continue
            if self._chunk_left is not None:
                if self._chunk_left and not self._in:
                    return None
                self._read_chunk()
                continue
            in_auth = self.state is State.AUTH
            line = self._take_line(MAX_AUTH_LINE if in_auth else self._command_limit())
            if line is None:
                if self._events:  # an over-long AUTH line ended the exchange
                    continue
                return None
            event = self._auth_response(line) if in_auth else self._command(line)
            if event is not None:
                return self._hand_out(event)

    def accept(self) -> None:
        """Answer the pending decision with its usual positive reply."""
        decision = self._take_pending()
        if isinstance(decision, ev.DataCommand) and self._bdat_asking:
            # rfc3030 2: no 354; the first chunk's octets are read now.
            self._bdat_asking = False
            self.state = State.BDAT
            self._chunks = ChunkReader(self.settings.max_message_size)
            return
        if isinstance(decision, ev.Hello):
            self._out.append(self._hello_bytes(decision))  # 250: never counts as an error
        elif isinstance(decision, ev.MailFrom):
            self._send(SENDER_OK)
        elif isinstance(decision, ev.RcptTo):
            self._send(RECIPIENT_OK)
        elif isinstance(decision, ev.DataCommand):
            self._send(START_DATA)
        elif isinstance(decision, ev.StartTLS):
            # rfc3207 4: 220, then the TLS handshake; nothing more is read in clear.
            self._send(Reply.of(220, "2.0.0", "Ready to start TLS"))
            self.state = State.TLS_PENDING
            self._in = b""
            return
        elif isinstance(decision, (ev.Turn, ev.Atrn)):
            # rfc821 4.1.1, rfc2645 5.3: 250, then the roles reverse.
            self._send(Reply.of(250, "2.0.0", "OK now reversing the connection"))
            self.state = State.TURNED
            return
        else:
            self._pending = decision
            raise RuntimeError(f"{type(decision).__name__} needs an explicit reply()")
        self._after_reply(decision, True)

    def reply(self, reply: Reply) -> None:
        """Answer the pending decision with ``reply``. A 421 closes the session
        (rfc5321 3.8); a 334 to ``Auth``/``AuthResponse`` continues the exchange."""
        decision = self._take_pending()
        if reply.code == 421:
            self.close(reply)
            return
        if isinstance(decision, ev.DataCommand) and self._bdat_asking:
            # The first chunk refused: its octets are read and discarded
            # first, then the reply; the later ones get it too (rfc3030 2).
            self._bdat_asking = False
            self.state = State.BDAT
            self._chunk_refusal = self._bdat_failed = reply
            return
        self._send(reply)
        if isinstance(decision, (ev.Auth, ev.AuthResponse)):
            self._after_auth_reply(reply)
        elif isinstance(decision, (ev.Turn, ev.Atrn)) and reply.positive and self.state is not State.CLOSED:
            self.state = State.TURNED  # rfc821 4.1.1: a 250 reverses the roles
        else:
            self._after_reply(decision, reply.positive)

    def tls_started(self) -> None:
        """The transport now speaks TLS: start the session over (rfc3207 4.2).

        Everything the client said before is forgotten, buffered input
        included: the EHLO name, any transaction, any AUTH. EHLO is needed
        again; STARTTLS is no longer offered.
        """
        if self.state is not State.TLS_PENDING:
            raise RuntimeError("tls_started() without an accepted STARTTLS")
        self._in = b""
        self._discarding = False
        self._chunk_left, self._chunk_refusal, self._bdat_asking = None, None, False
        self._reset_transaction()
        self.tls = True
        self.authenticated = False
        self.hello_name, self.extended = "", False
        self.state = State.GREETED

    # ---------------------------------------------------------- internals

    def _send(self, reply: Reply) -> None:
        self._out.append(bytes(reply))
        if reply.code in ERROR_CODES and self.state is not State.CLOSED:
            self.errors += 1
            if self.settings.max_errors and self.errors >= self.settings.max_errors:
                self.close(TOO_MANY_ERRORS)

    def _command_limit(self) -> int:
        limit = MAX_COMMAND_LINE
        if self.settings.auth_mechanisms:
            limit += AUTH_PARAMETER_ROOM
        if self.settings.smtputf8:
            limit += SMTPUTF8_PARAMETER_ROOM
        return limit

    def _hand_out(self, event: ev.Event) -> ev.Event:
        if event.needs_reply:
            self._pending = event
        return event

    def _take_pending(self) -> ev.Decision:
        if self._pending is None:
            raise RuntimeError("no decision is waiting for a reply")
        decision, self._pending = self._pending, None
        return decision

    def _enter_closed(self) -> None:
        self.state = State.CLOSED
        self._in = b""
        self._pending = None
        self._events.clear()

    def _reset_transaction(self) -> None:
        """rfc5321 4.1.1.5: forget sender, recipients and data."""
        self._accepted = self._attempted = 0
        self.smtputf8_transaction = False
        self._reader = None
        self._chunks = self._bdat_failed = None
        if self.state in (State.MAIL, State.DATA, State.BDAT):
            self.state = State.READY

    def _after_reply(self, decision: ev.Decision, positive: bool) -> None:
        if self.state is State.CLOSED:
            return
        if isinstance(decision, ev.Hello) and positive:
            # rfc5321 4.1.4: EHLO/HELO clears any transaction, like RSET.
            self._reset_transaction()
            self.state = State.READY
            self.hello_name, self.extended = decision.name, decision.extended
        elif isinstance(decision, ev.MailFrom) and positive:
            self.state = State.MAIL
            # rfc6531 3.4: the transaction may use UTF-8 addresses.
            self.smtputf8_transaction = "SMTPUTF8" in decision.parameters
        elif isinstance(decision, ev.RcptTo) and positive:
            self._accepted += 1
        elif isinstance(decision, ev.DataCommand) and positive:
            self.state = State.DATA
            self._reader = DataReader(self.settings.max_message_size)
        elif isinstance(decision, ev.DataEnd):
            self._reset_transaction()

    def _after_auth_reply(self, reply: Reply) -> None:
        if self.state is State.CLOSED:
            return
        if reply.code == 334:
            self.state = State.AUTH
            return
        self.state = State.READY
        if reply.code == 235:
            self.authenticated = True

    def _take_line(self, limit: int) -> bytes | None:
        """The next complete line of at most ``limit`` octets, or None.
        Over-long lines are answered with 500 and skipped up to their CRLF,
        so the session stays in step (rfc5321 4.5.3.1.4, 4.5.3.1.10; rfc4954 4
        for AUTH responses, which also ends the exchange)."""
        while True:
            end = self._in.find(b"\r\n")
            if self._discarding:
                if end < 0:
                    self._in = b"\r" if self._in.endswith(b"\r") else b""
                    return None
                self._in = self._in[end + 2 :]
                self._discarding = False
                continue
            if end < 0:
                if len(self._in) <= limit - 1:  # room for the rest and CRLF
                    return None
                too_long = True
            else:
                too_long = end + 2 > limit
            if too_long:
                self._discarding = True
                if self.state is State.AUTH:
                    self.state = State.READY
                    self._events.append(ev.AuthCancelled())
                    self._send(Reply.of(500, "5.5.6", "Authentication exchange line is too long"))
                    return None  # read the rest with the command line limit
                else:
                    self._send(Reply.of(500, "5.5.2", f"Line too long ({limit} octets at most)"))
                continue
            line, self._in = self._in[:end], self._in[end + 2 :]
            return line

    def _start_chunk(self, size: int, last: bool) -> ev.Event | None:
        """``BDAT size [LAST]`` (rfc3030 2): read the chunk into the
        transaction, ask about the first one, or discard it before its refusal."""
        self._chunk_left, self._chunk_size, self._chunk_last = size, size, last
        self._chunk_refusal = None
        if self.state is State.BDAT:
            self._chunk_refusal = self._bdat_failed  # None: the transaction goes on
            return None
        if self.settings.auth_required and not self.authenticated:
            self._chunk_refusal = AUTH_REQUIRED  # rfc4954 6
        elif self.state is not State.MAIL:
            self._chunk_refusal = Reply.of(503, "5.5.1", "Need MAIL before BDAT")
        elif self._accepted == 0 and self._attempted == 0:
            self._chunk_refusal = Reply.of(503, "5.5.1", "Need RCPT before BDAT")
        elif self._accepted == 0:
            self._chunk_refusal = Reply.of(554, "5.5.1", "No valid recipients")
        else:
            self._bdat_asking = True
            return ev.DataCommand()  # as DATA: may the message come?
        return None

    def _read_chunk(self) -> None:
        """The octets of the current BDAT chunk: stored (``DataChunk``) or
        discarded; at its end, the reply (250, or the outcome at LAST)."""
        assert self._chunk_left is not None
        piece, self._in = self._in[: self._chunk_left], self._in[self._chunk_left :]
        self._chunk_left -= len(piece)
        if self._chunk_refusal is None and self._chunks is not None:
            content = self._chunks.feed(piece)
            if content:
                self._events.append(ev.DataChunk(content))
        if self._chunk_left:
            return
        self._chunk_left = None
        refusal, self._chunk_refusal = self._chunk_refusal, None
        if refusal is not None:
            self._send(refusal)  # rfc3030 2: after the octets are read and discarded
        elif not self._chunk_last:
            self._send(Reply.of(250, "2.0.0", f"{self._chunk_size} octets received"))
        else:
            chunks = self._chunks
            assert chunks is not None
            fault = chunks.finish()
            if fault is None:
                self._events.append(ev.DataEnd(chunks.size))
                return
            refusal = _refusal(fault, self.settings.max_message_size)
            self._send(refusal)
            self._reset_transaction()
            self._events.append(ev.DataRefused(refusal))

    def _read_data(self) -> None:
        assert self._reader is not None
        data, self._in = self._in, b""
        content, rest = self._reader.feed(data)
        if content:
            self._events.append(ev.DataChunk(content))
        if rest is None:
            return
        self._in = rest
        fault = self._reader.fault
        if fault is None:
            self._events.append(ev.DataEnd(self._reader.size))
            return
        refusal = _refusal(fault, self.settings.max_message_size)
        self._send(refusal)
        self._reset_transaction()
        self._events.append(ev.DataRefused(refusal))


def _refusal(fault: DataFault, limit: int) -> Reply:
    """The reply that refuses a message at its end of data."""
    if fault is DataFault.TOO_BIG:
        return Reply.of(552, "5.3.4", f"Message too big: the limit is {limit} octets")
    if fault is DataFault.BARE_LINE_END:
        return Reply.of(550, "5.5.2", "Message refused: bare CR or LF in message text; lines must end with CRLF")
    return Reply.of(554, "5.6.0", "Message refused: a text line is longer than 1000 octets")

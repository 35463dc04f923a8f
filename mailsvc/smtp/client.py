"""The SMTP client role as a pure state machine: replies in, events and commands out.

The twin of ``mailsvc.smtp.server``, shaped like h11: ``receive_data(bytes)``
takes what the server sent, ``next_event()`` hands out what it meant
(``mailsvc.smtp.client_events``), the caller's calls (``send_message``,
``send_data``, ``end_data``, ``start_tls``, ``auth_plain``, ``auth_login``,
``turn``, ``atrn``, ``quit``) queue commands, and
``data_to_send()`` gives the bytes to write. No I/O, no Twisted, no clock:
timeouts are the caller's, ``timeout_phase`` says which one applies.

The body goes as DATA (dot-stuffed, rfc5321 4.5.2) or, when the server
offers CHUNKING, as BDAT chunks (rfc3030: no stuffing, no 354; each
``send_data`` chunk becomes one ``BDAT n``, the last one ``BDAT n LAST``).
Under PIPELINING the chunks go without waiting for their replies (rfc3030
2, example 4.2); without it, ``data_wanted`` says when the next chunk may go.
As in that example, the first chunk waits for the MAIL and RCPT replies:
nothing of the body goes when no recipient was accepted.

Misuse by the caller (a call in the wrong state, a malformed envelope) raises
``RuntimeError`` / ``ValueError``; anything the server does, however wrong,
becomes an event and never an exception.

One connection carries any number of messages. Each command's reply is
matched to it by counting, never by its text (rfc2920 3.1); a reply code is
read by its first digit (rfc5321 4.2.1, 4.3.2), and 421 ends the session at
any point (rfc5321 3.8).

The state machine is here, its reply handlers in ``client_replies``
(``ReplyHandlers``, mixed in); the parts that stand alone live beside it:
``client_state`` (settings, states, what each reply due answers, timeout
phases), ``client_capabilities`` (the EHLO reply read), ``client_commands``
(command lines and their ESMTP parameters), ``client_chunking`` (BDAT
framing) and ``client_transaction`` (the transaction's bookkeeping).
"""

from __future__ import annotations

import collections

from mailsvc.smtp import client_events as ev
from mailsvc.smtp.client_capabilities import offers_auth, size_limit
from mailsvc.smtp.client_chunking import ChunkWriter
from mailsvc.smtp.client_commands import (
    atrn_command,
    auth_login_answers,
    auth_plain_command,
    hello_command,
    mail_command,
    mail_parameters,
    offered_parameters,
    rcpt_command,
)
from mailsvc.smtp.client_events import Transaction
from mailsvc.smtp.client_replies import ReplyHandlers
from mailsvc.smtp.client_state import TIMEOUT_PHASES, ClientSettings, ReplyDue, State
from mailsvc.smtp.client_transaction import NO_RECIPIENTS, TransactionProgress
from mailsvc.smtp.reply_parser import MalformedReply, ReplyParser
from mailsvc.smtp.stuffing import DotStuffer

# ``ClientSettings``, ``State``, ``Transaction`` and ``NO_RECIPIENTS`` are the
# machine's public names too: its users import them from here.


class ClientConnection(ReplyHandlers):
    """One SMTP session, client side. See the module docstring.

    The session: wait for the greeting, EHLO (HELO if EHLO gets a 5xx,
    rfc5321 3.2), ``Ready``; then any number of ``send_message`` rounds, each
    ending in ``TransactionFailed`` or ``MessageResult``; optionally
    ``start_tls`` first; ``quit()`` ends it with ``Closed``.
    """

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.state = State.GREETING
        self.extensions: dict[str, str] = {}
        self.extended = False  # EHLO (not HELO) was accepted
        self.tls_active = settings.tls
        self._parser = ReplyParser()
        self._out: list[bytes] = []
        self._events: collections.deque[ev.ClientEvent] = collections.deque()
        self._due: collections.deque[ReplyDue] = collections.deque([ReplyDue.GREETING])
        self._unsent: collections.deque[tuple[ReplyDue, bytes]] = collections.deque()
        self._exchange: TransactionProgress | None = None
        self._stuffer: DotStuffer | None = None
        self._chunks: ChunkWriter | None = None  # BDAT: the body's chunks (rfc3030)
        self._auth_answers: collections.deque[bytes] = collections.deque()  # lines for 334s
        # The server may still hold a transaction (MAIL accepted, no end of
        # data since): the next one starts with RSET (rfc5321 4.1.1.5).
        self._needs_reset = False

    # ---------------------------------------------------------- driving

    def receive_data(self, data: bytes) -> None:
        """Take bytes from the server. Nothing is parsed until ``next_event``."""
        if self.state is not State.CLOSED:
            self._parser.feed(data)

    def data_to_send(self) -> bytes:
        """The bytes to write to the server now (commands and data, in order)."""
        out, self._out = b"".join(self._out), []
        return out

    def next_event(self) -> ev.ClientEvent | None:
        """The next event, or ``None`` when more input (or a call) is needed."""
        while True:
            if self._events:
                return self._events.popleft()
            if self.state in (State.CLOSED, State.TLS_HANDSHAKE, State.TURNED):
                return None
            reply = self._parser.next_reply()
            if reply is None:
                return None
            if isinstance(reply, MalformedReply):
                self._close(ev.ProtocolError(f"{reply.reason}: {reply.line[:80]!r}"))
            else:
                self._on_reply(reply)

    @property
    def closed(self) -> bool:
        """True once the session is over: write what is left, then disconnect."""
        return self.state is State.CLOSED

    @property
    def trailing_data(self) -> bytes:
        """Once ``Turned``: what the peer sent after the 250, not read here;
        feed it to the server role that takes the connection over."""
        return self._parser.discard() if self.state is State.TURNED else b""

    @property
    def max_size(self) -> int:
        """The server's SIZE limit in octets (rfc1870 4); 0 when it gives none."""
        return size_limit(self.extensions)

    @property
    def chunking(self) -> bool:
        """True when the transaction in progress sends its body with BDAT (rfc3030)."""
        return self._exchange is not None and self._exchange.chunking

    @property
    def data_wanted(self) -> bool:
        """True when ``send_data`` may be called now: in ``DATA``, and, for
        BDAT without PIPELINING, once the last chunk sent has its reply
        (rfc3030 2 and its example 4.2: only with PIPELINING may chunks go unanswered)."""
        if self.state is not State.DATA:
            return False
        return not self.chunking or self._pipelining or not self._due

    @property
    def _pipelining(self) -> bool:
        return self.settings.pipelining and "PIPELINING" in self.extensions

    @property
    def timeout_phase(self) -> str | None:
        """The rfc5321 4.5.3.2 timeout that applies now: "greeting", "mail",
        "rcpt", "data-init", "data-block" or "data-end" (5, 5, 5, 2, 3, 10
        minutes); ``None`` when no reply is due and no data is being sent."""
        if self.state is State.DATA:
            return "data-block"
        if not self._due or self.state is State.CLOSED:
            return None
        return TIMEOUT_PHASES.get(self._due[0], "mail")

    # ---------------------------------------------------------- caller's calls

    def send_message(self, transaction: Transaction) -> None:
        """Start a transaction: RSET if needed, MAIL, RCPTs, DATA (rfc5321 3.3),
        in one write under PIPELINING (rfc2920 3.1), else one at a time."""
        self._require(State.READY)
        mail_params, refusal = mail_parameters(transaction, self.extensions)
        if refusal is not None:
            self._events.append(ev.TransactionFailed(refusal, synthetic=True))
            return
        self._exchange = TransactionProgress(transaction)
        self._exchange.chunking = self.settings.chunking and "CHUNKING" in self.extensions
        self.state = State.TRANSACTION
        if self._needs_reset:
            self._unsent.append((ReplyDue.RSET, b"RSET\r\n"))
        self._unsent.append((ReplyDue.MAIL, mail_command(transaction.sender, mail_params)))
        for address, params in transaction.recipients:
            line = rcpt_command(address, offered_parameters(params, self.extensions))
            self._unsent.append((ReplyDue.RCPT, line))
        if not self._exchange.chunking:
            # With BDAT there is no DATA: the first chunk goes once a
            # recipient is accepted (``_recipients_done``).
            self._unsent.append((ReplyDue.DATA, b"DATA\r\n"))
        self._write_unsent()

    def send_data(self, chunk: bytes) -> None:
        """Send message bytes (unstuffed, CRLF line ends, any chunking) after
        ``StartData``. With BDAT, check ``data_wanted`` first."""
        self._require(State.DATA)
        if self.chunking:
            if not self.data_wanted:
                raise RuntimeError("the last BDAT chunk is not answered yet (no PIPELINING)")
            assert self._chunks is not None
            # rfc3030 2: the writer holds each chunk back until the next one
            # comes, so that the last can carry LAST; out comes the one before.
            command = self._chunks.chunk(chunk)
            if command:
                self._out.append(command)
                self._expect(ReplyDue.BDAT)
            return
        assert self._stuffer is not None
        stuffed = self._stuffer.stuff(chunk)
        if stuffed:
            self._out.append(stuffed)

    def end_data(self) -> None:
        """End the message (rfc5321 4.1.1.4; rfc3030 2: ``BDAT n LAST``);
        ``MessageResult`` follows."""
        self._require(State.DATA)
        if self.chunking:
            if not self.data_wanted:
                raise RuntimeError("the last BDAT chunk is not answered yet (no PIPELINING)")
            assert self._chunks is not None
            self._out.append(self._chunks.last())
            self._chunks = None
            self._expect(ReplyDue.END)
            self.state = State.DATA_END
            return
        assert self._stuffer is not None
        self._out.append(self._stuffer.end())
        self._stuffer = None
        self._expect(ReplyDue.END)
        self.state = State.DATA_END

    def start_tls(self) -> None:
        """Send STARTTLS (rfc3207 4); ``TLSReady`` or ``TLSRefused`` follows."""
        self._require(State.READY)
        if "STARTTLS" not in self.extensions or self.tls_active:
            # rfc3207 4.2: never a second TLS session; only when offered.
            raise RuntimeError("STARTTLS is not offered here")
        self._send(ReplyDue.STARTTLS, b"STARTTLS\r\n")
        self.state = State.STARTTLS

    def tls_started(self) -> None:
        """The TLS handshake is done: forget everything learnt before it,
        input still buffered included, and send EHLO again (rfc3207 4.2)."""
        self._require(State.TLS_HANDSHAKE)
        self._parser.discard()
        self.tls_active = True
        self.extensions, self.extended = {}, False
        self._needs_reset = False
        self._send_hello(ReplyDue.EHLO)

    def auth_plain(self, authcid: str, password: str, authzid: str = "") -> None:
        """AUTH PLAIN with an initial response (rfc4954 4, rfc4616 2);
        ``AuthSucceeded`` or ``AuthFailed`` follows. The caller makes sure
        the transport is encrypted: PLAIN carries the password."""
        self._require(State.READY)
        if not offers_auth(self.extensions, "PLAIN"):
            raise RuntimeError("AUTH PLAIN is not offered here")
        line = auth_plain_command(authcid, password, authzid)
        self._auth_answers.clear()
        self._send(ReplyDue.AUTH, line)
        self.state = State.AUTH

    def auth_login(self, username: str, password: str) -> None:
        """AUTH LOGIN (draft-murchison-sasl-login): the user name answers the
        first 334, the password the second; ``AuthSucceeded`` or
        ``AuthFailed`` follows. No initial response, which every server
        takes. The caller makes sure the transport is encrypted."""
        self._require(State.READY)
        if not offers_auth(self.extensions, "LOGIN"):
            raise RuntimeError("AUTH LOGIN is not offered here")
        self._auth_answers = auth_login_answers(username, password)
        self._send(ReplyDue.AUTH, b"AUTH LOGIN\r\n")
        self.state = State.AUTH

    def turn(self) -> None:
        """Send TURN (rfc821 4.1.1); ``Turned`` or ``TurnRefused`` follows."""
        self._require(State.READY)
        self._send(ReplyDue.TURN, b"TURN\r\n")
        self.state = State.TURN

    def atrn(self, domains=()) -> None:
        """Send ATRN [domain,...] (rfc2645 5.2.1); ``Turned`` or ``TurnRefused`` follows."""
        self._require(State.READY)
        self._send(ReplyDue.TURN, atrn_command(domains))
        self.state = State.TURN

    def quit(self) -> None:
        """Send QUIT (rfc5321 4.1.1.10); ``Closed`` follows."""
        self._require(State.READY, State.REFUSED)
        self._send(ReplyDue.QUIT, b"QUIT\r\n")
        self.state = State.QUIT

    # ---------------------------------------------------------- internals

    def _require(self, *states: State) -> None:
        if self.state not in states:
            raise RuntimeError(f"not allowed in state {self.state.value}")

    def _send(self, tag: ReplyDue, line: bytes) -> None:
        self._out.append(line)
        self._expect(tag)

    def _expect(self, tag: ReplyDue) -> None:
        self._due.append(tag)

    def _send_hello(self, tag: ReplyDue) -> None:
        self._send(tag, hello_command(tag.value, self.settings.helo_name))
        self.state = State.HELLO

    def _write_unsent(self) -> None:
        """Write what may go now: the whole group under PIPELINING, else the
        next command once the previous one is answered."""
        pipelining = self.settings.pipelining and "PIPELINING" in self.extensions
        while self._unsent and (pipelining or not self._due):
            tag, line = self._unsent.popleft()
            exchange = self._exchange
            if tag is ReplyDue.DATA and not pipelining and exchange and not exchange.accepted:
                # No recipient: no DATA; the server keeps the sender, so RSET
                # comes before the next MAIL (rfc5321 4.1.1.5).
                self._finish(ev.MessageResult(NO_RECIPIENTS, ()))
                return
            self._send(tag, line)

    def _close(self, event: ev.ClientEvent) -> None:
        self._events.append(event)
        self.state = State.CLOSED
        self._due.clear()
        self._unsent.clear()
        self._parser.discard()
        self._exchange = self._stuffer = self._chunks = None

    def _finish(self, event: ev.ClientEvent) -> None:
        """The transaction is over: report it; the machine is ready again."""
        self._events.append(event)
        self._exchange = self._chunks = None
        self._unsent.clear()
        self.state = State.READY

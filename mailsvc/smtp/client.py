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
"""

from __future__ import annotations

import base64
import collections
import enum
from dataclasses import dataclass

from mailsvc.smtp import client_events as ev
from mailsvc.smtp.client_events import ESMTP_KEYWORD, Transaction
from mailsvc.smtp.replies import Reply
from mailsvc.smtp.reply_parser import MalformedReply, ReplyParser
from mailsvc.smtp.stuffing import DotStuffer

# The EHLO keyword a MAIL/RCPT parameter needs; any other parameter needs the
# keyword of its own name. rfc3461 4 (DSN), rfc4954 5 (AUTH=), rfc6531 3.4.
PARAMETER_EXTENSION = {
    "RET": "DSN",
    "ENVID": "DSN",
    "NOTIFY": "DSN",
    "ORCPT": "DSN",
    "AUTH": "AUTH",
    "SMTPUTF8": "SMTPUTF8",
}

NO_RECIPIENTS = Reply.of(554, "5.5.1", "No recipient was accepted")


@dataclass(frozen=True)
class ClientSettings:
    """What the machine needs to know about the client it speaks for."""

    helo_name: str  # rfc5321 4.1.1.1: our domain or address literal
    pipelining: bool = True  # use PIPELINING when the server offers it
    chunking: bool = True  # use CHUNKING (BDAT, rfc3030) when the server offers it
    tls: bool = False  # the transport is TLS from the start (rfc8314 implicit TLS)

    def __post_init__(self) -> None:
        name = self.helo_name
        if not name or " " in name or not (name.isascii() and name.isprintable()):
            raise ValueError(f"bad HELO name: {name!r}")


class State(enum.Enum):
    """Where the session stands; see ``ClientConnection``."""

    GREETING = "greeting"  # waiting for 220
    HELLO = "hello"  # EHLO or HELO sent
    READY = "ready"  # idle: send_message, start_tls or quit
    STARTTLS = "starttls"  # STARTTLS sent
    TLS_HANDSHAKE = "tls-handshake"  # 220 to STARTTLS; waiting for tls_started()
    TRANSACTION = "transaction"  # MAIL, RCPT, DATA (or RSET) replies due
    DATA = "data"  # 354 came (or, with BDAT, a recipient was accepted): send_data() / end_data()
    DATA_END = "data-end"  # end of data sent; the final reply is due
    QUIT = "quit"  # QUIT sent
    AUTH = "auth"  # AUTH sent; 235 or a refusal is due
    TURN = "turn"  # TURN or ATRN sent
    TURNED = "turned"  # 250 to TURN/ATRN: roles reversed, the machine is done
    REFUSED = "refused"  # greeting or HELO refused: only quit()
    CLOSED = "closed"


class _Tag(enum.Enum):
    """What a reply due answers."""

    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    RSET = "RSET"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    DOT = "dot"  # the lone "." after 354 with no recipient (rfc2920 3.1)
    END = "end"  # end of data (or BDAT ... LAST)
    BDAT = "BDAT"  # a BDAT chunk that is not the last (rfc3030 2)
    QUIT = "QUIT"
    AUTH = "AUTH"
    TURN = "TURN"  # TURN or ATRN

    # Tags key the tables below, looked up for every reply: the members are
    # singletons compared by identity, so the identity hash (in C) serves,
    # not Enum's own (a Python call).
    __hash__ = object.__hash__


# rfc5321 4.5.3.2: which timeout applies while each reply is due. Commands
# that 4.5.3.2 does not name get the 5-minute per-command one ("mail").
_PHASES = {
    _Tag.GREETING: "greeting",
    _Tag.RCPT: "rcpt",
    _Tag.DATA: "data-init",
    _Tag.DOT: "data-end",
    _Tag.END: "data-end",
    _Tag.BDAT: "data-block",
    # rfc2645 5.2.1: the ATRN timeout "MUST be at least 10 minutes" (the
    # provider reads its queue first): the 10-minute phase.
    _Tag.TURN: "data-end",
}


class _Exchange:
    """The bookkeeping of the transaction in progress."""

    def __init__(self, transaction: Transaction) -> None:
        self.transaction = transaction
        self.mail_refusal: Reply | None = None
        self.accepted: list[str] = []
        self.rcpt_index = 0  # the recipient whose RCPT reply is due next
        self.chunking = False  # the body goes as BDAT chunks (rfc3030)
        self.chunk_refusal: Reply | None = None  # the first BDAT chunk refused


class ClientConnection:
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
        self._due: collections.deque[_Tag] = collections.deque([_Tag.GREETING])
        self._unsent: collections.deque[tuple[_Tag, bytes]] = collections.deque()
        self._exchange: _Exchange | None = None
        self._stuffer: DotStuffer | None = None
        self._chunk: bytes | None = None  # BDAT: the chunk held back, to go with LAST
        self._tail = b""  # BDAT: the last two octets of the data so far
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
        value = self.extensions.get("SIZE", "")
        return int(value) if value.isdigit() else 0

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
        return _PHASES.get(self._due[0], "mail")

    # ---------------------------------------------------------- caller's calls

    def send_message(self, transaction: Transaction) -> None:
        """Start a transaction: RSET if needed, MAIL, RCPTs, DATA (rfc5321 3.3),
        in one write under PIPELINING (rfc2920 3.1), else one at a time."""
        self._require(State.READY)
        mail_params, refusal = self._mail_parameters(transaction)
        if refusal is not None:
            self._events.append(ev.TransactionFailed(refusal, synthetic=True))
            return
        self._exchange = _Exchange(transaction)
        self._exchange.chunking = self.settings.chunking and "CHUNKING" in self.extensions
        self.state = State.TRANSACTION
        if self._needs_reset:
            self._unsent.append((_Tag.RSET, b"RSET\r\n"))
        self._unsent.append((_Tag.MAIL, _command(f"MAIL FROM:<{transaction.sender}>", mail_params)))
        for address, params in transaction.recipients:
            self._unsent.append((_Tag.RCPT, _command(f"RCPT TO:<{address}>", self._offered(params))))
        if not self._exchange.chunking:
            # With BDAT there is no DATA: the first chunk goes once a
            # recipient is accepted (``_recipients_done``).
            self._unsent.append((_Tag.DATA, b"DATA\r\n"))
        self._write_unsent()

    def send_data(self, chunk: bytes) -> None:
        """Send message bytes (unstuffed, CRLF line ends, any chunking) after
        ``StartData``. With BDAT, check ``data_wanted`` first."""
        self._require(State.DATA)
        if self.chunking:
            if not self.data_wanted:
                raise RuntimeError("the last BDAT chunk is not answered yet (no PIPELINING)")
            if chunk:
                # Each chunk is held back until the next one comes, so that
                # the last one can carry LAST (rfc3030 2) without "BDAT 0 LAST".
                if self._chunk:
                    self._send_chunk(self._chunk, last=False)
                self._chunk = chunk
                self._tail = (self._tail + chunk)[-2:]
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
            chunk, self._chunk = self._chunk or b"", None
            if self._tail not in (b"", b"\r\n"):
                # As with DATA, data that does not end with CRLF gets one
                # (rfc5321 4.1.1.4), so both ways deliver the same octets.
                chunk += b"\r\n"
            self._send_chunk(chunk, last=True)
            self.state = State.DATA_END
            return
        assert self._stuffer is not None
        self._out.append(self._stuffer.end())
        self._stuffer = None
        self._expect(_Tag.END)
        self.state = State.DATA_END

    def _send_chunk(self, chunk: bytes, last: bool) -> None:
        """rfc3030 2: ``BDAT <size> [LAST]`` CRLF, then exactly that many octets."""
        head = f"BDAT {len(chunk)} LAST\r\n" if last else f"BDAT {len(chunk)}\r\n"
        self._out.append(head.encode("ascii") + chunk)
        self._expect(_Tag.END if last else _Tag.BDAT)

    def start_tls(self) -> None:
        """Send STARTTLS (rfc3207 4); ``TLSReady`` or ``TLSRefused`` follows."""
        self._require(State.READY)
        if "STARTTLS" not in self.extensions or self.tls_active:
            # rfc3207 4.2: never a second TLS session; only when offered.
            raise RuntimeError("STARTTLS is not offered here")
        self._send(_Tag.STARTTLS, b"STARTTLS\r\n")
        self.state = State.STARTTLS

    def tls_started(self) -> None:
        """The TLS handshake is done: forget everything learnt before it,
        input still buffered included, and send EHLO again (rfc3207 4.2)."""
        self._require(State.TLS_HANDSHAKE)
        self._parser.discard()
        self.tls_active = True
        self.extensions, self.extended = {}, False
        self._needs_reset = False
        self._send_hello(_Tag.EHLO)

    def auth_plain(self, authcid: str, password: str, authzid: str = "") -> None:
        """AUTH PLAIN with an initial response (rfc4954 4, rfc4616 2);
        ``AuthSucceeded`` or ``AuthFailed`` follows. The caller makes sure
        the transport is encrypted: PLAIN carries the password."""
        self._require(State.READY)
        if "PLAIN" not in self.extensions.get("AUTH", "").upper().split():
            raise RuntimeError("AUTH PLAIN is not offered here")
        fields = [authzid, authcid, password]
        if any("\0" in f for f in fields) or not authcid or not password:
            raise ValueError("AUTH PLAIN needs a user and a password without NUL")
        message = "\0".join(fields).encode("utf-8")
        response = base64.b64encode(message).decode("ascii") or "="
        self._auth_answers.clear()
        self._send(_Tag.AUTH, f"AUTH PLAIN {response}\r\n".encode("ascii"))
        self.state = State.AUTH

    def auth_login(self, username: str, password: str) -> None:
        """AUTH LOGIN (draft-murchison-sasl-login): the user name answers the
        first 334, the password the second; ``AuthSucceeded`` or
        ``AuthFailed`` follows. No initial response, which every server
        takes. The caller makes sure the transport is encrypted."""
        self._require(State.READY)
        if "LOGIN" not in self.extensions.get("AUTH", "").upper().split():
            raise RuntimeError("AUTH LOGIN is not offered here")
        if not username or not password or any(c in f for f in (username, password) for c in "\0\r\n"):
            raise ValueError("AUTH LOGIN needs a user and a password without NUL, CR or LF")
        self._auth_answers = collections.deque(
            base64.b64encode(text.encode("utf-8")) + b"\r\n" for text in (username, password)
        )
        self._send(_Tag.AUTH, b"AUTH LOGIN\r\n")
        self.state = State.AUTH

    def turn(self) -> None:
        """Send TURN (rfc821 4.1.1); ``Turned`` or ``TurnRefused`` follows."""
        self._require(State.READY)
        self._send(_Tag.TURN, b"TURN\r\n")
        self.state = State.TURN

    def atrn(self, domains=()) -> None:
        """Send ATRN [domain,...] (rfc2645 5.2.1); ``Turned`` or ``TurnRefused`` follows."""
        self._require(State.READY)
        names = [d.strip() for d in domains]
        if any(not d or not d.isascii() or any(c in d for c in ", \r\n") for d in names):
            raise ValueError(f"bad ATRN domain list: {domains!r}")
        self._send(_Tag.TURN, ("ATRN " + ",".join(names) if names else "ATRN").encode("ascii") + b"\r\n")
        self.state = State.TURN

    def quit(self) -> None:
        """Send QUIT (rfc5321 4.1.1.10); ``Closed`` follows."""
        self._require(State.READY, State.REFUSED)
        self._send(_Tag.QUIT, b"QUIT\r\n")
        self.state = State.QUIT

    # ---------------------------------------------------------- internals

    def _require(self, *states: State) -> None:
        if self.state not in states:
            raise RuntimeError(f"not allowed in state {self.state.value}")

    def _send(self, tag: _Tag, line: bytes) -> None:
        self._out.append(line)
        self._expect(tag)

    def _expect(self, tag: _Tag) -> None:
        self._due.append(tag)

    def _send_hello(self, tag: _Tag) -> None:
        self._send(tag, f"{tag.value} {self.settings.helo_name}\r\n".encode("ascii"))
        self.state = State.HELLO

    def _write_unsent(self) -> None:
        """Write what may go now: the whole group under PIPELINING, else the
        next command once the previous one is answered."""
        pipelining = self.settings.pipelining and "PIPELINING" in self.extensions
        while self._unsent and (pipelining or not self._due):
            tag, line = self._unsent.popleft()
            exchange = self._exchange
            if tag is _Tag.DATA and not pipelining and exchange and not exchange.accepted:
                # No recipient: no DATA; the server keeps the sender, so RSET
                # comes before the next MAIL (rfc5321 4.1.1.5).
                self._finish(ev.MessageResult(NO_RECIPIENTS, ()))
                return
            self._send(tag, line)

    def _mail_parameters(self, tx: Transaction) -> tuple[dict, Reply | None]:
        """MAIL's parameters for this server, or the reply refusing the message."""
        params = self._offered(tx.mail_params)
        if tx.size is not None and "SIZE" in self.extensions:
            limit = self.max_size
            if limit and tx.size > limit:
                # rfc1870 6.2 (2): past the fixed maximum the message is undeliverable.
                text = f"Message size {tx.size} exceeds the server's limit of {limit} octets"
                return {}, Reply.of(552, "5.3.4", text)
            params["SIZE"] = str(tx.size)  # rfc1870 6
        if tx.body_8bit:
            if "8BITMIME" not in self.extensions:
                # rfc6152 3: no 8-bit content to a server without 8BITMIME;
                # the caller downgrades or bounces.
                return {}, Reply.of(554, "5.6.3", "The server does not offer 8BITMIME")
            params["BODY"] = "8BITMIME"  # rfc6152 3
        if tx.needs_smtputf8:
            if "SMTPUTF8" not in self.extensions:
                # rfc6531 3.5: nothing internationalized to a server without SMTPUTF8.
                return {}, Reply.of(553, "5.6.7", "The server does not offer SMTPUTF8")
            params["SMTPUTF8"] = None  # rfc6531 3.4
        return params, None

    def _offered(self, params: dict) -> dict:
        """Only the parameters of extensions the server offers (rfc5321 4.1.1.3:
        the client "MUST NOT transmit parameters other than those associated
        with a service extension offered by the server")."""
        if not params:
            return {}
        return {k: v for k, v in params.items() if PARAMETER_EXTENSION.get(k, k) in self.extensions}

    def _close(self, event: ev.ClientEvent) -> None:
        self._events.append(event)
        self.state = State.CLOSED
        self._due.clear()
        self._unsent.clear()
        self._parser.discard()
        self._exchange = self._stuffer = self._chunk = None

    def _finish(self, event: ev.ClientEvent) -> None:
        """The transaction is over: report it; the machine is ready again."""
        self._events.append(event)
        self._exchange = self._chunk = None
        self._unsent.clear()
        self.state = State.READY

    def _on_reply(self, reply: Reply) -> None:
        if not self._due:
            # A reply nobody asked for: 421 is the server leaving, anything
            # else means the two sides are out of step.
            if reply.code == 421:
                self._close(ev.ConnectionFailed(reply))
            else:
                self._close(ev.ProtocolError(f"reply when none was due: {reply}"))
            return
        tag = self._due.popleft()
        if tag is _Tag.QUIT:
            self._close(ev.Closed(reply))
            return
        if reply.code == 421 and tag is not _Tag.GREETING:
            self._close(ev.ConnectionFailed(reply))  # rfc5321 3.8
            return
        _REPLY_HANDLERS[tag](self, reply)
        if self.state is State.TRANSACTION:
            self._write_unsent()

    def _unexpected(self, reply: Reply) -> None:
        self._close(ev.ConnectionFailed(reply))

    def _on_greeting(self, reply: Reply) -> None:
        digit = reply.code // 100
        if digit == 2:
            self._send_hello(_Tag.EHLO)  # rfc5321 3.2: EHLO first
        elif reply.code == 421:
            self._close(ev.GreetingRefused(reply))
        elif digit in (4, 5):
            # rfc5321 3.1: after a 554 greeting the server waits for QUIT.
            self.state = State.REFUSED
            self._events.append(ev.GreetingRefused(reply))
        else:
            self._unexpected(reply)

    def _on_ehlo(self, reply: Reply) -> None:
        digit = reply.code // 100
        if digit == 2:
            self.extensions = _extensions(reply)
            self.extended = True
            self.state = State.READY
            self._events.append(ev.Ready(dict(self.extensions), True, reply))
        elif digit == 5:
            self._send_hello(_Tag.HELO)  # rfc5321 3.2: fall back to HELO
        elif digit == 4:
            self.state = State.REFUSED
            self._events.append(ev.HelloRefused(reply))
        else:
            self._unexpected(reply)

    def _on_helo(self, reply: Reply) -> None:
        digit = reply.code // 100
        if digit == 2:
            self.extensions, self.extended = {}, False
            self.state = State.READY
            self._events.append(ev.Ready({}, False, reply))
        elif digit in (4, 5):
            self.state = State.REFUSED
            self._events.append(ev.HelloRefused(reply))
        else:
            self._unexpected(reply)

    def _on_starttls(self, reply: Reply) -> None:
        digit = reply.code // 100
        if digit == 2:
            self.state = State.TLS_HANDSHAKE
            self._events.append(ev.TLSReady(reply))
        elif digit in (4, 5):
            self.state = State.READY
            self._events.append(ev.TLSRefused(reply))
        else:
            self._unexpected(reply)

    def _on_auth(self, reply: Reply) -> None:
        digit = reply.code // 100
        if reply.code == 235:
            self.state = State.READY
            self._auth_answers.clear()
            self._events.append(ev.AuthSucceeded(reply))
        elif reply.code == 334:
            # LOGIN: each challenge gets the next answer, by order, not by
            # its text ("Username:", "Password:" vary). PLAIN went with an
            # initial response, and a third LOGIN challenge is out of step:
            # cancel (rfc4954 4: "*" gets 501).
            answer = self._auth_answers.popleft() if self._auth_answers else b"*\r\n"
            self._send(_Tag.AUTH, answer)
        elif digit in (4, 5):
            self.state = State.READY
            self._auth_answers.clear()
            self._events.append(ev.AuthFailed(reply))
        else:
            self._unexpected(reply)

    def _on_turn(self, reply: Reply) -> None:
        digit = reply.code // 100
        if digit == 2:
            # rfc821 4.1.1: "program-A becomes the receiver-SMTP"; it sends 220 next.
            self.state = State.TURNED
            self._due.clear()
            self._events.append(ev.Turned(reply))
        elif digit in (4, 5):
            self.state = State.READY
            self._events.append(ev.TurnRefused(reply))
        else:
            self._unexpected(reply)

    def _on_rset(self, reply: Reply) -> None:
        if reply.code // 100 == 2:
            self._needs_reset = False
        else:
            self._unexpected(reply)  # rfc5321 4.3.2: RSET only ever succeeds

    def _on_mail(self, reply: Reply) -> None:
        exchange = self._exchange
        assert exchange is not None
        digit = reply.code // 100
        if digit == 2:
            self._needs_reset = True
        elif digit in (4, 5):
            exchange.mail_refusal = reply
            if not self._due:  # not pipelined: nothing else was sent
                self._finish(ev.TransactionFailed(reply))
        else:
            self._unexpected(reply)

    def _on_rcpt(self, reply: Reply) -> None:
        exchange = self._exchange
        assert exchange is not None
        address = exchange.transaction.recipients[exchange.rcpt_index][0]
        exchange.rcpt_index += 1
        if reply.code // 100 not in (2, 4, 5):
            self._unexpected(reply)
        elif exchange.mail_refusal is None:
            # rfc2920 3.1: after a refused MAIL the RCPT replies mean nothing.
            result = ev.RecipientResult(address, reply)
            if result.accepted:
                exchange.accepted.append(address)
            self._events.append(result)
        if exchange.chunking and exchange.rcpt_index == len(exchange.transaction.recipients):
            self._recipients_done()

    def _recipients_done(self) -> None:
        """BDAT: every RCPT is answered. There is no DATA to ask (rfc3030 2):
        with a recipient, the chunks may go; without one, the transaction
        ends here, and RSET comes before the next MAIL."""
        exchange = self._exchange
        assert exchange is not None
        if exchange.mail_refusal is not None:
            self._finish(ev.TransactionFailed(exchange.mail_refusal))
        elif not exchange.accepted:
            self._finish(ev.MessageResult(NO_RECIPIENTS, ()))
        else:
            self.state = State.DATA
            self._chunk, self._tail = None, b""
            self._events.append(ev.StartData(None))

    def _on_bdat(self, reply: Reply) -> None:
        """The reply to a BDAT chunk that was not the last (rfc3030 2: 250)."""
        exchange = self._exchange
        assert exchange is not None
        digit = reply.code // 100
        if digit == 2:
            pass
        elif digit in (4, 5):
            if exchange.chunk_refusal is None:
                # rfc3030 2: the transaction failed; no more chunks are sent.
                # Those already pipelined are answered too, then it ends.
                exchange.chunk_refusal = reply
                self._chunk = None
                if self.state is State.DATA:
                    self.state = State.DATA_END
        else:
            self._unexpected(reply)
            return
        if exchange.chunk_refusal is not None and not self._due:
            self._finish(self._outcome(exchange.chunk_refusal))

    def _on_data(self, reply: Reply) -> None:
        exchange = self._exchange
        assert exchange is not None
        digit = reply.code // 100
        if digit == 3 and exchange.accepted and exchange.mail_refusal is None:
            self.state = State.DATA
            self._stuffer = DotStuffer()
            self._events.append(ev.StartData(reply))
        elif digit == 3:
            # rfc2920 3.1: DATA accepted with no recipient: "the client SMTP
            # should send a single dot"; the server then sends nothing to
            # anybody (rfc2920 3.2 (4)).
            self._send(_Tag.DOT, b".\r\n")
        elif digit in (4, 5):
            # rfc2920 3.1: DATA "properly rejected": RSET before the next MAIL.
            self._finish(self._outcome(reply))
        else:
            self._unexpected(reply)

    def _on_dot(self, reply: Reply) -> None:
        if reply.code // 100 in (2, 4, 5):
            self._needs_reset = False  # the server ended its transaction
            self._finish(self._outcome(NO_RECIPIENTS))
        else:
            self._unexpected(reply)

    def _outcome(self, reply: Reply) -> ev.ClientEvent:
        exchange = self._exchange
        assert exchange is not None
        if exchange.mail_refusal is not None:
            return ev.TransactionFailed(exchange.mail_refusal)
        return ev.MessageResult(reply, tuple(exchange.accepted))

    def _on_end(self, reply: Reply) -> None:
        exchange = self._exchange
        if reply.code // 100 not in (2, 4, 5):
            self._unexpected(reply)
        elif exchange is not None and exchange.chunk_refusal is not None:
            # An earlier chunk was refused: that is the outcome; the server
            # may still hold the transaction (rfc3030 2), so RSET comes next.
            if not self._due:
                self._finish(self._outcome(exchange.chunk_refusal))
        else:
            # rfc5321 4.1.1.4: end of data clears the transaction. After a
            # refused BDAT LAST the server's state is less certain (rfc3030
            # 2: "the transaction should be considered failed"): RSET first.
            self._needs_reset = exchange is not None and exchange.chunking and reply.code >= 400
            self._finish(self._outcome(reply))


_REPLY_HANDLERS = {
    _Tag.GREETING: ClientConnection._on_greeting,
    _Tag.EHLO: ClientConnection._on_ehlo,
    _Tag.HELO: ClientConnection._on_helo,
    _Tag.STARTTLS: ClientConnection._on_starttls,
    _Tag.AUTH: ClientConnection._on_auth,
    _Tag.TURN: ClientConnection._on_turn,
    _Tag.RSET: ClientConnection._on_rset,
    _Tag.MAIL: ClientConnection._on_mail,
    _Tag.RCPT: ClientConnection._on_rcpt,
    _Tag.DATA: ClientConnection._on_data,
    _Tag.DOT: ClientConnection._on_dot,
    _Tag.END: ClientConnection._on_end,
    _Tag.BDAT: ClientConnection._on_bdat,
}


def _command(head: str, params: dict) -> bytes:
    """A command line with its ESMTP parameters (rfc5321 4.1.2 Mail-parameters)."""
    if not params:
        return (head + "\r\n").encode("utf-8")
    parts = [head] + [key if value is None else f"{key}={value}" for key, value in params.items()]
    return (" ".join(parts) + "\r\n").encode("utf-8")


def _extensions(reply: Reply) -> dict[str, str]:
    """EHLO keywords and their parameters (rfc5321 4.1.1.1: ehlo-line), from
    every line but the first (the greeting). Lines that are not a keyword are
    skipped; the first use of a keyword wins."""
    found: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if ESMTP_KEYWORD.match(keyword):
            found.setdefault(keyword.upper(), params.strip())
    return found

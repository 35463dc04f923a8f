"""The SMTP server role as a pure state machine: bytes in, events and bytes out.

Modelled on h11: ``receive_data(bytes)`` takes what the client sent,
``next_event()`` hands out what happened, ``accept()`` / ``reply()`` answer a
decision, ``data_to_send()`` gives the bytes to write. No I/O, no Twisted.

The machine itself answers what needs no outside knowledge: syntax (501),
sequence (503), unknown commands (500), limits (line length, SIZE, recipient
count), NOOP, HELP, RSET, QUIT. It asks (a ``Decision`` event) for what needs
policy: HELO/EHLO, MAIL, RCPT, DATA, end of data, VRFY, EXPN, TURN.

Commands: rfc5321 4.1.1 (EHLO/HELO, MAIL, RCPT, DATA, RSET, VRFY, EXPN, HELP,
NOOP, QUIT) and rfc821 4.1.1 (SEND, SOML, SAML, TURN).
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass

from mailsvc.smtp import events as ev
from mailsvc.smtp import xtext
from mailsvc.smtp.address import AddressError, parse_path_argument
from mailsvc.smtp.data import DataFault, DataReader
from mailsvc.smtp.help import help_reply
from mailsvc.smtp.replies import (
    BAD_SEQUENCE,
    OK,
    RECIPIENT_OK,
    SENDER_OK,
    START_DATA,
    SYNTAX,
    Reply,
)

MAX_COMMAND_LINE = 512  # rfc5321 4.5.3.1.4, CRLF included


@dataclass(frozen=True)
class ServerSettings:
    """What the machine needs to know about the server it speaks for."""

    hostname: str
    max_message_size: int = 0  # rfc1870 SIZE; 0 = no limit
    max_recipients: int = 100  # rfc5321 4.5.3.1.8 requires at least 100
    # Extra EHLO keywords (e.g. "STARTTLS") offered by the glue.
    extensions: tuple[str, ...] = ()


class State(enum.Enum):
    """Where the session stands (rfc5321 4.1.4 command order)."""

    NEW = "new"  # before the greeting
    GREETED = "greeted"  # 220 sent, no HELO/EHLO yet
    READY = "ready"  # HELO/EHLO done, no transaction
    MAIL = "mail"  # MAIL accepted; RCPTs may follow
    DATA = "data"  # reading message data
    REFUSED = "refused"  # 554 greeting: only QUIT is served (rfc5321 3.1)
    CLOSED = "closed"


# Verbs that start a transaction: MAIL (rfc5321) and rfc821 3.4's SEND, SOML,
# SAML. This server has no terminals, so all four deliver to mailboxes.
MAIL_VERBS = frozenset({"MAIL", "SEND", "SOML", "SAML"})
# Verbs known but not offered (rfc5321 4.2.4: 502 "not implemented").
NOT_IMPLEMENTED = frozenset({"STARTTLS", "AUTH", "BDAT", "ETRN", "ATRN"})
# MAIL parameters understood: rfc1870 SIZE, rfc6152 BODY, rfc3461 RET and ENVID.
BODY_VALUES = frozenset({"7BIT", "8BITMIME"})
RET_VALUES = frozenset({"FULL", "HDRS"})  # rfc3461 4.3
NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})  # rfc3461 4.1
MAX_ENVID = 100  # rfc3461 4.4
MAX_ORCPT = 500  # rfc3461 4.2


class ServerConnection:
    """One SMTP session, server side. See the module docstring."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.state = State.NEW
        self.hello_name = ""
        self.extended = False  # EHLO was used
        self._in = b""
        self._out: list[bytes] = []
        self._events: collections.deque[ev.Event] = collections.deque()
        self._pending: ev.Decision | None = None
        self._discarding = False  # inside an over-long command line
        self._reader: DataReader | None = None
        self._accepted = 0  # recipients accepted in this transaction
        self._attempted = 0  # RCPT commands that passed syntax

    # ---------------------------------------------------------- driving

    def start(self, refusal: Reply | None = None) -> None:
        """Send the greeting (rfc5321 4.3.1), or ``refusal`` instead.

        A 554 refusal leaves the session open for QUIT only (rfc5321 3.1); a
        421 closes it.
        """
        if self.state is not State.NEW:
            raise RuntimeError("start() called twice")
        if refusal is None:
            self._send(Reply.of(220, "", f"{self.settings.hostname} ESMTP mailsvc"))
            self.state = State.GREETED
        elif refusal.code == 421:
            self.close(refusal)
        else:
            self._send(refusal)
            self.state = State.REFUSED

    def receive_data(self, data: bytes) -> None:
        """Take bytes from the client. Nothing is parsed until ``next_event``."""
        if self.state is not State.CLOSED:
            self._in += data

    def data_to_send(self) -> bytes:
        """The bytes to write to the client now (replies, in order)."""
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
    def in_data(self) -> bool:
        """True while message data is being read."""
        return self.state is State.DATA

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
            if self._pending is not None or self.state in (State.CLOSED, State.NEW):
                return None
            if self.state is State.DATA:
                if not self._in:
                    return None
                self._read_data()
                continue
            line = self._take_line()
            if line is None:
                return None
            event = self._command(line)
            if event is not None:
                return self._hand_out(event)

    def accept(self) -> None:
        """Answer the pending decision with its usual positive reply."""
        decision = self._take_pending()
        if isinstance(decision, ev.Hello):
            self._send(self._hello_reply(decision))
        elif isinstance(decision, ev.MailFrom):
            self._send(SENDER_OK)
        elif isinstance(decision, ev.RcptTo):
            self._send(RECIPIENT_OK)
        elif isinstance(decision, ev.DataCommand):
            self._send(START_DATA)
        else:
            self._pending = decision
            raise RuntimeError(f"{type(decision).__name__} needs an explicit reply()")
        self._after_reply(decision, True)

    def reply(self, reply: Reply) -> None:
        """Answer the pending decision with ``reply``."""
        decision = self._take_pending()
        self._send(reply)
        self._after_reply(decision, reply.positive)

    # ---------------------------------------------------------- internals

    def _send(self, reply: Reply) -> None:
        self._out.append(bytes(reply))

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
        self._reader = None
        if self.state in (State.MAIL, State.DATA):
            self.state = State.READY

    def _after_reply(self, decision: ev.Decision, positive: bool) -> None:
        if isinstance(decision, ev.Hello) and positive:
            # rfc5321 4.1.4: EHLO/HELO clears any transaction, like RSET.
            self._reset_transaction()
            self.state = State.READY
            self.hello_name, self.extended = decision.name, decision.extended
        elif isinstance(decision, ev.MailFrom) and positive:
            self.state = State.MAIL
        elif isinstance(decision, ev.RcptTo) and positive:
            self._accepted += 1
        elif isinstance(decision, ev.DataCommand) and positive:
            self.state = State.DATA
            self._reader = DataReader(self.settings.max_message_size)
        elif isinstance(decision, ev.DataEnd):
            self._reset_transaction()

    def _take_line(self) -> bytes | None:
        """The next complete command line, or None. Over-long lines are
        answered with 500 and skipped up to their CRLF, so the session stays in
        step (rfc5321 4.5.3.1.4, 4.5.3.1.10)."""
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
                if len(self._in) <= MAX_COMMAND_LINE - 1:  # room for the rest and CRLF
                    return None
                too_long = True
            else:
                too_long = end + 2 > MAX_COMMAND_LINE
            if too_long:
                self._send(Reply.of(500, "5.5.2", f"Line too long ({MAX_COMMAND_LINE} octets at most)"))
                self._discarding = True
                continue
            line, self._in = self._in[:end], self._in[end + 2 :]
            return line

    def _command(self, raw: bytes) -> ev.Event | None:
        """Parse one command line; answer it or return the event it makes."""
        if b"\r" in raw or b"\n" in raw:
            # rfc5321 2.3.8: never take a bare CR or LF as a line end.
            self._send(Reply.of(500, "5.5.2", "Bare CR or LF in command line; lines must end with CRLF"))
            return None
        line = raw.decode("utf-8", "replace")
        verb, _, argument = line.partition(" ")
        verb = verb.upper()
        argument = argument.strip(" ")
        if self.state is State.REFUSED and verb != "QUIT":
            self._send(Reply.of(503, BAD_SEQUENCE, "Service refused; only QUIT is allowed"))
            return None
        handler = _HANDLERS.get(verb)
        if handler is not None:
            return handler(self, verb, argument)
        if verb in MAIL_VERBS:
            return self._mail(verb, argument)
        if verb in NOT_IMPLEMENTED:
            self._send(Reply.of(502, "5.5.1", f"{verb} not implemented"))
            return None
        shown = verb if verb.isascii() and verb.isprintable() and len(verb) <= 20 else "?"
        self._send(Reply.of(500, "5.5.2", f"Command unrecognized: {shown}" if verb else "Empty command"))
        return None

    def _syntax(self, text: str, status: str = SYNTAX, code: int = 501) -> None:
        self._send(Reply.of(code, status, text))

    def _hello(self, verb: str, argument: str) -> ev.Event | None:
        # rfc5321 4.1.1.1: EHLO/HELO take the client's domain or address literal.
        if not argument or " " in argument or not (argument.isascii() and argument.isprintable()):
            self._syntax(f"Syntax: {verb} hostname")
            return None
        return ev.Hello(argument, verb == "EHLO")

    def _hello_reply(self, hello: ev.Hello) -> Reply:
        greeting = f"{self.settings.hostname} greets {hello.name}"
        if not hello.extended:
            return Reply.of(250, "", greeting)
        size = self.settings.max_message_size
        keywords = [
            "PIPELINING",  # rfc2920
            f"SIZE {size}" if size else "SIZE",  # rfc1870
            "8BITMIME",  # rfc6152
            "ENHANCEDSTATUSCODES",  # rfc2034
            "DSN",  # rfc3461
            *self.settings.extensions,
            "HELP",
        ]
        return Reply.of(250, "", greeting, *keywords)

    def _mail(self, verb: str, argument: str) -> ev.Event | None:
        if self.state is State.GREETED:
            self._send(Reply.of(503, BAD_SEQUENCE, "Send HELO or EHLO first"))
            return None
        if self.state is State.MAIL:
            self._send(Reply.of(503, BAD_SEQUENCE, "Sender already given; RSET first"))
            return None
        try:
            path = parse_path_argument(argument, "FROM", null_allowed=True, postmaster_allowed=False)
        except AddressError as error:
            self._address_error(error, "5.1.7")  # rfc3463: bad sender address syntax
            return None
        if not self._check_mail_parameters(path.parameters):
            return None
        self._reset_transaction()
        return ev.MailFrom(path.address, path.parameters, verb)

    def _check_mail_parameters(self, parameters: dict) -> bool:
        if parameters and not self.extended:
            # rfc5321 4.1.1.11 / rfc1869 4.4: parameters need EHLO.
            self._syntax("MAIL parameters need EHLO", code=555)
            return False
        for key, value in parameters.items():
            if key == "SIZE":
                # rfc1870 6: SIZE=<octets>; too big is 552 5.3.4.
                if value is None or not value.isdigit() or len(value) > 20:
                    self._syntax("SIZE needs a number of octets")
                    return False
                limit = self.settings.max_message_size
                if limit and int(value) > limit:
                    self._send(Reply.of(552, "5.3.4", f"Message size exceeds the limit of {limit} octets"))
                    return False
            elif key == "RET":
                if value is None or value.upper() not in RET_VALUES:
                    self._syntax("RET must be FULL or HDRS")
                    return False
                parameters[key] = value.upper()
            elif key == "ENVID":
                if value is None or len(value) > MAX_ENVID or not xtext.is_xtext(value):
                    self._syntax(f"ENVID must be xtext of at most {MAX_ENVID} characters")
                    return False
            elif key == "BODY":
                # rfc6152 2: BODY=7BIT or BODY=8BITMIME.
                if value is None or value.upper() not in BODY_VALUES:
                    self._syntax("BODY must be 7BIT or 8BITMIME")
                    return False
                parameters[key] = value.upper()
            else:
                self._syntax(f"Unsupported MAIL parameter: {key}", code=555)
                return False
        return True

    def _address_error(self, error: AddressError, status: str) -> None:
        if error.status == "5.6.7":
            self._send(Reply.of(553, "5.6.7", str(error)))  # rfc6531 3.7.4.1
        else:
            self._syntax(f"Syntax error: {error}", error.status or status)

    def _rcpt(self, verb: str, argument: str) -> ev.Event | None:
        if self.state is not State.MAIL:
            self._send(Reply.of(503, BAD_SEQUENCE, "Need MAIL before RCPT"))
            return None
        try:
            path = parse_path_argument(argument, "TO", null_allowed=False, postmaster_allowed=True)
        except AddressError as error:
            self._address_error(error, "5.1.3")  # rfc3463: bad destination syntax
            return None
        if path.parameters and not self._check_rcpt_parameters(path.parameters):
            return None
        if self._accepted >= self.settings.max_recipients:
            # rfc5321 4.5.3.1.10: "452 too many recipients"; the client sends the rest later.
            self._send(Reply.of(452, "4.5.3", f"Too many recipients ({self.settings.max_recipients} at most)"))
            return None
        self._attempted += 1
        return ev.RcptTo(path.address, path.parameters)

    def _check_rcpt_parameters(self, parameters: dict) -> bool:
        """rfc3461 4.1 NOTIFY and 4.2 ORCPT; anything else is 555."""
        if not self.extended:
            self._syntax("RCPT parameters need EHLO", code=555)
            return False
        for key, value in parameters.items():
            if key == "NOTIFY":
                words = (value or "").upper().split(",")
                if words != ["NEVER"] and not (set(words) <= NOTIFY_VALUES and len(set(words)) == len(words)):
                    self._syntax("NOTIFY must be NEVER, or a list of SUCCESS, FAILURE, DELAY")
                    return False
                parameters[key] = ",".join(words)
            elif key == "ORCPT":
                kind, semi, address = (value or "").partition(";")
                if not semi or not kind or len(value) > MAX_ORCPT or not xtext.is_xtext(address):
                    self._syntax("ORCPT must be addr-type;xtext, as rfc822;user@domain")
                    return False
            else:
                self._syntax(f"Unsupported RCPT parameter: {key}", code=555)
                return False
        return True

    def _data(self, verb: str, argument: str) -> ev.Event | None:
        if argument:
            self._syntax("DATA takes no argument")
        elif self.state is not State.MAIL:
            self._send(Reply.of(503, BAD_SEQUENCE, "Need MAIL before DATA"))
        elif self._accepted == 0 and self._attempted == 0:
            self._send(Reply.of(503, BAD_SEQUENCE, "Need RCPT before DATA"))
        elif self._accepted == 0:
            # rfc2920 3.1: DATA after every RCPT failed gets 554.
            self._send(Reply.of(554, "5.5.1", "No valid recipients"))
        else:
            return ev.DataCommand()
        return None

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

    def _rset(self, verb: str, argument: str) -> ev.Event | None:
        if argument:
            self._syntax("RSET takes no argument")
            return None
        self._reset_transaction()  # rfc5321 4.1.1.5
        self._send(OK)
        return ev.Reset()

    def _noop(self, verb: str, argument: str) -> ev.Event | None:
        self._send(OK)  # rfc5321 4.1.1.9: any argument is ignored
        return None

    def _quit(self, verb: str, argument: str) -> ev.Event | None:
        if argument:
            self._syntax("QUIT takes no argument")
            return None
        # rfc5321 4.1.1.10: 221, then close.
        self._send(Reply.of(221, "2.0.0", f"{self.settings.hostname} closing connection"))
        self._enter_closed()
        return ev.Quit()

    def _help(self, verb: str, argument: str) -> ev.Event | None:
        self._send(help_reply(argument))  # rfc5321 4.1.1.8
        return None

    def _vrfy(self, verb: str, argument: str) -> ev.Event | None:
        if not argument:
            self._syntax("Syntax: VRFY user-or-address")
            return None
        return ev.Verify(argument)  # rfc5321 3.5.1, 4.1.1.6

    def _expn(self, verb: str, argument: str) -> ev.Event | None:
        if not argument:
            self._syntax("Syntax: EXPN list")
            return None
        return ev.Expand(argument)  # rfc5321 3.5.2, 4.1.1.7

    def _turn(self, verb: str, argument: str) -> ev.Event | None:
        if argument:
            self._syntax("TURN takes no argument")
            return None
        return ev.Turn()  # rfc821 4.1.1


def _refusal(fault: DataFault, limit: int) -> Reply:
    """The reply that refuses a message at its end of data."""
    if fault is DataFault.TOO_BIG:
        return Reply.of(552, "5.3.4", f"Message too big: the limit is {limit} octets")
    if fault is DataFault.BARE_LINE_END:
        return Reply.of(550, "5.5.2", "Message refused: bare CR or LF in message text; lines must end with CRLF")
    return Reply.of(554, "5.6.0", "Message refused: a text line is longer than 1000 octets")


_HANDLERS = {
    "HELO": ServerConnection._hello,
    "EHLO": ServerConnection._hello,
    "RCPT": ServerConnection._rcpt,
    "DATA": ServerConnection._data,
    "RSET": ServerConnection._rset,
    "NOOP": ServerConnection._noop,
    "QUIT": ServerConnection._quit,
    "HELP": ServerConnection._help,
    "VRFY": ServerConnection._vrfy,
    "EXPN": ServerConnection._expn,
    "TURN": ServerConnection._turn,
}

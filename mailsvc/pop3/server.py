"""The POP3 protocol: ``twisted.mail.pop3.POP3`` with its Python 3 breakages worked around
(see ``mailsvc.pop3`` for the list).

Here: the connection, command dispatch by state, CAPA, STLS, the listing
and marking commands, QUIT, flow control. Logging in is
``mailsvc.pop3.login``, RETR and TOP ``mailsvc.pop3.transfer``; both are
mixed into ``POP3Server``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import re

from twisted.logger import Logger
from twisted.mail import pop3

from mailsvc.pop3.login import LoginCommands
from mailsvc.pop3.transfer import MessageTransfer
from mailsvc.smtp import sasl

if TYPE_CHECKING:
    from mailsvc.pop3.listeners import POP3Factory

log = Logger(namespace="mailsvc.pop3")

# rfc1939 and its extensions: the commands of each state (rfc1939 3).
AUTHORIZATION = frozenset({"CAPA", "USER", "PASS", "APOP", "AUTH", "STLS", "QUIT"})
TRANSACTION = frozenset({"CAPA", "STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "QUIT"})
_NO_ARGUMENT = frozenset({"CAPA", "STLS", "QUIT", "STAT", "NOOP", "RSET"})
_NUMBER = re.compile(rb"[0-9]{1,9}\Z")
_PRINTABLE = re.compile(rb"[\x21-\x7e]{1,16}\Z")


# ---------------------------------------------------------------- protocol


class POP3Server(LoginCommands, MessageTransfer, pop3.POP3):
    """One POP3 connection; see the module docstring for what differs from
    ``twisted.mail.pop3.POP3`` and why."""

    MAX_LENGTH = sasl.MAX_RESPONSE_LINE  # rfc5034 4: AUTH lines may exceed rfc2449's 255

    def __init__(self, factory: "POP3Factory") -> None:
        self.factory = factory
        self.portal = factory.authenticator.portal
        self.timeOut = factory.idle_timeout
        self.secure = factory.implicit_tls
        self.client_address = ""
        self._exchange: sasl.Exchange | None = None
        self._mechanism = ""
        self._discard = False  # STLS accepted: ignore the rest of the clear-text read
        self._gone = False
        self._quitting = False
        self._loggingIn = False

    # ------------------------------------------------------ connection

    def callLater(self, period, func):
        """The autologout timer (``TimeoutMixin``) runs on the factory's clock."""
        return self.factory.clock.callLater(period, func)

    def connectionMade(self) -> None:
        self.client_address = getattr(self.transport.getPeer(), "host", "")
        log.info("pop3 connect from [{client}]", client=self.client_address)
        refusal = self.factory.admit(self)
        if refusal is not None:
            self.failResponse(refusal)
            self._quitting = True
            self.transport.loseConnection()
            return
        # rfc1939 4: the greeting; no APOP timestamp (we offer no APOP).
        self.successResponse(f"{self.factory.hostname} POP3 server ready")
        self.setTimeout(self.timeOut)

    def connectionLost(self, reason=None) -> None:
        self._gone = True
        self.factory.release(self)
        super().connectionLost(reason)  # _onLogout: the session ends, nothing removed
        log.info("pop3 disconnect from [{client}]", client=self.client_address)

    def timeoutConnection(self) -> None:
        """rfc1939 3: the autologout timer expired: close without UPDATE."""
        log.info("pop3 autologout of [{client}]", client=self.client_address)
        self.failResponse(b"Autologout: idle for too long")
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self._discard:
            # rfc2595 4 (as rfc3207 4.2): what came in clear after STLS, in
            # the same read, is dropped, buffered partial line included.
            self._discard = False
            self._buffer = b""

    def lineReceived(self, line: bytes) -> None:
        if self._discard or self._gone or self._quitting:
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.failResponse(f"Line too long ({self.MAX_LENGTH} octets at most)")
        self._quitting = True
        self.transport.loseConnection()

    # ------------------------------------------------------ commands

    def state_COMMAND(self, line: bytes) -> None:
        """One command line. Replaces POP3's (workaround 1): it never lets a
        bad argument raise."""
        if b"\r" in line or b"\n" in line:
            self.failResponse(b"Bare CR or LF in command line")
            return
        command, _, argument = line.partition(b" ")
        try:
            if argument or line.endswith(b" "):
                self.processCommand(command, argument)
            else:
                self.processCommand(command)
        except Exception:
            log.failure("pop3 command failed for [{client}]", client=self.client_address)
            self.failResponse(b"[SYS/TEMP] Internal error")

    def processCommand(self, command: bytes, *args: bytes):
        """Check the state and the arguments, then call ``do_<COMMAND>``.
        ``args`` is empty or the rest of the line. Pipelined commands wait in
        ``self.blocked`` while a long operation runs (POP3's queue)."""
        if self.blocked is not None:
            self.blocked.append((command, args))
            return None
        if self._quitting:
            return None
        verb = command.upper()
        name = verb.decode("ascii") if _PRINTABLE.match(verb) else ""
        if name not in AUTHORIZATION | TRANSACTION:
            shown = f" {name}" if name else ""
            self.failResponse(f"Unknown command{shown}")
            return None
        allowed = TRANSACTION if self.mbox is not None else AUTHORIZATION
        if name not in allowed:
            self.failResponse(f"{name} is not allowed {'after' if self.mbox is not None else 'before'} login")
            return None
        argument = args[0] if args else None
        if name in _NO_ARGUMENT:
            if argument is not None and argument.strip():
                self.failResponse(f"{name} takes no argument")
                return None
            return getattr(self, "do_" + name)()
        if name in ("RETR", "DELE"):
            number = self._messageNumber(argument)
            return None if number is None else getattr(self, "do_" + name)(number)
        if name in ("LIST", "UIDL"):
            if argument is None or not argument.strip():
                return getattr(self, "do_" + name)()
            number = self._messageNumber(argument)
            return None if number is None else getattr(self, "do_" + name)(number)
        if name == "TOP":
            parts = (argument or b"").split()
            if len(parts) != 2 or not _NUMBER.match(parts[1]):
                self.failResponse(b"Usage: TOP message-number lines")
                return None
            number = self._messageNumber(parts[0])
            return None if number is None else self.do_TOP(number, int(parts[1]))
        return getattr(self, "do_" + name)(argument)

    def _messageNumber(self, argument: bytes | None) -> int | None:
        """The 0-based index of a live message, or None after a ``-ERR`` (rfc1939 5)."""
        text = (argument or b"").strip()
        if not _NUMBER.match(text):
            self.failResponse(b"A message number is needed")
            return None
        number = int(text)
        messages = self.mbox.messages()
        if not 1 <= number <= len(messages):
            self.failResponse(f"No such message: {number}")
            return None
        if messages[number - 1].deleted:
            self.failResponse(f"Message {number} is deleted")
            return None
        return number - 1

    # ------------------------------------------------------ CAPA, STLS

    def listCapabilities(self) -> list[bytes]:
        """rfc2449 5 (replaces POP3's, workaround 5)."""
        capabilities = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        if self.mbox is None:
            if self._authAllowed():
                capabilities.append(b"USER")
                mechanisms = self.factory.mechanisms
                if mechanisms:
                    capabilities.append(("SASL " + " ".join(mechanisms)).encode("ascii"))
            if self.factory.tls is not None and not self.secure:
                capabilities.append(b"STLS")
        capabilities.append(b"IMPLEMENTATION mailsvc")
        return capabilities

    def do_CAPA(self) -> None:
        self.successResponse(b"Capability list follows")
        self.transport.writeSequence([c + b"\r\n" for c in self.listCapabilities()] + [b".\r\n"])

    def do_STLS(self) -> None:
        """rfc2595 4: +OK in clear, then the handshake; the session starts over."""
        if self.secure:
            self.failResponse(b"TLS is already active")
            return
        if self.factory.tls is None:
            self.failResponse(b"[SYS/TEMP] TLS is not available")
            return
        self.successResponse(b"Begin TLS negotiation now")
        try:
            self.transport.startTLS(self.factory.tls)
        except Exception:
            log.failure("STLS failed for [{client}]", client=self.client_address)
            self._gone = True
            self.transport.abortConnection()
            return
        self.secure = True
        self._discard = True
        self._userIs = None  # rfc2595 4: forget what was said before

    # ------------------------------------------------------ transaction

    def do_STAT(self) -> None:
        live = [m for m in self.mbox.messages() if not m.deleted]
        self.successResponse(b"%d %d" % (len(live), sum(m.size for m in live)))

    def do_LIST(self, number: int | None = None) -> None:
        """rfc1939 5: deleted messages are neither listed nor counted (workaround 4)."""
        messages = self.mbox.messages()
        if number is not None:
            self.successResponse(b"%d %d" % (number + 1, messages[number].size))
            return
        live = [(i + 1, m) for i, m in enumerate(messages) if not m.deleted]
        self.successResponse(f"{len(live)} messages ({sum(m.size for _, m in live)} octets)")
        self.transport.writeSequence([b"%d %d\r\n" % (n, m.size) for n, m in live] + [b".\r\n"])

    def do_UIDL(self, number: int | None = None) -> None:
        messages = self.mbox.messages()
        if number is not None:
            self.successResponse(f"{number + 1} {messages[number].uid}")
            return
        self.successResponse(b"Unique-ID listing follows")
        lines = [f"{i + 1} {m.uid}\r\n".encode("ascii") for i, m in enumerate(messages) if not m.deleted]
        self.transport.writeSequence(lines + [b".\r\n"])

    def do_DELE(self, number: int) -> None:
        """Mark only (rfc1939 6: removal happens at QUIT); workaround 4."""
        self.mbox.deleteMessage(number)
        self.successResponse(f"Message {number + 1} deleted")

    def do_RSET(self) -> None:
        self.mbox.undeleteMessages()
        self._highest = 0
        live = self.mbox.messages()
        self.successResponse(f"{self.mbox.name} has {len(live)} messages ({sum(m.size for m in live)} octets)")

    def do_QUIT(self):
        """rfc1939 6: in TRANSACTION, UPDATE: remove the deleted messages
        (in a thread), then answer (workaround 6) and close."""
        self._quitting = True
        if self.mbox is None:
            self.successResponse(f"{self.factory.hostname} POP3 server signing off")
            self.transport.loseConnection()
            return None
        d = self.mbox.sync()

        def removed(count):
            log.info("pop3 quit user={user} removed={count}", user=self.mbox.name, count=count)
            self.successResponse(f"{self.factory.hostname} POP3 server signing off ({count} messages deleted)")

        def failed(failure):
            log.failure("pop3 update of {user} failed", failure, user=self.mbox.name)
            self.failResponse(b"[SYS/TEMP] Some deleted messages were not removed")

        d.addCallbacks(removed, failed)
        d.addBoth(lambda _: self.transport.loseConnection())
        return d

    # ------------------------------------------------------ flow control

    def _longOperation(self, d):
        """POP3's: commands wait in a queue meanwhile. We also stop reading,
        so that the queue holds at most what one read brought."""
        self.transport.pauseProducing()
        d.addBoth(self._resumeReading)
        return super()._longOperation(d)

    def _resumeReading(self, result):
        if not self._gone and not getattr(self.transport, "disconnecting", False):
            self.transport.resumeProducing()
        return result

    def _unexpected(self, failure) -> None:
        self._loggingIn = False
        log.failure("pop3 error for [{client}]", failure, client=self.client_address)
        self.failResponse(b"[SYS/TEMP] Internal error")

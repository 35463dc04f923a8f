"""The POP3 protocol: ``twisted.mail.pop3.POP3`` with its Python 3 breakages worked around
(see ``mailsvc.pop3`` for the list)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import re

from twisted.cred import error as cred_error
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.mail import pop3
from twisted.protocols import basic

from mailsvc.auth import credentials_for
from mailsvc.smtp import sasl
from mailsvc.store.access import MailboxLocked
from mailsvc.pop3.encoding import MessageEncoder, _EncodedReader

if TYPE_CHECKING:
    from mailsvc.pop3.listeners import POP3Factory

log = Logger(namespace="mailsvc.pop3")

# rfc2449 8 / rfc3206 response codes in brackets.
AUTH_FAILED = b"[AUTH] Authentication failed"
TOO_MANY_FAILURES = b"[SYS/TEMP] Too many failed logins from your address; try again later"
PLAINTEXT_REFUSED = b"[AUTH] Plaintext login refused before TLS: send STLS first"
SASL_REFUSED = b"[AUTH] Authentication refused before TLS: send STLS first"
IN_USE = b"[IN-USE] mailbox locked: another session is reading it"
MAILBOX_UNAVAILABLE = b"[SYS/TEMP] Cannot open your mailbox now; try again later"
TOO_MANY_CONNECTIONS = b"[SYS/TEMP] Too many connections; try again later"
TOO_MANY_FROM_CLIENT = b"[SYS/TEMP] Too many connections from your address; try again later"

# rfc1939 and its extensions: the commands of each state (rfc1939 3).
AUTHORIZATION = frozenset({"CAPA", "USER", "PASS", "APOP", "AUTH", "STLS", "QUIT"})
TRANSACTION = frozenset({"CAPA", "STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "QUIT"})
_NO_ARGUMENT = frozenset({"CAPA", "STLS", "QUIT", "STAT", "NOOP", "RSET"})
_NUMBER = re.compile(rb"[0-9]{1,9}\Z")
_PRINTABLE = re.compile(rb"[\x21-\x7e]{1,16}\Z")


# ---------------------------------------------------------------- protocol


class POP3Server(pop3.POP3):
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

    # ------------------------------------------------------ login

    def _authAllowed(self) -> bool:
        return self.secure or self.factory.plaintext_without_tls

    def _blocked(self) -> bool:
        """The client's address used up its login attempts: say so and close."""
        if not self.factory.authenticator.failures.blocked(self.client_address):
            return False
        self.failResponse(TOO_MANY_FAILURES)
        self._quitting = True
        self.transport.loseConnection()
        return True

    def do_APOP(self, argument=None) -> None:
        self.failResponse(b"APOP is not supported: use USER/PASS or AUTH over TLS")

    def do_USER(self, argument: bytes | None) -> None:
        if not self._authAllowed():
            self.failResponse(PLAINTEXT_REFUSED)
            return
        name = (argument or b"").strip()
        if not name:
            self.failResponse(b"Usage: USER name")
            return
        self._userIs = name
        self.successResponse(b"Send PASS")

    def do_PASS(self, argument: bytes | None) -> None:
        if not self._authAllowed():
            self.failResponse(PLAINTEXT_REFUSED)
            return
        if self._userIs is None:
            self.failResponse(b"USER first")
            return
        login, self._userIs = self._userIs, None
        if self._blocked():
            return
        self._mechanism = "USER"
        try:
            name = self.factory.authenticator.user_name(login.decode("utf-8"))
            password = (argument or b"").decode("utf-8")
        except UnicodeDecodeError:
            self._longOperation(defer.maybeDeferred(self._failed, "login or password not UTF-8"))
            return
        self._login(UsernamePassword(name, password), name)

    def do_AUTH(self, argument: bytes | None = None) -> None:
        """rfc5034: ``AUTH mechanism [initial-response]``; plain ``AUTH``
        lists the mechanisms (rfc1734's old form, still used)."""
        if not self._authAllowed():
            self.failResponse(SASL_REFUSED)
            return
        mechanisms = self.factory.mechanisms
        if argument is None or not argument.strip():
            self.successResponse(b"Supported mechanisms follow")
            self.transport.writeSequence([m.encode("ascii") + b"\r\n" for m in mechanisms] + [b".\r\n"])
            return
        parts = argument.split()
        mechanism = parts[0].upper().decode("ascii", "replace")
        if mechanism not in mechanisms or len(parts) > 2:
            self.failResponse(b"Unsupported SASL mechanism" if len(parts) <= 2 else b"Usage: AUTH mechanism [initial-response]")
            return
        if self._blocked():
            return
        self._mechanism = mechanism
        self._exchange = self._newExchange(mechanism)
        try:
            initial = sasl.decode(parts[1].decode("ascii")) if len(parts) == 2 else None
        except (sasl.SASLError, UnicodeDecodeError):
            self._exchange = None
            self.failResponse(b"Cannot decode the initial response")
            return
        self._step(lambda: self._exchange.start(initial))

    def _newExchange(self, mechanism: str) -> sasl.Exchange:
        if mechanism == "PLAIN":
            return sasl.Plain()
        if mechanism == "LOGIN":
            return sasl.Login()
        if mechanism == "CRAM-MD5":
            return sasl.CramMD5(sasl.cram_md5_challenge(self.factory.hostname))
        return sasl.ScramSHA256()

    def state_AUTH(self, line: bytes) -> None:
        """A client line of a running SASL exchange (replaces POP3's, workaround 2)."""
        self.state = "COMMAND"
        if self._exchange is None or self._loggingIn:
            self._exchange = None
            self.failResponse(b"Authentication exchange out of step")
            return
        if line == b"*":  # rfc5034 4: the client cancels
            self._exchange = None
            self.failResponse(b"Authentication cancelled")
            return
        try:
            data = sasl.decode(line.decode("ascii")) if line else b""
        except (sasl.SASLError, UnicodeDecodeError):
            self._exchange = None
            self.failResponse(b"Cannot decode the response")
            return
        self._step(lambda: self._exchange.respond(data))

    def _step(self, run) -> None:
        """Run one step of the exchange: a challenge, a key lookup (SCRAM) or a login."""
        try:
            step = run()
        except sasl.SASLError as error:
            self._exchange = None
            if error.kind == "sequence":
                self.failResponse(b"This mechanism takes no initial response")
                return
            self._longOperation(defer.maybeDeferred(self._failed, f"malformed {self._mechanism} exchange: {error}"))
            return
        if isinstance(step, sasl.Challenge):
            self.sendLine(b"+ " + sasl.encode(step.data).encode("ascii"))
            self.state = "AUTH"
            return
        authenticator = self.factory.authenticator
        if isinstance(step, sasl.Lookup):
            name = authenticator.user_name(step.username)
            self._loggingIn = True
            d = authenticator.run_blocking(authenticator.passwords.lookup, name)

            def found(entry):
                self._loggingIn = False
                if self._exchange is not None and not self._gone:
                    self._step(lambda: self._exchange.keys_found(entry and entry.scram))

            def failed(failure):
                self._loggingIn = False
                self._exchange = None
                log.failure("password lookup failed", failure)
                self.failResponse(b"[SYS/TEMP] Temporary authentication failure")

            d.addCallbacks(found, failed)
            d.addErrback(self._unexpected)
            self._longOperation(d)
            return
        self._exchange = None
        name, authzid, credentials = credentials_for(authenticator, step)
        if authzid and authenticator.user_name(authzid) != name:
            self._longOperation(defer.maybeDeferred(self._failed, f"user {name} asked to act as {authzid}"))
            return
        self._login(credentials, name)

    def _login(self, credentials, name: str) -> None:
        """Log in through the portal; the realm opens the mailbox. Commands
        sent meanwhile wait (pipelining)."""
        self._loggingIn = True
        d = self.portal.login(credentials, None, pop3.IMailbox)
        d.addCallbacks(self._loggedIn, self._loginFailed, callbackArgs=(name,), errbackArgs=(name,))
        d.addErrback(self._unexpected)
        self._longOperation(d)

    def _loggedIn(self, result, name: str) -> None:
        self._loggingIn = False
        _interface, mailbox, logout = result
        if self._gone:
            logout()  # the client went away meanwhile
            return
        self.mbox = mailbox
        self._onLogout = logout
        live = [m for m in mailbox.messages() if not m.deleted]
        log.info(
            "pop3 login user={user} mechanism={mechanism} client=[{client}] messages={count}",
            user=mailbox.name, mechanism=self._mechanism, client=self.client_address, count=len(live),
        )
        self.successResponse(f"{mailbox.name} has {len(live)} messages ({sum(m.size for m in live)} octets)")

    def _loginFailed(self, failure, name: str):
        self._loggingIn = False
        if failure.check(cred_error.UnauthorizedLogin, cred_error.UnhandledCredentials):
            return self._failed(f"bad credentials for {name}")
        if failure.check(MailboxLocked):
            log.info("pop3 mailbox of {user} in use; refused [{client}]", user=name, client=self.client_address)
            self.failResponse(IN_USE)
            return None
        log.failure("pop3 cannot open the mailbox of {user}", failure, user=name)
        self.failResponse(MAILBOX_UNAVAILABLE)
        return None

    def _failed(self, why: str):
        """``-ERR [AUTH]`` after a growing delay; once the address is blocked, close."""
        failures, address = self.factory.authenticator.failures, self.client_address
        failures.record(address)
        log.warn("pop3 auth failed mechanism={mechanism} client=[{client}]: {why}",
                 mechanism=self._mechanism, client=address, why=why)
        if failures.blocked(address):
            self.failResponse(TOO_MANY_FAILURES)
            self._quitting = True
            self.transport.loseConnection()
            return None
        delay = failures.delay(address)
        if not delay:
            self.failResponse(AUTH_FAILED)
            return None
        return task.deferLater(self.factory.clock, delay, self.failResponse, AUTH_FAILED)

    def _unexpected(self, failure) -> None:
        self._loggingIn = False
        log.failure("pop3 error for [{client}]", failure, client=self.client_address)
        self.failResponse(b"[SYS/TEMP] Internal error")

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

    def do_RETR(self, number: int):
        return self._sendMessage(number, None)

    def do_TOP(self, number: int, lines: int):
        return self._sendMessage(number, lines)

    def _sendMessage(self, number: int, bodyLines: int | None):
        """RETR or TOP: the message streamed with ``basic.FileSender`` through
        a ``MessageEncoder`` (workaround 3); RETR marks it seen."""
        size = self.mbox.messages()[number].size
        opened = self.mbox.getMessage(number)

        def send(source):
            encoder = MessageEncoder(bodyLines)
            self.successResponse(f"{size} octets" if bodyLines is None else "Top of message follows")
            transfer = basic.FileSender().beginFileTransfer(_EncodedReader(source, encoder), self.transport)

            def sent(_):
                self.transport.write(encoder.end())
                if bodyLines is None:
                    self._highest = max(self._highest, number + 1)
                    return self.mbox.markSeen(number).addErrback(
                        lambda f: log.failure("cannot mark message {n} seen", f, n=number + 1)
                    )
                return None

            def stopped(failure):
                log.info("pop3 transfer to [{client}] stopped: {why}", client=self.client_address,
                         why=failure.getErrorMessage())

            def closeSource(result):
                source.close()
                return result

            return transfer.addCallbacks(sent, stopped).addBoth(closeSource)

        def cannotRead(failure):
            log.failure("pop3 cannot read message {n} of {user}", failure, n=number + 1, user=self.mbox.name)
            self.failResponse(f"[SYS/TEMP] Cannot read message {number + 1} now")

        opened.addCallbacks(send, cannotRead)
        opened.addErrback(self._unexpected)
        return self._longOperation(opened)

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

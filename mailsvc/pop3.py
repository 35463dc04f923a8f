"""POP3 mailbox access (rfc1939) on ``twisted.mail.pop3``, over our stores.

Users read what local delivery wrote, with the password they submit mail
with. The pieces:

- ``POP3Server``: a subclass of ``twisted.mail.pop3.POP3`` (its line
  handling, autologout timer, pipelined-command queue and ``FileSender``
  streaming are reused) with CAPA (rfc2449: TOP, UIDL, RESP-CODES,
  AUTH-RESP-CODE, PIPELINING, USER, SASL, STLS), STLS (rfc2595), SASL AUTH
  (rfc5034, with the mechanisms of ``mailsvc.smtp.sasl``: SCRAM-SHA-256,
  PLAIN, LOGIN, CRAM-MD5) and USER/PASS. Plaintext logins (USER/PASS and
  any AUTH) need TLS unless ``allow_plaintext_without_tls``: before it CAPA
  offers neither USER nor SASL and they get ``-ERR [AUTH]``. Failed logins
  count per client address (``mailsvc.limits.AuthFailures``): each ``-ERR``
  waits longer, then the address is refused and the connection closed.
- ``MailboxRealm``: the ``twisted.cred`` realm handing out
  ``twisted.mail.pop3.IMailbox`` avatars; the portal uses the checkers of
  ``mailsvc.auth`` (the same password file as SMTP AUTH). The avatar is a
  ``POP3Mailbox`` over an ``IMailboxSession`` of the store
  (``mailsvc.interfaces.IMailboxAccess``); a mailbox already being read
  gives ``-ERR [IN-USE]`` (rfc2449 8.1.2).
- rfc1939 6: deletions happen only at QUIT (the UPDATE state, in a
  thread); a connection lost before QUIT removes nothing.
- Messages go out as stored (``mailsvc.store.access.WireForm``: LF to
  CRLF), dot-stuffed with ``mailsvc.smtp.stuffing.DotStuffer``.
- ``pop3_listeners``: the STLS and implicit-TLS (rfc8314) listeners of
  ``[pop3]``, sharing one connection count.

Where ``twisted.mail.pop3.POP3`` is broken (Twisted 24-26 on Python 3),
this module works around it in the subclass rather than patching it:

1. ``state_COMMAND`` builds its error reply with ``b"".join(e.args)``, but
   on Python 3 a ``ValueError`` or ``TypeError`` carries ``str`` arguments:
   "USER" with no name, "DELE x", "TOP 1" or "AUTH PLAIN <initial
   response>" raise a second ``TypeError`` out of ``dataReceived`` and the
   reactor drops the connection. We parse and check every command ourselves
   and answer a clear ``-ERR``.
2. SASL AUTH cannot log anyone in: ``state_AUTH`` splits the decoded
   answer at white space (the CRAM-MD5 shape) and never calls
   ``setResponse``, so PLAIN gets garbage credentials; rfc5034's initial
   response and ``*`` (cancel) are not handled. Ours runs the
   ``mailsvc.smtp.sasl`` exchanges.
3. ``transformChunk`` dot-stuffs each 16 KiB chunk on its own: a line
   starting with ``.`` at a chunk boundary (or the first line) is not
   stuffed, so a lone ``.`` there ends the response early. ``TOP``'s
   ``_HeadersPlusNLines`` misses a blank line split across two chunks.
   Ours keeps the state across chunks.
4. ``do_DELE`` passes ``int(i) - 1`` unchecked: ``DELE 0`` deletes the
   last message (index -1); deleting twice says ``+OK``. LIST, UIDL and
   STAT list and count deleted messages (rfc1939 5 says they must not).
5. CAPA offers ``PIPELINE`` (rfc2449 says PIPELINING), joke capabilities
   and USER whatever the TLS state; there is no STLS.
6. ``do_QUIT`` calls ``sync()`` without waiting for or checking it, so a
   failed removal is answered ``+OK``.
7. The greeting's APOP timestamp comes from ``smtp.messageid()`` (a
   blocking ``getfqdn()``); APOP needs stored plaintext passwords, which we
   do not keep, so we offer no APOP and send no timestamp.
8. ``TimeoutMixin`` and ``task.coiterate`` use the global reactor: our
   timer runs on the factory's clock and listings are written directly.
9. ``twisted.mail.pop3`` imports ``twisted.mail.smtp``, which imports the
   global reactor at module level: ``mailsvc.tap`` imports this module only
   inside ``build``, and only when a POP3 listener is configured.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from twisted.application.internet import StreamServerEndpointService
from twisted.cred import error as cred_error
from twisted.cred.credentials import UsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, endpoints, task
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.mail import pop3
from twisted.protocols import basic
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from mailsvc.auth import Authenticator, CramMD5Answer, SASLVerified
from mailsvc.errors import ConfigError
from mailsvc.interfaces import IMailboxAccess
from mailsvc.limits import ClientConnections
from mailsvc.listeners import authenticator, tls_context
from mailsvc.smtp import sasl
from mailsvc.smtp.stuffing import DotStuffer
from mailsvc.store.access import MailboxLocked, MessageInfo, WireForm

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


# ---------------------------------------------------------------- message encoding


class TopLimit:
    """TOP (rfc1939 7): the header section, the blank line, then ``lines``
    lines of the body, from wire-form (CRLF) text fed in any chunks that do
    not split a CRLF (``WireForm`` output)."""

    def __init__(self, lines: int) -> None:
        self.left = lines
        self.inHeaders = True
        self.atLineStart = True
        self.done = False

    def take(self, data: bytes) -> bytes:
        """The part of ``data`` still to send."""
        position, size = 0, len(data)
        while position < size and not self.done:
            if self.atLineStart:
                if not self.inHeaders and self.left <= 0:
                    self.done = True
                    break
                if self.inHeaders and data.startswith(b"\r\n", position):
                    self.inHeaders = False  # the blank line: sent, then the body
                    position += 2
                    continue
            end = data.find(b"\r\n", position)
            if end < 0:
                position, self.atLineStart = size, False
                break
            position, self.atLineStart = end + 2, True
            if not self.inHeaders:
                self.left -= 1
        return data[:position]


class MessageEncoder:
    """A stored message (LF line ends) to the body of a POP3 multi-line
    response: CRLF, dot-stuffed, optionally cut for TOP, and terminated."""

    def __init__(self, bodyLines: int | None = None) -> None:
        self._wire = WireForm()
        self._top = TopLimit(bodyLines) if bodyLines is not None else None
        self._stuffer = DotStuffer()

    @property
    def done(self) -> bool:
        """True once TOP has all it needs: the rest of the file need not be read."""
        return self._top is not None and self._top.done

    def feed(self, chunk: bytes) -> bytes:
        """The wire bytes for the next stored chunk."""
        if self.done:
            return b""
        data = self._wire.feed(chunk)
        if self._top is not None:
            data = self._top.take(data)
        return self._stuffer.stuff(data)

    def end(self) -> bytes:
        """The last bytes and the terminator: ``.CRLF``, after a CRLF if the message lacked one."""
        tail = b"" if self.done else self._stuffer.stuff(self._wire.end())
        return tail + self._stuffer.end()


class _EncodedReader:
    """A file for ``basic.FileSender``: reads the stored file, returns wire
    bytes; ``b""`` only at the end (an empty chunk would end the transfer)."""

    def __init__(self, source, encoder: MessageEncoder) -> None:
        self.source, self.encoder = source, encoder

    def read(self, size: int) -> bytes:
        while not self.encoder.done:
            chunk = self.source.read(size)
            if not chunk:
                return b""
            data = self.encoder.feed(chunk)
            if data:
                return data
        return b""


# ---------------------------------------------------------------- mailbox and realm


@implementer(pop3.IMailbox)
class POP3Mailbox:
    """``twisted.mail.pop3.IMailbox`` over an ``IMailboxSession``.

    Listing and marking work on the session's memory; reading, marking
    seen and committing run through ``run_blocking`` (a thread). ``logout``
    ends the session without removing anything, after any of those still
    running.
    """

    loginDelay = 0
    messageExpiration = None

    def __init__(self, name: str, session, run_blocking: Callable) -> None:
        self.name = name
        self.session = session
        self.run_blocking = run_blocking
        self._running = 0
        self._closeWhenIdle = False

    # ------------------------------------------------------ twisted's IMailbox

    def listMessages(self, i=None):
        """Sizes in octets (0 for a deleted message), or the size of message ``i``."""
        messages = self.messages()
        if i is None:
            return [0 if m.deleted else m.size for m in messages]
        info = self._info(i)
        return 0 if info.deleted else info.size

    def getMessage(self, i):
        """A Deferred firing with a binary file of message ``i`` as stored."""
        self._info(i)
        return self._run(self.session.read, i)

    def getUidl(self, i):
        return self._info(i).uid

    def deleteMessage(self, i):
        self._info(i)
        self.session.delete(i)

    def undeleteMessages(self):
        self.session.undelete()

    def sync(self):
        """rfc1939 6 UPDATE: a Deferred firing with how many messages were removed."""
        return self._run(self.session.commit)

    # ------------------------------------------------------ ours

    def messages(self) -> list[MessageInfo]:
        """Every message of the session (``MessageInfo``), deleted ones included."""
        return list(self.session.list())

    def markSeen(self, i):
        """A Deferred: the store records that message ``i`` was retrieved."""
        return self._run(self.session.markSeen, i)

    def logout(self) -> None:
        """The connection ended: close the session (nothing removed unless QUIT committed)."""
        if self._running:
            self._closeWhenIdle = True
        else:
            self._close()

    def _info(self, i) -> MessageInfo:
        messages = self.messages()
        if not isinstance(i, int) or not 0 <= i < len(messages):
            raise ValueError(f"no message {i!r}")
        return messages[i]

    def _run(self, f, *args):
        self._running += 1
        d = self.run_blocking(f, *args)

        def finished(result):
            self._running -= 1
            if self._closeWhenIdle and not self._running:
                self._close()
            return result

        return d.addBoth(finished)

    def _close(self) -> None:
        self._closeWhenIdle = False
        try:
            self.session.close()
        except OSError:
            log.failure("closing the mailbox of {user}", user=self.name)


@implementer(IRealm)
class MailboxRealm:
    """An authenticated user gets a ``POP3Mailbox`` over a session of their
    mailbox in ``store`` (an ``IMailboxAccess``), opened through ``run_blocking``."""

    def __init__(self, store, run_blocking: Callable) -> None:
        self.store = store
        self.run_blocking = run_blocking

    def requestAvatar(self, avatarId, mind, *interfaces):
        if pop3.IMailbox not in interfaces:
            raise NotImplementedError("this realm only hands out POP3 mailboxes")
        name = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else avatarId
        d = self.run_blocking(self.store.open, name)

        def opened(session):
            mailbox = POP3Mailbox(name, session, self.run_blocking)
            return pop3.IMailbox, mailbox, mailbox.logout

        return d.addCallback(opened)


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
        if isinstance(step, sasl.PasswordCredentials):
            name, authzid = authenticator.user_name(step.authcid), step.authzid
            credentials = UsernamePassword(name, step.password)
        elif isinstance(step, sasl.CramMD5Credentials):
            name, authzid = authenticator.user_name(step.username), ""
            credentials = CramMD5Answer(name, step)
        else:
            name, authzid = authenticator.user_name(step.username), step.authzid
            credentials = SASLVerified(name, step.verified)
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


# ---------------------------------------------------------------- factory and listeners


class POP3Connections:
    """Every POP3 connection of a server, over both listeners: at most
    ``max_connections`` in all and ``max_per_client`` per address (0: no cap)."""

    def __init__(self, max_connections: int = 100, max_per_client: int = 0) -> None:
        self.max_connections = max_connections
        self.per_client = ClientConnections(max_per_client)
        self.connections: set[POP3Server] = set()

    def admit(self, protocol: POP3Server) -> bytes | None:
        if self.max_connections and len(self.connections) >= self.max_connections:
            return TOO_MANY_CONNECTIONS
        if not self.per_client.admit(protocol.client_address):
            log.warn("too many pop3 connections from [{client}]", client=protocol.client_address)
            return TOO_MANY_FROM_CLIENT
        self.connections.add(protocol)
        return None

    def release(self, protocol: POP3Server) -> None:
        if protocol in self.connections:
            self.connections.discard(protocol)
            self.per_client.release(protocol.client_address)


class POP3Factory(ServerFactory):
    """Makes ``POP3Server``s for one listener.

    :param authenticator: a ``mailsvc.auth.Authenticator`` whose portal has a
        ``MailboxRealm`` (its passwords, failure counts, clock and
        ``run_blocking`` are used too).
    :param mechanisms: SASL mechanisms offered (``[auth] mechanisms``).
    :param tls: the context for STLS, or None (no STLS).
    :param implicit_tls: the listener is wrapped in TLS (rfc8314).
    :param plaintext_without_tls: allow USER/PASS and AUTH before TLS.
    """

    noisy = False

    def __init__(
        self,
        authenticator: Authenticator,
        *,
        hostname: str,
        clock,
        mechanisms=("PLAIN",),
        tls=None,
        implicit_tls: bool = False,
        plaintext_without_tls: bool = False,
        idle_timeout: float = 600,
        connections: POP3Connections | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.hostname = hostname
        self.clock = clock
        self.mechanisms = tuple(mechanisms)
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.plaintext_without_tls = plaintext_without_tls
        self.idle_timeout = idle_timeout
        self.connections = connections if connections is not None else POP3Connections()

    def buildProtocol(self, addr) -> POP3Server:
        return POP3Server(self)

    def admit(self, protocol: POP3Server) -> bytes | None:
        return self.connections.admit(protocol)

    def release(self, protocol: POP3Server) -> None:
        self.connections.release(protocol)


def pop3_authenticator(smtp_auth: Authenticator, store, run_blocking: Callable) -> Authenticator:
    """The POP3 login machinery: SMTP AUTH's checkers (the same password and
    CRAM-MD5 files) behind a portal whose realm opens mailboxes of ``store``."""
    checkers = {id(c): c for c in smtp_auth.portal.checkers.values()}.values()
    portal = Portal(MailboxRealm(store, run_blocking), list(checkers))
    return Authenticator(
        portal,
        smtp_auth.passwords,
        smtp_auth.hostname,
        smtp_auth.local_domains,
        smtp_auth.failures,
        smtp_auth.clock,
        run_blocking,
    )


def pop3_listeners(cfg, reactor, store, run_blocking: Callable) -> list:
    """One service per ``[pop3] listen`` (STLS) and ``listen_implicit_tls``
    endpoint; ``[]`` when POP3 is off.

    :raise ConfigError: POP3 is on but ``store`` cannot be read (it does not
        provide ``IMailboxAccess``), or the certificate is unusable.
    """
    settings = cfg.pop3
    if not settings.enabled:
        return []
    if not IMailboxAccess.providedBy(store):
        key = "listen" if settings.listen else "listen_implicit_tls"
        raise ConfigError(
            f"{cfg.path.name}: [pop3] {key}: the {cfg.store.type!r} store cannot be read by POP3 "
            "(it does not provide mailsvc.interfaces.IMailboxAccess); remove the [pop3] listeners "
            "or choose another [store] type"
        )
    context = tls_context(cfg)
    auth = pop3_authenticator(authenticator(cfg, reactor, run_blocking), store, run_blocking)
    common = dict(
        hostname=cfg.server.hostname,
        clock=reactor,
        mechanisms=cfg.auth.mechanisms,
        plaintext_without_tls=settings.plaintext_allowed(cfg.auth),
        idle_timeout=settings.idle_timeout,
        connections=POP3Connections(settings.max_connections, settings.max_connections_per_client),
    )
    services = []
    stls = POP3Factory(auth, tls=context, **common)
    for description in settings.listen:
        services.append(StreamServerEndpointService(endpoints.serverFromString(reactor, description), stls))
    implicit = POP3Factory(auth, implicit_tls=True, **common)
    for description in settings.listen_implicit_tls:
        wrapped = TLSMemoryBIOFactory(context, False, implicit)  # rfc8314 3.3: TLS first
        services.append(StreamServerEndpointService(endpoints.serverFromString(reactor, description), wrapped))
    return services


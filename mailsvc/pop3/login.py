"""POP3 login: the AUTHORIZATION-state commands that log a user in.

USER/PASS (rfc1939 7), APOP (refused: we keep no plaintext passwords) and
SASL AUTH (rfc5034, the exchanges of ``mailsvc.smtp.sasl``), all through the
portal of the factory's ``mailsvc.auth.Authenticator``. Plaintext logins need
TLS unless the factory allows them without; failed logins count per client
address, each ``-ERR`` waits longer, then the address is refused.

``LoginCommands`` is mixed into ``mailsvc.pop3.server.POP3Server``, which
owns the state it works on (``factory``, ``portal``, ``secure``,
``client_address``, ``mbox``, the exchange under way) and the
``_longOperation`` and ``_unexpected`` it calls.
"""

from __future__ import annotations

from twisted.cred import error as cred_error
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.mail import pop3

from mailsvc.auth import credentials_for
from mailsvc.pop3.replies import (
    AUTH_FAILED,
    IN_USE,
    MAILBOX_UNAVAILABLE,
    PLAINTEXT_REFUSED,
    SASL_REFUSED,
    TOO_MANY_FAILURES,
)
from mailsvc.smtp import sasl
from mailsvc.store.access import MailboxLocked

log = Logger(namespace="mailsvc.pop3")


class LoginCommands:
    """USER, PASS, APOP and AUTH, and the SASL exchange lines (``state_AUTH``),
    mixed into ``POP3Server`` (workaround 2 of ``mailsvc.pop3``)."""

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

    # ------------------------------------------------------ USER, PASS, APOP

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

    # ------------------------------------------------------ AUTH (SASL)

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

    # ------------------------------------------------------ the portal, failures

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

"""SMTP AUTH (rfc4954) on ``twisted.cred``: the portal, its checkers, and the
per-connection driver that answers the server machine's AUTH decisions.

- ``make_portal``: a ``twisted.cred.portal.Portal`` whose realm hands out
  ``IMailUser`` avatars, with three checkers:
  ``PasswordFileChecker`` (``IUsernamePassword``: PLAIN and LOGIN, against
  the scrypt hashes of the password file), ``CramMD5Checker``
  (``IUsernameHashedPassword``: CRAM-MD5, against the secrets file) and
  ``SASLVerifiedChecker`` (``ISASLVerifiedCredentials``: SCRAM-SHA-256,
  whose proof the exchange checked against the stored keys).
- ``Authenticator`` (one per server) and ``AuthSession`` (one per
  connection): run the ``mailsvc.smtp.sasl`` exchange, log in through the
  portal, and turn the outcome into a reply: 334 challenge, 235, 535 5.7.8
  (after a growing delay), 501, 454 4.7.0, or 421 4.7.0 once the client
  address has failed too often (``mailsvc.limits.AuthFailures``).

A login name may be ``alice`` or ``alice@<a local domain>``; either is the
local user ``alice``. Asking to act as someone else (a PLAIN or SCRAM authzid
that is not the same user) fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword, UsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from mailsvc.aliases import normalName
from mailsvc.interfaces import IMailUser, ISASLVerifiedCredentials
from mailsvc.limits import AuthFailures
from mailsvc.passwords import PasswordFile, SecretsFile, hash_password, verify_password
from mailsvc.policy import SessionInfo
from mailsvc.smtp import events as ev
from mailsvc.smtp import sasl
from mailsvc.smtp.address import domain_key
from mailsvc.smtp.replies import Reply

log = Logger(namespace="mailsvc.auth")

SUCCESS = Reply.of(235, "2.7.0", "Authentication successful")
INVALID = Reply.of(535, "5.7.8", "Authentication credentials invalid")
TEMPORARY = Reply.of(454, "4.7.0", "Temporary authentication failure")
TOO_MANY_FAILURES = Reply.of(421, "4.7.0", "Too many failed authentication attempts; try again later")
BAD_ENCODING = Reply.of(501, "5.5.2", "Cannot decode response")
NO_INITIAL_RESPONSE = Reply.of(501, "5.7.0", "This mechanism takes no initial response")

# A hash to check unknown users against, so that they take as long as known ones.
_DUMMY_HASH = hash_password("not a password", b"\0" * 16)


@implementer(IMailUser)
@dataclass(frozen=True)
class MailUser:
    """An authenticated local user."""

    name: str


@implementer(IRealm)
class MailUserRealm:
    """Every authenticated id is the local user of that name."""

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IMailUser not in interfaces:
            raise NotImplementedError("mailsvc only hands out IMailUser avatars")
        name = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else avatarId
        return IMailUser, MailUser(name), lambda: None


@implementer(IUsernameHashedPassword)
class CramMD5Answer:
    """A CRAM-MD5 answer as ``twisted.cred`` credentials: ``checkPassword(secret)``."""

    def __init__(self, username: str, answer: sasl.CramMD5Credentials) -> None:
        self.username = username
        self._answer = answer

    def checkPassword(self, password) -> bool:
        secret = password.encode("utf-8") if isinstance(password, str) else password
        return self._answer.verify(secret)


@implementer(ISASLVerifiedCredentials)
@dataclass(frozen=True)
class SASLVerified:
    """The outcome of a SCRAM exchange, as credentials."""

    username: str
    verified: bool


@implementer(ICredentialsChecker)
class PasswordFileChecker:
    """PLAIN and LOGIN: the password against the scrypt hash in the password file.
    The file read and the hash run through ``run_blocking`` (a thread)."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, passwords: PasswordFile, run_blocking: Callable) -> None:
        self.passwords = passwords
        self.run_blocking = run_blocking

    def requestAvatarId(self, credentials):
        return self.run_blocking(self._check, credentials.username, credentials.password)

    def _check(self, username: str, password: str) -> str:
        entry = self.passwords.lookup(username)
        if entry is None:
            verify_password(password, _DUMMY_HASH)  # the same time for unknown users
            raise cred_error.UnauthorizedLogin()
        if not verify_password(password, entry.hashed):
            raise cred_error.UnauthorizedLogin()
        return entry.name


@implementer(ICredentialsChecker)
class CramMD5Checker:
    """CRAM-MD5: HMAC-MD5 of the challenge with the user's secret (rfc2195)."""

    credentialInterfaces = (IUsernameHashedPassword,)

    def __init__(self, secrets: SecretsFile | None, run_blocking: Callable) -> None:
        self.secrets = secrets
        self.run_blocking = run_blocking

    def requestAvatarId(self, credentials):
        if self.secrets is None:
            return defer.fail(cred_error.UnauthorizedLogin())

        def check(secret):
            if secret is not None and credentials.checkPassword(secret):
                return credentials.username.lower()
            raise cred_error.UnauthorizedLogin()

        return self.run_blocking(self.secrets.secret, credentials.username).addCallback(check)


@implementer(ICredentialsChecker)
class SASLVerifiedChecker:
    """SCRAM-SHA-256: the exchange verified the proof; this only reads the outcome."""

    credentialInterfaces = (ISASLVerifiedCredentials,)

    def requestAvatarId(self, credentials):
        if credentials.verified:
            return defer.succeed(credentials.username.lower())
        return defer.fail(cred_error.UnauthorizedLogin())


def make_portal(passwords: PasswordFile, secrets: SecretsFile | None, run_blocking: Callable, realm=None) -> Portal:
    """The portal for SMTP AUTH: password file, CRAM-MD5 secrets, SCRAM outcomes."""
    return Portal(
        realm or MailUserRealm(),
        [PasswordFileChecker(passwords, run_blocking), CramMD5Checker(secrets, run_blocking), SASLVerifiedChecker()],
    )


class Authenticator:
    """What every connection's ``AuthSession`` shares: portal, password file
    (for SCRAM's stored keys), limits, clock."""

    def __init__(
        self,
        portal: Portal,
        passwords: PasswordFile,
        hostname: str,
        local_domains,
        failures: AuthFailures,
        clock,
        run_blocking: Callable,
    ) -> None:
        self.portal = portal
        self.passwords = passwords
        self.hostname = hostname
        self.local_domains = frozenset(d.lower() for d in local_domains)
        self.failures = failures
        self.clock = clock
        self.run_blocking = run_blocking

    def session(self, info: SessionInfo) -> "AuthSession":
        """The AUTH driver of one connection."""
        return AuthSession(self, info)

    def user_name(self, login: str) -> str:
        """``alice`` or ``alice@<local domain>`` → ``alice``; anything else
        as is, both as user names are compared (``normalName``: lower case,
        NFC; a local domain as a U-label or an A-label)."""
        name = login.strip()
        local, at, domain = name.rpartition("@")
        if at and local and domain_key(domain) in self.local_domains:
            return normalName(local)
        return normalName(name)


def credentials_for(authenticator, step) -> tuple[str, str, object]:
    """What a finished SASL exchange (``mailsvc.smtp.sasl``) proves:
    ``(user name, authorization id, twisted.cred credentials)`` for the
    portal. SMTP AUTH (rfc4954) and POP3 AUTH (rfc5034) share it."""
    if isinstance(step, sasl.PasswordCredentials):
        name = authenticator.user_name(step.authcid)
        return name, step.authzid, UsernamePassword(name, step.password)
    if isinstance(step, sasl.CramMD5Credentials):
        name = authenticator.user_name(step.username)
        return name, "", CramMD5Answer(name, step)
    name = authenticator.user_name(step.username)
    return name, step.authzid, SASLVerified(name, step.verified)


class AuthSession:
    """Answers one connection's ``Auth``, ``AuthResponse`` and ``AuthCancelled`` events.

    On success ``info.user`` is the local user name. Each ``on_*`` returns a
    ``Reply`` or a Deferred of one, as ``mailsvc.receiver`` handlers do.
    """

    def __init__(self, authenticator: Authenticator, info: SessionInfo) -> None:
        self.authenticator = authenticator
        self.info = info
        self.exchange: sasl.Exchange | None = None
        self.mechanism = ""

    def on_auth(self, event: ev.Auth):
        """AUTH mechanism [initial-response]: start the exchange."""
        if self.authenticator.failures.blocked(self.info.client_address):
            return TOO_MANY_FAILURES
        self.mechanism = event.mechanism
        self.exchange = self._exchange(event.mechanism)
        try:
            initial = None if event.initial_response is None else sasl.decode(event.initial_response)
        except sasl.SASLError as error:
            return self._sasl_error(error)
        return self._step(lambda: self.exchange.start(initial))

    def on_auth_response(self, event: ev.AuthResponse):
        """A client line of the running exchange."""
        if self.exchange is None:
            return INVALID
        try:
            data = sasl.decode(event.line)
        except sasl.SASLError as error:
            return self._sasl_error(error)
        return self._step(lambda: self.exchange.respond(data))

    def on_auth_cancelled(self, event: ev.AuthCancelled) -> None:
        """``*`` (or an over-long line): forget the exchange."""
        self.exchange = None

    def reset(self) -> None:
        """The session starts over (after STARTTLS)."""
        self.exchange = None

    # ---------------------------------------------------------- internals

    def _exchange(self, mechanism: str) -> sasl.Exchange:
        if mechanism == "PLAIN":
            return sasl.Plain()
        if mechanism == "LOGIN":
            return sasl.Login()
        if mechanism == "CRAM-MD5":
            return sasl.CramMD5(sasl.cram_md5_challenge(self.authenticator.hostname))
        if mechanism == "SCRAM-SHA-256":
            return sasl.ScramSHA256()
        raise ValueError(f"no such mechanism: {mechanism}")  # the machine offers only known ones

    def _step(self, run):
        try:
            step = run()
        except sasl.SASLError as error:
            return self._sasl_error(error)
        if isinstance(step, sasl.Challenge):
            return Reply.of(334, "", sasl.encode(step.data))
        if isinstance(step, sasl.Lookup):
            name = self.authenticator.user_name(step.username)
            d = self.authenticator.run_blocking(self.authenticator.passwords.lookup, name)
            d.addCallback(lambda entry: self._step(lambda: self.exchange.keys_found(entry and entry.scram)))
            return d
        return self._login(step)

    def _sasl_error(self, error: sasl.SASLError):
        self.exchange = None
        if error.kind == "encoding":
            return BAD_ENCODING
        if error.kind == "sequence":
            return NO_INITIAL_RESPONSE
        return self._failed(f"malformed {self.mechanism} exchange: {error}")

    def _login(self, step):
        self.exchange = None
        authenticator = self.authenticator
        name, authzid, credentials = credentials_for(authenticator, step)
        if authzid and authenticator.user_name(authzid) != name:
            return self._failed(f"user {name} asked to act as {authzid}")
        d = authenticator.portal.login(credentials, None, IMailUser)
        d.addCallbacks(self._succeeded, self._login_failed, errbackArgs=(name,))
        return d

    def _succeeded(self, result) -> Reply:
        _interface, avatar, _logout = result
        self.info.user = avatar.name
        self.info.extra["auth_mechanism"] = self.mechanism
        log.info(
            "auth ok user={user} mechanism={mechanism} client=[{client}]",
            user=avatar.name,
            mechanism=self.mechanism,
            client=self.info.client_address,
        )
        return SUCCESS

    def _login_failed(self, failure, name: str):
        if failure.check(cred_error.UnauthorizedLogin, cred_error.UnhandledCredentials):
            return self._failed(f"bad credentials for {name}")
        log.failure("authentication error", failure)
        return TEMPORARY

    def _failed(self, why: str):
        """535 after a growing delay; 421 (the machine closes) once the address is blocked."""
        failures, address = self.authenticator.failures, self.info.client_address
        failures.record(address)
        log.warn(
            "auth failed mechanism={mechanism} client=[{client}]: {why}",
            mechanism=self.mechanism,
            client=address,
            why=why,
        )
        if failures.blocked(address):
            return TOO_MANY_FAILURES
        delay = failures.delay(address)
        if not delay:
            return INVALID
        return task.deferLater(self.authenticator.clock, delay, lambda: INVALID)

"""Opening an SMTP client session: STARTTLS and AUTH between EHLO and the first message.

``SessionSecurity`` says what a session does before it carries mail;
``SessionOpener`` does it, pure logic over a
``mailsvc.smtp.client.ClientConnection`` (the caller owns the transport and
switches it to TLS); ``OpeningFailed`` says why a session could not be
opened as asked.

Between EHLO and the first message, ``SessionOpener`` takes the session
through STARTTLS (rfc3207; the handshake with ``tls_options``, then EHLO
again, everything said before forgotten, rfc3207 4.2) and AUTH PLAIN or
LOGIN (rfc4954, rfc4616), as a ``SessionSecurity`` says. The relay agent
(through ``mailsvc.clientprotocol.SMTPClientProtocol``) and ``mailsvc turn``
(``mailsvc.callin``) both open their sessions with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from mailsvc.smtp import client_events as ev
from mailsvc.smtp.client import ClientConnection
from mailsvc.smtp.replies import Reply

TLS_POLICIES = ("none", "opportunistic", "required")


@dataclass(frozen=True)
class SessionSecurity:
    """What a session does between EHLO and its first message.

    ``tls``: ``"none"`` (never STARTTLS), ``"opportunistic"`` (STARTTLS when
    offered; not offered or refused, the session goes on in clear) or
    ``"required"`` (it must be offered and succeed). ``tls_options``: the
    ``IOpenSSLClientConnectionCreator`` for the handshake
    (``mailsvc.tls.ClientTLSContext``: whether and how the certificate is
    checked is its business). ``username`` and ``password``: AUTH PLAIN, or
    LOGIN when only that is offered (rfc4954), after TLS; never in clear
    text unless ``auth_without_tls``.
    """

    tls: str = "none"
    tls_options: object = None
    username: str = ""
    password: str = field(default="", repr=False)
    auth_without_tls: bool = False

    def __post_init__(self) -> None:
        if self.tls not in TLS_POLICIES:
            raise ValueError(f"tls must be one of {', '.join(TLS_POLICIES)}, not {self.tls!r}")
        if self.tls != "none" and self.tls_options is None:
            raise ValueError("STARTTLS needs tls_options")
        if self.username and not self.password:
            raise ValueError("AUTH needs a password")

    def without_tls(self) -> SessionSecurity:
        """The same without STARTTLS (after a failed opportunistic handshake)."""
        return dataclasses.replace(self, tls="none", tls_options=None)


class OpeningFailed(Exception):
    """STARTTLS or AUTH did not go as the ``SessionSecurity`` demands.

    ``kind``: ``"no-starttls"`` (required, not offered), ``"starttls-refused"``
    (required, refused), ``"auth-needs-tls"`` (no TLS, and the password is
    not sent in clear), ``"no-auth"`` (neither PLAIN nor LOGIN offered),
    ``"auth-refused"``. ``reply`` is the peer's reply that caused it, if any.
    """

    TLS_KINDS = frozenset({"no-starttls", "starttls-refused", "auth-needs-tls"})

    def __init__(self, kind: str, reason: str, reply: Reply | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.reply = reply

    @property
    def tls(self) -> bool:
        """True when it is for want of TLS."""
        return self.kind in self.TLS_KINDS


OPEN = "open"  # SessionOpener: the session may carry mail now
WAIT = "wait"  # SessionOpener: a step is under way; more events to come


class SessionOpener:
    """Takes a client machine from its first ``Ready`` to a session ready
    for mail: STARTTLS, then AUTH, as ``security`` says.

    Pure logic over the machine: ``start_tls(options)`` is the caller's
    (it switches its transport: ``ITLSTransport.startTLS``). Feed it every
    event of ``OPENING_EVENTS``; ``handle`` says ``OPEN`` or ``WAIT``, or
    raises ``OpeningFailed``.

    - rfc3207 4: STARTTLS when offered and ``tls`` is not ``"none"``; after
      the 220 the transport switches and the machine forgets everything it
      knew and says EHLO again (4.2), whose ``Ready`` comes back here.
    - rfc4954 4: AUTH PLAIN with an initial response (rfc4616), else LOGIN;
      only over TLS unless ``auth_without_tls`` (PLAIN and LOGIN send the
      password itself).
    """

    OPENING_EVENTS = (ev.Ready, ev.TLSReady, ev.TLSRefused, ev.AuthSucceeded, ev.AuthFailed)

    def __init__(self, machine: ClientConnection, security: SessionSecurity, start_tls: Callable[[object], None]) -> None:
        self.machine = machine
        self.security = security
        self._start_tls = start_tls
        self.authenticated = False
        self.mechanism = ""  # the AUTH mechanism used
        self._tls_refused = False

    def handle(self, event: ev.ClientEvent) -> str:
        """Take one of ``OPENING_EVENTS``: ``WAIT`` or ``OPEN``.

        :raise OpeningFailed: the session cannot be opened as asked.
        """
        security = self.security
        if isinstance(event, ev.TLSReady):
            self._start_tls(security.tls_options)
            self.machine.tls_started()  # rfc3207 4.2: forget what came before; EHLO again
            return WAIT
        if isinstance(event, ev.TLSRefused):
            if security.tls == "required":
                raise OpeningFailed("starttls-refused", f"STARTTLS refused: {event.reply}", event.reply)
            self._tls_refused = True  # opportunistic: go on in clear
            return self._next()
        if isinstance(event, ev.AuthSucceeded):
            self.authenticated = True
            return OPEN
        if isinstance(event, ev.AuthFailed):
            raise OpeningFailed(
                "auth-refused", f"AUTH {self.mechanism} as {security.username} refused: {event.reply}", event.reply
            )
        return self._next()

    def _next(self) -> str:
        machine, security = self.machine, self.security
        offered = machine.extensions
        if security.tls != "none" and not machine.tls_active and not self._tls_refused and "STARTTLS" in offered:
            machine.start_tls()
            return WAIT
        if security.tls == "required" and not machine.tls_active:
            raise OpeningFailed("no-starttls", "STARTTLS not offered")
        if security.username and not self.authenticated:
            if not machine.tls_active and not security.auth_without_tls:
                raise OpeningFailed("auth-needs-tls", "no TLS, and the AUTH password is not sent in clear text")
            mechanisms = offered.get("AUTH", "").upper().split()
            if "PLAIN" in mechanisms:
                self.mechanism = "PLAIN"
                machine.auth_plain(security.username, security.password)
            elif "LOGIN" in mechanisms:
                self.mechanism = "LOGIN"
                machine.auth_login(security.username, security.password)
            else:
                raise OpeningFailed("no-auth", f"AUTH PLAIN or LOGIN not offered (AUTH: {' '.join(mechanisms) or 'none'})")
            return WAIT
        return OPEN

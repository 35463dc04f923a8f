"""The POP3 factory and listeners of ``[pop3]`` (STLS and implicit TLS)."""

from __future__ import annotations

from collections.abc import Callable

from twisted.cred.portal import Portal
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailsvc.auth import Authenticator
from mailsvc.errors import ConfigError
from mailsvc.interfaces import IMailboxAccess
from mailsvc.limits import ClientConnections
from mailsvc.listeners import Listener, authenticator, tls_context
from mailsvc.pop3.mailbox import MailboxRealm
from mailsvc.pop3.replies import TOO_MANY_CONNECTIONS, TOO_MANY_FROM_CLIENT
from mailsvc.pop3.server import POP3Server

log = Logger(namespace="mailsvc.pop3")


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
    for i, description in enumerate(settings.listen):
        services.append(Listener(reactor, description, stls, f"[pop3] listen[{i}]"))
    implicit = POP3Factory(auth, implicit_tls=True, **common)
    for i, description in enumerate(settings.listen_implicit_tls):
        wrapped = TLSMemoryBIOFactory(context, False, implicit)  # rfc8314 3.3: TLS first
        services.append(Listener(reactor, description, wrapped, f"[pop3] listen_implicit_tls[{i}]"))
    return services

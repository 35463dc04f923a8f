"""How a relay session is secured: the ``SessionSecurity`` (STARTTLS and AUTH)
a connection is opened with.

An MX host gets ``opportunistic_security``: STARTTLS when offered, any
certificate. A ``[[relay.route]]`` or the smarthost gets what its
configuration says, made by ``RouteSecurities``: its TLS policy, the names its
certificate must carry and the CA file to check it against, and its
username with the password read from ``password_file``. The policy itself,
and what happens when a session cannot meet it, is told in the docstring of
``mailsvc.delivery.relay`` ("TLS and AUTH").
"""

from __future__ import annotations

from collections.abc import Callable

from mailsvc.clientsession import SessionSecurity
from mailsvc.errors import TemporaryDeliveryError
from mailsvc.tls import ClientTLSContext, TLSError


def opportunistic_security(name: str) -> SessionSecurity:
    """STARTTLS when offered, any certificate (an MX host: rfc3207 4.1 leaves
    the check to local policy; MTA-STS and DANE are not done)."""
    return SessionSecurity(tls="opportunistic", tls_options=ClientTLSContext((name,), verify=False))


def read_password(path) -> str:
    """The first line of the password file (blocking).

    :raise ValueError: it is empty.
    """
    with open(path, encoding="utf-8") as f:
        password = f.readline().rstrip("\r\n")
    if not password:
        raise ValueError(f"{path} is empty")
    return password


class RouteSecurities:
    """The ``SessionSecurity`` of each route (a ``RouteConfig``, or the
    smarthost's), made when first needed and kept while it cannot change.

    :param run_blocking: ``run_blocking(f, *args) -> Deferred`` for reading
        a password file (production: a thread pool).
    """

    def __init__(self, run_blocking: Callable) -> None:
        self._blocking = run_blocking
        self._checked_tls: dict = {}  # (names, ca_file) -> ClientTLSContext, built once
        self._route_securities: dict = {}  # RouteConfig without AUTH -> its SessionSecurity

    async def security_for(self, route) -> SessionSecurity:
        """STARTTLS and AUTH for ``route``.

        :raise TemporaryDeliveryError: the password file or CA file cannot be used.
        """
        # Nothing changes in a route's security between messages but a
        # password, read again for each message: without one it is made once.
        security = self._route_securities.get(route)
        if security is None:
            security = await self._route_security(route)
            if not route.username:
                self._route_securities[route] = security
        return security

    async def _route_security(self, route) -> SessionSecurity:
        """STARTTLS and AUTH for a route (or the smarthost), its password read now.

        :raise TemporaryDeliveryError: the password file or CA file cannot be used.
        """
        password = ""
        if route.username:
            try:
                password = await self._blocking(read_password, route.password_file)
            except (OSError, ValueError) as e:
                # rfc3463 3.4: X.3.5 system incorrectly configured.
                raise TemporaryDeliveryError(f"cannot read the password for {route.host}: {e}", "4.3.5") from None
        if route.tls == "none":
            options = None
        elif route.tls == "opportunistic":
            options = ClientTLSContext((route.host,), verify=False)
        else:
            # rfc7817 3: the host the connection is opened to, and (for a
            # per-domain route) the domain of the recipients.
            names = (route.host,) if route.domain == "*" else (route.host, route.domain)
            ca_file = route.ca_file
            options = self._checked_tls.get((names, ca_file))
            if options is None:
                try:
                    options = ClientTLSContext(names, verify=True, ca_file=ca_file)
                except TLSError as e:
                    raise TemporaryDeliveryError(f"TLS to {route.host}: cannot use the CA file: {e}", "4.7.5") from None
                self._checked_tls[(names, ca_file)] = options
        return SessionSecurity(
            tls=route.tls,
            tls_options=options,
            username=route.username,
            password=password,
            auth_without_tls=route.tls == "none",  # said explicitly in the config
        )

"""The ``[pop3]`` config table: mailbox access over POP3 (``mailsvc.pop3``).

``read_pop3`` takes the ``mailsvc.configtable.Table`` being read and returns a
frozen ``POP3Config``; ``mailsvc.config`` calls it. Every key and its
default is documented in ``etc/mailsvc.toml``. With no key at all POP3 is
off: both endpoint lists are empty by default (``make run``'s config turns
it on, on 127.0.0.1:2110 and 2995).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class POP3Config:
    """``[pop3]``: listeners (rfc1939, rfc2595 STLS, rfc8314 implicit TLS) and limits."""

    listen: tuple[str, ...] = ()
    listen_implicit_tls: tuple[str, ...] = ()
    # None: follow [auth] allow_plaintext_without_tls.
    allow_plaintext_without_tls: bool | None = None
    idle_timeout: float = 600  # rfc1939 3: an autologout timer of at least 10 minutes
    max_connections: int = 100
    max_connections_per_client: int = 10  # 0 = no limit

    @property
    def enabled(self) -> bool:
        """Whether any POP3 listener is configured."""
        return bool(self.listen or self.listen_implicit_tls)

    def plaintext_allowed(self, auth) -> bool:
        """USER/PASS and SASL PLAIN/LOGIN before TLS: this table's key, else ``[auth]``'s."""
        if self.allow_plaintext_without_tls is not None:
            return self.allow_plaintext_without_tls
        return auth.allow_plaintext_without_tls


def read_pop3(t) -> POP3Config:
    """``[pop3]``."""
    default = POP3Config()
    endpoints = {
        "listen": t.endpoints("listen", default.listen),
        "listen_implicit_tls": t.endpoints("listen_implicit_tls", default.listen_implicit_tls, "tcp:995"),
    }
    plaintext = None
    if "allow_plaintext_without_tls" in t.data:
        plaintext = t.boolean("allow_plaintext_without_tls", False)
    idle = t.seconds("idle_timeout", default.idle_timeout)
    if idle < 600:
        t.fail("idle_timeout", f"rfc1939 3 wants at least 600 seconds (10 minutes), got {idle!r}")
    return POP3Config(
        listen=endpoints["listen"],
        listen_implicit_tls=endpoints["listen_implicit_tls"],
        allow_plaintext_without_tls=plaintext,
        idle_timeout=idle,
        max_connections=t.integer("max_connections", default.max_connections),
        max_connections_per_client=t.integer(
            "max_connections_per_client", default.max_connections_per_client, minimum=0
        ),
    )

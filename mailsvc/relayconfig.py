"""The ``[relay]`` table with its ``[[relay.route]]`` routes, and ``[[uucp.site]]``:
how mail for other domains leaves (``mailsvc.delivery.relay``,
``mailsvc.delivery.uucp``). Read with ``mailsvc.configtable.Table``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from mailsvc.configtable import Table, checkDomain, show

TLS_MODES = ("none", "opportunistic", "required")


@dataclass(frozen=True)
class RouteConfig:
    """A fixed next hop: ``[relay] smarthost`` or one ``[[relay.route]]``.

    ``domain`` is the recipient domain it serves (``"*"`` for the smarthost).
    ``tls``: ``none``, ``opportunistic`` (STARTTLS when offered) or
    ``required``. ``username``/``password_file``: AUTH to that host.
    ``ca_file``: the CAs (PEM) a ``required`` host's certificate must lead
    to; ``None``: the system's.
    """

    domain: str
    host: str
    port: int = 25
    tls: str = "opportunistic"
    username: str = ""
    password_file: Path | None = None
    ca_file: Path | None = None


@dataclass(frozen=True)
class RelayConfig:
    """``[relay]``: how mail for other domains leaves (rfc5321 5.1, 4.5.3.2, 6.3)."""

    smarthost: RouteConfig | None = None
    routes: tuple[RouteConfig, ...] = ()
    resolver: str = ""  # "host:port" of a DNS server; "" = the system's
    port: int = 25  # the port MX hosts are contacted on
    helo_name: str = ""  # "" = [server] hostname
    max_received_headers: int = 100
    connect_timeout: float = 30
    greeting_timeout: float = 300
    mail_timeout: float = 300
    rcpt_timeout: float = 300
    data_init_timeout: float = 120
    data_block_timeout: float = 180
    data_end_timeout: float = 600
    max_messages_per_connection: int = 100
    max_connections_per_destination: int = 5
    max_connections: int = 50
    delay_warning_after: float = 14400  # 0 = no delay warnings

    def route_for(self, domain: str) -> RouteConfig | None:
        """The fixed route for ``domain``: a per-domain route, else the smarthost, else None (MX)."""
        for route in self.routes:
            if route.domain == domain:
                return route
        return self.smarthost


@dataclass(frozen=True)
class UucpSiteConfig:
    """One ``[[uucp.site]]``: a site reached by UUCP, its domains, and how batches leave.

    Mail for ``domains`` is spooled under hop ``uucp.<name>`` and handed, as
    BSMTP batches (rfc2442) of at most ``max_messages`` messages and
    ``max_bytes`` octets, on standard input to ``command``
    (``{site}`` in it is replaced by ``name``).
    """

    name: str
    domains: tuple[str, ...]
    command: tuple[str, ...] = ("uux", "-r", "-z", "-", "{site}!rsmtp")
    max_messages: int = 100
    max_bytes: int = 1048576

    @property
    def hop(self) -> str:
        """The spool hop of this site's mail."""
        return f"uucp.{self.name}"


RELAY_KEYS = tuple(k for k in RelayConfig.__dataclass_fields__ if k != "routes") + (
    "route",
    "tls",
    "username",
    "password_file",
    "ca_file",
)
_ROUTE_KEYS = ("domain", "host", "port", "tls", "username", "password_file", "ca_file")


def _hostPort(t: Table, key: str, text: str, defaultPort: int) -> tuple[str, int]:
    """``host`` or ``host:port`` (``[v6addr]:port`` for IPv6 literals)."""
    host, port = text, defaultPort
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                t.fail(key, f"expected host or host:port, got {show(text)}")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, portText = text.partition(":")
        if not portText.isdigit():
            t.fail(key, f"expected host or host:port, got {show(text)}")
        port = int(portText)
    if not host or not 0 < port < 65536:
        t.fail(key, f"expected host or host:port, got {show(text)}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if checkDomain(host) is None:
            t.fail(key, f"not a valid host name: {show(host)}")
        host = checkDomain(host)
    return host, port


def _readCAFile(t: Table, base: Path) -> Path:
    """``ca_file``: a PEM file holding at least one certificate."""
    path, text = t.text("ca_file", base)
    if "-----BEGIN CERTIFICATE-----" not in text:
        t.fail("ca_file", f"{path}: no PEM certificate in it")
    return path


def _readRoute(
    t: Table, domain: str, hostText: str, base: Path, defaultPort: int, defaultCA: Path | None = None
) -> RouteConfig:
    """The host, TLS and AUTH settings of one route (the smarthost or a [[relay.route]])."""
    host, port = _hostPort(t, "host" if "host" in t.data else "smarthost", hostText, defaultPort)
    if "port" in t.data:
        port = t.integer("port", port)
        if port > 65535:
            t.fail("port", f"out of range: {port}")
    tls = t.data.get("tls", "opportunistic")
    if tls not in TLS_MODES:
        t.fail("tls", f"must be one of {', '.join(TLS_MODES)}; got {show(tls)}")
    username = t.data.get("username", "")
    if not isinstance(username, str):
        t.fail("username", f"expected a string, got {show(username)}")
    passwordFile = None
    if "password_file" in t.data:
        passwordFile, _ = t.text("password_file", base)
    if username and passwordFile is None:
        t.fail("password_file", "needed with username (AUTH to the relay host)")
    caFile = _readCAFile(t, base) if "ca_file" in t.data else defaultCA
    return RouteConfig(
        domain=domain, host=host, port=port, tls=tls, username=username, password_file=passwordFile, ca_file=caFile
    )


def read_relay(fileName: str, t: Table, base: Path) -> RelayConfig:
    """``[relay]`` and its ``[[relay.route]]`` tables."""
    default = RelayConfig()
    port = t.integer("port", default.port)
    if port > 65535:
        t.fail("port", f"out of range: {port}")
    if t.data.get("tls", "opportunistic") not in TLS_MODES:
        t.fail("tls", f"must be one of {', '.join(TLS_MODES)}; got {show(t.data['tls'])}")
    # [relay] ca_file: the smarthost's, and every route's that names none.
    defaultCA = _readCAFile(t, base) if "ca_file" in t.data else None
    smarthost = None
    text = t.data.get("smarthost", "")
    if not isinstance(text, str):
        t.fail("smarthost", f"expected a string, got {show(text)}")
    if text:
        smarthost = _readRoute(t, "*", text, base, 25)
    resolver = t.data.get("resolver", "")
    if not isinstance(resolver, str):
        t.fail("resolver", f"expected a string, got {show(resolver)}")
    if resolver:
        host, rport = _hostPort(t, "resolver", resolver, 53)
        resolver = f"{host}:{rport}"
    helo = t.data.get("helo_name", "")
    if helo and (not isinstance(helo, str) or checkDomain(helo) is None):
        t.fail("helo_name", f"not a valid host name: {show(helo)}")
    entries = t.data.get("route", [])
    if not isinstance(entries, list):
        t.fail("route", f"expected [[relay.route]] tables, got {show(entries)}")
    routes = []
    for index, entry in enumerate(entries):
        rt = Table(fileName, f"[[relay.route]][{index}]", entry, _ROUTE_KEYS)
        domain = checkDomain(rt.string("domain", ""))
        if domain is None:
            rt.fail("domain", f"not a valid domain name: {show(entry.get('domain'))}")
        if any(r.domain == domain for r in routes):
            rt.fail("domain", f"{domain} has two routes")
        routes.append(_readRoute(rt, domain, rt.string("host", ""), base, 25, defaultCA))
    seconds = {
        key: t.seconds(key, getattr(default, key))
        for key in RelayConfig.__dataclass_fields__
        if key.endswith("_timeout")
    }
    warning = t.data.get("delay_warning_after", default.delay_warning_after)
    if isinstance(warning, bool) or not isinstance(warning, (int, float)) or warning < 0:
        t.fail("delay_warning_after", f"expected a number of seconds (0 = off), got {show(warning)}")
    return RelayConfig(
        smarthost=smarthost,
        routes=tuple(routes),
        resolver=resolver,
        port=port,
        helo_name=helo.lower() if helo else "",
        max_received_headers=t.integer("max_received_headers", default.max_received_headers),
        max_messages_per_connection=t.integer("max_messages_per_connection", default.max_messages_per_connection),
        max_connections_per_destination=t.integer(
            "max_connections_per_destination", default.max_connections_per_destination
        ),
        max_connections=t.integer("max_connections", default.max_connections),
        delay_warning_after=warning,
        **seconds,
    )




def read_uucp(fileName: str, t: Table) -> tuple[UucpSiteConfig, ...]:
    """``[[uucp.site]]`` tables."""
    entries = t.data.get("site", [])
    if not isinstance(entries, list):
        t.fail("site", f"expected [[uucp.site]] tables, got {show(entries)}")
    sites: list[UucpSiteConfig] = []
    names: set[str] = set()
    claimed: dict[str, str] = {}
    default = UucpSiteConfig(name="", domains=())
    for index, entry in enumerate(entries):
        st = Table(fileName, f"[[uucp.site]][{index}]", entry, tuple(UucpSiteConfig.__dataclass_fields__))
        name = st.site_name(names, "UUCP site")
        domains = st.domains("domains", claimed, f"site {name}")
        if not domains:
            st.fail("domains", "at least one domain is needed")
        command = st.strings("command", list(default.command))
        if not command:
            st.fail("command", "expected the command to run, as an array of strings")
        sites.append(
            UucpSiteConfig(
                name=name,
                domains=domains,
                command=command,
                max_messages=st.integer("max_messages", default.max_messages),
                max_bytes=st.integer("max_bytes", default.max_bytes),
            )
        )
    return tuple(sites)

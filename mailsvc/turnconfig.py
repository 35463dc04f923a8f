"""The config of the turn-around roles: ``[[hold.site]]``, ``[atrn]``, ``[[callin]]``.

Read by ``mailsvc.config`` (as ``securityconfig`` is), kept apart so that
config.py stays small. See etc/mailsvc.toml for every key.

- ``[[hold.site]]``: a site connected now and then. Mail for its
  ``domains`` is accepted from anyone (we are their MX) and kept under the
  spool hop ``hold.<name>`` until the site calls in: TURN or ATRN by one of
  its ``users`` (AUTH login names), or ETRN when a ``[[relay.route]]`` says
  where the site is reachable.
- ``[atrn]``: the On-Demand Mail Relay listeners (rfc2645, port 366).
- ``[[callin]]``: the customer's side: call a provider in with ATRN or TURN
  on a schedule (``mailsvc.callinservice``), as ``mailsvc turn`` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mailsvc.configtable import Table, show
from mailsvc.errors import ConfigError



@dataclass(frozen=True)
class HoldSiteConfig:
    """One ``[[hold.site]]``: a site whose mail is held until it calls in."""

    name: str
    domains: tuple[str, ...]
    users: tuple[str, ...]  # AUTH login names that own these domains (DESIGN rule 4)

    @property
    def hop(self) -> str:
        """The spool hop of this site's mail."""
        return f"hold.{self.name}"


@dataclass(frozen=True)
class ATRNConfig:
    """``[atrn]``: the ODMR listeners (rfc2645 4: port 366 in production).

    They are started only when at least one ``[[hold.site]]`` exists.
    ``challenge_auth_without_tls``: offer CRAM-MD5 and SCRAM-SHA-256 (which
    never send the password) before STARTTLS, as ODMR clients such as
    fetchmail need; PLAIN and LOGIN still wait for TLS.
    """

    listen: tuple[str, ...] = ("tcp:2366:interface=127.0.0.1",)
    challenge_auth_without_tls: bool = True


def read_hold(table, claimed: Mapping[str, str]) -> tuple[HoldSiteConfig, ...]:
    """``[[hold.site]]`` tables. ``table`` is the ``[hold]`` table reader of
    ``mailsvc.config``; ``claimed`` maps domains already given elsewhere
    (local, UUCP sites) to who has them."""

    entries = table.data.get("site", [])
    if not isinstance(entries, list):
        table.fail("site", f"expected [[hold.site]] tables, got {show(entries)}")
    sites: list[HoldSiteConfig] = []
    names: set[str] = set()
    taken = dict(claimed)
    for index, entry in enumerate(entries):
        st = Table(table.fileName, f"[[hold.site]][{index}]", entry, tuple(HoldSiteConfig.__dataclass_fields__))
        name = st.site_name(names)
        domains = st.domains("domains", taken, f"hold site {name}")
        if not domains:
            st.fail("domains", "at least one domain is needed")
        users = []
        for u, text in enumerate(st.strings("users", [])):
            user = text.strip().lower()
            if not user or any(c.isspace() for c in user):
                st.fail(f"users[{u}]", f"not a login name: {show(text)}")
            users.append(user)
        if not users:
            st.fail("users", "at least one AUTH user who owns these domains is needed (TURN and ATRN need AUTH)")
        sites.append(HoldSiteConfig(name=name, domains=domains, users=tuple(users)))
    return tuple(sites)


def read_atrn(table) -> ATRNConfig:
    """``[atrn]``."""
    default = ATRNConfig()
    return ATRNConfig(
        listen=table.endpoints("listen", default.listen),
        challenge_auth_without_tls=table.boolean("challenge_auth_without_tls", default.challenge_auth_without_tls),
    )



CALLIN_MODES = ("atrn", "turn")
CALLIN_TLS = ("required", "opportunistic", "none")
CALLIN_PORTS = {"atrn": 366, "turn": 25}  # rfc2645 4; rfc5321 4.5.4.2


@dataclass(frozen=True)
class CallInConfig:
    """One ``[[callin]]``: call a provider in (``mailsvc turn``) every ``interval`` seconds.

    ``tls``: ``"required"`` (STARTTLS must be offered; the certificate is
    checked against ``ca_file`` or the system's CAs, for ``tls_name`` or
    ``host``), ``"opportunistic"`` (STARTTLS when offered, the certificate
    checked only against ``ca_file`` when given; not offered, the password
    goes in clear) or ``"none"`` (never STARTTLS: a trusted link).
    """

    host: str
    port: int
    user: str
    password_file: Path
    mode: str = "atrn"
    domains: tuple[str, ...] = ()  # ATRN only; empty: every domain of the login
    interval: float = 900
    tls: str = "required"
    ca_file: Path | None = None
    tls_name: str | None = None

    @property
    def command(self) -> str:
        """The SMTP verb: ATRN or TURN."""
        return self.mode.upper()


_CALLIN_KEYS = ("host", "mode", "user", "password_file", "domains", "interval", "tls", "ca_file", "tls_name")


def _split_host(text: str) -> tuple[str, int | None] | None:
    """``host``, ``host:port`` or ``[v6]:port``; None if malformed."""
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, None
    if not host or any(c.isspace() for c in host):
        return None
    if port is None:
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def read_callins(fileName: str, entries: object, base: Path) -> tuple[CallInConfig, ...]:
    """``[[callin]]`` tables, in order (relative paths taken from ``base``)."""

    if not isinstance(entries, list):
        raise ConfigError(f"{fileName}: [[callin]]: expected an array of tables, got {show(entries)}")
    callins: list[CallInConfig] = []
    for index, entry in enumerate(entries):
        t = Table(fileName, f"[[callin]][{index}]", entry, _CALLIN_KEYS)
        mode = t.data.get("mode", "atrn")
        if mode not in CALLIN_MODES:
            t.fail("mode", f"must be one of {', '.join(CALLIN_MODES)}; got {show(mode)}")
        if "host" not in t.data:
            t.fail("host", "missing: the provider, as host or host:port")
        text = t.string("host", "")
        split = _split_host(text)
        if split is None:
            t.fail("host", f"expected host or host:port, got {show(text)}")
        host, port = split
        if "user" not in t.data:
            t.fail("user", "missing: our AUTH login at the provider")
        user = t.string("user", "")
        if "password_file" not in t.data:
            t.fail("password_file", "missing: a file holding the password (first line)")
        password_file = t.path("password_file", "", base)
        if not password_file.is_file():
            t.fail("password_file", f"file not found: {password_file}")
        domains = t.domains("domains")
        if domains and mode == "turn":
            t.fail("domains", "for ATRN only (TURN takes no argument)")
        tls = t.data.get("tls", "required")
        if tls not in CALLIN_TLS:
            t.fail("tls", f"must be one of {', '.join(CALLIN_TLS)}; got {show(tls)}")
        ca_file = None
        if "ca_file" in t.data:
            ca_file = t.path("ca_file", "", base)
            if not ca_file.is_file():
                t.fail("ca_file", f"file not found: {ca_file}")
        callins.append(CallInConfig(
            host=host,
            port=port if port is not None else CALLIN_PORTS[mode],
            user=user,
            password_file=password_file,
            mode=mode,
            domains=tuple(domains),
            interval=t.seconds("interval", 900),
            tls=tls,
            ca_file=ca_file,
            tls_name=t.string("tls_name", "") if "tls_name" in t.data else None,
        ))
    return tuple(callins)

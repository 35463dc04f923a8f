"""The configuration: ``etc/mailsvc.toml`` read into frozen, checked values.

``load(path)`` reads the file with ``tomllib`` and returns a ``Config``.
Every key has the default written in ``etc/mailsvc.toml``, so an empty file
is a valid configuration. Anything wrong raises ``ConfigError`` with one line
that names the file, the key and the problem, e.g.
``mailsvc.toml: [smtp] max_recipients: expected a positive integer, got "ten"``.
Relative paths are taken from ``base_dir``.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from mailsvc import aliases as aliasfiles
from mailsvc.errors import ConfigError
from mailsvc.pop3config import POP3Config, read_pop3
from mailsvc.securityconfig import AuthConfig, SubmissionConfig, TLSConfig, read_auth, read_submission, read_tls
from mailsvc.turnconfig import ATRNConfig, HoldSiteConfig, read_atrn, read_hold

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

VRFY_MODES = ("directory", "always-252", "off")

# rfc1035 2.3.1 / rfc1123 2.1: letters, digits, hyphens; labels of at most
# 63 octets, at most 253 in all (without the trailing dot).
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")


@dataclass(frozen=True)
class ServerConfig:
    """``[server]``: our host name and the spool directory."""

    hostname: str = "mail.example.test"
    spool_dir: Path = Path("var/spool")
    control_socket: Path = Path("var/run/mailsvc.sock")


@dataclass(frozen=True)
class SMTPConfig:
    """``[smtp]``: listening endpoints, limits, timeouts, VRFY/EXPN, trusted networks."""

    listen: tuple[str, ...] = ("tcp:2525:interface=127.0.0.1",)
    max_message_size: int = 26214400
    max_recipients: int = 100
    max_connections: int = 100
    command_timeout: float = 300
    data_timeout: float = 180
    vrfy: str = "directory"
    expn: bool = False
    trusted_networks: tuple[IPNetwork, ...] = ()
    starttls: bool = True  # rfc3207 on the MX listeners
    auth: bool = False  # rfc4954 on the MX listeners too (submission always has it)
    max_connections_per_client: int = 20  # 0 = no limit
    max_errors: int = 10  # bad commands before 421 and close; 0 = no limit


@dataclass(frozen=True)
class LocalConfig:
    """``[local]``: local domains, users (name to full name), aliases (name to members).

    ``users`` merges ``users`` and ``users_file``; ``aliases`` merges
    ``aliases`` and ``aliases_file``, each member reduced to a local name.
    """

    domains: tuple[str, ...]
    users: Mapping[str, str]
    aliases: Mapping[str, tuple[str, ...]]
    directory: str = "config"


@dataclass(frozen=True)
class StoreConfig:
    """``[store]``: the store plugin name and its options (``path`` absolute)."""

    type: str
    options: Mapping[str, object]


@dataclass(frozen=True)
class DeliveryConfig:
    """``[delivery]``: spool scan interval, retry schedule, concurrency (seconds, count)."""

    scan_interval: float = 60
    retry_first: float = 300
    retry_max: float = 3600
    give_up_after: float = 432000
    concurrency: int = 20


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


@dataclass(frozen=True)
class PolicyConfig:
    """One ``[[policy]]`` table: the plugin ``name`` and the other keys as ``options``."""

    name: str
    options: Mapping[str, object]


@dataclass(frozen=True)
class Config:
    """The whole configuration, as read from the file at ``path``."""

    path: Path
    base_dir: Path
    server: ServerConfig
    smtp: SMTPConfig
    local: LocalConfig
    store: StoreConfig
    delivery: DeliveryConfig
    policies: tuple[PolicyConfig, ...] = ()
    relay: RelayConfig = RelayConfig()
    uucp_sites: tuple[UucpSiteConfig, ...] = ()
    tls: TLSConfig = TLSConfig()
    auth: AuthConfig = AuthConfig()
    submission: SubmissionConfig = SubmissionConfig()
    pop3: POP3Config = POP3Config()  # [pop3] (mailsvc.pop3config)
    hold_sites: tuple[HoldSiteConfig, ...] = ()  # [[hold.site]] (mailsvc.turnconfig)
    atrn: ATRNConfig = ATRNConfig()  # [atrn]


def load(path: str | os.PathLike) -> Config:
    """Read and check the configuration file at ``path``.

    :raise ConfigError: the file cannot be read, is not TOML, or a key is wrong.
    """
    path = Path(os.path.abspath(path))
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path.name}: not UTF-8 text (at octet {e.start})") from None
    return loads(text, path)


def loads(text: str, path: str | os.PathLike) -> Config:
    """Check configuration ``text`` as if read from the file at ``path``.

    ``path`` gives the default ``base_dir`` and the name in error messages.
    """
    path = Path(os.path.abspath(path))
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path.name}: not valid TOML: {e}") from None
    return _read(data, path)


def checkDomain(name: str) -> str | None:
    """``name`` lower-cased without a trailing dot if it is a sane domain name, else None."""
    if not isinstance(name, str):
        return None
    domain = name.lower().removesuffix(".")
    if len(domain) > 253 or not _DOMAIN.match(domain):
        return None
    return domain


# ---------------------------------------------------------------- reading

_TABLES = ("server", "smtp", "local", "store", "delivery", "policy", "relay", "uucp", "tls", "auth", "submission", "hold", "atrn", "pop3")
_NO_REACTOR = object()  # parsing an endpoint string only stores the reactor
_DEFAULT_ALIASES = {"postmaster": ["alice"], "team": ["alice", "bob"]}


def _show(value: object) -> str:
    """A TOML value as an error message shows it: strings quoted, arrays named."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _resolve(base: Path, value: str) -> Path:
    """``value`` as an absolute path, relative ones taken from ``base``."""
    return Path(os.path.normpath(base / value))


class _Table:
    """One TOML table being read: typed getters that fail naming the key."""

    def __init__(self, fileName: str, title: str, data: object, allowed: tuple[str, ...] | None) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{fileName}: {title}: expected a table, got {_show(data)}")
        self.fileName, self.title, self.data = fileName, title, data
        for key in data if allowed is not None else ():
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, 1)
                self.fail(key, "unknown key" + (f" (did you mean {close[0]}?)" if close else ""))

    def fail(self, key: str, problem: str):
        """Stop with ``<file>: <table> <key>: <problem>``."""
        raise ConfigError(f"{self.fileName}: {self.title} {key}: {problem}")

    def string(self, key: str, default: str) -> str:
        """A non-empty string."""
        value = self.data.get(key, default)
        if not isinstance(value, str) or not value:
            self.fail(key, f"expected a non-empty string, got {_show(value)}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        """true or false."""
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {_show(value)}")
        return value

    def integer(self, key: str, default: int, minimum: int = 1) -> int:
        """An integer (not a bool) at least ``minimum``."""
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            self.fail(key, f"expected {wanted}, got {_show(value)}")
        return value

    def seconds(self, key: str, default: float) -> float:
        """A positive, finite number of seconds (integer or float)."""
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            self.fail(key, f"expected a positive number of seconds, got {_show(value)}")
        return value

    def strings(self, key: str, default: list[str]) -> tuple[str, ...]:
        """An array of strings; a bad element is named ``key[i]``."""
        value = self.data.get(key, default)
        if not isinstance(value, list):
            self.fail(key, f"expected an array of strings, got {_show(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, str):
                self.fail(f"{key}[{index}]", f"expected a string, got {_show(item)}")
        return tuple(value)

    def path(self, key: str, default: str, base: Path) -> Path:
        """A path string, made absolute against ``base``."""
        return _resolve(base, self.string(key, default))

    def text(self, key: str, base: Path) -> tuple[Path, str]:
        """The path named by ``key`` and the UTF-8 text of that file."""
        path = self.path(key, "", base)
        try:
            return path, path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            self.fail(key, f"file not found: {path}")
        except OSError as e:
            self.fail(key, f"cannot read {path}: {e.strerror}")
        except UnicodeDecodeError:
            self.fail(key, f"{path}: not UTF-8 text")


def _read(data: dict, path: Path) -> Config:
    """Build a ``Config`` from parsed TOML ``data`` of the file at ``path``."""
    fileName = path.name
    for key, value in data.items():
        if key not in _TABLES:
            if isinstance(value, dict):
                raise ConfigError(f"{fileName}: [{key}]: unknown table")
            close = difflib.get_close_matches(key, _TABLES, 1)
            hint = f" (did you mean [{close[0]}]?)" if close else ""
            raise ConfigError(f"{fileName}: {key}: unknown key{hint}")

    def table(name: str, allowed: tuple[str, ...] | None) -> _Table:
        return _Table(fileName, f"[{name}]", data.get(name, {}), allowed)

    server = table("server", ("hostname", "base_dir", "spool_dir", "control_socket"))
    base = path.parent.parent
    if "base_dir" in server.data:
        base = server.path("base_dir", ".", base)
    return Config(
        path=path,
        base_dir=base,
        server=_readServer(server, base),
        smtp=_readSMTP(table("smtp", tuple(SMTPConfig.__dataclass_fields__))),
        local=(local := _readLocal(table("local", ("domains", "users", "users_file", "aliases", "aliases_file", "directory")), base)),
        store=_readStore(table("store", None), base),
        delivery=_readDelivery(table("delivery", tuple(DeliveryConfig.__dataclass_fields__))),
        policies=_readPolicies(fileName, data.get("policy", [])),
        relay=_readRelay(fileName, table("relay", _RELAY_KEYS), base),
        uucp_sites=(uucp := _readUucp(fileName, table("uucp", ("site",)))),
        tls=read_tls(table("tls", tuple(TLSConfig.__dataclass_fields__)), base),
        auth=read_auth(table("auth", tuple(AuthConfig.__dataclass_fields__)), base),
        submission=read_submission(table("submission", tuple(SubmissionConfig.__dataclass_fields__)), checkEndpoint),
        pop3=read_pop3(table("pop3", tuple(POP3Config.__dataclass_fields__)), checkEndpoint),
        hold_sites=read_hold(table("hold", ("site",)), checkDomain, {
            **{d: "[local] domains" for d in local.domains},
            **{d: f"uucp site {site.name}" for site in uucp for d in site.domains},
        }),
        atrn=read_atrn(table("atrn", tuple(ATRNConfig.__dataclass_fields__)), checkEndpoint),
    )


def _readServer(t: _Table, base: Path) -> ServerConfig:
    """``[server]``."""
    hostname = t.string("hostname", ServerConfig.hostname)
    checked = checkDomain(hostname)
    if checked is None:
        t.fail("hostname", f"not a valid host name: {_show(hostname)}")
    return ServerConfig(
        hostname=checked,
        spool_dir=t.path("spool_dir", "var/spool", base),
        control_socket=t.path("control_socket", "var/run/mailsvc.sock", base),
    )


def checkEndpoint(description: str) -> str | None:
    """Why ``description`` is not a Twisted server endpoint string, or None if it is one."""
    from twisted.internet.endpoints import serverFromString

    try:
        endpoint = serverFromString(_NO_REACTOR, description)
    except Exception as e:  # the parsers raise ValueError, TypeError, ImportError...
        return str(e) or type(e).__name__
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        return f"port {port} is out of range"
    return None


def _readSMTP(t: _Table) -> SMTPConfig:
    """``[smtp]``."""
    default = SMTPConfig()
    listen = t.strings("listen", list(default.listen))
    for index, description in enumerate(listen):
        problem = checkEndpoint(description)
        if problem is not None:
            t.fail(f"listen[{index}]", f"not a valid endpoint: {_show(description)} ({problem})")
    networks = []
    for index, text in enumerate(t.strings("trusted_networks", [])):
        try:
            networks.append(ipaddress.ip_network(text.strip()))
        except ValueError as e:
            t.fail(f"trusted_networks[{index}]", f"not a CIDR network: {_show(text)} ({e})")
    vrfy = t.data.get("vrfy", default.vrfy)
    if vrfy not in VRFY_MODES:
        t.fail("vrfy", f"must be one of {', '.join(VRFY_MODES)}; got {_show(vrfy)}")
    return SMTPConfig(
        listen=listen,
        max_message_size=t.integer("max_message_size", default.max_message_size, minimum=0),
        max_recipients=t.integer("max_recipients", default.max_recipients),
        max_connections=t.integer("max_connections", default.max_connections),
        command_timeout=t.seconds("command_timeout", default.command_timeout),
        data_timeout=t.seconds("data_timeout", default.data_timeout),
        vrfy=vrfy,
        expn=t.boolean("expn", default.expn),
        trusted_networks=tuple(networks),
        starttls=t.boolean("starttls", default.starttls),
        auth=t.boolean("auth", default.auth),
        max_connections_per_client=t.integer("max_connections_per_client", default.max_connections_per_client, minimum=0),
        max_errors=t.integer("max_errors", default.max_errors, minimum=0),
    )


def _readLocal(t: _Table, base: Path) -> LocalConfig:
    """``[local]``: domains, users, aliases, checked together."""
    domains: dict[str, None] = {}
    for index, name in enumerate(t.strings("domains", ["example.test"])):
        domain = checkDomain(name)
        if domain is None:
            t.fail(f"domains[{index}]", f"not a valid domain name: {_show(name)}")
        domains[domain] = None
    if not domains:
        t.fail("domains", "at least one local domain is needed (for postmaster, rfc5321 4.5.1)")

    users: dict[str, str] = {}
    for index, name in enumerate(t.strings("users", ["alice", "bob"])):
        if not aliasfiles.isValidName(name.lower()):
            t.fail(f"users[{index}]", f"not a valid user name: {_show(name)}")
        users[name.lower()] = ""
    if "users_file" in t.data:
        usersPath, text = t.text("users_file", base)
        try:
            for name, fullName in aliasfiles.parseUsers(text).items():
                users[name] = fullName or users.get(name, "")
        except ConfigError as e:
            t.fail("users_file", f"{usersPath} {e}")

    aliases = _readAliasTable(t, domains)
    if "aliases_file" in t.data:
        aliasesPath, text = t.text("aliases_file", base)
        try:
            parsed = aliasfiles.parseAliases(text, domains)
        except ConfigError as e:
            t.fail("aliases_file", f"{aliasesPath} {e}")
        for name, members in parsed.items():
            if name in aliases:
                t.fail("aliases_file", f'{aliasesPath}: alias "{name}" is also in [local] aliases')
            aliases[name] = members
    try:
        aliasfiles.checkAliases(users, aliases)
    except ConfigError as e:
        hint = "" if "aliases" in t.data else " (these are the default aliases: set [local] aliases)"
        t.fail("aliases", f"{e}{hint}")
    return LocalConfig(
        domains=tuple(domains),
        users=MappingProxyType(users),
        aliases=MappingProxyType(aliases),
        directory=t.string("directory", "config"),
    )


def _readAliasTable(t: _Table, domains: dict[str, None]) -> dict[str, tuple[str, ...]]:
    """``[local] aliases``: a table of name = [member, ...]."""
    table = t.data.get("aliases", _DEFAULT_ALIASES)
    if not isinstance(table, dict):
        t.fail("aliases", f"expected a table of name = [members], got {_show(table)}")
    aliases: dict[str, tuple[str, ...]] = {}
    for key, value in table.items():
        name = key.lower()
        if not aliasfiles.isValidName(name):
            t.fail(f"aliases.{key}", "not a valid alias name")
        if name in aliases:
            t.fail(f"aliases.{key}", f'alias "{name}" is defined twice')
        if not isinstance(value, list) or not value:
            t.fail(f"aliases.{key}", f"expected a non-empty array of members, got {_show(value)}")
        members: dict[str, None] = {}
        for index, member in enumerate(value):
            if not isinstance(member, str):
                t.fail(f"aliases.{key}[{index}]", f"expected a string, got {_show(member)}")
            try:
                members[aliasfiles.localMember(member, domains)] = None
            except ConfigError as e:
                t.fail(f"aliases.{key}[{index}]", str(e))
        aliases[name] = tuple(members)
    return aliases


def _readStore(t: _Table, base: Path) -> StoreConfig:
    """``[store]``: ``type``; every other key is an option for the store plugin."""
    storeType = t.string("type", "maildir")
    options = {key: value for key, value in t.data.items() if key != "type"}
    options["path"] = str(t.path("path", "var/mail", base))
    return StoreConfig(type=storeType, options=MappingProxyType(options))


def _readDelivery(t: _Table) -> DeliveryConfig:
    """``[delivery]``."""
    default = DeliveryConfig()
    delivery = DeliveryConfig(
        scan_interval=t.seconds("scan_interval", default.scan_interval),
        retry_first=t.seconds("retry_first", default.retry_first),
        retry_max=t.seconds("retry_max", default.retry_max),
        give_up_after=t.seconds("give_up_after", default.give_up_after),
        concurrency=t.integer("concurrency", default.concurrency),
    )
    if delivery.retry_max < delivery.retry_first:
        t.fail("retry_max", f"must be at least retry_first ({delivery.retry_first}), got {delivery.retry_max}")
    return delivery


def _readPolicies(fileName: str, entries: object) -> tuple[PolicyConfig, ...]:
    """``[[policy]]`` tables, in order: each needs ``name``; the rest are its options."""
    if not isinstance(entries, list):
        raise ConfigError(f"{fileName}: [[policy]]: expected an array of tables, got {_show(entries)}")
    policies = []
    for index, entry in enumerate(entries):
        t = _Table(fileName, f"[[policy]][{index}]", entry, None)
        if "name" not in entry:
            t.fail("name", "missing: the policy plugin to use")
        name = t.string("name", "")
        options = {key: value for key, value in entry.items() if key != "name"}
        policies.append(PolicyConfig(name=name, options=MappingProxyType(options)))
    return tuple(policies)


# The smarthost's tls/username/password_file sit in [relay] itself.
_RELAY_KEYS = tuple(k for k in RelayConfig.__dataclass_fields__ if k != "routes") + (
    "route",
    "tls",
    "username",
    "password_file",
    "ca_file",
)
_ROUTE_KEYS = ("domain", "host", "port", "tls", "username", "password_file", "ca_file")


def _hostPort(t: _Table, key: str, text: str, defaultPort: int) -> tuple[str, int]:
    """``host`` or ``host:port`` (``[v6addr]:port`` for IPv6 literals)."""
    host, port = text, defaultPort
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                t.fail(key, f"expected host or host:port, got {_show(text)}")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, portText = text.partition(":")
        if not portText.isdigit():
            t.fail(key, f"expected host or host:port, got {_show(text)}")
        port = int(portText)
    if not host or not 0 < port < 65536:
        t.fail(key, f"expected host or host:port, got {_show(text)}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if checkDomain(host) is None:
            t.fail(key, f"not a valid host name: {_show(host)}")
        host = checkDomain(host)
    return host, port


def _readCAFile(t: _Table, base: Path) -> Path:
    """``ca_file``: a PEM file holding at least one certificate."""
    path, text = t.text("ca_file", base)
    if "-----BEGIN CERTIFICATE-----" not in text:
        t.fail("ca_file", f"{path}: no PEM certificate in it")
    return path


def _readRoute(
    t: _Table, domain: str, hostText: str, base: Path, defaultPort: int, defaultCA: Path | None = None
) -> RouteConfig:
    """The host, TLS and AUTH settings of one route (the smarthost or a [[relay.route]])."""
    host, port = _hostPort(t, "host" if "host" in t.data else "smarthost", hostText, defaultPort)
    if "port" in t.data:
        port = t.integer("port", port)
        if port > 65535:
            t.fail("port", f"out of range: {port}")
    tls = t.data.get("tls", "opportunistic")
    if tls not in TLS_MODES:
        t.fail("tls", f"must be one of {', '.join(TLS_MODES)}; got {_show(tls)}")
    username = t.data.get("username", "")
    if not isinstance(username, str):
        t.fail("username", f"expected a string, got {_show(username)}")
    passwordFile = None
    if "password_file" in t.data:
        passwordFile, _ = t.text("password_file", base)
    if username and passwordFile is None:
        t.fail("password_file", "needed with username (AUTH to the relay host)")
    caFile = _readCAFile(t, base) if "ca_file" in t.data else defaultCA
    return RouteConfig(
        domain=domain, host=host, port=port, tls=tls, username=username, password_file=passwordFile, ca_file=caFile
    )


def _readRelay(fileName: str, t: _Table, base: Path) -> RelayConfig:
    """``[relay]`` and its ``[[relay.route]]`` tables."""
    default = RelayConfig()
    port = t.integer("port", default.port)
    if port > 65535:
        t.fail("port", f"out of range: {port}")
    if t.data.get("tls", "opportunistic") not in TLS_MODES:
        t.fail("tls", f"must be one of {', '.join(TLS_MODES)}; got {_show(t.data['tls'])}")
    # [relay] ca_file: the smarthost's, and every route's that names none.
    defaultCA = _readCAFile(t, base) if "ca_file" in t.data else None
    smarthost = None
    text = t.data.get("smarthost", "")
    if not isinstance(text, str):
        t.fail("smarthost", f"expected a string, got {_show(text)}")
    if text:
        smarthost = _readRoute(t, "*", text, base, 25)
    resolver = t.data.get("resolver", "")
    if not isinstance(resolver, str):
        t.fail("resolver", f"expected a string, got {_show(resolver)}")
    if resolver:
        host, rport = _hostPort(t, "resolver", resolver, 53)
        resolver = f"{host}:{rport}"
    helo = t.data.get("helo_name", "")
    if helo and (not isinstance(helo, str) or checkDomain(helo) is None):
        t.fail("helo_name", f"not a valid host name: {_show(helo)}")
    entries = t.data.get("route", [])
    if not isinstance(entries, list):
        t.fail("route", f"expected [[relay.route]] tables, got {_show(entries)}")
    routes = []
    for index, entry in enumerate(entries):
        rt = _Table(fileName, f"[[relay.route]][{index}]", entry, _ROUTE_KEYS)
        domain = checkDomain(rt.string("domain", ""))
        if domain is None:
            rt.fail("domain", f"not a valid domain name: {_show(entry.get('domain'))}")
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
        t.fail("delay_warning_after", f"expected a number of seconds (0 = off), got {_show(warning)}")
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


_SITE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")  # a UUCP node name, safe as a hop


def _readUucp(fileName: str, t: _Table) -> tuple[UucpSiteConfig, ...]:
    """``[[uucp.site]]`` tables."""
    entries = t.data.get("site", [])
    if not isinstance(entries, list):
        t.fail("site", f"expected [[uucp.site]] tables, got {_show(entries)}")
    sites: list[UucpSiteConfig] = []
    claimed: dict[str, str] = {}
    default = UucpSiteConfig(name="", domains=())
    for index, entry in enumerate(entries):
        st = _Table(fileName, f"[[uucp.site]][{index}]", entry, tuple(UucpSiteConfig.__dataclass_fields__))
        name = st.string("name", "")
        if not _SITE_NAME.match(name):
            st.fail("name", f"a UUCP site name is lower-case letters, digits, - and _; got {_show(name)}")
        if any(site.name == name for site in sites):
            st.fail("name", f"site {name} is defined twice")
        domains = []
        for d, text in enumerate(st.strings("domains", [])):
            domain = checkDomain(text)
            if domain is None:
                st.fail(f"domains[{d}]", f"not a valid domain name: {_show(text)}")
            if domain in claimed:
                st.fail(f"domains[{d}]", f"{domain} already goes to site {claimed[domain]}")
            claimed[domain] = name
            domains.append(domain)
        if not domains:
            st.fail("domains", "at least one domain is needed")
        command = st.strings("command", list(default.command))
        if not command:
            st.fail("command", "expected the command to run, as an array of strings")
        sites.append(
            UucpSiteConfig(
                name=name,
                domains=tuple(domains),
                command=command,
                max_messages=st.integer("max_messages", default.max_messages),
                max_bytes=st.integer("max_bytes", default.max_bytes),
            )
        )
    return tuple(sites)

"""The configuration: ``etc/mailsvc.toml`` read into frozen, checked values.

``load(path)`` reads the file with ``tomllib`` and returns a ``Config``.
Every key has the default written in ``etc/mailsvc.toml``, so an empty file
is a valid configuration. Anything wrong raises ``ConfigError`` with one line
that names the file, the key and the problem, e.g.
``mailsvc.toml: [smtp] max_recipients: expected a positive integer, got "ten"``.
Relative paths are taken from ``base_dir``.

This module reads the core tables; the others have their own module, all
built on ``mailsvc.configtable.Table``: ``relayconfig`` ([relay],
[[uucp.site]]), ``securityconfig`` ([tls], [auth], [submission]),
``turnconfig`` ([[hold.site]], [atrn], [[callin]]), ``pop3config`` ([pop3]).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import tomllib
from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from mailsvc import aliases as aliasfiles
from mailsvc.configtable import Table, checkDomain, show
from mailsvc.errors import ConfigError
from mailsvc.relayconfig import RELAY_KEYS, RelayConfig, UucpSiteConfig, read_relay, read_uucp
from mailsvc.pop3config import POP3Config, read_pop3
from mailsvc.securityconfig import AuthConfig, SubmissionConfig, TLSConfig, read_auth, read_submission, read_tls
from mailsvc.turnconfig import ATRNConfig, CallInConfig, HoldSiteConfig, read_atrn, read_callins, read_hold

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

VRFY_MODES = ("directory", "always-252", "off")



@dataclass(frozen=True)
class ServerConfig:
    """``[server]``: our host name and the spool directory."""

    hostname: str = "mail.example.test"
    spool_dir: Path = Path("var/spool")
    control_socket: Path = Path("var/run/mailsvc.sock")
    # SMTP served by this many child processes (mailsvc.receiverprocesses); 0: by this one.
    receiver_processes: int = 0


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
    smtputf8: bool = True  # rfc6531 on every SMTP listener


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
    callins: tuple[CallInConfig, ...] = ()  # [[callin]] (mailsvc.turnconfig)
    # The file's text as read: receiver processes load this very text
    # (mailsvc.receiverprocesses), even if the file changed since.
    text: str = field(default="", repr=False, compare=False)


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
    return dataclasses.replace(_read(data, path), text=text)



# ---------------------------------------------------------------- reading

_TABLES = ("server", "smtp", "local", "store", "delivery", "policy", "relay", "uucp", "tls", "auth", "submission", "hold", "atrn", "pop3", "callin")
_DEFAULT_ALIASES = {"postmaster": ["alice"], "team": ["alice", "bob"]}


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

    def table(name: str, allowed: tuple[str, ...] | None) -> Table:
        return Table(fileName, f"[{name}]", data.get(name, {}), allowed)

    server = table("server", ("hostname", "base_dir", "spool_dir", "control_socket", "receiver_processes"))
    base = path.parent.parent
    if "base_dir" in server.data:
        base = server.path("base_dir", ".", base)
    config = Config(
        path=path,
        base_dir=base,
        server=_readServer(server, base),
        smtp=_readSMTP(table("smtp", tuple(SMTPConfig.__dataclass_fields__))),
        local=(local := _readLocal(table("local", ("domains", "users", "users_file", "aliases", "aliases_file", "directory")), base)),
        store=_readStore(table("store", None), base),
        delivery=_readDelivery(table("delivery", tuple(DeliveryConfig.__dataclass_fields__))),
        policies=_readPolicies(fileName, data.get("policy", [])),
        relay=read_relay(fileName, table("relay", RELAY_KEYS), base),
        uucp_sites=(uucp := read_uucp(fileName, table("uucp", ("site",)))),
        tls=read_tls(table("tls", tuple(TLSConfig.__dataclass_fields__)), base),
        auth=read_auth(table("auth", tuple(AuthConfig.__dataclass_fields__)), base),
        submission=read_submission(table("submission", tuple(SubmissionConfig.__dataclass_fields__))),
        pop3=read_pop3(table("pop3", tuple(POP3Config.__dataclass_fields__))),
        hold_sites=read_hold(table("hold", ("site",)), {
            **{d: "[local] domains" for d in local.domains},
            **{d: f"uucp site {site.name}" for site in uucp for d in site.domains},
        }),
        atrn=read_atrn(table("atrn", tuple(ATRNConfig.__dataclass_fields__))),
        callins=read_callins(fileName, data.get("callin", []), base),
    )
    if config.server.receiver_processes and config.hold_sites:
        # TURN reverses the roles on the connection, in the process that has
        # the held mail: the one process (mailsvc.receiverprocesses).
        server.fail("receiver_processes", "must be 0 when a [[hold.site]] exists (TURN and ATRN need the queue "
                    "in the process serving the connection)")
    return config


def _readServer(t: Table, base: Path) -> ServerConfig:
    """``[server]``."""
    hostname = t.string("hostname", ServerConfig.hostname)
    checked = checkDomain(hostname)
    if checked is None:
        t.fail("hostname", f"not a valid host name: {show(hostname)}")
    return ServerConfig(
        hostname=checked,
        spool_dir=t.path("spool_dir", "var/spool", base),
        control_socket=t.path("control_socket", "var/run/mailsvc.sock", base),
        receiver_processes=_receiver_processes(t),
    )


def _receiver_processes(t: Table) -> int:
    count = t.integer("receiver_processes", 0, minimum=0)
    if count > 64:
        t.fail("receiver_processes", f"at most 64, got {count}")
    return count


def _readSMTP(t: Table) -> SMTPConfig:
    """``[smtp]``."""
    default = SMTPConfig()
    listen = t.endpoints("listen", default.listen)
    networks = []
    for index, text in enumerate(t.strings("trusted_networks", [])):
        try:
            networks.append(ipaddress.ip_network(text.strip()))
        except ValueError as e:
            t.fail(f"trusted_networks[{index}]", f"not a CIDR network: {show(text)} ({e})")
    vrfy = t.data.get("vrfy", default.vrfy)
    if vrfy not in VRFY_MODES:
        t.fail("vrfy", f"must be one of {', '.join(VRFY_MODES)}; got {show(vrfy)}")
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
        smtputf8=t.boolean("smtputf8", default.smtputf8),
    )


def _readLocal(t: Table, base: Path) -> LocalConfig:
    """``[local]``: domains, users, aliases, checked together."""
    domains: dict[str, None] = {}
    for index, name in enumerate(t.strings("domains", ["example.test"])):
        domain = checkDomain(name)
        if domain is None:
            t.fail(f"domains[{index}]", f"not a valid domain name: {show(name)}")
        domains[domain] = None
    if not domains:
        t.fail("domains", "at least one local domain is needed (for postmaster, rfc5321 4.5.1)")

    users: dict[str, str] = {}
    for index, name in enumerate(t.strings("users", ["alice", "bob"])):
        if not aliasfiles.isValidName(aliasfiles.normalName(name)):
            t.fail(f"users[{index}]", f"not a valid user name: {show(name)}")
        users[aliasfiles.normalName(name)] = ""
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


def _readAliasTable(t: Table, domains: dict[str, None]) -> dict[str, tuple[str, ...]]:
    """``[local] aliases``: a table of name = [member, ...]."""
    table = t.data.get("aliases", _DEFAULT_ALIASES)
    if not isinstance(table, dict):
        t.fail("aliases", f"expected a table of name = [members], got {show(table)}")
    aliases: dict[str, tuple[str, ...]] = {}
    for key, value in table.items():
        name = aliasfiles.normalName(key)
        if not aliasfiles.isValidName(name):
            t.fail(f"aliases.{key}", "not a valid alias name")
        if name in aliases:
            t.fail(f"aliases.{key}", f'alias "{name}" is defined twice')
        if not isinstance(value, list) or not value:
            t.fail(f"aliases.{key}", f"expected a non-empty array of members, got {show(value)}")
        members: dict[str, None] = {}
        for index, member in enumerate(value):
            if not isinstance(member, str):
                t.fail(f"aliases.{key}[{index}]", f"expected a string, got {show(member)}")
            try:
                members[aliasfiles.localMember(member, domains)] = None
            except ConfigError as e:
                t.fail(f"aliases.{key}[{index}]", str(e))
        aliases[name] = tuple(members)
    return aliases


def _readStore(t: Table, base: Path) -> StoreConfig:
    """``[store]``: ``type``; every other key is an option for the store plugin."""
    storeType = t.string("type", "maildir")
    options = {key: value for key, value in t.data.items() if key != "type"}
    options["path"] = str(t.path("path", "var/mail", base))
    return StoreConfig(type=storeType, options=MappingProxyType(options))


def _readDelivery(t: Table) -> DeliveryConfig:
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
        raise ConfigError(f"{fileName}: [[policy]]: expected an array of tables, got {show(entries)}")
    policies = []
    for index, entry in enumerate(entries):
        t = Table(fileName, f"[[policy]][{index}]", entry, None)
        if "name" not in entry:
            t.fail("name", "missing: the policy plugin to use")
        name = t.string("name", "")
        options = {key: value for key, value in entry.items() if key != "name"}
        policies.append(PolicyConfig(name=name, options=MappingProxyType(options)))
    return tuple(policies)


# The smarthost's tls/username/password_file sit in [relay] itself.

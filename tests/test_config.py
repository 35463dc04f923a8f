"""Tests for mailsvc.config and mailsvc.aliases: defaults, paths, and one-line errors."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from mailsvc import aliases as aliasfiles
from mailsvc.config import Config, load, loads
from mailsvc.configtable import checkEndpoint
from mailsvc.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "mailsvc.toml") -> Path:
    """Write a config file at <tmp>/etc/<name>, so base_dir is <tmp>."""
    path = tmp_path / "etc" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_emptyFileGivesDefaults(tmp_path):
    """An empty file is valid: every value is the default of etc/mailsvc.toml."""
    config = load(write(tmp_path, ""))
    assert isinstance(config, Config)
    assert config.path == tmp_path / "etc" / "mailsvc.toml"
    assert config.base_dir == tmp_path
    assert config.server.hostname == "mail.example.test"
    assert config.server.spool_dir == tmp_path / "var" / "spool"
    smtp = config.smtp
    assert smtp.listen == ("tcp:2525:interface=127.0.0.1",)
    assert (smtp.max_message_size, smtp.max_recipients, smtp.max_connections) == (26214400, 100, 100)
    assert (smtp.command_timeout, smtp.data_timeout) == (300, 180)
    assert (smtp.vrfy, smtp.expn, smtp.trusted_networks) == ("directory", False, ())
    assert config.local.domains == ("example.test",)
    assert dict(config.local.users) == {"alice": "", "bob": ""}
    assert dict(config.local.aliases) == {"postmaster": ("alice",), "team": ("alice", "bob")}
    assert config.local.directory == "config"
    assert config.store.type == "maildir"
    assert dict(config.store.options) == {"path": str(tmp_path / "var" / "mail")}
    d = config.delivery
    assert (d.scan_interval, d.retry_first, d.retry_max, d.give_up_after, d.concurrency) == (60, 300, 3600, 432000, 20)
    assert config.policies == ()


def test_shippedConfigEqualsDefaults(tmp_path):
    """etc/mailsvc.toml itself loads, and says the same as an empty file."""
    shipped = load(REPO / "etc" / "mailsvc.toml")
    empty = load(write(tmp_path, ""))
    assert shipped.base_dir == REPO
    for part in ("smtp", "delivery", "policies"):
        assert getattr(shipped, part) == getattr(empty, part)
    assert shipped.server.hostname == empty.server.hostname
    assert dict(shipped.local.aliases) == dict(empty.local.aliases)
    assert shipped.store.type == empty.store.type


def test_onlyDomains(tmp_path):
    """A file with only [local] domains works; domains are lower-cased, trailing dot dropped."""
    config = load(write(tmp_path, '[local]\ndomains = ["Example.ORG.", "b.example"]\n'))
    assert config.local.domains == ("example.org", "b.example")


def test_fullConfig(tmp_path):
    """Every key set: values, paths against base_dir, store options, policies."""
    (tmp_path / "etc" / "users").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "etc" / "users").write_text("# users\ncarol: Carol C.\n\nDave\nalice: Alice A.\n")
    (tmp_path / "etc" / "aliases").write_text(
        "# aliases(5)\nstaff: carol,\n  dave@Example.test\nPostmaster: root\nroot: alice\n"
    )
    path = write(
        tmp_path,
        """
        [server]
        hostname = "MX.Example.test."
        base_dir = "srv"
        spool_dir = "/abs/spool"
        [smtp]
        listen = ["tcp:25", "tcp6:587:interface=\\\\:\\\\:1"]
        max_message_size = 0
        max_recipients = 5
        max_connections = 7
        command_timeout = 1.5
        data_timeout = 2
        vrfy = "always-252"
        expn = true
        trusted_networks = ["127.0.0.0/8", "::1/128"]
        [local]
        domains = ["example.test"]
        users = ["alice"]
        users_file = "../etc/users"
        aliases = { team = ["alice", "staff"] }
        aliases_file = "../etc/aliases"
        directory = "ldap"
        [store]
        type = "mbox"
        path = "mail"
        lock_timeout = 3
        [delivery]
        scan_interval = 5
        retry_first = 10
        retry_max = 20
        give_up_after = 100
        concurrency = 2
        [[policy]]
        name = "greylist"
        delay = 300
        [[policy]]
        name = "spf"
        """,
    )
    config = load(path)
    base = tmp_path / "srv"
    assert config.base_dir == base
    assert config.server.hostname == "mx.example.test"
    assert config.server.spool_dir == Path("/abs/spool")
    assert config.smtp.listen == ("tcp:25", "tcp6:587:interface=\\:\\:1")
    assert config.smtp.max_message_size == 0
    assert config.smtp.command_timeout == 1.5
    assert config.smtp.vrfy == "always-252" and config.smtp.expn is True
    assert config.smtp.trusted_networks == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert dict(config.local.users) == {"alice": "Alice A.", "carol": "Carol C.", "dave": ""}
    assert dict(config.local.aliases) == {
        "team": ("alice", "staff"),
        "staff": ("carol", "dave"),
        "postmaster": ("root",),
        "root": ("alice",),
    }
    assert config.local.directory == "ldap"
    assert config.store.type == "mbox"
    assert dict(config.store.options) == {"path": str(base / "mail"), "lock_timeout": 3}
    assert config.delivery.concurrency == 2
    assert [(p.name, dict(p.options)) for p in config.policies] == [("greylist", {"delay": 300}), ("spf", {})]


def test_valuesAreFrozen(tmp_path):
    """Config objects and their mappings cannot be changed."""
    config = load(write(tmp_path, ""))
    with pytest.raises(AttributeError):
        config.smtp.max_recipients = 1
    with pytest.raises(TypeError):
        config.local.users["mallory"] = ""
    with pytest.raises(TypeError):
        config.store.options["path"] = "/"


ERRORS = [
    # (toml text, expected message, whole or a prefix of it)
    ('[smtp]\nmax_recipients = "ten"', 'mailsvc.toml: [smtp] max_recipients: expected a positive integer, got "ten"'),
    ("[smtp]\nmax_recipients = 0", "mailsvc.toml: [smtp] max_recipients: expected a positive integer, got 0"),
    ("[smtp]\nmax_recipients = true", "mailsvc.toml: [smtp] max_recipients: expected a positive integer, got true"),
    ("[smtp]\nmax_recipents = 10", "mailsvc.toml: [smtp] max_recipents: unknown key (did you mean max_recipients?)"),
    ("[smtp]\nmax_message_size = -1", "mailsvc.toml: [smtp] max_message_size: expected an integer >= 0, got -1"),
    ("[smtp]\ncommand_timeout = 0", "mailsvc.toml: [smtp] command_timeout: expected a positive number of seconds, got 0"),
    ("[smtp]\ndata_timeout = inf", "mailsvc.toml: [smtp] data_timeout: expected a positive number of seconds, got inf"),
    ("[smtp]\nexpn = 1", "mailsvc.toml: [smtp] expn: expected true or false, got 1"),
    ('[smtp]\nvrfy = "yes"', 'mailsvc.toml: [smtp] vrfy: must be one of directory, always-252, off; got "yes"'),
    ('[smtp]\nlisten = ["tcp:25", "tcpp:25"]', 'mailsvc.toml: [smtp] listen[1]: not a valid endpoint: "tcpp:25" ('),
    ('[smtp]\nlisten = ["tcp:http"]', 'mailsvc.toml: [smtp] listen[0]: not a valid endpoint: "tcp:http" ('),
    ('[smtp]\nlisten = ["tcp:70000"]', 'mailsvc.toml: [smtp] listen[0]: not a valid endpoint: "tcp:70000" (port'),
    ('[smtp]\nlisten = "tcp:25"', 'mailsvc.toml: [smtp] listen: expected an array of strings, got "tcp:25"'),
    ("[smtp]\nlisten = [25]", "mailsvc.toml: [smtp] listen[0]: expected a string, got 25"),
    ('[smtp]\ntrusted_networks = ["10.0.0.0/8", "10.0.0.300/8"]', "mailsvc.toml: [smtp] trusted_networks[1]: not a CIDR network"),
    ('[smtp]\ntrusted_networks = ["10.0.0.1/8"]', "mailsvc.toml: [smtp] trusted_networks[0]: not a CIDR network"),
    ("[smtpd]\nx = 1", "mailsvc.toml: [smtpd]: unknown table"),
    ("hostname = 'x'", "mailsvc.toml: hostname: unknown key"),
    ("smtp = 3", "mailsvc.toml: [smtp]: expected a table, got 3"),
    ("[smtp\n", "mailsvc.toml: not valid TOML: "),
    ("a = 1\na = 2\n", "mailsvc.toml: not valid TOML: "),
    ('[server]\nhostname = "bad_host!"', 'mailsvc.toml: [server] hostname: not a valid host name: "bad_host!"'),
    ('[server]\nhostname = ""', 'mailsvc.toml: [server] hostname: expected a non-empty string, got ""'),
    ("[server]\nspool_dir = 3", "mailsvc.toml: [server] spool_dir: expected a non-empty string, got 3"),
    ('[local]\ndomains = ["ok.test", "-bad.test"]', 'mailsvc.toml: [local] domains[1]: not a valid domain name: "-bad.test"'),
    ("[local]\ndomains = []", "mailsvc.toml: [local] domains: at least one local domain is needed"),
    ('[local]\nusers = ["alice", "b ob"]', 'mailsvc.toml: [local] users[1]: not a valid user name: "b ob"'),
    ('[local]\nusers = ["alice", "bob"]\naliases = { "a/b" = ["alice"], postmaster = ["alice"] }', "mailsvc.toml: [local] aliases.a/b: not a valid alias name"),
    ('[local]\naliases = { postmaster = ["alice"], team = [] }', "mailsvc.toml: [local] aliases.team: expected a non-empty array of members"),
    ('[local]\naliases = { postmaster = ["|/bin/sh"] }', 'mailsvc.toml: [local] aliases.postmaster[0]: "|/bin/sh": only local members are supported'),
    ('[local]\naliases = { postmaster = ["alice@elsewhere.example"] }', "mailsvc.toml: [local] aliases.postmaster[0]: \"alice@elsewhere.example\": only local members are supported"),
    ('[local]\naliases = { postmaster = ["carol"] }', 'mailsvc.toml: [local] aliases: alias "postmaster": member "carol" is neither a user nor an alias'),
    ('[local]\naliases = { postmaster = ["a"], a = ["b"], b = ["a"] }', "mailsvc.toml: [local] aliases: alias loop: "),
    ('[local]\naliases = { team = ["alice"] }', "mailsvc.toml: [local] aliases: postmaster must lead to a user (rfc5321 4.5.1)"),
    ('[local]\nusers = ["carol"]', "mailsvc.toml: [local] aliases: alias \"postmaster\": member \"alice\" is neither a user nor an alias (these are the default aliases"),
    ('[local]\nusers_file = "etc/nope"', "mailsvc.toml: [local] users_file: file not found: "),
    ('[local]\naliases_file = "/x/aliases"', "mailsvc.toml: [local] aliases_file: file not found: /x/aliases"),
    ("[store]\ntype = 1", "mailsvc.toml: [store] type: expected a non-empty string, got 1"),
    ("[store]\npath = []", "mailsvc.toml: [store] path: expected a non-empty string, got an array"),
    ("[delivery]\nconcurrency = 1.5", "mailsvc.toml: [delivery] concurrency: expected a positive integer, got 1.5"),
    ("[delivery]\nretry_first = 100\nretry_max = 10", "mailsvc.toml: [delivery] retry_max: must be at least retry_first"),
    ("[delivery]\nretry = 1", "mailsvc.toml: [delivery] retry: unknown key"),
    ("[[policy]]\ndelay = 3", "mailsvc.toml: [[policy]][0] name: missing"),
    ('[[policy]]\nname = "a"\n[[policy]]\nname = 3', "mailsvc.toml: [[policy]][1] name: expected a non-empty string, got 3"),
    ("[policy]\nname = 'x'", "mailsvc.toml: [[policy]]: expected an array of tables, got a table"),
]


@pytest.mark.parametrize("text, message", ERRORS)
def test_errors(tmp_path, text, message):
    """Each mistake stops loading with one line naming the file, the key and the problem."""
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, text))
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(message), text


def test_tomlErrorHasLine(tmp_path):
    """A TOML syntax error tells the line."""
    with pytest.raises(ConfigError, match=r"line 3"):
        load(write(tmp_path, "[smtp]\nexpn = true\nvrfy = \n"))


def test_missingConfigFile(tmp_path):
    """A config file that is not there is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="file not found"):
        load(tmp_path / "nope.toml")


def test_aliasesFileErrorNamesFileAndLine(tmp_path):
    """A non-local member in the aliases file names the key, the file and the line."""
    aliases = tmp_path / "aliases"
    aliases.write_text("# x\npostmaster: alice\nops: bob,\n  /var/log/mail\n")
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, f'[local]\naliases = {{}}\naliases_file = "{aliases}"\n'))
    assert str(caught.value) == (
        f'mailsvc.toml: [local] aliases_file: {aliases} line 3: "/var/log/mail": '
        "only local members are supported (no |command, /file, :include:)"
    )


def test_aliasesFileDuplicatingTable(tmp_path):
    """An alias both in the table and in the file is refused."""
    aliases = tmp_path / "aliases"
    aliases.write_text("team: bob\n")
    with pytest.raises(ConfigError, match=r'aliases_file: .* alias "team" is also in \[local\] aliases'):
        load(write(tmp_path, f'[local]\naliases_file = "{aliases}"\n'))


def test_usersFileErrorNamesLine(tmp_path):
    """A bad name in the users file names the file and the line."""
    users = tmp_path / "users"
    users.write_text("carol\nbad name: X\n")
    with pytest.raises(ConfigError, match=rf"\[local\] users_file: {users} line 2: not a valid user name"):
        load(write(tmp_path, f'[local]\nusers_file = "{users}"\n'))


def test_loads(tmp_path):
    """loads() checks text as if it came from the given path."""
    config = loads("[smtp]\nmax_recipients = 3\n", tmp_path / "etc" / "x.toml")
    assert config.smtp.max_recipients == 3
    assert config.base_dir == tmp_path
    with pytest.raises(ConfigError, match=r"^x.toml: \[smtp\]"):
        loads("[smtp]\nmax_recipients = 0\n", tmp_path / "etc" / "x.toml")


@pytest.mark.parametrize(
    "description, good",
    [("tcp:25", True), ("tcp:2525:interface=127.0.0.1", True), ("unix:/tmp/s", True), ("tcp6:25", True), ("tcpp:25", False), ("25", False), ("tcp:25:bogus=1", False), ("", False)],
)
def test_checkEndpoint(description, good):
    """Endpoint strings are checked by parsing them as Twisted does."""
    assert (checkEndpoint(description) is None) == good


# ---------------------------------------------------------------- aliases.py


def test_parseAliases():
    """aliases(5): continuation lines, comments, blank lines, lower-cased names, local domains."""
    text = "# comment\n\nTeam: Alice, bob@EXAMPLE.test.\n\tcarol ,\n  dave\nops:alice,alice\nx: a b,c  ,d\n"
    assert aliasfiles.parseAliases(text, ["example.test"]) == {
        "team": ("alice", "bob", "carol", "dave"),
        "ops": ("alice",),
        "x": ("a", "b", "c", "d"),
    }


@pytest.mark.parametrize(
    "text, message",
    [
        ("a: |/usr/bin/x", 'line 1: "|/usr/bin/x": only local members are supported'),
        ('a: "|/usr/bin/x"', "line 1: "),
        ("a: b\nc: :include:/etc/list", 'line 2: ":include:/etc/list": only local members are supported'),
        ("a: /dev/null", 'line 1: "/dev/null": only local members are supported'),
        ("a: b@other.example", 'line 1: "b@other.example": only local members are supported'),
        ("  b", "line 1: continuation line with nothing to continue"),
        ("a b", 'line 1: expected "name: member, member"'),
        ("a: b\na: c", 'line 2: alias "a" is defined twice'),
        ("a:", 'line 1: alias "a" has no members'),
        ("a/b: c", 'line 1: not a valid alias name: "a/b"'),
        ("a: b!c", 'line 1: "b!c": not a valid member name'),
        ('a: b, "|/bin/prog -x"', 'line 1: ""|/bin/prog -x"": only local members are supported'),
    ],
)
def test_parseAliasesErrors(text, message):
    """Unsupported or malformed lines give the line number and the problem."""
    with pytest.raises(ConfigError) as caught:
        aliasfiles.parseAliases(text, ["example.test"])
    assert str(caught.value).startswith(message)


def test_parseUsers():
    """Users file: name or name: Full Name, comments and blank lines skipped."""
    assert aliasfiles.parseUsers("# x\nAlice: Alice Liddell\n\nbob\n") == {"alice": "Alice Liddell", "bob": ""}


@pytest.mark.parametrize(
    "users, aliases, message",
    [
        ({"alice"}, {"postmaster": ("alice",)}, None),
        ({"postmaster"}, {}, None),
        ({"alice", "bob"}, {"postmaster": ("alice",), "alice": ("alice", "bob")}, None),  # keep a copy
        ({"alice"}, {"postmaster": ("alice",), "alice": ("alice", "postmaster")}, "alias loop: postmaster -> alice -> postmaster"),
        ({"alice"}, {}, "postmaster must lead to a user"),
        ({"alice"}, {"postmaster": ("a",), "a": ("a",)}, "alias loop: a -> a"),
        ({"alice"}, {"postmaster": ("a",), "a": ("b",), "b": ("c",), "c": ("a",)}, "alias loop: a -> b -> c -> a"),
        ({"alice"}, {"postmaster": ("bob",)}, 'alias "postmaster": member "bob" is neither'),
    ],
)
def test_checkAliases(users, aliases, message):
    """Unknown members, loops and a missing postmaster are found; self-copies are fine."""
    if message is None:
        aliasfiles.checkAliases(users, aliases)
    else:
        with pytest.raises(ConfigError, match=message):
            aliasfiles.checkAliases(users, aliases)


def test_expandAlias():
    """Expansion is recursive, first-seen order, without repeats."""
    users = {"alice", "bob", "carol"}
    aliases = {"all": ("team", "carol", "bob"), "team": ("bob", "alice"), "alice": ("alice", "carol")}
    assert aliasfiles.expandAlias("all", users, aliases) == ("bob", "alice", "carol")
    assert aliasfiles.expandAlias("alice", users, aliases) == ("alice", "carol")
    assert aliasfiles.expandAlias("carol", users, aliases) == ("carol",)
    assert aliasfiles.expandAlias("nobody", users, aliases) == ()


# ---------------------------------------------------------------- [relay]


def test_relay_defaults_use_mx():
    """With no [relay] table, mail for other domains goes by MX, on port 25, with rfc5321 timeouts."""
    relay = loads("", "/tmp/x/mailsvc.toml").relay
    assert relay.smarthost is None and relay.routes == () and relay.route_for("any.test") is None
    assert (relay.port, relay.greeting_timeout, relay.data_init_timeout, relay.data_end_timeout) == (25, 300, 120, 600)
    assert relay.max_received_headers == 100 and relay.delay_warning_after == 14400


def test_relay_routes_take_precedence_over_the_smarthost():
    """A per-domain route wins; other domains go to the smarthost."""
    text = '[relay]\nsmarthost = "smtp.isp.test:587"\ntls = "required"\n[[relay.route]]\ndomain = "Partner.TEST"\nhost = "[192.0.2.5]:2525"\ntls = "none"\n'
    relay = loads(text, "/tmp/x/mailsvc.toml").relay
    partner = relay.route_for("partner.test")
    assert (partner.host, partner.port, partner.tls) == ("192.0.2.5", 2525, "none")
    other = relay.route_for("elsewhere.test")
    assert (other.host, other.port, other.tls) == ("smtp.isp.test", 587, "required")


def test_relay_route_auth_reads_the_password_file(tmp_path):
    """username needs password_file, which must exist; the path is resolved against base_dir."""
    (tmp_path / "pw").write_text("secret\n")
    etc = tmp_path / "etc"
    etc.mkdir()
    text = '[[relay.route]]\ndomain = "p.test"\nhost = "h.test"\nusername = "u"\npassword_file = "pw"\n'
    route = loads(text, etc / "mailsvc.toml").relay.routes[0]
    assert route.username == "u" and route.password_file == tmp_path / "pw"


@pytest.mark.parametrize(
    "text, message",
    [
        ('[relay]\nsmarthost = "a:b"', '[relay] smarthost: expected host or host:port, got "a:b"'),
        ("[relay]\nport = 70000", "[relay] port: out of range: 70000"),
        ('[relay]\ntls = "always"', '[relay] tls: must be one of none, opportunistic, required; got "always"'),
        ('[relay]\nsmarthost = "h.test"\ntls = "always"', '[relay] tls: must be one of none, opportunistic, required; got "always"'),
        ("[relay]\nretries = 1", "[relay] retries: unknown key"),
        ('[[relay.route]]\ndomain = "x.test"\nhost = "h"\nusername = "u"', "[[relay.route]][0] password_file: needed with username"),
        ('[[relay.route]]\ndomain = "x.test"\nhost = "h"\npassword_file = "/nonexistent"', "[[relay.route]][0] password_file: file not found: /nonexistent"),
        ('[[relay.route]]\ndomain = "x.test"\nhost = "h"\n[[relay.route]]\ndomain = "X.test"\nhost = "i"', "[[relay.route]][1] domain: x.test has two routes"),
        ('[[relay.route]]\ndomain = "x.test"\nhots = "h"', "[[relay.route]][0] hots: unknown key"),
        ("[relay]\ndelay_warning_after = -1", "[relay] delay_warning_after: expected a number of seconds (0 = off), got -1"),
        ('[relay]\nresolver = "not a host"', '[relay] resolver: not a valid host name: "not a host"'),
    ],
)
def test_relay_errors_name_the_key(text, message):
    """Every [relay] mistake stops with one line naming the key."""
    with pytest.raises(ConfigError) as caught:
        loads(text, "/tmp/x/mailsvc.toml")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_uucp_sites():
    """[[uucp.site]]: name, domains (checked, lower-cased), command with its default, limits."""
    text = '[[uucp.site]]\nname = "faraway"\ndomains = ["FarAway.example"]\n[[uucp.site]]\nname = "b"\ndomains = ["b.example"]\ncommand = ["cat"]\nmax_messages = 2\n'
    a, b = loads(text, "/tmp/x/mailsvc.toml").uucp_sites
    assert (a.name, a.domains, a.command, a.hop) == ("faraway", ("faraway.example",), ("uux", "-r", "-z", "-", "{site}!rsmtp"), "uucp.faraway")
    assert (b.command, b.max_messages, b.max_bytes) == (("cat",), 2, 1048576)


@pytest.mark.parametrize(
    "text, message",
    [
        ('[[uucp.site]]\nname = "Bad Name"\ndomains = ["a.example"]', "[[uucp.site]][0] name: a UUCP site name is lower-case"),
        ('[[uucp.site]]\nname = "a"', "[[uucp.site]][0] domains: at least one domain is needed"),
        ('[[uucp.site]]\nname = "a"\ndomains = ["x.example"]\n[[uucp.site]]\nname = "b"\ndomains = ["x.example"]', "[[uucp.site]][1] domains[0]: x.example already goes to site a"),
        ('[[uucp.site]]\nname = "a"\ndomains = ["x.example"]\ncommand = []', "[[uucp.site]][0] command: expected the command to run"),
        ('[[uucp.site]]\nname = "a"\ndomains = ["x.example"]\nspeed = 9600', "[[uucp.site]][0] speed: unknown key"),
    ],
)
def test_uucp_errors_name_the_key(text, message):
    """[[uucp.site]] mistakes stop with one line naming the key."""
    with pytest.raises(ConfigError) as caught:
        loads(text, "/tmp/x/mailsvc.toml")
    assert message in str(caught.value)

"""``[[hold.site]]`` and ``[atrn]``: read, checked, documented, routed."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailsvc.config import load, loads
from mailsvc.delivery.router import Router
from mailsvc.envelope import Recipient
from mailsvc.errors import ConfigError
from mailsvc.turnconfig import ATRNConfig, CallInConfig, HoldSiteConfig

REPO = Path(__file__).resolve().parent.parent
SITE = '[[hold.site]]\nname = "customer"\ndomains = ["Customer.Example.", "other.example"]\nusers = ["CustUser"]\n'


def read(text: str):
    return loads(text, "/tmp/cfg/etc/mailsvc.toml")


def test_hold_sites_and_atrn_are_read():
    """A site: name, lower-cased domains and users, its hop; [atrn] listen."""
    cfg = read(SITE + '[atrn]\nlisten = ["tcp:366"]\nchallenge_auth_without_tls = false\n')
    assert cfg.hold_sites == (HoldSiteConfig("customer", ("customer.example", "other.example"), ("custuser",)),)
    assert cfg.hold_sites[0].hop == "hold.customer"
    assert cfg.atrn == ATRNConfig(("tcp:366",), False)


def test_defaults_and_the_shipped_file():
    """No site by default; [atrn] listens on loopback 2366; etc/mailsvc.toml says the same."""
    empty = read("")
    assert empty.hold_sites == () and empty.atrn == ATRNConfig()
    assert empty.atrn.listen == ("tcp:2366:interface=127.0.0.1",) and empty.atrn.challenge_auth_without_tls
    shipped = load(REPO / "etc" / "mailsvc.toml")
    assert shipped.atrn == empty.atrn and shipped.hold_sites == ()


@pytest.mark.parametrize(("text", "message"), [
    ('[[hold.site]]\nname = "Bad Name"\ndomains = ["a.example"]\nusers = ["u"]\n', "[[hold.site]][0] name"),
    ('[[hold.site]]\nname = "s"\ndomains = []\nusers = ["u"]\n', "domains: at least one domain"),
    ('[[hold.site]]\nname = "s"\ndomains = ["a.example"]\n', "users: at least one AUTH user"),
    ('[[hold.site]]\nname = "s"\ndomains = ["example.test"]\nusers = ["u"]\n', "example.test already goes to [local] domains"),
    (SITE + SITE.replace('"customer"', '"two"'), "customer.example already goes to hold site customer"),
    (SITE + '[[uucp.site]]\nname = "u"\ndomains = ["customer.example"]\n', "already goes to"),
    ('[[hold.site]]\nname = "s"\ndomains = ["a.example"]\nusers = ["u"]\ncolour = 1\n', "colour: unknown key"),
    ('[atrn]\nlisten = ["nonsense:366"]\n', "[atrn] listen[0]: not a valid endpoint"),
    ('[atrn]\nport = 366\n', "[atrn] port: unknown key"),
])
def test_bad_config_names_the_key(text, message):
    """Each mistake stops start-up with one line naming the key."""
    with pytest.raises(ConfigError) as caught:
        read(text)
    assert message in str(caught.value)


def test_router_sends_held_domains_to_the_hold_hop():
    """Router.from_config: a held domain's recipients go to hold.<name>; others are unchanged."""
    router = Router.from_config(read(SITE))
    assert router.hop_for(Recipient("u@customer.example")) == "hold.customer"
    assert router.hop_for(Recipient("u@other.example")) == "hold.customer"
    assert router.hop_for(Recipient("u@far.example")) == "relay"


# ---------------------------------------------------------------- [[callin]]


@pytest.fixture
def pw(tmp_path):
    """A password file and a CA file under tmp_path/etc (relative paths are from tmp_path)."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "provider.pw").write_text("secret\n")
    (tmp_path / "etc" / "ca.pem").write_text("not checked here\n")
    return tmp_path


def read_callin(root: Path, text: str):
    return loads(text, root / "etc" / "mailsvc.toml")


CALLIN = '[[callin]]\nhost = "mail.provider.example"\nuser = "custuser"\npassword_file = "etc/provider.pw"\n'


def test_callin_defaults_and_every_key(pw):
    """Defaults: ATRN on 366, every 900 s, TLS required; TURN defaults to 25;
    every key read (paths from base_dir, domains lower-cased)."""
    (first,) = read_callin(pw, CALLIN).callins
    assert first == CallInConfig(host="mail.provider.example", port=366, user="custuser",
                                 password_file=pw / "etc" / "provider.pw")
    assert (first.mode, first.interval, first.tls, first.domains, first.ca_file, first.tls_name) == (
        "atrn", 900, "required", (), None, None)
    assert first.command == "ATRN"
    cfg = read_callin(pw, CALLIN + 'mode = "turn"\n' + CALLIN.replace('"mail.provider.example"', '"[::1]:2366"')
                      + 'domains = ["Customer.Example."]\ninterval = 1.5\ntls = "opportunistic"\n'
                      + 'ca_file = "etc/ca.pem"\ntls_name = "mx.provider.example"\n')
    turn, atrn = cfg.callins
    assert (turn.mode, turn.command, turn.port) == ("turn", "TURN", 25)
    assert (atrn.host, atrn.port, atrn.domains, atrn.interval, atrn.tls) == ("::1", 2366, ("customer.example",), 1.5, "opportunistic")
    assert (atrn.ca_file, atrn.tls_name) == (pw / "etc" / "ca.pem", "mx.provider.example")
    assert read_callin(pw, CALLIN.replace('"mail.provider.example"', '"p.example:587"') + 'tls = "none"\n').callins[0].port == 587
    assert read_callin(pw, "").callins == ()
    assert load(REPO / "etc" / "mailsvc.toml").callins == ()


@pytest.mark.parametrize(("extra", "message"), [
    ('mode = "etrn"\n', '[[callin]][0] mode: must be one of atrn, turn; got "etrn"'),
    ('interval = 0\n', "[[callin]][0] interval: expected a positive number of seconds, got 0"),
    ('interval = "often"\n', "[[callin]][0] interval: expected a positive number"),
    ('tls = "maybe"\n', '[[callin]][0] tls: must be one of required, opportunistic, none; got "maybe"'),
    ('domains = ["bad domain"]\n', "[[callin]][0] domains[0]: not a valid domain name"),
    ('mode = "turn"\ndomains = ["customer.example"]\n', "[[callin]][0] domains: for ATRN only"),
    ('ca_file = "etc/missing.pem"\n', "[[callin]][0] ca_file: file not found"),
    ('tls_name = ""\n', "[[callin]][0] tls_name: expected a non-empty string"),
    ('port = 366\n', "[[callin]][0] port: unknown key"),
])
def test_bad_callin_names_the_key(pw, extra, message):
    """Each mistake in a [[callin]] stops start-up naming the key."""
    with pytest.raises(ConfigError) as caught:
        read_callin(pw, CALLIN + extra)
    assert message in str(caught.value)


@pytest.mark.parametrize(("text", "message"), [
    (CALLIN.replace('host = "mail.provider.example"\n', ""), "[[callin]][0] host: missing"),
    (CALLIN.replace('"mail.provider.example"', '"p.example:99999"'), "[[callin]][0] host: expected host or host:port"),
    (CALLIN.replace('"mail.provider.example"', '"p.example:smtp"'), "[[callin]][0] host: expected host or host:port"),
    (CALLIN.replace('"mail.provider.example"', '""'), "[[callin]][0] host: expected a non-empty string"),
    (CALLIN.replace('user = "custuser"\n', ""), "[[callin]][0] user: missing"),
    (CALLIN.replace('password_file = "etc/provider.pw"\n', ""), "[[callin]][0] password_file: missing"),
    (CALLIN.replace("provider.pw", "nothing.pw"), "[[callin]][0] password_file: file not found"),
    ('callin = 1\n', "[[callin]]: expected an array of tables"),
])
def test_bad_callin_required_keys(pw, text, message):
    with pytest.raises(ConfigError) as caught:
        read_callin(pw, text)
    assert message in str(caught.value)

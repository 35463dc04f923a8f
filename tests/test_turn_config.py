"""``[[hold.site]]`` and ``[atrn]``: read, checked, documented, routed."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailsvc.config import load, loads
from mailsvc.delivery.router import Router
from mailsvc.envelope import Recipient
from mailsvc.errors import ConfigError
from mailsvc.turnconfig import ATRNConfig, HoldSiteConfig

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

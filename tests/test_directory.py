"""Tests for mailsvc.directory: local domains, resolving and expanding addresses."""

from __future__ import annotations

from types import MappingProxyType

import pytest
from zope.interface.verify import verifyObject

from mailsvc.config import LocalConfig, loads
from mailsvc.directory import ConfigDirectory, ConfigDirectoryFactory
from mailsvc.envelope import LocalMailbox
from mailsvc.interfaces import IRecipientDirectory, IRecipientDirectoryFactory

LOCAL = LocalConfig(
    domains=("example.test", "other.test"),
    users=MappingProxyType({"alice": "Alice Liddell", "bob": "", "carol": "Carol"}),
    aliases=MappingProxyType(
        {
            "postmaster": ("root",),
            "root": ("alice",),
            "team": ("alice", "bob"),
            "all": ("team", "carol", "alice"),
            "carol": ("carol", "bob"),  # carol keeps a copy and forwards one to bob
        }
    ),
)


@pytest.fixture
def directory():
    """A directory over the LOCAL users and aliases."""
    return ConfigDirectory(LOCAL)


def test_verifyObject(directory):
    """The directory and its factory provide their interfaces."""
    assert verifyObject(IRecipientDirectory, directory)
    assert verifyObject(IRecipientDirectoryFactory, ConfigDirectoryFactory())


@pytest.mark.parametrize(
    "domain, local",
    [
        ("example.test", True),
        ("EXAMPLE.Test", True),
        ("example.test.", True),
        ("other.test", True),
        ("sub.example.test", False),
        ("example.org", False),
        ("", False),
    ],
)
def test_isLocalDomain(directory, domain, local):
    """Local domains match without regard to case or a trailing dot."""
    assert directory.isLocalDomain(domain) is local


def mb(user, domain="example.test", name=None):
    """The LocalMailbox expected for ``user`` at ``domain``."""
    return LocalMailbox(f"{user}@{domain}", user, LOCAL.users[user] if name is None else name)


@pytest.mark.parametrize(
    "address, expected",
    [
        ("alice@example.test", (mb("alice"),)),
        ("ALICE@Example.TEST", (mb("alice"),)),
        ("alice@example.test.", (mb("alice"),)),
        ("bob@other.test", (mb("bob", "other.test"),)),
        ("team@example.test", (mb("alice"), mb("bob"))),
        ("all@other.test", (mb("alice", "other.test"), mb("bob", "other.test"), mb("carol", "other.test"))),
        ("carol@example.test", (mb("carol"), mb("bob"))),
        ("postmaster@example.test", (mb("alice"),)),
        ("PostMaster@other.test", (mb("alice", "other.test"),)),
        ("postmaster", (mb("alice"),)),  # rfc5321 4.5.1: <Postmaster> with no domain
        ("Postmaster", (mb("alice"),)),
        ("alice", ()),
        ("nobody@example.test", ()),
        ("alice@example.org", ()),
        ("@example.test", ()),
        ("a@b@example.test", ()),
        ("", ()),
    ],
)
def test_resolve(directory, address, expected):
    """Users resolve to themselves, aliases recursively to users, unknown to ()."""
    assert directory.resolve(address) == expected


@pytest.mark.parametrize(
    "address, expected",
    [
        ("team@example.test", ("alice@example.test", "bob@example.test")),
        ("TEAM@other.test", ("alice@other.test", "bob@other.test")),
        ("all@example.test", ("team@example.test", "carol@example.test", "alice@example.test")),
        ("postmaster", ("root@example.test",)),
        ("alice@example.test", None),
        ("nobody@example.test", None),
        ("team@example.org", None),
    ],
)
def test_expand(directory, address, expected):
    """EXPN lists an alias's members one level deep, at the asked domain; None otherwise."""
    assert directory.expand(address) == expected


def test_postmasterWhenUser(tmp_path):
    """A user named postmaster receives postmaster mail when there is no alias."""
    config = loads('[local]\nusers = ["Postmaster", "alice"]\naliases = {}\n', tmp_path / "etc" / "m.toml")
    directory = ConfigDirectoryFactory().makeDirectory(config)
    assert directory.resolve("POSTMASTER@example.test") == (LocalMailbox("postmaster@example.test", "postmaster", ""),)
    assert directory.expand("postmaster@example.test") is None


def test_factoryFromLoadedConfig(tmp_path):
    """The config plugin builds a directory from a loaded Config."""
    factory = ConfigDirectoryFactory()
    assert factory.name == "config"
    directory = factory.makeDirectory(loads("", tmp_path / "etc" / "m.toml"))
    assert isinstance(directory, ConfigDirectory)
    assert directory.resolve("team@example.test") == (
        LocalMailbox("alice@example.test", "alice"),
        LocalMailbox("bob@example.test", "bob"),
    )

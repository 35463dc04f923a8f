"""The config of the turn-around roles: ``[[hold.site]]`` and ``[atrn]``.

Read by ``mailsvc.config`` (as ``securityconfig`` is), kept apart so that
config.py stays small. See etc/mailsvc.toml for every key.

- ``[[hold.site]]``: a site connected now and then. Mail for its
  ``domains`` is accepted from anyone (we are their MX) and kept under the
  spool hop ``hold.<name>`` until the site calls in: TURN or ATRN by one of
  its ``users`` (AUTH login names), or ETRN when a ``[[relay.route]]`` says
  where the site is reachable.
- ``[atrn]``: the On-Demand Mail Relay listeners (rfc2645, port 366).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mailsvc.configtable import Table, show

_SITE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")  # safe as a spool hop


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


def read_hold(table, check_domain: Callable, claimed: Mapping[str, str]) -> tuple[HoldSiteConfig, ...]:
    """``[[hold.site]]`` tables. ``table`` is the ``[hold]`` table reader of
    ``mailsvc.config``; ``claimed`` maps domains already given elsewhere
    (local, UUCP sites) to who has them."""

    entries = table.data.get("site", [])
    if not isinstance(entries, list):
        table.fail("site", f"expected [[hold.site]] tables, got {show(entries)}")
    sites: list[HoldSiteConfig] = []
    taken = dict(claimed)
    for index, entry in enumerate(entries):
        st = Table(table.fileName, f"[[hold.site]][{index}]", entry, tuple(HoldSiteConfig.__dataclass_fields__))
        name = st.string("name", "")
        if not _SITE_NAME.match(name):
            st.fail("name", f"a site name is lower-case letters, digits, - and _; got {show(name)}")
        if any(site.name == name for site in sites):
            st.fail("name", f"site {name} is defined twice")
        domains = []
        for d, text in enumerate(st.strings("domains", [])):
            domain = check_domain(text)
            if domain is None:
                st.fail(f"domains[{d}]", f"not a valid domain name: {show(text)}")
            if domain in taken:
                st.fail(f"domains[{d}]", f"{domain} already goes to {taken[domain]}")
            taken[domain] = f"hold site {name}"
            domains.append(domain)
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
        sites.append(HoldSiteConfig(name=name, domains=tuple(domains), users=tuple(users)))
    return tuple(sites)


def read_atrn(table, check_endpoint: Callable) -> ATRNConfig:
    """``[atrn]``."""

    default = ATRNConfig()
    listen = table.strings("listen", list(default.listen))
    for index, description in enumerate(listen):
        problem = check_endpoint(description)
        if problem is not None:
            table.fail(f"listen[{index}]", f"not a valid endpoint: {show(description)} ({problem})")
    return ATRNConfig(
        listen=listen,
        challenge_auth_without_tls=table.boolean("challenge_auth_without_tls", default.challenge_auth_without_tls),
    )


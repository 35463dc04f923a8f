"""The ``config`` recipient directory: local domains, users and aliases from the config.

Answers are computed from ``mailsvc.config.LocalConfig`` alone, in memory,
and returned directly (no Deferred). Local parts match without regard to
case (and, when not ASCII, to Unicode normal form); domains match in their
A-label form, so ``bücher.example`` is ``xn--bcher-kva.example`` (rfc6531
3.2); every user receives mail at every local domain.
"""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailsvc.aliases import expandAlias, normalName
from mailsvc.envelope import LocalMailbox
from mailsvc.interfaces import IRecipientDirectory, IRecipientDirectoryFactory
from mailsvc.smtp.address import domain_key

POSTMASTER = "postmaster"


@implementer(IRecipientDirectory)
class ConfigDirectory:
    """Recipients from a ``LocalConfig`` (``[local]``): users and aliases.

    What it holds does not change once made (a new config makes a new
    directory), so the answers of ``resolve`` are kept.
    """

    def __init__(self, local) -> None:
        self.domains = tuple(local.domains)
        self.users = dict(local.users)
        self.aliases = dict(local.aliases)
        # (local part, domain) -> resolve's answer, for known names only: at
        # most (users + aliases) x domains entries, whatever clients ask.
        # Expanding aliases and making the LocalMailbox values cost more
        # than the rest of a RCPT lookup.
        self._resolved: dict[tuple[str, str], tuple[LocalMailbox, ...]] = {}

    def isLocalDomain(self, domain: str) -> bool:
        """Whether ``domain`` is local; case, a trailing dot and U-labels or
        A-labels do not matter."""
        return domain_key(domain) in self.domains

    def _split(self, address: str) -> tuple[str, str] | None:
        """(local part lower-cased, local domain) of ``address``, or None if not local.

        A bare ``postmaster`` (rfc5321 4.5.1: ``RCPT TO:<Postmaster>`` must
        be accepted) goes to the first local domain.
        """
        local, at, domain = address.rpartition("@")
        if not at:
            local, domain = address, self.domains[0] if self.domains else ""
            if local.lower() != POSTMASTER:
                return None
        domain = domain_key(domain)
        if not local or domain not in self.domains:
            return None
        return normalName(local), domain

    def resolve(self, address: str) -> tuple[LocalMailbox, ...]:
        """The final mailboxes of ``address``: aliases expanded, no repeats; ``()`` if unknown."""
        split = self._split(address)
        if split is None:
            return ()
        mailboxes = self._resolved.get(split)
        if mailboxes is None:
            local, domain = split
            mailboxes = tuple(
                LocalMailbox(f"{user}@{domain}", user, self.users.get(user, ""))
                for user in expandAlias(local, self.users, self.aliases)
            )
            if mailboxes:
                self._resolved[split] = mailboxes
        return mailboxes

    def expand(self, address: str) -> tuple[str, ...] | None:
        """The members of alias ``address`` (one level, ``member@domain``), or None if not an alias."""
        split = self._split(address)
        if split is None or split[0] not in self.aliases:
            return None
        local, domain = split
        return tuple(f"{member}@{domain}" for member in self.aliases[local])


@implementer(IPlugin, IRecipientDirectoryFactory)
class ConfigDirectoryFactory:
    """The ``config`` directory plugin: ``[local]`` users and aliases."""

    name = "config"
    description = "Users and aliases from [local] in the config (users_file, aliases_file)"

    def makeDirectory(self, config) -> ConfigDirectory:
        """A ``ConfigDirectory`` over ``config.local`` (a ``mailsvc.config.Config``)."""
        return ConfigDirectory(config.local)

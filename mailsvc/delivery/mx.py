"""Where mail for a domain goes: MX lookup and the list of addresses to try.

``MXResolver.resolve(domain)`` asks a ``twisted.names`` resolver for the MX
records of ``domain`` and the A and AAAA records of each exchange, and
answers with an ``MXResult``: the hosts in the order rfc5321 5.1 says to try
them, each with every address found, so the relay agent can try them all
before it defers. Failures come as ``mailsvc.errors`` delivery errors that
say whether trying later may help.

An internationalized domain (a U-label, such as ``bücher.example``, which
SMTPUTF8 mail may carry) is looked up in A-label form (rfc6531 3.2: "transform
the internationalized domain name to A-label form ... as specified in RFC
5890"): IDNA 2008 (rfc5891) with the UTS 46 mapping, so that ``BÜCHER`` is
``bücher`` (``ascii_name``). A name that is not a valid IDN fails with 5.1.3.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby

from twisted.internet import defer
from twisted.names import dns
from twisted.names import error as dns_error

from mailsvc.errors import PermanentDeliveryError, TemporaryDeliveryError
from mailsvc.smtp.address import ascii_domain

# DNS answers that mean "this name does not exist" rather than "ask later".
_NO_SUCH_NAME = (dns_error.DNSNameError, dns_error.AuthoritativeDomainError)
# DNS answers that mean "the name server could not answer now" (SERVFAIL,
# REFUSED, timeouts, network trouble): rfc5321 5.1, the message is queued.
_TRY_LATER = (dns_error.DomainError, defer.TimeoutError, TimeoutError, OSError)


@dataclass(frozen=True)
class Host:
    """One mail exchanger: its name, MX preference and addresses to try in order."""

    name: str
    preference: int
    addresses: list[str]


@dataclass(frozen=True)
class MXResult:
    """The hosts to try for a domain, best first.

    ``implicit`` is true when the domain has no MX records and its own
    addresses stand for it (rfc5321 5.1, "implicit MX").
    """

    hosts: list[Host]
    implicit: bool = False

    def targets(self) -> list[tuple[str, str]]:
        """Every ``(host name, address)`` pair in the order to try them."""
        return [(host.name, address) for host in self.hosts for address in host.addresses]


class MXResolver:
    """Finds the hosts to deliver to for a domain (rfc5321 5.1, rfc7505).

    :param resolver: a ``twisted.names`` ``IResolver`` (production:
        ``twisted.names.client.createResolver(...)``).
    :param our_hostnames: names and addresses this server is known by; an MX
        naming one of them, and every MX no better than it, is dropped.
    :param rng: the ``random.Random`` that shuffles MX of equal preference.
    :param timeout: the ``twisted.names`` timeout sequence for each query, or
        ``None`` for the resolver's default.
    """

    def __init__(
        self,
        resolver,
        our_hostnames: Iterable[str] = frozenset(),
        rng: random.Random | None = None,
        timeout: Sequence[float] | None = None,
    ) -> None:
        self._resolver = resolver
        self._ours = frozenset(_normal_self_name(name) for name in our_hostnames)
        self._rng = rng or random.Random()
        self._timeout = timeout

    def resolve(self, domain: str) -> defer.Deferred:
        """The hosts to try for ``domain``: a Deferred firing with an ``MXResult``.

        It errbacks with ``PermanentDeliveryError`` (5.1.2 no such domain,
        5.1.10 null MX, 5.4.6 the best MX is this server, 5.1.3 bad syntax) or
        ``TemporaryDeliveryError`` (4.4.3: DNS failed or no MX host has an
        address).
        """
        return defer.Deferred.fromCoroutine(self._resolve(domain))

    async def _resolve(self, domain: str) -> MXResult:
        domain = _normal_domain(domain)
        if domain.startswith("["):
            return self._literal(domain)
        try:
            answers, _authority, _additional = await self._resolver.lookupMailExchange(
                domain, self._timeout
            )
        except _NO_SUCH_NAME:
            # rfc5321 5.1: a non-existent domain MUST be reported as an error.
            raise PermanentDeliveryError(f"domain {domain} does not exist", "5.1.2")
        except _TRY_LATER as e:
            # rfc5321 5.1: on a temporary error the message is queued and retried.
            raise TemporaryDeliveryError(f"MX lookup for {domain} failed: {_describe(e)}", "4.4.3")
        exchanges = _exchanges(answers)
        if len(exchanges) == 1 and exchanges[0] == (0, ""):
            # rfc7505 3, 4.1: a single MX "0 ." says the domain takes no mail.
            raise PermanentDeliveryError(f"domain {domain} does not accept mail (null MX)", "5.1.10")
        implicit = not exchanges
        if implicit:
            # rfc5321 5.1: no MX records: the domain itself, as if an MX of preference 0.
            exchanges = [(0, domain)]
        # "." anywhere else is not a host name (rfc7505 3): skip it, never fall back
        # to the domain's own addresses (rfc5321 5.1: MX present, none usable).
        exchanges = [(preference, name) for preference, name in exchanges if name]
        exchanges = self._drop_ourselves(domain, exchanges, lambda name: name in self._ours)
        found = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self._addresses(name)) for _, name in exchanges]
        )
        addresses = {name: found_addresses for (_, name), (found_addresses, _) in zip(exchanges, found)}
        exchanges = self._drop_ourselves(
            domain, exchanges, lambda name: not self._ours.isdisjoint(addresses[name])
        )
        # rfc5321 5.1: the exchange's name MUST resolve to an address; skip those that do not.
        hosts = [
            Host(name, preference, addresses[name])
            for preference, name in exchanges
            if addresses[name]
        ]
        if not hosts:
            if implicit and not any(temporary for _, temporary in found):
                # rfc5321 5.1: "the implicit MX is unusable" MUST be reported as an error.
                raise PermanentDeliveryError(f"domain {domain} has no MX and no address", "5.1.2")
            raise TemporaryDeliveryError(f"no mail exchanger of {domain} has an address", "4.4.3")
        return MXResult(self._shuffled(hosts), implicit)

    def _literal(self, domain: str) -> MXResult:
        """An address literal (rfc5321 4.1.3) stands for itself: no DNS."""
        text = domain[1:-1] if domain.endswith("]") else ""
        if text[:5].lower() == "ipv6:":
            text, version = text[5:], 6
        else:
            version = 4
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            address = None
        if address is None or address.version != version:
            raise PermanentDeliveryError(f"bad address literal {domain}", "5.1.3")
        name = str(address)
        if name in self._ours:
            raise PermanentDeliveryError(f"mail for {domain} loops back to myself", "5.4.6")
        return MXResult([Host(name, 0, [name])])

    def _drop_ourselves(self, domain, exchanges, is_ours) -> list[tuple[int, str]]:
        """rfc5321 5.1: if we are an MX, drop it and every MX of equal or higher preference."""
        mine = [preference for preference, name in exchanges if is_ours(name)]
        if not mine:
            return exchanges
        kept = [(preference, name) for preference, name in exchanges if preference < min(mine)]
        if not kept:
            # rfc5321 5.1: nothing left: the message MUST be returned as undeliverable.
            raise PermanentDeliveryError(f"mail for {domain} loops back to myself", "5.4.6")
        return kept

    async def _addresses(self, name: str) -> tuple[list[str], bool]:
        """Every A then AAAA address of ``name``, and whether a lookup failed for now."""
        results = await defer.DeferredList(
            [
                self._resolver.lookupAddress(name, self._timeout),
                self._resolver.lookupIPV6Address(name, self._timeout),
            ],
            consumeErrors=True,
        )
        addresses: list[str] = []
        temporary = False
        for succeeded, result in results:
            if not succeeded:
                # NXDOMAIN or no data: this host has no address; anything else may pass.
                temporary = temporary or not result.check(*_NO_SUCH_NAME)
                continue
            for record in result[0]:
                address = _address_of(record)
                if address and address not in addresses:
                    addresses.append(address)
        return addresses, temporary

    def _shuffled(self, hosts: list[Host]) -> list[Host]:
        """Best preference first; random order among equals (rfc5321 5.1)."""
        ordered: list[Host] = []
        for _, group in groupby(sorted(hosts, key=lambda h: (h.preference, h.name)), lambda h: h.preference):
            same = list(group)
            self._rng.shuffle(same)
            ordered.extend(same)
        return ordered


def _exchanges(answers) -> list[tuple[int, str]]:
    """The ``(preference, exchange)`` of each MX record in ``answers``, once per exchange."""
    best: dict[str, int] = {}
    for record in answers:
        if record.type != dns.MX:
            continue  # e.g. the CNAME a recursive server put in front (rfc5321 5.1)
        name = _normal_name(record.payload.name.name.decode("ascii", "replace"))
        preference = record.payload.preference
        best[name] = min(preference, best.get(name, preference))
    return sorted(((preference, name) for name, preference in best.items()))


def _address_of(record) -> str | None:
    """The text form of an A or AAAA record's address; ``None`` for other records."""
    if record.type == dns.A:
        return record.payload.dottedQuad()
    if record.type == dns.AAAA:
        return socket.inet_ntop(socket.AF_INET6, record.payload.address)
    return None


def _normal_name(name: str) -> str:
    """A host name compared without case or trailing dot."""
    return name.strip().rstrip(".").lower()


def _normal_self_name(name: str) -> str:
    """One of our names or addresses, in the form it is compared in."""
    text = name.strip().strip("[]")
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return _normal_name(name)


def ascii_name(domain: str) -> str:
    """``domain`` as the DNS knows it: lower case, no trailing dot, its
    U-labels as A-labels (rfc6531 3.2; ``mailsvc.smtp.address.ascii_domain``:
    IDNA 2008 with the UTS 46 mapping). An ASCII name is only lower-cased,
    its labels checked for length (rfc1035 2.3.4), as Postfix converts only
    non-ASCII names.

    :raise ValueError: (``AddressError``, ``UnicodeError``) not a valid name.
    """
    name = _normal_name(domain) if domain.isascii() else ascii_domain(domain.strip())
    if any(not 0 < len(label) <= 63 for label in name.split(".")):
        raise UnicodeError(f"label empty or too long in {domain!r}")
    return name


def _normal_domain(domain: str) -> str:
    """``domain`` as DNS wants it: ASCII (A-labels), lower case, no trailing dot."""
    given = domain.strip()
    if given.startswith("["):
        return given
    try:
        domain = ascii_name(given)
    except ValueError:
        domain = ""
    if not domain:
        # rfc3463 3.2: X.1.3 bad destination mailbox address syntax.
        raise PermanentDeliveryError(f"bad destination domain {given!r}", "5.1.3")
    return domain


def _describe(exc: BaseException) -> str:
    """A short reason for a DNS failure, for the error text."""
    if isinstance(exc, (defer.TimeoutError, TimeoutError)):
        return "timed out"
    if isinstance(exc, dns_error.DNSServerError):
        return "server failure (SERVFAIL)"
    return type(exc).__name__

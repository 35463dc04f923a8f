"""Held mail: the agent of the ``hold.<site>`` hops.

A ``[[hold.site]]`` is connected now and then. Its mail waits in the spool
under ``hold.<name>`` until the site asks for it: TURN or ATRN on a
connection it opened (the roles reverse and the mail goes back over it), or
ETRN (rfc1985: the mail goes to where a ``[[relay.route]]`` says the site
is, over a new connection).

``HoldAgent`` is the ``IDeliveryAgent`` of every hold hop. It sends nothing
itself: while a site is being served, ``release(hop, domains, agent)``
lends it an agent for those domains (the reversed session's
``mailsvc.turnaround.ReversedSessionAgent``, or the ``RelayAgent`` for
ETRN), and each message the queue runner hands over goes to that agent for
the recipients of those domains. Every other recipient is deferred with
``4.4.1 held for <site> until it calls in (TURN/ATRN/ETRN)``.

The queue runner never tries hold hops on its own (``on_demand_hops``): a
held message costs no attempt, no retry and no log line until its site asks
(``QueueRunner.flush``), or until it is older than ``give_up_after``, when
that deferral makes the runner give up and bounce it. The runner keeps doing
what it does for every hop: one delivery of a message at a time, results
saved per recipient, bounces and DSN reports.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailsvc.envelope import QueuedMessage, RecipientState
from mailsvc.errors import TemporaryDeliveryError
from mailsvc.interfaces import IDeliveryAgent


def domain_of(address: str) -> str:
    """The domain of ``address``, lower case, without a trailing dot."""
    return address.rpartition("@")[2].lower().rstrip(".")


@dataclass(eq=False)
class Release:
    """The mail of ``domains`` under ``hop`` may go out through ``agent`` now."""

    hop: str
    domains: frozenset[str]
    agent: object  # IDeliveryAgent


@implementer(IDeliveryAgent)
class HoldAgent:
    """Keeps each hold site's mail until it is released to another agent.

    :param sites: the ``HoldSiteConfig`` of every ``[[hold.site]]``.
    :param log: a ``twisted.logger.Logger``.
    """

    def __init__(self, sites: Iterable, log: Logger | None = None) -> None:
        self.sites = {site.hop: site for site in sites}
        self._releases: list[Release] = []
        self._log = log or Logger(namespace="mailsvc.delivery.hold")

    @property
    def hops(self) -> frozenset[str]:
        """The hops this agent serves (for ``QueueRunner(on_demand_hops=...)``)."""
        return frozenset(self.sites)

    def release(self, hop: str, domains: Iterable[str], agent) -> Release:
        """Let the mail of ``domains`` under ``hop`` go out through ``agent``
        until ``end(release)``. The newest release of a domain wins."""
        release = Release(hop, frozenset(d.lower().rstrip(".") for d in domains), agent)
        self._releases.insert(0, release)
        return release

    def end(self, release: Release) -> None:
        """The release is over: that mail is held again."""
        if release in self._releases:
            self._releases.remove(release)

    def releasing(self, hop: str) -> bool:
        """True while some mail of ``hop`` is released."""
        return any(r.hop == hop for r in self._releases)

    def _release_for(self, hop: str, domain: str) -> Release | None:
        for release in self._releases:
            if release.hop == hop and domain in release.domains:
                return release
        return None

    # ---------------------------------------------------------- IDeliveryAgent

    def deliver(self, message: QueuedMessage) -> defer.Deferred:
        """Released recipients go to their release's agent; the rest stay held.

        :return: a Deferred firing with ``{address: None | Delivered | DeliveryError}``.
        """
        return defer.Deferred.fromCoroutine(self._deliver(message))

    async def _deliver(self, message: QueuedMessage) -> dict:
        site = self.sites.get(message.hop)
        name = site.name if site is not None else message.hop
        held = TemporaryDeliveryError(f"held for {name} until it calls in (TURN/ATRN/ETRN)", "4.4.1")
        results: dict = {}
        groups: dict[int, tuple[Release, list]] = {}
        for recipient in message.envelope.recipients:
            if recipient.state is not RecipientState.PENDING:
                continue
            release = self._release_for(message.hop, domain_of(recipient.address))
            if release is None:
                results[recipient.address] = held
            else:
                groups.setdefault(id(release), (release, []))[1].append(recipient)
        for release, recipients in groups.values():
            part = message.evolve(envelope=message.envelope.evolve(recipients=tuple(recipients)))
            try:
                outcome = await defer.maybeDeferred(release.agent.deliver, part)
            except Exception as e:  # an agent never should; keep the mail held
                self._log.failure("releasing id={id} of {hop} failed", id=message.id, hop=message.hop)
                outcome = {r.address: TemporaryDeliveryError(f"internal error: {e}", "4.3.0") for r in recipients}
            for recipient in recipients:
                results[recipient.address] = outcome.get(
                    recipient.address, TemporaryDeliveryError("no result from the releasing agent", "4.3.0")
                )
        return results

"""Turn-around, provider side: TURN (rfc821), ATRN (rfc2645), ETRN (rfc1985).

A site connected now and then (a ``[[hold.site]]``) has its mail held in the
spool (``mailsvc.delivery.hold``). When it calls in:

- **TURN** (rfc821 4.1.1) on an SMTP listener, or **ATRN** (rfc2645 5.2.1)
  on the On-Demand Mail Relay listener: only for an authenticated client,
  and only for the domains its login owns (DESIGN rule 4; rfc5321 F.1).
  ``TurnAround.on_turn`` / ``on_atrn`` check that and that mail waits, then
  accept: the server machine says 250 and enters ``TURNED``. The server glue
  calls ``take_over``, which puts an ``SMTPClientProtocol`` (the relay's
  client glue) on the same transport, TLS session included
  (``switch_protocol``), fed the bytes the machine had not read. The
  ``ReversedSession`` waits for the customer's 220 and EHLO, lends the hold
  agent a ``ReversedSessionAgent`` for those domains and asks the queue
  runner to deliver them (``flush``), so each message is removed from the
  hold hop only once the customer said 250 after its end of data; a broken
  connection leaves what was not acknowledged held (at least once, never
  lost). Then QUIT.
- **ETRN** (rfc1985) on the MX listeners: ``on_etrn`` starts a delivery run
  over new connections, at once, for the mail queued for a domain
  (``ETRN domain``), a domain and its subdomains (``ETRN @domain``) or a
  queue (``ETRN #relay``, ``#uucp.<site>``, ``#hold.<site>``): 251 when
  nothing waits, 253 with the count otherwise, 458/459 when it cannot or
  may not. Held mail goes out by ETRN only to a ``[[relay.route]]`` of its
  domain: the provider's config says where the customer is reachable.

Replies: TURN before AUTH 530 5.7.0; TURN by a login owning no held domain
502 5.7.1 (rfc821 4.3: 502 is TURN's refusal); ATRN for a domain not owned
450 4.7.1 (rfc2645 5.2.1: then nothing is sent for any domain); nothing
held 453 4.2.0 "You have no mail" (rfc2645 7, for TURN too); the spool
cannot be read 451 4.3.0.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailsvc.bsmtp import peek_header
from mailsvc.clientprotocol import CHUNK_SIZE, SMTPClientProtocol
from mailsvc.clientresults import SendResult, SMTPSessionError
from mailsvc.configtable import checkDomain
from mailsvc.delivery.hold import domain_of
from mailsvc.delivery.relayoutcome import PASSED_ON, dsn_parameters, transaction_results
from mailsvc.envelope import QueuedMessage, RecipientState
from mailsvc.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError
from mailsvc.interfaces import IDeliveryAgent
from mailsvc.smtp.client import ClientSettings
from mailsvc.smtp.client_events import Transaction
from mailsvc.smtp.replies import Reply

log = Logger(namespace="mailsvc.turnaround")


# ---------------------------------------------------------------- the switch


_WRAPPER_ATTRIBUTES = ("wrappedProtocol", "_wrappedProtocol")  # TLS layers; endpoint wrappers


def switch_protocol(old, new, trailing: bytes = b"") -> None:
    """Put protocol ``new`` in the place of ``old`` on ``old``'s transport.

    Whoever delivers the transport's bytes to ``old`` delivers them to
    ``new`` from now on. That is found by walking down from the transport:
    a TCP connection's ``protocol``, then through the layers wrapping the
    application protocol (a TLS layer's ``wrappedProtocol`` after STARTTLS or
    on an implicit-TLS listener, whose layer is the transport itself; a
    client endpoint's ``_wrappedProtocol``), so the TLS session goes on.
    ``new`` is then connected (``makeConnection``) and fed ``trailing``,
    the bytes ``old`` had received but not read (h11's ``trailing_data``).
    """
    transport = old.transport
    holder, attribute = None, None
    node, via = transport, ("protocol", *_WRAPPER_ATTRIBUTES)
    for _ in range(8):  # a handful of layers at most
        found = [(a, getattr(node, a)) for a in via if getattr(node, a, None) is not None]
        if not found:
            break
        for a, child in found:
            if child is old:
                holder, attribute = node, a
                break
        if holder is not None:
            break
        node, via = found[0][1], _WRAPPER_ATTRIBUTES
    if holder is None:
        raise RuntimeError(f"cannot find what feeds {old!r} on {transport!r}")
    setattr(holder, attribute, new)
    new.makeConnection(transport)
    if trailing:
        new.dataReceived(trailing)


# ---------------------------------------------------------------- plans


@dataclass
class TurnPlan:
    """What a call-in that was accepted will receive: ``hops`` maps each hold
    hop to the domains asked for; ``count`` messages were waiting."""

    user: str
    command: str  # "TURN" or "ATRN"
    hops: dict[str, frozenset[str]] = field(default_factory=dict)
    count: int = 0

    def wants(self, message: QueuedMessage) -> bool:
        """Whether ``message`` has a pending recipient this plan delivers."""
        domains = self.hops.get(message.hop)
        return bool(domains) and any(
            r.state is RecipientState.PENDING and domain_of(r.address) in domains for r in message.envelope.recipients
        )

    @property
    def domains(self) -> list[str]:
        return sorted(d for ds in self.hops.values() for d in ds)


class TurnAround:
    """Answers TURN, ATRN and ETRN for every listener of a server and runs
    the reversed sessions. See the module docstring.

    :param sites: the ``HoldSiteConfig`` of every ``[[hold.site]]``.
    :param spool: the ``ISpool`` (read to see what waits).
    :param runner: the ``QueueRunner`` (``flush``, ``idle``).
    :param hold_agent: the ``HoldAgent`` of the hold hops.
    :param clock: an ``IReactorTime`` for the reversed sessions' timeouts.
    :param helo_name: the name we give in EHLO once the roles are reversed.
    :param timeouts: the client timeouts per phase (``clientprotocol.timeouts_from``).
    :param run_blocking: ``run_blocking(f, *args) -> Deferred`` for spool reads.
    :param relay_agent: the ``RelayAgent``, which ETRN lends held mail to.
    :param routed_domains: domains with a ``[[relay.route]]`` (ETRN of held mail).
    :param local_domains: our local domains (ETRN for them: 459).
    :param etrn_queues: the queue names ``ETRN #name`` may start (non-hold hops).
    """

    def __init__(
        self,
        *,
        sites: Iterable,
        spool,
        runner,
        hold_agent,
        clock,
        helo_name: str,
        timeouts: Mapping[str, float] | None = None,
        run_blocking: Callable = defer.maybeDeferred,
        relay_agent=None,
        routed_domains: Iterable[str] = (),
        local_domains: Iterable[str] = (),
        etrn_queues: Iterable[str] = ("relay",),
    ) -> None:
        self.sites = tuple(sites)
        self.spool = spool
        self.runner = runner
        self.hold_agent = hold_agent
        self.clock = clock
        self.helo_name = helo_name
        self.timeouts = dict(timeouts or {})
        self.run_blocking = run_blocking
        self.relay_agent = relay_agent
        self.routed_domains = frozenset(d.lower() for d in routed_domains)
        self.local_domains = frozenset(d.lower() for d in local_domains)
        self.etrn_queues = frozenset(etrn_queues)
        self.held_domains = {d: site for site in self.sites for d in site.domains}
        self._plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.sessions: set[ReversedSession] = set()  # running now (tests, shutdown)

    def shutdown(self) -> None:
        """The server is stopping: drop every reversed connection now. What
        the customers had not acknowledged stays held (their deliveries end
        with a temporary error, so the queue runner can stop)."""
        for session in list(self.sessions):
            session.client.abort()

    def sites_of(self, user: str) -> list:
        """The hold sites whose domains ``user`` owns."""
        return [site for site in self.sites if user in site.users]

    # ---------------------------------------------------------- TURN, ATRN

    def on_turn(self, protocol, event):
        """TURN (rfc821 4.1.1): for an authenticated owner of held domains."""
        user = _user(protocol)
        if user is None:
            # rfc5321 F.1: TURN SHOULD NOT be used unless the server can authenticate the client.
            return Reply.of(530, "5.7.0", "Authentication required: TURN is honoured only after AUTH (rfc5321 F.1)")
        sites = self.sites_of(user)
        if not sites:
            return Reply.of(502, "5.7.1", f"TURN refused: {user} owns no domain whose mail is held here")
        plan = TurnPlan(user, "TURN", {site.hop: frozenset(site.domains) for site in sites})
        return self._accept_if_mail(protocol, plan)

    def on_atrn(self, protocol, event):
        """ATRN [domain,...] (rfc2645 5.2.1): every domain must be the user's."""
        user = _user(protocol)
        if user is None:
            return Reply.of(530, "5.7.0", "Authentication required")
        owned = {domain: site for site in self.sites_of(user) for domain in site.domains}
        wanted = event.domains or tuple(owned)
        if not wanted:
            return Reply.of(450, "4.7.1", f"ATRN refused: {user} owns no domain whose mail is held here")
        foreign = [d for d in wanted if d not in owned]
        if foreign:
            # rfc2645 5.2.1: no mail for any domain, and 450.
            return Reply.of(450, "4.7.1", f"ATRN refused: {user} has no access to {', '.join(foreign)}")
        hops: dict[str, set[str]] = {}
        for domain in wanted:
            hops.setdefault(owned[domain].hop, set()).add(domain)
        plan = TurnPlan(user, "ATRN", {hop: frozenset(ds) for hop, ds in hops.items()})
        return self._accept_if_mail(protocol, plan)

    @defer.inlineCallbacks
    def _accept_if_mail(self, protocol, plan: TurnPlan):
        try:
            messages = yield self.run_blocking(self.spool.queued)
        except Exception as e:
            log.error("{command}: cannot read the spool: {error}", command=plan.command, error=e)
            # rfc2645 5.2.1: 451 when access cannot be checked now.
            return Reply.of(451, "4.3.0", f"Unable to process {plan.command} request now; try again later")
        plan.count = sum(1 for m in messages if plan.wants(m))
        if not plan.count:
            # rfc2645 7: 453 "You have no mail" (TURN gets it too).
            return Reply.of(453, "4.2.0", f"You have no mail (nothing is held for {', '.join(plan.domains)})")
        self._plans[protocol] = plan
        log.info(
            "{command} by {user} from [{client}]: {count} held message(s) for {domains}; reversing",
            command=plan.command, user=plan.user, client=protocol.client_address, count=plan.count,
            domains=",".join(plan.domains),
        )
        return None  # the machine says 250 and turns

    def take_over(self, protocol, trailing: bytes) -> "ReversedSession":
        """The server machine said 250 to TURN/ATRN: become the client on the
        same connection (rfc821 4.1.1: "it then expects to receive the 220")."""
        plan = self._plans.pop(protocol, None) or TurnPlan(_user(protocol) or "?", "TURN")
        settings = ClientSettings(self.helo_name, tls=protocol.machine.tls)
        client = SMTPClientProtocol(settings, self.clock, self.timeouts)
        session = ReversedSession(self, plan, client)
        self.sessions.add(session)
        switch_protocol(protocol, client, trailing)
        session.done = defer.Deferred.fromCoroutine(session.run())
        session.done.addErrback(lambda f: log.failure("reversed session for {user} failed", f, user=plan.user))
        session.done.addBoth(lambda _: self.sessions.discard(session))
        return session

    # ---------------------------------------------------------- ETRN

    @defer.inlineCallbacks
    def on_etrn(self, protocol, event):
        """ETRN [@|#]node (rfc1985 5.1): start delivering now; say how much."""
        shown = event.option + event.node
        releases = []
        if event.option == "#":
            queue = event.node.lower()
            site = next((s for s in self.sites if s.hop == queue), None)
            if site is not None:
                domains = [d for d in site.domains if d in self.routed_domains]
                if not domains or self.relay_agent is None:
                    return _no_route(shown)
                releases = [(site.hop, frozenset(domains))]
                predicate = _hop_and_domains(site.hop, frozenset(domains))
            elif queue in self.etrn_queues:
                predicate = lambda m, q=queue: m.hop == q  # noqa: E731
            else:
                return Reply.of(458, "4.5.3", f"Unable to queue messages for node {shown}: no such queue")
        else:
            node = checkDomain(event.node)
            if node is None:
                return Reply.of(501, "5.5.4", f"Syntax error in parameters: {event.node[:64]} is not a domain name")
            if event.option == "@" and node.count(".") < 1:
                # rfc1985 8: "@com" would release everything; too broad.
                return Reply.of(459, "4.7.1", f"Node {shown} not allowed: too broad, name a domain")
            matches = (lambda d: d == node or d.endswith("." + node)) if event.option == "@" else (lambda d: d == node)
            if event.option == "" and node in self.local_domains:
                return Reply.of(459, "4.7.1", f"Node {shown} not allowed: its mail is delivered here")
            held = {}
            for domain, site in self.held_domains.items():
                if matches(domain):
                    held.setdefault(site.hop, set()).add(domain)
            routed = {hop: frozenset(d for d in ds if d in self.routed_domains) for hop, ds in held.items()}
            routed = {hop: ds for hop, ds in routed.items() if ds}
            if held and not routed and event.option == "":
                return _no_route(shown)
            releases = list(routed.items()) if self.relay_agent is not None else []
            by_hop = dict(releases)

            def predicate(message, by_hop=by_hop, matches=matches):
                if message.hop in by_hop:
                    domains = by_hop[message.hop]
                elif message.hop == "relay" or message.hop in self.etrn_queues:
                    domains = None
                else:
                    return False
                return any(
                    r.state is RecipientState.PENDING
                    and (domain_of(r.address) in domains if domains is not None else matches(domain_of(r.address)))
                    for r in message.envelope.recipients
                )

        lent = [self.hold_agent.release(hop, domains, self.relay_agent) for hop, domains in releases]
        keys: set = set()
        try:
            count = yield self.runner.flush(predicate, keys)
        except Exception as e:
            for release in lent:
                self.hold_agent.end(release)
            log.error("ETRN {node}: {error}", node=shown, error=e)
            return Reply.of(458, "4.3.0", f"Unable to queue messages for node {shown}")
        if lent:
            ended = self.runner.idle(keys)
            ended.addBoth(lambda _: [self.hold_agent.end(release) for release in lent])
        log.info("ETRN {node} from [{client}]: {count} message(s) started", node=shown,
                 client=protocol.client_address, count=count)
        if not count:
            return Reply.of(251, "2.0.0", f"OK, no messages waiting for node {shown}")
        return Reply.of(253, "2.0.0", f"OK, {count} pending messages for node {shown} started")


def _user(protocol) -> str | None:
    session = getattr(protocol, "session", None)
    return session.info.user if session is not None else None


def _no_route(shown: str) -> Reply:
    return Reply.of(
        458, "4.4.0",
        f"Unable to queue messages for node {shown}: no route to it is configured; call in with ATRN or TURN",
    )


def _hop_and_domains(hop: str, domains: frozenset[str]) -> Callable:
    def wants(message) -> bool:
        return message.hop == hop and any(
            r.state is RecipientState.PENDING and domain_of(r.address) in domains for r in message.envelope.recipients
        )

    return wants


# ---------------------------------------------------------------- the reversed session


class ReversedSession:
    """The provider as the client, on the connection the customer opened."""

    def __init__(self, turnaround: TurnAround, plan: TurnPlan, client: SMTPClientProtocol) -> None:
        self.turnaround = turnaround
        self.plan = plan
        self.client = client
        self.agent: ReversedSessionAgent | None = None
        self.done: defer.Deferred | None = None

    async def run(self) -> None:
        """Greeting and EHLO, every held message of the plan, QUIT."""
        t, plan, client = self.turnaround, self.plan, self.client
        try:
            await client.ready
        except SMTPSessionError as e:
            log.warn("{command} by {user}: the customer's greeting failed: {error}",
                     command=plan.command, user=plan.user, error=e.reason)
            client.abort()
            return
        self.agent = agent = ReversedSessionAgent(client, t.spool, f"[{client.peer.rpartition(':')[0]}]")
        releases = [t.hold_agent.release(hop, domains, agent) for hop, domains in plan.hops.items()]
        keys: set = set()
        try:
            await t.runner.flush(plan.wants, keys)
            await t.runner.idle(keys)
        finally:
            for release in releases:
                t.hold_agent.end(release)
        await client.quit()
        log.info(
            "{command} by {user} done: {delivered} message(s) delivered, {kept} still held",
            command=plan.command, user=plan.user, delivered=agent.delivered, kept=agent.kept,
        )


@implementer(IDeliveryAgent)
class ReversedSessionAgent:
    """Delivers over one reversed connection, a message at a time; lent to
    the ``HoldAgent`` while the session runs.

    :param client: the ``SMTPClientProtocol`` on the turned connection.
    :param spool: the ``ISpool`` the messages are read from.
    :param name: the peer's name in error texts (``host <name> said: ...``).
    """

    def __init__(self, client: SMTPClientProtocol, spool, name: str) -> None:
        self.client = client
        self.spool = spool
        self.name = name
        self.delivered = 0  # messages the customer took for every recipient
        self.kept = 0  # messages with a recipient still held (or failed)
        self._lock = defer.DeferredLock()

    def deliver(self, message: QueuedMessage) -> defer.Deferred:
        """Send ``message`` to its pending recipients; never errbacks."""
        return self._lock.run(lambda: defer.Deferred.fromCoroutine(self._deliver(message)))

    async def _deliver(self, message: QueuedMessage) -> dict:
        pending = [r for r in message.envelope.recipients if r.state is RecipientState.PENDING]
        if not pending:
            return {}
        body = self.spool.open(message)
        try:
            try:
                transaction = _transaction(message, pending, self.spool, _ascii_headers(message, body))
            except ValueError as e:
                return {r.address: PermanentDeliveryError(f"bad envelope: {e}", "5.1.7") for r in pending}
            try:
                result = await self.client.send(transaction, body)
            except SMTPSessionError as e:
                results = _broken(self.name, transaction, e)
            else:
                results = transaction_results(self.name, transaction, result, "DSN" in self.client.extensions)
        finally:
            body.close()
        if isinstance(results, DeliveryError):
            results = {address: results for address, _ in transaction.recipients}
        if all(not isinstance(outcome, DeliveryError) for outcome in results.values()):
            self.delivered += 1
        else:
            self.kept += 1
        return results


def _ascii_headers(message: QueuedMessage, body) -> bool:
    """Whether the header section of ``message`` (open as ``body``, seekable)
    is all ASCII, when that decides whether it needs SMTPUTF8 (it came with
    the parameter: rfc6531 3.4, as the relay decides it); ``body`` is left at
    its start."""
    if message.envelope.parameter("SMTPUTF8") is None:
        return False
    _, ascii_headers = peek_header(iter(lambda: body.read(CHUNK_SIZE), b""))
    body.seek(0)
    return ascii_headers


def _transaction(message: QueuedMessage, recipients, spool, ascii_headers: bool = False) -> Transaction:
    """The envelope of ``message`` for ``recipients``, as the relay sends it."""
    envelope = message.envelope
    params = {}
    for key in PASSED_ON:  # as the relay passes them on
        value = envelope.parameter(key)
        if value is not None:
            params[key] = value or None
    size = spool.size(message) + sum(len(h.encode("utf-8", "surrogateescape")) + 2 for h in envelope.prepend_headers)
    body_8bit = (envelope.parameter("BODY") or "").upper() == "8BITMIME"
    rcpts = tuple((r.address, dsn_parameters(r)) for r in recipients)
    try:
        return Transaction(envelope.sender, rcpts, params, size=size, body_8bit=body_8bit, ascii_headers=ascii_headers)
    except ValueError:
        kept = {key: None for key in params if key == "SMTPUTF8"}  # it cannot be bad (rfc6531 3.4)
        return Transaction(envelope.sender, tuple(r.address for r in recipients), kept, size=size,
                           body_8bit=body_8bit, ascii_headers=ascii_headers)


def _broken(name: str, transaction: Transaction, error: SMTPSessionError) -> dict:
    """The connection broke during a transaction: whatever the customer did
    not acknowledge stays held (a refusal it gave still counts)."""
    partial = error.partial or SendResult()
    if error.data_sent:
        why = f"connection to {name} broke after the end of data (the message may have arrived): {error.reason}"
    else:
        why = f"connection to {name} broke before the end of data: {error.reason}"
    results = {}
    for address, _ in transaction.recipients:
        reply = partial.recipients.get(address)
        if reply is not None and reply.code >= 500:
            results[address] = PermanentDeliveryError(f"host {name} said: {reply}", reply.enhanced or "5.0.0")
        else:
            results[address] = TemporaryDeliveryError(why, "4.4.2")
    return results

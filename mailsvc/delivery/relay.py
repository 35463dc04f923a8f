"""Relay delivery: mail for other domains goes to their mail exchangers over SMTP.

``RelayAgent`` is the ``IDeliveryAgent`` of the ``relay`` hop. For each
message it groups the pending recipients by domain and, for each domain:

1. finds where to send: a ``[[relay.route]]`` for the domain, else the
   ``[relay] smarthost``, else the domain's MX hosts (``MXResolver``,
   rfc5321 5.1: every address of every MX, best first, on ``[relay] port``);
2. connects (``connect_timeout``), under the caps ``max_connections`` in all
   and ``max_connections_per_destination`` per host and port;
3. sends one transaction (``mailsvc.clientprotocol``) with SIZE (rfc1870) and
   BODY=8BITMIME when the message came with it (rfc6152), then QUIT.

The next address is tried when the connection fails, the greeting or HELO is
refused with 4xx (421 included), the session breaks (421, timeout, lost
connection) before the end of data, or MAIL gets a 4xx: those concern the
whole connection, not a recipient. A 5xx greeting, HELO or MAIL fails every
recipient of the domain for good. Otherwise each recipient gets what the
peer said: 2xx delivered, 4xx ``TemporaryDeliveryError``, 5xx
``PermanentDeliveryError``, written ``"<x.y.z> host <name> said: <reply>"``
so that bounces name the Remote-MTA (``mailsvc.delivery.bounce.outcome_of``).
When every address failed, the last reason is returned as a temporary error
(rfc5321 4.5.4.1: the message stays queued and is retried).

Before connecting, a message with more ``Received:`` headers than
``max_received_headers`` is failed with 5.4.6 (rfc5321 6.3: a loop).

Not done yet, and refused honestly rather than done half-way:

- STARTTLS: a route with ``tls = "required"`` defers with 4.7.5;
  ``opportunistic`` routes and MX hosts are sent to in clear text.
- AUTH to a relay host: a route with ``username`` defers.
- 8-bit downgrade (rfc6152 3 allows converting to 7-bit MIME): an 8-bit
  message to a peer without 8BITMIME fails with 5.6.3.
- Connection reuse: each domain of each message gets its own connection
  (``max_messages_per_connection`` is not used yet).
- DSN parameters (rfc3461) are passed on to a peer that offers DSN (NOTIFY
  and ORCPT per recipient, RET and ENVID per message); then the peer sends
  any success report. To a peer without DSN, a recipient that asked for
  NOTIFY=SUCCESS gets a "relayed" report from us (rfc3461 5.2.2). Formerly: RET and ENVID
  are, when the peer offers DSN.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.logger import Logger
from zope.interface import implementer

from mailsvc.clientprotocol import (
    CHUNK_SIZE,
    SendResult,
    SMTPClientFactory,
    SMTPSessionError,
    timeouts_from,
)
from mailsvc.envelope import Delivered, QueuedMessage, Recipient, RecipientState
from mailsvc.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError
from mailsvc.interfaces import IDeliveryAgent
from mailsvc.smtp.client import ClientSettings
from mailsvc.smtp.client_events import Transaction
from mailsvc.smtp import xtext
from mailsvc.smtp.replies import Reply

# The MAIL parameters of the received message that are passed on (when the
# peer offers their extension; the client machine checks that).
_PASSED_ON = ("RET", "ENVID", "SMTPUTF8")


def endpoint_connector(reactor) -> Callable:
    """The production connector: ``(host, port, factory) -> Deferred[protocol]``
    over TCP; an address literal is dialled as is, a name with
    ``HostnameEndpoint`` (every address it has, rfc8305)."""

    def connect(host: str, port: int, factory) -> defer.Deferred:
        try:
            version = ipaddress.ip_address(host).version
        except ValueError:
            endpoint = HostnameEndpoint(reactor, host, port)
        else:
            kind = TCP6ClientEndpoint if version == 6 else TCP4ClientEndpoint
            endpoint = kind(reactor, host, port)
        return endpoint.connect(factory)

    return connect


@implementer(IDeliveryAgent)
class RelayAgent:
    """Delivers to other mail servers over SMTP. See the module docstring.

    :param relay_config: the ``mailsvc.config.RelayConfig``.
    :param mx_resolver: a ``mailsvc.delivery.mx.MXResolver``.
    :param connector: ``connector(host, port, factory)`` returns a Deferred
        firing with the connected protocol built by ``factory`` (a Twisted
        ``Factory``); ``None``: TCP on ``clock`` (which must then be the reactor).
    :param clock: an ``IReactorTime`` for every timeout.
    :param spool: the ``ISpool`` messages are read from.
    :param helo_name: the name we give in EHLO.
    :param log: a ``twisted.logger.Logger``.
    :param run_blocking: ``run_blocking(f, *args) -> Deferred`` for the scan
        of the message before it is sent (production: a thread pool).
    """

    def __init__(
        self,
        relay_config,
        mx_resolver,
        connector: Callable | None,
        clock,
        spool,
        helo_name: str,
        log: Logger | None = None,
        run_blocking: Callable | None = None,
    ) -> None:
        self._config = relay_config
        self._mx = mx_resolver
        self._connector = connector or endpoint_connector(clock)
        self._clock = clock
        self._spool = spool
        self._settings = ClientSettings(helo_name)
        self._timeouts = timeouts_from(relay_config)
        self._log = log or Logger(namespace="mailsvc.delivery.relay")
        self._blocking = run_blocking or defer.maybeDeferred
        self._all_connections = defer.DeferredSemaphore(relay_config.max_connections)
        self._per_destination: dict[str, defer.DeferredSemaphore] = {}

    # ---------------------------------------------------------- IDeliveryAgent

    def deliver(self, message: QueuedMessage) -> defer.Deferred:
        """Send ``message`` to every PENDING recipient's domain.

        :return: a Deferred firing with ``{address: None | DeliveryError}``;
            it never errbacks.
        """
        return defer.Deferred.fromCoroutine(self._deliver(message))

    async def _deliver(self, message: QueuedMessage) -> dict:
        pending: dict[str, Recipient] = {}
        for recipient in message.envelope.recipients:
            if recipient.state is RecipientState.PENDING:
                pending.setdefault(recipient.address, recipient)
        if not pending:
            return {}
        try:
            size, received = await self._blocking(self._scan, message)
        except OSError as e:
            return _all(pending, TemporaryDeliveryError(f"cannot read the queued message: {e}", "4.3.0"))
        if received > self._config.max_received_headers:
            # rfc5321 6.3: too many Received: headers is a loop; it is bounced.
            error = PermanentDeliveryError(
                f"mail loop: the message has {received} Received: headers"
                f" (more than {self._config.max_received_headers})",
                "5.4.6",
            )
            return _all(pending, error)
        by_domain: dict[str, list[str]] = {}
        for address in pending:
            by_domain.setdefault(address.rpartition("@")[2].lower().rstrip("."), []).append(address)
        outcomes = await defer.gatherResults(
            [
                defer.Deferred.fromCoroutine(self._deliver_domain_safely(message, domain, addresses, size))
                for domain, addresses in by_domain.items()
            ]
        )
        results: dict = {}
        for outcome in outcomes:
            results.update(outcome)
        return results

    def _scan(self, message: QueuedMessage) -> tuple[int, int]:
        """Blocking: the message's size in octets (as it will be sent, before
        dot-stuffing) and how many ``Received:`` headers it has."""
        size = received = 0
        with self._spool.open(message) as source:
            while True:
                line = source.readline(CHUNK_SIZE)
                size += len(line)
                if not line or line in (b"\r\n", b"\n"):
                    break  # the end of the header section (rfc5322 2.1)
                if line[:9].lower() == b"received:":
                    received += 1
            while chunk := source.read(CHUNK_SIZE):
                size += len(chunk)
        return size, received

    # ---------------------------------------------------------- one domain

    async def _deliver_domain_safely(self, message, domain, addresses, size) -> dict:
        try:
            return await self._deliver_domain(message, domain, addresses, size)
        except Exception as e:
            self._log.failure("relay of id={id} to domain {domain} failed unexpectedly", id=message.id, domain=domain)
            return _all(addresses, TemporaryDeliveryError(f"internal error: {e.__class__.__name__}: {e}", "4.3.0"))

    async def _deliver_domain(self, message: QueuedMessage, domain: str, addresses: list[str], size: int) -> dict:
        results: dict = {}
        if not domain:
            return _all(addresses, PermanentDeliveryError("recipient address has no domain", "5.1.3"))
        envelope = message.envelope
        valid = []
        for address in addresses:
            try:
                Transaction("", (address,))
            except ValueError as e:
                results[address] = PermanentDeliveryError(f"bad recipient address <{address}>: {e}", "5.1.3")
            else:
                valid.append(address)
        if not valid:
            return results
        mail_params = {}
        for key in _PASSED_ON:
            value = envelope.parameter(key)
            if value is not None:
                mail_params[key] = value or None
        body_8bit = (envelope.parameter("BODY") or "").upper() == "8BITMIME"
        by_address = {r.address: r for r in envelope.recipients}
        rcpts = tuple((address, _dsn_parameters(by_address.get(address))) for address in valid)
        try:
            try:
                transaction = Transaction(envelope.sender, rcpts, mail_params, size=size, body_8bit=body_8bit)
            except ValueError:
                # A parameter we cannot repeat is dropped rather than the message.
                transaction = Transaction(envelope.sender, tuple(valid), {}, size=size, body_8bit=body_8bit)
        except ValueError as e:
            # rfc3463 3.2: X.1.7 bad sender's mailbox address syntax.
            return {**results, **_all(valid, PermanentDeliveryError(f"bad envelope: {e}", "5.1.7"))}

        route = self._config.route_for(domain)
        if route is not None:
            if route.tls == "required":
                return {**results, **_all(valid, TemporaryDeliveryError(
                    f"TLS required by route to {route.host} but not available yet", "4.7.5"))}
            if route.username:
                return {**results, **_all(valid, TemporaryDeliveryError(
                    f"AUTH to relay {route.host} not available yet", "4.7.0"))}
            targets = [(route.host, route.host, route.port)]
        else:
            try:
                found = await self._mx.resolve(domain)
            except DeliveryError as e:
                return {**results, **_all(valid, e)}
            targets = [(name, address, self._config.port) for name, address in found.targets()]

        last: DeliveryError = TemporaryDeliveryError(f"no host to try for {domain}", "4.4.4")
        for name, host, port in targets:
            outcome = await self._attempt(message, transaction, name, host, port)
            if isinstance(outcome, dict):
                return {**results, **outcome}
            last = outcome
            if outcome.permanent:
                break
            self._log.info(
                "relay id={id} to {name}[{host}]:{port} failed, trying the next: {error}",
                id=message.id, name=name, host=host, port=port, error=str(outcome),
            )
        if not last.permanent:
            # rfc5321 4.5.4.1: every address failed: keep it queued, retry later.
            last = TemporaryDeliveryError(last.text, last.status)
        return {**results, **_all(valid, last)}

    # ---------------------------------------------------------- one address

    async def _attempt(self, message, transaction, name, host, port):
        """One connection to ``host:port`` under the connection caps.

        Returns the per-recipient results (done with this domain), or a
        ``DeliveryError``: temporary to try the next address, permanent to
        fail every recipient.
        """
        key = f"{host}:{port}"
        await self._all_connections.acquire()
        try:
            semaphore = self._per_destination.get(key)
            if semaphore is None:
                semaphore = defer.DeferredSemaphore(self._config.max_connections_per_destination)
                self._per_destination[key] = semaphore
            await semaphore.acquire()
            try:
                return await self._session(message, transaction, name, host, port)
            finally:
                semaphore.release()
                if semaphore.tokens == semaphore.limit and not semaphore.waiting:
                    self._per_destination.pop(key, None)
        finally:
            self._all_connections.release()

    async def _session(self, message, transaction: Transaction, name: str, host: str, port: int):
        where = f"{name}[{host}]:{port}" if name != host else f"{host}:{port}"
        factory = SMTPClientFactory(self._settings, self._clock, self._timeouts)
        connecting = defer.maybeDeferred(self._connector, host, port, factory)
        connecting.addTimeout(self._config.connect_timeout, self._clock)
        try:
            protocol = await connecting
        except Exception as e:
            # rfc3463 3.5: X.4.1 no answer from host; X.4.3 the name did not resolve.
            status = "4.4.3" if isinstance(e, net_error.DNSLookupError) else "4.4.1"
            return TemporaryDeliveryError(f"connect to {where}: {_describe(e)}", status)
        try:
            outcome = await self._converse(protocol, message, transaction, name, where)
        except BaseException:
            protocol.abort()
            raise
        await protocol.quit()
        if not isinstance(outcome, dict):
            return outcome
        self._log.info(
            "relayed id={id} to {where}: {summary}",
            id=message.id,
            where=where,
            summary=", ".join(f"<{a}> {e if isinstance(e, DeliveryError) else 'sent'}" for a, e in outcome.items()),
        )
        return outcome

    async def _converse(self, protocol, message, transaction, name, where):
        """Greeting, EHLO and one transaction: per-recipient results or one error."""
        try:
            await protocol.ready
        except SMTPSessionError as e:
            return _session_error(name, where, e)
        body = self._spool.open(message)
        try:
            result = await protocol.send(transaction, body)
        except SMTPSessionError as e:
            if not e.data_sent:
                return _session_error(name, where, e)
            return self._lost_after_data(name, where, transaction, e)
        finally:
            body.close()
        return _results(name, transaction, result, "DSN" in protocol.extensions)

    def _lost_after_data(self, name, where, transaction, error: SMTPSessionError) -> dict:
        """The session broke after the end of data: the accepted recipients may
        have the message; they are retried (at least once, never lost)."""
        partial = error.partial or SendResult()
        results = {}
        for address, _ in transaction.recipients:
            reply = partial.recipients.get(address)
            if reply is not None and reply.code >= 400:
                results[address] = _said(name, reply)
            else:
                results[address] = TemporaryDeliveryError(
                    f"connection to {where} broken after the end of data"
                    f" (the message may have been delivered): {error.reason}",
                    "4.4.2",
                )
        return results


# ---------------------------------------------------------------- helpers


def _all(addresses: Iterable[str], error: DeliveryError | None) -> dict:
    return {address: error for address in addresses}


def _said(name: str, reply: Reply) -> DeliveryError:
    """The peer's refusal as the error text bounces read: ``host <name> said: <reply>``."""
    permanent = reply.code >= 500
    status = reply.enhanced or ("5.0.0" if permanent else "4.0.0")
    kind = PermanentDeliveryError if permanent else TemporaryDeliveryError
    return kind(f"host {name} said: {reply}", status)


def _session_error(name: str, where: str, error: SMTPSessionError) -> DeliveryError:
    """A session that ended before the end of data: a 5xx from the peer is
    permanent; anything else means trying the next address."""
    if error.reply is not None:
        return _said(name, error.reply)
    # rfc3463 3.5: X.4.2 bad connection (timeouts, lost connections).
    return TemporaryDeliveryError(f"conversation with {where} failed: {error.reason}", "4.4.2")


def _dsn_parameters(recipient: Recipient | None) -> dict:
    """rfc3461 4.1, 4.2: the NOTIFY and ORCPT to pass on for ``recipient``
    (sent only if the peer offers DSN: the client machine filters them)."""
    if recipient is None:
        return {}
    parameters = {}
    if recipient.notify:
        parameters["NOTIFY"] = recipient.notify
    if recipient.original and recipient.original != recipient.address and "@" in recipient.original:
        parameters["ORCPT"] = "rfc822;" + xtext.encode(recipient.original)
    return parameters


def _results(name: str, transaction: Transaction, result: SendResult, peer_dsn: bool = False):
    """Per-recipient results of a finished transaction, or one error for all.

    A success is ``Delivered.PASSED_ON`` when the peer took the DSN request
    over (rfc3461 5.2.1), else ``Delivered.RELAYED`` (5.2.2)."""
    if result.refusal is not None:
        reply = result.refusal
        if result.synthetic:
            # Our machine refused before sending (SIZE, 8BITMIME, SMTPUTF8).
            text = f"host {name}: {reply.lines[0]}"
            if reply.enhanced == "5.6.3":
                text += " (the message is 8-bit; converting it to 7-bit is not done yet)"
            kind = PermanentDeliveryError if reply.code >= 500 else TemporaryDeliveryError
            return kind(text, reply.enhanced or "5.0.0")
        # MAIL refused: 5xx fails everyone; 4xx concerns the whole transaction.
        return _said(name, reply)
    results: dict = {}
    accepted = set(result.accepted)
    for address, _ in transaction.recipients:
        reply = result.recipients.get(address)
        if reply is None:
            results[address] = TemporaryDeliveryError(f"host {name} gave no reply to RCPT", "4.4.2")
        elif reply.code >= 400:
            results[address] = _said(name, reply)
        elif address not in accepted or result.reply is None:
            results[address] = TemporaryDeliveryError(f"host {name} gave no reply to the message", "4.4.2")
        elif result.reply.code >= 400:
            results[address] = _said(name, result.reply)
        else:
            results[address] = Delivered.PASSED_ON if peer_dsn else Delivered.RELAYED
    return results


def _describe(error: BaseException) -> str:
    """A short reason for a failed connection, for the error text."""
    if isinstance(error, (defer.TimeoutError, TimeoutError, net_error.TimeoutError, defer.CancelledError)):
        return "connection timed out"
    if isinstance(error, net_error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, net_error.DNSLookupError):
        return "host name lookup failed"
    return str(error) or error.__class__.__name__

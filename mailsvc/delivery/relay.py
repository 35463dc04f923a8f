"""Relay delivery: mail for other domains goes to their mail exchangers over SMTP.

``RelayAgent`` is the ``IDeliveryAgent`` of the ``relay`` hop. For each
message it groups the pending recipients by domain and, for each domain:

1. finds where to send: a ``[[relay.route]]`` for the domain, else the
   ``[relay] smarthost``, else the domain's MX hosts (``MXResolver``,
   rfc5321 5.1: every address of every MX, best first, on ``[relay] port``);
2. takes a connection to that host and port (``mailsvc.delivery.pool``):
   one kept idle from an earlier message (rfc5321 3.3: several
   transactions per session; the client machine says RSET when needed),
   else a new one (``connect_timeout``), under the caps ``max_connections``
   in all and ``max_connections_per_destination`` per host and port, idle
   connections counted;
3. on a new connection, after EHLO: STARTTLS and AUTH (see "TLS and AUTH"
   below), then EHLO again over TLS;
4. sends one transaction (``mailsvc.clientprotocol``) with SIZE (rfc1870) and
   BODY=8BITMIME when the message came with it and the peer offers 8BITMIME
   (rfc6152). To a peer without it, an 8-bit message is converted to 7-bit
   MIME (``mailsvc.delivery.downgrade``: quoted-printable or base64 parts,
   made once per delivery off the reactor thread) and sent without BODY,
   SIZE being the converted size; one that cannot be converted (not MIME,
   8-bit header fields, too large) fails with 5.6.3 (rfc6152 3). The body
   goes in BDAT chunks when the peer offers CHUNKING (rfc3030), pipelined
   under PIPELINING, else as dot-stuffed DATA;
5. keeps the connection idle for the next message to the same host and port
   when the session is still good, until it has carried
   ``max_messages_per_connection`` transactions or stays unused for
   ``idle_timeout`` seconds; then QUIT. ``close()`` QUITs the idle ones.

A kept connection that turns out dead when reused (lost, timed out or 421
before any RCPT reply) is replaced by a new one at once, without trying the
next address.

The next address is tried when the connection fails, the greeting or HELO is
refused with 4xx (421 included), the session breaks (421, timeout, lost
connection) before the end of data, or MAIL gets a 4xx: those concern the
whole connection, not a recipient. A 5xx greeting, HELO or MAIL fails every
recipient of the domain for good. Otherwise each recipient gets what the
peer said: 2xx delivered, 4xx ``TemporaryDeliveryError``, 5xx
``PermanentDeliveryError``, written ``"<x.y.z> host <name> said: <reply>"``
so that bounces name the Remote-MTA (``mailsvc.delivery.bounce.outcome_of``;
the results are made in ``mailsvc.delivery.relayoutcome``).
When every address failed, the last reason is returned as a temporary error
(rfc5321 4.5.4.1: the message stays queued and is retried).

Before connecting, a message with more ``Received:`` headers than
``max_received_headers`` is failed with 5.4.6 (rfc5321 6.3: a loop).

SMTPUTF8 (rfc6531), as Postfix does it: a message needs it when an address
of the transaction (the sender, a recipient of the domain) is not ASCII, or
when the sender gave SMTPUTF8 and the header section (read with the
``Received:`` count) has non-ASCII octets (rfc6532). A peer that offers it
gets SMTPUTF8 on MAIL whenever the sender gave it; one that does not gets a
message that does not need it without the parameter (rfc6531 3.4: "SHOULD
NOT supply"), and one that needs it fails with 5.6.7, saying why (rfc6531
3.2, 3.5). Domains are grouped, routed and looked up in A-label form
(``mailsvc.delivery.mx.ascii_name``, rfc6531 3.2); addresses go as given.
Only the message's own header section is read: UTF-8 headers of nested
parts (message/global) are not looked for.

DSN parameters (rfc3461) are passed on to a peer that offers DSN (NOTIFY and
ORCPT per recipient, RET and ENVID per message); then the peer sends any
success report. To a peer without DSN, a recipient that asked for
NOTIFY=SUCCESS gets a "relayed" report from us (rfc3461 5.2.2).

TLS and AUTH (``mailsvc.clientprotocol.SessionOpener``, ``mailsvc.tls.ClientTLSContext``;
what each host or route gets: ``mailsvc.delivery.relaysecurity``):

- MX hosts, and routes with ``tls = "opportunistic"``: STARTTLS when
  offered (rfc3207), the certificate not checked (like Postfix's ``may``:
  encryption against passive listeners; MTA-STS and DANE, which would say
  when to check, are not done). When the handshake fails, that host is
  tried again at once without TLS, once, and it is logged.
- ``tls = "required"`` (a route or the smarthost): STARTTLS must be offered
  and succeed; the chain must verify against the system's CAs or the
  route's ``ca_file``, and the certificate must name the route's host (or,
  for a ``[[relay.route]]``, its domain: rfc7817 3), checked with
  ``service_identity``. Any failure defers every recipient of the route
  with 4.7.5 and says why ("certificate for mx.example does not match: it
  is for ...", "STARTTLS not offered").
- ``username`` and ``password_file`` (read at each connection): AUTH PLAIN,
  or LOGIN when only that is offered (rfc4954), once TLS is up; without
  TLS the password is not sent (4.7.5) unless the route says
  ``tls = "none"``. AUTH not offered: 4.7.0. AUTH refused: deferred, not
  bounced (Postfix's ``smtp_sasl_auth_soft_bounce``: the fault is in our
  configuration, which can be fixed before the message expires), with the
  peer's reply and its status code made temporary (535 5.7.8 → 4.7.8).

Not done: 8-bit header fields are not encoded (rfc2047) for a peer without
8BITMIME: such a message bounces with 5.6.3, as does one over the
downgrade limit (it is converted in memory).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import ipaddress
from collections.abc import Callable

from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.logger import Logger
from zope.interface import implementer

from mailsvc.clientprotocol import CHUNK_SIZE, SMTPClientFactory, timeouts_from
from mailsvc.clientresults import SMTPSessionError
from mailsvc.clientsession import SessionSecurity
from mailsvc.delivery.downgrade import CannotDowngrade
from mailsvc.delivery.mx import ascii_name
from mailsvc.delivery.outgoing import OutgoingMessage
from mailsvc.delivery.pool import ConnectionPool, PooledConnection
from mailsvc.delivery.relayoutcome import (
    connect_failure_reason,
    envelope_transaction,
    opening_error,
    results_lost_after_data,
    same_for_all,
    session_error,
    smtputf8_refusal,
    transaction_results,
    unanswered,
)
from mailsvc.delivery.relaysecurity import RouteSecurities, opportunistic_security
from mailsvc.envelope import QueuedMessage, Recipient, RecipientState
from mailsvc.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError
from mailsvc.interfaces import IDeliveryAgent
from mailsvc.smtp.client import ClientSettings, State

# The largest message converted to 7-bit (it is read whole to do it).
DOWNGRADE_LIMIT = 16 * 1024 * 1024

# What _converse returns when a reused connection was found dead before the
# peer answered anything of the transaction: connect again.
_STALE = object()


class _TLSFailed:
    """What _converse returns when the TLS handshake (or the certificate
    check) failed: ``error`` for the recipients, unless the policy allows
    trying again without TLS."""

    def __init__(self, error: DeliveryError) -> None:
        self.error = error


def _domain_of(address: str) -> str:
    """The domain of ``address`` as it is grouped, routed and looked up: A-labels
    (rfc6531 3.2); as given, lower-cased, when it is no valid name (the MX
    lookup then fails it with 5.1.3)."""
    domain = address.rpartition("@")[2]
    try:
        return ascii_name(domain)
    except ValueError:
        return domain.lower().rstrip(".")


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

    :param relay_config: the ``mailsvc.relayconfig.RelayConfig``.
    :param mx_resolver: a ``mailsvc.delivery.mx.MXResolver``.
    :param connector: ``connector(host, port, factory)`` returns a Deferred
        firing with the connected protocol built by ``factory`` (a Twisted
        ``Factory``); ``None``: TCP on ``clock`` (which must then be the reactor).
    :param clock: an ``IReactorTime`` for every timeout.
    :param spool: the ``ISpool`` messages are read from.
    :param helo_name: the name we give in EHLO.
    :param log: a ``twisted.logger.Logger``.
    :param run_blocking: ``run_blocking(f, *args) -> Deferred`` for the scan
        of the message before it is sent and its 7-bit conversion
        (production: a thread pool).
    :param idle_timeout: seconds a connection is kept open, unused, for the
        next message to the same host and port.
    :param downgrade_limit: the largest message (octets) converted to 7-bit
        for a peer without 8BITMIME; a larger one is bounced with 5.6.3.
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
        idle_timeout: float = 5.0,
        downgrade_limit: int = DOWNGRADE_LIMIT,
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
        self._downgrade_limit = downgrade_limit
        self._route_securities = RouteSecurities(self._blocking)
        self._pool = ConnectionPool(
            clock,
            relay_config.max_connections,
            relay_config.max_connections_per_destination,
            relay_config.max_messages_per_connection,
            idle_timeout,
        )

    def close(self, timeout: float = 10.0) -> defer.Deferred:
        """QUIT the idle connections (on shutdown); connections busy now are
        QUIT when their message is done. Fires once the idle ones are closed
        (those still open after ``timeout`` seconds are dropped)."""
        return self._pool.close(timeout)

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
            size, received, ascii_headers = await self._blocking(self._scan, message)
        except OSError as e:
            return same_for_all(pending, TemporaryDeliveryError(f"cannot read the queued message: {e}", "4.3.0"))
        if received > self._config.max_received_headers:
            # rfc5321 6.3: too many Received: headers is a loop; it is bounced.
            error = PermanentDeliveryError(
                f"mail loop: the message has {received} Received: headers"
                f" (more than {self._config.max_received_headers})",
                "5.4.6",
            )
            return same_for_all(pending, error)
        by_domain: dict[str, list[str]] = {}
        for address in pending:
            by_domain.setdefault(_domain_of(address), []).append(address)
        content = OutgoingMessage(self._spool, message, self._blocking, self._downgrade_limit)
        try:
            if len(by_domain) == 1:
                # The common case, one domain: awaited here, without the
                # Deferred and the gathering that running domains side by
                # side needs (_deliver_domain_safely never raises).
                [(domain, addresses)] = by_domain.items()
                return await self._deliver_domain_safely(message, content, domain, addresses, size, ascii_headers)
            outcomes = await defer.gatherResults(
                [
                    defer.Deferred.fromCoroutine(
                        self._deliver_domain_safely(message, content, domain, addresses, size, ascii_headers)
                    )
                    for domain, addresses in by_domain.items()
                ]
            )
        finally:
            content.close()
        results: dict = {}
        for outcome in outcomes:
            results.update(outcome)
        return results

    def _scan(self, message: QueuedMessage) -> tuple[int, int, bool]:
        """Blocking: the message's size in octets (as it will be sent, before
        dot-stuffing), how many ``Received:`` headers it has and whether its
        header section is all ASCII (else it needs SMTPUTF8 when the sender
        gave it: rfc6531 3.4, rfc6532). Only the header section is read when
        the spool's file can tell its size."""
        size = received = 0
        ascii_headers = True
        with self._spool.open(message) as source:
            while True:
                line = source.readline(CHUNK_SIZE)
                size += len(line)
                if not line or line in (b"\r\n", b"\n"):
                    break  # the end of the header section (rfc5322 2.1)
                if line[:9].lower() == b"received:":
                    received += 1
                ascii_headers = ascii_headers and line.isascii()
            if source.seekable():
                return source.seek(0, io.SEEK_END), received, ascii_headers
            while chunk := source.read(CHUNK_SIZE):
                size += len(chunk)
        return size, received, ascii_headers

    # ---------------------------------------------------------- one domain

    async def _deliver_domain_safely(self, message, content, domain, addresses, size, ascii_headers) -> dict:
        try:
            return await self._deliver_domain(message, content, domain, addresses, size, ascii_headers)
        except Exception as e:
            self._log.failure("relay of id={id} to domain {domain} failed unexpectedly", id=message.id, domain=domain)
            return same_for_all(addresses, TemporaryDeliveryError(f"internal error: {e.__class__.__name__}: {e}", "4.3.0"))

    async def _deliver_domain(
        self, message: QueuedMessage, content, domain: str, addresses: list[str], size: int, ascii_headers: bool
    ) -> dict:
        if not domain:
            return same_for_all(addresses, PermanentDeliveryError("recipient address has no domain", "5.1.3"))
        transaction, valid, results = envelope_transaction(message.envelope, addresses, size, ascii_headers)
        if transaction is None:
            return results

        route = self._config.route_for(domain)
        if route is not None:
            try:
                security = await self._route_securities.security_for(route)
            except DeliveryError as e:
                return {**results, **same_for_all(valid, e)}
            targets = [(route.host, route.host, route.port)]
        else:
            try:
                found = await self._mx.resolve(domain)
            except DeliveryError as e:
                return {**results, **same_for_all(valid, e)}
            targets = [(name, address, self._config.port) for name, address in found.targets()]

        last: DeliveryError = TemporaryDeliveryError(f"no host to try for {domain}", "4.4.4")
        for name, host, port in targets:
            if route is None:
                # An MX host: opportunistic STARTTLS, no check (no MTA-STS, no
                # DANE); its TLS context is made only if a connection is opened.
                key, host_security = (host, port), functools.partial(opportunistic_security, name)
            else:
                # A route's connections are its own: its TLS and AUTH differ.
                plain = route.tls == "opportunistic" and not route.username
                key, host_security = ((host, port) if plain else (host, port, route.domain)), security
            outcome = await self._attempt(message, content, transaction, name, host, port, host_security, key)
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
        return {**results, **same_for_all(valid, last)}

    # ---------------------------------------------------------- one address

    async def _attempt(self, message, content, transaction, name, host, port, security=None, key=None):
        """One transaction with ``host:port``: on an idle connection kept from
        an earlier message (under ``key``, default ``(host, port)``), else a
        new one opened with ``security`` (a ``SessionSecurity``, or a function
        making one when a connection is opened), under the connection caps.

        Returns the per-recipient results (done with this domain), or a
        ``DeliveryError``: temporary to try the next address, permanent to
        fail every recipient.
        """
        where = f"{name}[{host}]:{port}" if name != host else f"{host}:{port}"
        security = security or SessionSecurity()
        slot = await self._pool.acquire(key or (host, port))
        try:
            while True:
                reused = slot.protocol is not None
                if not reused:
                    if not isinstance(security, SessionSecurity):
                        security = security()
                    error = await self._connect(slot, host, port, where, security)
                    if error is not None:
                        self._pool.release(slot, reuse=False)
                        return error
                outcome = await self._converse(slot, message, content, transaction, name, where)
                if isinstance(outcome, _TLSFailed):
                    if security.tls != "opportunistic":
                        outcome = outcome.error
                        break
                    # Opportunistic: that host again at once, in clear, this time only.
                    self._log.warn(
                        "TLS with {where} failed ({error}); sending without TLS this time",
                        where=where, error=outcome.error.text,
                    )
                    security = security.without_tls()
                    self._pool.discard(slot)
                    continue
                if outcome is not _STALE:
                    break
                # The kept connection died while idle: a new one, at once.
                self._log.info("idle connection to {where} is gone; connecting again", where=where)
                self._pool.discard(slot)
        except BaseException:
            self._pool.release(slot, reuse=False, abort=True)
            raise
        # rfc5321 3.3: a session that is ready again may carry the next message.
        self._pool.release(slot, reuse=slot.protocol.machine.state is State.READY)
        if isinstance(outcome, dict):
            self._log.info(
                "relayed id={id} to {where}{again}: {summary}",
                id=message.id,
                where=where,
                again=" (connection reused)" if reused else "",
                summary=", ".join(f"<{a}> {e if isinstance(e, DeliveryError) else 'sent'}" for a, e in outcome.items()),
            )
        return outcome

    async def _connect(
        self, slot: PooledConnection, host: str, port: int, where: str, security: SessionSecurity | None = None
    ) -> DeliveryError | None:
        """Connect ``slot`` to ``host:port``; the error when that failed."""
        factory = SMTPClientFactory(self._settings, self._clock, self._timeouts, security)
        connecting = defer.maybeDeferred(self._connector, host, port, factory)
        connecting.addTimeout(self._config.connect_timeout, self._clock)
        try:
            protocol = await connecting
        except Exception as e:
            # rfc3463 3.5: X.4.1 no answer from host; X.4.3 the name did not resolve.
            status = "4.4.3" if isinstance(e, net_error.DNSLookupError) else "4.4.1"
            return TemporaryDeliveryError(f"connect to {where}: {connect_failure_reason(e)}", status)
        self._pool.connected(slot, protocol)
        return None

    async def _converse(self, slot: PooledConnection, message, content, transaction, name, where):
        """Greeting and EHLO (on a new connection), then one transaction:
        per-recipient results, one error, or ``_STALE`` for a reused
        connection that broke before the peer answered any of it."""
        protocol = slot.protocol
        if not slot.reused:
            try:
                await protocol.ready
            except SMTPSessionError as e:
                if e.tls_failed:
                    # rfc3463 3.8: X.7.5 cryptographic failure.
                    return _TLSFailed(TemporaryDeliveryError(f"{where}: {e.reason}", "4.7.5"))
                if e.opening is not None:
                    return opening_error(where, e.opening)
                return session_error(name, where, e)
        refusal = smtputf8_refusal(name, transaction, protocol.extensions)
        if refusal is not None:
            return refusal  # rfc6531 3.2: bounced, not converted (rfc6531 3.5: 5.6.7)
        if transaction.body_8bit and "8BITMIME" not in protocol.extensions:
            # rfc6152 3: no 8-bit data to this peer: convert to 7-bit MIME, or bounce.
            try:
                size = await content.seven_bit()
            except CannotDowngrade as e:
                return PermanentDeliveryError(
                    f"host {name} does not offer 8BITMIME and the message cannot be"
                    f" converted to 7-bit: {e.reason}",
                    "5.6.3",
                )
            except OSError as e:
                return TemporaryDeliveryError(f"cannot convert the message to 7-bit: {e}", "4.3.0")
            transaction = dataclasses.replace(transaction, size=size, body_8bit=False)
            body = content.open_seven_bit()
        else:
            body = content.open()
        slot.uses += 1
        try:
            result = await protocol.send(transaction, body)
        except SMTPSessionError as e:
            if not e.data_sent:
                if slot.reused and unanswered(e):
                    return _STALE
                return session_error(name, where, e)
            return results_lost_after_data(name, where, transaction, e)
        finally:
            body.close()
        return transaction_results(name, transaction, result, "DSN" in protocol.extensions)

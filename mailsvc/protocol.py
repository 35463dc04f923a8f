"""Twisted glue for the SMTP server: transports, timeouts, connection limits.

Thin by design: bytes go to ``mailsvc.smtp.server.ServerConnection``, its
events go to ``mailsvc.receiver.ReceivingSession`` (AUTH steps to
``mailsvc.auth.AuthSession``), and the answers go back to the machine. While
a decision is pending the transport is paused, so a slow policy never
reorders pipelined replies (rfc2920 3.1) and input does not pile up in memory.
Replies are sent on the socket at once when nothing is queued before them
(``mailsvc.sockets.write_now``), else through ``transport.write``.

TLS: an accepted STARTTLS writes the 220 in clear, switches the transport
with ``startTLS`` and tells the machine (``tls_started``), which drops
whatever was read before (rfc3207 4.2). Implicit TLS listeners (rfc8314) are
this factory wrapped in ``TLSMemoryBIOFactory`` with ``implicit_tls=True``.

Limits shared by every listener of a server (``ConnectionPool``): total
connections and connections per client address, each 421 4.7.0.

Turn-around (TURN, ATRN, ETRN): with a ``turnaround`` (``mailsvc.turnaround``)
those decisions go to it; once the machine has said 250 to TURN or ATRN
(``turned``), this protocol writes that reply, lets go of the connection and
calls ``turnaround.take_over(self, trailing_data)``, which puts the client
glue in its place on the same transport.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsvc.limits import ClientConnections
from mailsvc.policy import SessionInfo
from mailsvc.receiver import SESSION_HANDLERS, ReceiverContext, ReceivingSession
from mailsvc.smtp import events as ev
from mailsvc.smtp.replies import Reply
from mailsvc.smtp.server import ServerConnection, ServerSettings
from mailsvc.sockets import disable_nagle, write_now

log = Logger(namespace="mailsvc.protocol")

TOO_MANY_CONNECTIONS = Reply.of(421, "4.7.0", "Too many connections; try again later")
TOO_MANY_FROM_CLIENT = Reply.of(421, "4.7.0", "Too many connections from your address; try again later")
TLS_UNAVAILABLE = Reply.of(454, "4.7.0", "TLS not available due to temporary reason")
SHUTTING_DOWN = Reply.of(421, "4.3.2", "Service shutting down; try again later")
TIMEOUT = Reply.of(421, "4.4.2", "Timeout exceeded; closing connection")
LOCAL_ERROR = Reply.of(451, "4.3.0", "Local error in processing; try again later")

# Event → (who answers it, method): the receiving session (receiver.SESSION_HANDLERS),
# the AUTH session, or the glue.
_AUTH_HANDLERS = {
    ev.Auth: "on_auth",
    ev.AuthResponse: "on_auth_response",
    ev.AuthCancelled: "on_auth_cancelled",
}
# Answered by the factory's ``turnaround`` when it has one (else TURN goes to
# the receiving session, which refuses it; the machine offers no ETRN/ATRN).
_TURN_HANDLERS = {ev.Turn: "on_turn", ev.Atrn: "on_atrn", ev.Etrn: "on_etrn"}
# Events the glue routes itself; every other one goes straight to the session.
_GLUE_EVENTS = frozenset({ev.Quit, ev.StartTLS, *_TURN_HANDLERS, *_AUTH_HANDLERS})


class SMTPServerProtocol(Protocol):
    """One SMTP server connection."""

    def __init__(self, factory: "SMTPServerFactory") -> None:
        self.factory = factory
        self.machine = ServerConnection(factory.server_settings, tls=factory.implicit_tls)
        self.session: ReceivingSession | None = None
        self.auth = None  # mailsvc.auth.AuthSession when AUTH is offered
        self.client_address = ""
        self._timer = None  # one DelayedCall; fires at or before _deadline
        self._deadline = 0.0  # clock time the current timeout ends
        self._busy = False  # inside _pump, or waiting for a Deferred answer
        self._gone = False

    # ---------------------------------------------------------- Protocol

    def connectionMade(self) -> None:
        peer, host = self.transport.getPeer(), self.transport.getHost()
        info = SessionInfo(
            client_address=getattr(peer, "host", ""),
            client_port=getattr(peer, "port", 0),
            server_address=getattr(host, "host", ""),
            tls=self.factory.implicit_tls,
        )
        self.client_address = info.client_address
        disable_nagle(self.transport)  # a late reply after an early one is not held back
        log.info("connect from [{client}]:{port}", client=info.client_address, port=info.client_port)
        refusal = self.factory.admit(self)
        if refusal is not None:
            self.machine.start(refusal)
            self._flush()
            return
        self.session = ReceivingSession(self.factory.context, info)
        if self.factory.authenticator is not None:
            self.auth = self.factory.authenticator.session(info)
        self._busy = True
        d = defer.maybeDeferred(self.session.on_connect)
        answered: list = []
        d.addBoth(answered.append)
        if not answered:
            # Not decided yet: read nothing until the greeting is sent.
            self.transport.pauseProducing()
            d.addCallback(lambda _: self._greeted(answered[0], resume=True))
            return
        self._greeted(answered[0])

    def dataReceived(self, data: bytes) -> None:
        if self.session is None or self._gone:
            return
        self.machine.receive_data(data)
        if not self._busy:
            self._pump()
        self._restart_timer()  # after the pump: it may have entered or left DATA

    def connectionLost(self, reason: Failure = None) -> None:
        self._gone = True
        self._cancel_timer()
        self.factory.release(self)
        if self.session is not None:
            self.session.abort()
        log.info("disconnect from [{client}]", client=self.client_address)

    # ---------------------------------------------------------- control

    def shutdown(self) -> None:
        """The server is stopping: 421 4.3.2 and close (rfc5321 3.8)."""
        self._close_with(SHUTTING_DOWN)

    def _close_with(self, reply: Reply) -> None:
        if self._gone:
            return
        self.machine.close(reply)
        if self.session is not None:
            self.session.abort()
        self._flush()

    def _greeted(self, result, resume: bool = False) -> None:
        if isinstance(result, Failure):
            self._greet_failed(result, resume)
        else:
            self._greet(result, resume)

    def _greet(self, refusal, resume: bool = False) -> None:
        if self._gone:
            return
        self.machine.start(refusal)
        self._busy = False
        if resume:
            self.transport.resumeProducing()
        self._restart_timer()
        self._pump()

    def _greet_failed(self, failure: Failure, resume: bool = False) -> None:
        log.failure("connect policy failed", failure)
        self._greet(Reply.of(421, "4.3.0", "Local error; try again later"), resume)

    # ---------------------------------------------------------- the pump

    def _pump(self) -> None:
        """Hand events to the session until input runs out or an answer is awaited."""
        self._busy = True
        try:
            while not self._gone:
                event = self.machine.next_event()
                if event is None:
                    break
                result = self._dispatch(event)
                if not event.needs_reply:
                    continue
                # None and a Reply are answers already: no Deferred for them.
                if result is not None and type(result) is not Reply:
                    d = result if type(result) is defer.Deferred else defer.maybeDeferred(lambda r=result: r)
                    answered: list = []
                    d.addBoth(answered.append)
                    if not answered:
                        # A slow answer: stop reading until it comes (rfc2920 3.1).
                        self.transport.pauseProducing()
                        d.addCallback(lambda _, e=event: self._answered(e, answered[0]))
                        self._flush()
                        return
                    result = answered[0]
                self._answer(event, result)
        finally:
            if self.machine.waiting is None:
                self._busy = False
        self._flush()

    def _answered(self, event: ev.Event, result) -> None:
        if self._gone:
            return
        self._answer(event, result)
        self.transport.resumeProducing()
        self._pump()

    def _dispatch(self, event: ev.Event):
        kind = type(event)
        if kind not in _GLUE_EVENTS:
            handler = getattr(self.session, SESSION_HANDLERS[kind])
            try:
                return handler(event)
            except Exception:
                return Failure()
        if isinstance(event, ev.Quit):
            return None
        if isinstance(event, ev.StartTLS):
            return None if self.factory.tls is not None else TLS_UNAVAILABLE
        if type(event) in _TURN_HANDLERS and self.factory.turnaround is not None:
            handler = getattr(self.factory.turnaround, _TURN_HANDLERS[type(event)])
            try:
                return handler(self, event)
            except Exception:
                return Failure()
        if type(event) in (ev.Atrn, ev.Etrn):
            return Reply.of(502, "5.5.1", "Command not implemented")
        if type(event) in _AUTH_HANDLERS:
            if self.auth is None:
                return Reply.of(454, "4.7.0", "Temporary authentication failure") if event.needs_reply else None
            handler = getattr(self.auth, _AUTH_HANDLERS[type(event)])
        else:
            handler = getattr(self.session, SESSION_HANDLERS[type(event)])
        try:
            return handler(event)
        except Exception:
            return Failure()

    def _answer(self, event: ev.Event, result) -> None:
        if isinstance(result, Failure):
            log.failure("error answering {event}", result, event=type(event).__name__)
            result = LOCAL_ERROR
        if self.machine.waiting is None:
            return  # the session was closed meanwhile
        if result is None:
            self.machine.accept()
        else:
            self.machine.reply(result)
        if self.machine.tls_pending:
            self._start_tls()
        elif self.machine.turned:
            self._hand_over()

    def _hand_over(self) -> None:
        """250 to TURN/ATRN: write it, then give the connection to the client
        role (rfc821 4.1.1); this protocol is done with it."""
        self._flush()
        trailing = self.machine.trailing_data
        self._gone = True
        self._cancel_timer()
        self.factory.release(self)
        if self.session is not None:
            self.session.abort()
        self.factory.turnaround.take_over(self, trailing)

    def _start_tls(self) -> None:
        """STARTTLS accepted: 220 in clear, then the handshake; the session starts over."""
        self._flush()
        try:
            self.transport.startTLS(self.factory.tls)
        except Exception:
            log.failure("STARTTLS failed for [{client}]", client=self.client_address)
            self._gone = True
            self.transport.abortConnection()
            return
        self.machine.tls_started()  # rfc3207 4.2: forget everything said before
        self.session.on_tls_started()
        if self.auth is not None:
            self.auth.reset()

    def _flush(self) -> None:
        out = self.machine.data_to_send()
        if out and not self._gone:
            write_now(self.transport, out)  # on the socket at once when nothing is queued
        if self.machine.closed and not self._gone:
            self._cancel_timer()
            self.transport.loseConnection()

    # ---------------------------------------------------------- timeouts

    def _restart_timer(self) -> None:
        """rfc5321 4.5.3.2.7 (commands) and 4.5.3.2.5 (data blocks).

        Activity only moves ``_deadline``. The one timer is armed for at most
        the shorter of the two timeouts (``_timer_step``), so it fires at or before
        any deadline that activity can set, and is never re-made on an event:
        when it fires early it re-arms itself for what is left."""
        if self._gone or self.machine.closed:
            self._cancel_timer()
            return
        factory = self.factory
        seconds = factory.data_timeout if self.machine.in_data else factory.command_timeout
        if not seconds:
            self._cancel_timer()
            return
        self._deadline = factory.clock.seconds() + seconds
        if self._timer is None:
            self._timer = factory.clock.callLater(_timer_step(factory), self._timer_fired)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timer_fired(self) -> None:
        self._timer = None
        clock = self.factory.clock
        left = self._deadline - clock.seconds()
        if left > 0:
            self._timer = clock.callLater(min(left, _timer_step(self.factory)), self._timer_fired)
            return
        self._timed_out()

    def _timed_out(self) -> None:
        self._timer = None
        log.info("timeout, closing [{client}]", client=getattr(self.transport.getPeer(), "host", ""))
        self._close_with(TIMEOUT)


def _timer_step(factory) -> float:
    """The longest a connection's timer is armed for: the shorter of the
    timeouts in use, so no deadline that activity sets comes before it fires."""
    return min(t for t in (factory.command_timeout, factory.data_timeout) if t)


class ConnectionPool:
    """Every SMTP connection of a server, whatever the listener: caps the
    total (``max_connections``) and the count per client address
    (``max_per_client``); 0 means no cap."""

    def __init__(self, max_connections: int = 100, max_per_client: int = 0) -> None:
        self.max_connections = max_connections
        self.per_client = ClientConnections(max_per_client)
        self.connections: set[SMTPServerProtocol] = set()

    def admit(self, protocol: SMTPServerProtocol) -> Reply | None:
        """Count a new connection in, or return the 421 that refuses it."""
        if self.max_connections and len(self.connections) >= self.max_connections:
            return TOO_MANY_CONNECTIONS
        if not self.per_client.admit(protocol.client_address):
            log.warn("too many connections from [{client}]", client=protocol.client_address)
            return TOO_MANY_FROM_CLIENT
        self.connections.add(protocol)
        return None

    def release(self, protocol: SMTPServerProtocol) -> None:
        """A connection ended."""
        if protocol in self.connections:
            self.connections.discard(protocol)
            self.per_client.release(protocol.client_address)

    def shutdown(self) -> None:
        """Tell every connected client we are going away (421 4.3.2)."""
        for protocol in list(self.connections):
            protocol.shutdown()


class SMTPServerFactory(Factory):
    """Makes ``SMTPServerProtocol``s for one kind of listener.

    :param tls: a context factory for STARTTLS (``mailsvc.tls.ServerTLSContext``), or None.
    :param implicit_tls: the listener is wrapped in TLS (rfc8314): sessions start with TLS active.
    :param authenticator: a ``mailsvc.auth.Authenticator`` when AUTH is offered.
    :param turnaround: a ``mailsvc.turnaround.TurnAround`` answering TURN,
        ATRN and ETRN and taking over a turned connection, or None.
    :param pool: the ``ConnectionPool`` shared with the server's other listeners
        (default: one of its own, from ``max_connections`` and ``max_connections_per_client``).
    """

    def __init__(
        self,
        context: ReceiverContext,
        server_settings: ServerSettings,
        clock,
        max_connections: int = 100,
        command_timeout: float = 300,
        data_timeout: float = 180,
        *,
        tls=None,
        implicit_tls: bool = False,
        authenticator=None,
        pool: ConnectionPool | None = None,
        max_connections_per_client: int = 0,
        turnaround=None,
    ) -> None:
        self.context = context
        self.server_settings = server_settings
        self.clock = clock
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.authenticator = authenticator
        self.turnaround = turnaround  # mailsvc.turnaround.TurnAround: TURN, ATRN, ETRN
        self.pool = pool if pool is not None else ConnectionPool(max_connections, max_connections_per_client)

    @property
    def connections(self) -> set:
        """The open connections of the pool."""
        return self.pool.connections

    def buildProtocol(self, addr) -> SMTPServerProtocol:
        return SMTPServerProtocol(self)

    def admit(self, protocol: SMTPServerProtocol) -> Reply | None:
        """Count a new connection in, or the 421 refusing it."""
        return self.pool.admit(protocol)

    def release(self, protocol: SMTPServerProtocol) -> None:
        """A connection ended."""
        self.pool.release(protocol)

    def shutdown(self) -> None:
        """Tell every connected client of the pool we are going away (421 4.3.2)."""
        self.pool.shutdown()

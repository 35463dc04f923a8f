"""Twisted glue for the SMTP client machine: a transport, timeouts, a body streamed from disk.

Thin by design, the twin of ``mailsvc.protocol``: bytes from the peer go to
``mailsvc.smtp.client.ClientConnection``, its output goes to the transport,
and its events fire the Deferreds of a small API for the relay agent:

- ``ready`` fires with the protocol once the greeting and EHLO (or HELO) are
  done, and STARTTLS and AUTH as its ``SessionSecurity`` asks, or errbacks
  with ``SMTPSessionError``;
- ``send(transaction, body)`` runs one transaction and fires with a
  ``SendResult`` (per-recipient replies and the message reply), or errbacks
  with ``SMTPSessionError`` when the session broke;
- ``quit()`` says QUIT and fires once the connection is closed.

The rfc5321 4.5.3.2 timeouts run on the clock given, one per
``ClientConnection.timeout_phase``. The body is read from a binary file in
chunks of ``CHUNK_SIZE`` and written as a pull producer: the next chunk is
read only when the transport asks for it, so memory does not grow with the
message and a slow peer slows the reading down. With BDAT (rfc3030) to a
peer without PIPELINING, the producer stops while a chunk's reply is due
and starts again when it comes.

Between EHLO and the first message, ``SessionOpener``
(``mailsvc.clientsession``) takes the session through STARTTLS and AUTH, as
the ``SessionSecurity`` given says; ``SendResult`` and ``SMTPSessionError``
are in ``mailsvc.clientresults``.
A session that breaks between the STARTTLS handshake and the EHLO reply
over TLS fails with ``tls_failed`` set: the handshake (or the certificate
check, ``mailsvc.tls.ClientTLSContext``) failed.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.internet import defer
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsvc.clientresults import SendResult, SMTPSessionError
from mailsvc.clientsession import OPEN, OpeningFailed, SessionOpener, SessionSecurity
from mailsvc.smtp import client_events as ev
from mailsvc.smtp.client import ClientConnection, ClientSettings, State
from mailsvc.smtp.client_events import Transaction
from mailsvc.sockets import disable_nagle
from mailsvc.tls import describe_tls_failure

log = Logger(namespace="mailsvc.clientprotocol")

CHUNK_SIZE = 64 * 1024

# rfc5321 4.5.3.2: the minimum timeouts, in seconds, per timeout phase.
DEFAULT_TIMEOUTS = {
    "greeting": 300.0,  # 4.5.3.2.1
    "mail": 300.0,  # 4.5.3.2.2 (and every command 4.5.3.2 does not name)
    "rcpt": 300.0,  # 4.5.3.2.3
    "data-init": 120.0,  # 4.5.3.2.4
    "data-block": 180.0,  # 4.5.3.2.5
    "data-end": 600.0,  # 4.5.3.2.6
}


def timeouts_from(relay_config) -> dict[str, float]:
    """The per-phase timeouts of a ``mailsvc.relayconfig.RelayConfig``."""
    return {
        "greeting": relay_config.greeting_timeout,
        "mail": relay_config.mail_timeout,
        "rcpt": relay_config.rcpt_timeout,
        "data-init": relay_config.data_init_timeout,
        "data-block": relay_config.data_block_timeout,
        "data-end": relay_config.data_end_timeout,
    }


# ---------------------------------------------------------------- the body


@implementer(IPullProducer)
class _BodySender:
    """Feeds a message body to the protocol, one chunk each time the
    transport asks for more (a pull producer, like ``FileSender``).

    When the machine takes no data now (BDAT without PIPELINING: a chunk's
    reply is due) it stops (``stalled``), unregistered; the protocol
    registers it again once the reply is in."""

    def __init__(self, protocol: SMTPClientProtocol, body) -> None:
        self.protocol = protocol
        self.body = body
        self.stopped = False
        self.stalled = False

    def resumeProducing(self) -> None:
        # The first BDAT chunk is held back by the machine (for LAST): read
        # on until something is written, or a pull transport waits forever.
        # After a short read the end of the file is most likely next: one
        # more read now lets the end of data go out in the same write as the
        # last of the body (a small message: one send, not two). Never more
        # than one chunk beyond what the transport asked for.
        read_on = False
        while not self.stopped:
            if not self.protocol.machine.data_wanted:
                self.stalled = True
                self.protocol._body_stalled()
                return
            try:
                chunk = self.body.read(CHUNK_SIZE)
            except Exception:
                self.stopped = True
                self.protocol._body_failed(Failure())
                return
            if not chunk:
                self.stopped = True
                self.protocol._body_done()
                return
            if self.protocol._body_chunk(chunk):
                if read_on or len(chunk) >= CHUNK_SIZE:
                    return
                read_on = True

    def stopProducing(self) -> None:
        self.stopped = True


class SMTPClientProtocol(Protocol):
    """One outgoing SMTP session. See the module docstring.

    :param settings: the machine's ``ClientSettings`` (our HELO name).
    :param clock: an ``IReactorTime`` for the timeouts.
    :param timeouts: seconds per ``timeout_phase`` (missing ones: rfc5321's).
    :param security: STARTTLS and AUTH before mail (default: neither).
    """

    def __init__(
        self,
        settings: ClientSettings,
        clock,
        timeouts: Mapping[str, float] | None = None,
        security: SessionSecurity | None = None,
    ) -> None:
        self.machine = ClientConnection(settings)
        self.clock = clock
        self.timeouts = {**DEFAULT_TIMEOUTS, **(timeouts or {})}
        self.security = security or SessionSecurity()
        self.opener = SessionOpener(self.machine, self.security, self._start_tls)
        self._tls_handshake = False  # startTLS called; EHLO over TLS not answered yet
        self.ready: defer.Deferred = defer.Deferred()
        self._close_waiters: list[defer.Deferred] = []
        self._later: list = []  # Deferreds to fire once the pump has written
        self.peer = ""
        self._result: SendResult | None = None
        self._sending: defer.Deferred | None = None
        self._sender: _BodySender | None = None
        self._data_sent = False
        self._timer = None
        self._timer_phase = ""  # the timeout phase the timer is for
        self._gone = False
        self._failure: SMTPSessionError | None = None  # why the session ended, once it has
        self._ready_settled = False  # ready's callback or errback is on its way

    # ---------------------------------------------------------- the agent's API

    @property
    def extensions(self) -> dict[str, str]:
        """The EHLO keywords the peer offered (upper case; empty after HELO)."""
        return self.machine.extensions

    @property
    def tls_active(self) -> bool:
        """True when the session runs over TLS."""
        return self.machine.tls_active

    @property
    def authenticated(self) -> bool:
        """True once AUTH succeeded."""
        return self.opener.authenticated

    def send(self, transaction: Transaction, body) -> defer.Deferred:
        """Send one message: ``transaction`` (its envelope) and ``body``, a
        binary file read from its current position (wire form, unstuffed).

        :return: a Deferred firing with a ``SendResult``, or failing with
            ``SMTPSessionError``. ``body`` is not closed here.
        """
        if self._sending is not None:
            raise RuntimeError("a transaction is already in progress")
        if self._failure is not None:
            return defer.fail(self._failure)
        self._sending = defer.Deferred()
        self._result = SendResult()
        self._body = body
        self._data_sent = False
        d = self._sending
        self.machine.send_message(transaction)
        self._pump()
        return d

    def quit(self) -> defer.Deferred:
        """Say QUIT (when the session still allows it) and close; the
        Deferred fires once the connection is closed (never fails)."""
        if not self._gone:
            if self.machine.state in (State.READY, State.REFUSED):
                self.machine.quit()
                self._pump()
            elif self.machine.state is not State.QUIT and not self.machine.closed:
                self.transport.loseConnection()  # in the middle of something: just go
        return self.when_closed()

    def abort(self) -> None:
        """Drop the connection now, without QUIT."""
        if not self._gone and self.transport is not None:
            _abort(self.transport)

    def when_closed(self) -> defer.Deferred:
        """A Deferred firing (with ``None``) once the connection is gone."""
        if self._gone:
            return defer.succeed(None)
        d = defer.Deferred()
        self._close_waiters.append(d)
        return d

    # ---------------------------------------------------------- Protocol

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        disable_nagle(self.transport)  # the end of data is a small write of its own
        self._restart_timer()

    def dataReceived(self, data: bytes) -> None:
        if self._gone:
            return
        self.machine.receive_data(data)
        self._pump()

    def connectionLost(self, reason: Failure = None) -> None:
        self._gone = True
        self._cancel_timer()
        if self._sender is not None:
            self._sender.stopProducing()
            self._sender = None
        if self._tls_handshake:
            # Lost between the STARTTLS handshake and the EHLO reply over
            # TLS: the handshake or the certificate check failed.
            error = SMTPSessionError(f"TLS handshake failed: {describe_tls_failure(reason)}", tls_failed=True)
        else:
            why = reason.getErrorMessage() if reason is not None else "closed"
            error = SMTPSessionError(f"connection lost: {why}", data_sent=self._data_sent)
        self._fail(error, now=True)
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(None)

    # ---------------------------------------------------------- the pump

    def _pump(self) -> None:
        """Take the machine's events, write its output, set the timer; only
        then fire the Deferreds the events settled, so whatever their
        callbacks do next comes after what the machine had to say."""
        while not self._gone:
            event = self.machine.next_event()
            if event is None:
                break
            self._on_event(event)
        self._flush()
        self._restart_timer()
        sender = self._sender
        if sender is not None and sender.stalled and self.machine.data_wanted and not self._gone:
            # BDAT without PIPELINING: the chunk's reply came; the next may go.
            sender.stalled = False
            self.transport.registerProducer(sender, False)
        while self._later:
            self._later.pop(0)()

    def _flush(self) -> None:
        if self._gone:
            return
        out = self.machine.data_to_send()
        if out:
            self.transport.write(out)
        if self.machine.closed:
            self._cancel_timer()
            self.transport.loseConnection()

    def _on_event(self, event: ev.ClientEvent) -> None:
        # The events of a transaction come first: they are most of them (the
        # event classes are disjoint, so the order decides nothing else).
        if isinstance(event, ev.RecipientResult):
            if self._result is not None:
                self._result.recipients[event.address] = event.reply
        elif isinstance(event, ev.StartData):
            self._start_body()
        elif isinstance(event, ev.MessageResult):
            result = self._result or SendResult()
            result.reply, result.accepted = event.reply, event.recipients
            self._finish(result)
        elif isinstance(event, ev.TransactionFailed):
            self._finish(SendResult(refusal=event.reply, synthetic=event.synthetic))
        elif isinstance(event, SessionOpener.OPENING_EVENTS):
            if isinstance(event, ev.Ready) and self.machine.tls_active:
                self._tls_handshake = False  # EHLO answered over TLS
            try:
                step = self.opener.handle(event)
            except OpeningFailed as e:
                if self.machine.state is State.READY:
                    self.machine.quit()  # rfc5321 4.1.1.10: leave politely
                self._fail(SMTPSessionError(e.reason, e.reply, opening=e))
                return
            if step == OPEN and not self._ready_settled:
                self._ready_settled = True
                self._later.append(lambda: self.ready.callback(self))
        elif isinstance(event, (ev.GreetingRefused, ev.HelloRefused)):
            what = "greeting" if isinstance(event, ev.GreetingRefused) else "HELO"
            error = SMTPSessionError(f"{what} refused: {event.reply}", event.reply)
            if not self.machine.closed:
                self.machine.quit()  # rfc5321 3.1: after a 554 greeting, QUIT
            self._fail(error)
        elif isinstance(event, ev.ConnectionFailed):
            self._fail(SMTPSessionError(f"session ended: {event.reply}", event.reply, self._data_sent))
        elif isinstance(event, ev.ProtocolError):
            self._fail(SMTPSessionError(f"protocol error: {event.reason}", None, self._data_sent))
        elif isinstance(event, ev.Closed):
            pass  # _flush closes the transport
        else:  # Turned, TurnRefused: TURN and ATRN are never sent here
            log.warning("unexpected client event {event!r}", event=event)

    def _start_tls(self, options) -> None:
        """The peer said 220 to STARTTLS: switch the transport (rfc3207 4)."""
        self._tls_handshake = True
        self.transport.startTLS(options)

    def _finish(self, result: SendResult) -> None:
        d, self._sending, self._result = self._sending, None, None
        self._body = None
        self._stop_sender()  # BDAT: a refused chunk ends the transaction early
        if d is not None:
            self._later.append(lambda: d.callback(result))

    def _fail(self, error: SMTPSessionError, now: bool = False) -> None:
        """The session is over: every Deferred waiting gets ``error`` (after
        the pump has written, or at once with ``now``)."""
        if self._failure is None:
            self._failure = error
        self._stop_sender()
        if not self._ready_settled:
            self._ready_settled = True
            self._fire(lambda: self.ready.errback(error), now)
        d, self._sending, result, self._result = self._sending, None, self._result, None
        if d is not None:
            if error.partial is None:
                error.partial = result
            self._fire(lambda: d.errback(error), now)

    def _fire(self, call, now: bool) -> None:
        self._later.append(call)
        while now and self._later:
            self._later.pop(0)()

    # ---------------------------------------------------------- the body

    def _start_body(self) -> None:
        self._sender = _BodySender(self, self._body)
        self.transport.registerProducer(self._sender, False)

    def _stop_sender(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            registered = not sender.stalled
            sender.stopProducing()
            if registered and not self._gone:
                self.transport.unregisterProducer()

    def _body_chunk(self, chunk: bytes) -> bool:
        """Hand ``chunk`` to the machine; True when bytes were written."""
        self.machine.send_data(chunk)
        out = self.machine.data_to_send()
        if out:
            self.transport.write(out)
            self._restart_timer()  # rfc5321 4.5.3.2.5: a block was handed on
        return bool(out)

    def _body_stalled(self) -> None:
        """The machine takes no data now (a BDAT reply is due): stop pulling."""
        self.transport.unregisterProducer()

    def _body_done(self) -> None:
        self._sender = None
        self.transport.unregisterProducer()
        if self.machine.state is State.DATA:
            self.machine.end_data()
            self._data_sent = True
        self._pump()

    def _body_failed(self, failure: Failure) -> None:
        log.failure("reading the message body failed", failure)
        # Never end the data: the peer must not take a truncated message.
        self._fail(SMTPSessionError(f"cannot read the message: {failure.getErrorMessage()}"), now=True)
        _abort(self.transport)

    # ---------------------------------------------------------- timeouts

    def _restart_timer(self) -> None:
        """rfc5321 4.5.3.2: one timer for the reply (or data block) due now."""
        phase = None if self._gone else self.machine.timeout_phase
        if phase is None:
            self._cancel_timer()
            return
        seconds = self.timeouts[phase]
        timer, self._timer_phase = self._timer, phase
        if timer is not None and timer.active():
            # Restarted several times per message: moving the timer later
            # in place (DelayedCall.reset) costs less than a new one. reset
            # keeps the move as an offset from the old time; when
            # time <= deadline <= 2 * time that offset is exact in floating
            # point (Sterbenz), so the timer fires at exactly the deadline a
            # new one would have.
            deadline = self.clock.seconds() + seconds
            if timer.time <= deadline <= 2 * timer.time:
                timer.reset(seconds)
                return
            timer.cancel()
        self._timer = self.clock.callLater(seconds, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer, phase = None, self._timer_phase
        seconds = self.timeouts[phase]
        log.info("timeout ({phase}, {seconds:g} s) talking to {peer}", phase=phase, seconds=seconds, peer=self.peer)
        if self._tls_handshake:
            error = SMTPSessionError(f"TLS handshake failed: no answer within {seconds:g} s", tls_failed=True)
        elif phase == "data-block":
            error = SMTPSessionError(f"timed out after {seconds:g} s sending message data", None, self._data_sent)
        else:
            reason = f"timed out after {seconds:g} s waiting for the {phase} reply"
            error = SMTPSessionError(reason, None, self._data_sent)
        self._fail(error, now=True)
        _abort(self.transport)


def _abort(transport) -> None:
    abort = getattr(transport, "abortConnection", None)
    (abort or transport.loseConnection)()


class SMTPClientFactory(Factory):
    """Builds one ``SMTPClientProtocol`` (for an endpoint's ``connect``)."""

    def __init__(
        self,
        settings: ClientSettings,
        clock,
        timeouts: Mapping[str, float] | None = None,
        security: SessionSecurity | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.timeouts = dict(timeouts or {})
        self.security = security

    def buildProtocol(self, addr) -> SMTPClientProtocol:
        protocol = SMTPClientProtocol(self.settings, self.clock, self.timeouts, self.security)
        protocol.factory = self
        return protocol

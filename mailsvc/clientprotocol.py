"""Twisted glue for the SMTP client machine: a transport, timeouts, a body streamed from disk.

Thin by design, the twin of ``mailsvc.protocol``: bytes from the peer go to
``mailsvc.smtp.client.ClientConnection``, its output goes to the transport,
and its events fire the Deferreds of a small API for the relay agent:

- ``ready`` fires with the protocol once the greeting and EHLO (or HELO) are
  done, or errbacks with ``SMTPSessionError``;
- ``send(transaction, body)`` runs one transaction and fires with a
  ``SendResult`` (per-recipient replies and the message reply), or errbacks
  with ``SMTPSessionError`` when the session broke;
- ``quit()`` says QUIT and fires once the connection is closed.

The rfc5321 4.5.3.2 timeouts run on the clock given, one per
``ClientConnection.timeout_phase``. The body is read from a binary file in
chunks of ``CHUNK_SIZE`` and written as a pull producer: the next chunk is
read only when the transport asks for it, so memory does not grow with the
message and a slow peer slows the reading down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsvc.smtp import client_events as ev
from mailsvc.smtp.client import ClientConnection, ClientSettings, State
from mailsvc.smtp.client_events import Transaction
from mailsvc.smtp.replies import Reply

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
    """The per-phase timeouts of a ``mailsvc.config.RelayConfig``."""
    return {
        "greeting": relay_config.greeting_timeout,
        "mail": relay_config.mail_timeout,
        "rcpt": relay_config.rcpt_timeout,
        "data-init": relay_config.data_init_timeout,
        "data-block": relay_config.data_block_timeout,
        "data-end": relay_config.data_end_timeout,
    }


class SMTPSessionError(Exception):
    """The session ended before the step asked for was done.

    ``reply`` is the peer's reply that ended it (a refused greeting or
    HELO, a 421), or ``None`` (connection lost, timeout, garbled reply);
    ``reason`` says what happened in words. ``data_sent`` is true when the
    end of data had been sent: the peer may have taken the message.
    ``partial`` holds the replies to the transaction in progress so far.
    """

    def __init__(self, reason: str, reply: Reply | None = None, data_sent: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply
        self.data_sent = data_sent
        # What the peer had said to the transaction in progress, if any.
        self.partial: SendResult | None = None

    @property
    def transient(self) -> bool:
        """False only when the peer refused with a 5xx reply."""
        return self.reply is None or self.reply.code < 500


@dataclass
class SendResult:
    """What the peer said to one transaction.

    ``refusal`` is set when the message went to nobody for a reason that
    applies to every recipient: MAIL refused, or the machine's own refusal
    (``synthetic``: too big for the peer's SIZE, 8-bit body without
    8BITMIME). Otherwise ``recipients`` maps each address to its RCPT reply
    and ``reply`` is the reply to the end of data (or the refusal of DATA),
    which applies to the ``accepted`` recipients.
    """

    refusal: Reply | None = None
    synthetic: bool = False
    recipients: dict[str, Reply] = field(default_factory=dict)
    reply: Reply | None = None
    accepted: tuple[str, ...] = ()


@implementer(IPullProducer)
class _BodySender:
    """Feeds a message body to the protocol, one chunk each time the
    transport asks for more (a pull producer, like ``FileSender``)."""

    def __init__(self, protocol: SMTPClientProtocol, body) -> None:
        self.protocol = protocol
        self.body = body
        self.stopped = False

    def resumeProducing(self) -> None:
        if self.stopped:
            return
        try:
            chunk = self.body.read(CHUNK_SIZE)
        except Exception:
            self.stopped = True
            self.protocol._body_failed(Failure())
            return
        if chunk:
            self.protocol._body_chunk(chunk)
        else:
            self.stopped = True
            self.protocol._body_done()

    def stopProducing(self) -> None:
        self.stopped = True


class SMTPClientProtocol(Protocol):
    """One outgoing SMTP session. See the module docstring.

    :param settings: the machine's ``ClientSettings`` (our HELO name).
    :param clock: an ``IReactorTime`` for the timeouts.
    :param timeouts: seconds per ``timeout_phase`` (missing ones: rfc5321's).
    """

    def __init__(self, settings: ClientSettings, clock, timeouts: Mapping[str, float] | None = None) -> None:
        self.machine = ClientConnection(settings)
        self.clock = clock
        self.timeouts = {**DEFAULT_TIMEOUTS, **(timeouts or {})}
        self.ready: defer.Deferred = defer.Deferred()
        self._close_waiters: list[defer.Deferred] = []
        self._later: list = []  # Deferreds to fire once the pump has written
        self.peer = ""
        self._result: SendResult | None = None
        self._sending: defer.Deferred | None = None
        self._sender: _BodySender | None = None
        self._data_sent = False
        self._timer = None
        self._gone = False
        self._failure: SMTPSessionError | None = None  # why the session ended, once it has
        self._ready_settled = False  # ready's callback or errback is on its way

    # ---------------------------------------------------------- the agent's API

    @property
    def extensions(self) -> dict[str, str]:
        """The EHLO keywords the peer offered (upper case; empty after HELO)."""
        return self.machine.extensions

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
        why = reason.getErrorMessage() if reason is not None else "closed"
        self._fail(SMTPSessionError(f"connection lost: {why}", data_sent=self._data_sent), now=True)
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
        if isinstance(event, ev.Ready):
            if not self._ready_settled:
                self._ready_settled = True
                self._later.append(lambda: self.ready.callback(self))
        elif isinstance(event, (ev.GreetingRefused, ev.HelloRefused)):
            what = "greeting" if isinstance(event, ev.GreetingRefused) else "HELO"
            error = SMTPSessionError(f"{what} refused: {event.reply}", event.reply)
            if not self.machine.closed:
                self.machine.quit()  # rfc5321 3.1: after a 554 greeting, QUIT
            self._fail(error)
        elif isinstance(event, ev.RecipientResult):
            if self._result is not None:
                self._result.recipients[event.address] = event.reply
        elif isinstance(event, ev.StartData):
            self._start_body()
        elif isinstance(event, ev.TransactionFailed):
            self._finish(SendResult(refusal=event.reply, synthetic=event.synthetic))
        elif isinstance(event, ev.MessageResult):
            result = self._result or SendResult()
            result.reply, result.accepted = event.reply, event.recipients
            self._finish(result)
        elif isinstance(event, ev.ConnectionFailed):
            self._fail(SMTPSessionError(f"session ended: {event.reply}", event.reply, self._data_sent))
        elif isinstance(event, ev.ProtocolError):
            self._fail(SMTPSessionError(f"protocol error: {event.reason}", None, self._data_sent))
        elif isinstance(event, ev.Closed):
            pass  # _flush closes the transport
        else:  # TLSReady, TLSRefused: STARTTLS is never sent yet
            log.warning("unexpected client event {event!r}", event=event)

    def _finish(self, result: SendResult) -> None:
        d, self._sending, self._result = self._sending, None, None
        self._body = None
        if d is not None:
            self._later.append(lambda: d.callback(result))

    def _fail(self, error: SMTPSessionError, now: bool = False) -> None:
        """The session is over: every Deferred waiting gets ``error`` (after
        the pump has written, or at once with ``now``)."""
        if self._failure is None:
            self._failure = error
        if self._sender is not None:
            self._sender.stopProducing()
            self._sender = None
            if not self._gone:
                self.transport.unregisterProducer()
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

    def _body_chunk(self, chunk: bytes) -> None:
        self.machine.send_data(chunk)
        self._flush()
        self._restart_timer()  # rfc5321 4.5.3.2.5: a block was handed on

    def _body_done(self) -> None:
        self._sender = None
        self.transport.unregisterProducer()
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
        self._cancel_timer()
        if self._gone:
            return
        phase = self.machine.timeout_phase
        if phase is None:
            return
        self._timer = self.clock.callLater(self.timeouts[phase], self._timed_out, phase)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self, phase: str) -> None:
        self._timer = None
        seconds = self.timeouts[phase]
        log.info("timeout ({phase}, {seconds:g} s) talking to {peer}", phase=phase, seconds=seconds, peer=self.peer)
        if phase == "data-block":
            reason = f"timed out after {seconds:g} s sending message data"
        else:
            reason = f"timed out after {seconds:g} s waiting for the {phase} reply"
        self._fail(SMTPSessionError(reason, None, self._data_sent), now=True)
        _abort(self.transport)


def _abort(transport) -> None:
    abort = getattr(transport, "abortConnection", None)
    (abort or transport.loseConnection)()


class SMTPClientFactory(Factory):
    """Builds one ``SMTPClientProtocol`` (for an endpoint's ``connect``)."""

    def __init__(self, settings: ClientSettings, clock, timeouts: Mapping[str, float] | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.timeouts = dict(timeouts or {})

    def buildProtocol(self, addr) -> SMTPClientProtocol:
        protocol = SMTPClientProtocol(self.settings, self.clock, self.timeouts)
        protocol.factory = self
        return protocol

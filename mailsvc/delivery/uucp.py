"""UUCP delivery: a site's mail handed to a command as BSMTP batches.

``UucpAgent`` is the ``IDeliveryAgent`` of the hop ``uucp.<name>`` of one
``[[uucp.site]]`` (rfc976: mail to a UUCP neighbour is a job for it, run
there as ``rsmtp`` with the batch on standard input). The queue runner hands
it one message per ``deliver()`` call; the agent gathers the messages that
arrive within ``window`` seconds of the first into one batch, up to the
site's ``max_messages`` and ``max_bytes`` (a message larger than
``max_bytes`` goes alone), and starts the site's ``command`` (``{site}``
replaced by the name; by default ``uux -r -z - {site}!rsmtp``: queue the job,
do not call the site now) with the batch (``mailsvc.bsmtp``) streamed to its
standard input straight from the spool files, a chunk at a time as the pipe
drains (never a whole message in memory). A message's ``MAIL`` carries
SMTPUTF8 only when the message needs it (rfc6531 3.4; ``mailsvc.bsmtp``: a
non-ASCII address, or SMTPUTF8 given and a non-ASCII header section, which is
then read ahead of the ``MAIL`` line, up to ``bsmtp.HEADER_PEEK_LIMIT``).

The batch counts as handed on only when the command exits with status 0:
then every recipient of every message in it is delivered. Otherwise (a
non-zero status, a signal, no exit within ``timeout`` seconds, which kills
it, input not read to its end, or the command missing) each recipient gets a
``TemporaryDeliveryError`` naming the command, its status and the first line
of its standard error, and the runner retries the message like any deferred
one. The same message may then travel again in a later batch: delivery is at
least once (DESIGN rule 1); ``uux`` only queues, so a failure after it
accepted a job is rare.

Reads of the spool (``size``, ``open`` and the data itself, in 64 KiB
pieces) are done in the reactor thread: they are local file reads.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsvc import bsmtp
from mailsvc.envelope import QueuedMessage, Recipient, RecipientState
from mailsvc.errors import DeliveryError, TemporaryDeliveryError
from mailsvc.interfaces import IDeliveryAgent

CHUNK_SIZE = 64 * 1024
STDERR_KEPT = 4096  # octets of the command's stderr kept for the error text
# rfc3463 4.3.0: other or undefined mail system status (the hand-off failed).
STATUS = "4.3.0"


def command_for(site) -> list[str]:
    """The site's command line, ``{site}`` replaced by its name."""
    return [arg.replace("{site}", site.name) for arg in site.command]


def _read_chunks(source) -> Iterator[bytes]:
    """The bytes of an open binary file, ``CHUNK_SIZE`` at a time."""
    while True:
        chunk = source.read(CHUNK_SIZE)
        if not chunk:
            return
        yield chunk


@dataclass
class _Entry:
    """A message waiting in a gathering batch, and the Deferred its ``deliver`` returned."""

    message: QueuedMessage
    recipients: tuple[Recipient, ...]
    size: int  # octets of its data with the prepended headers
    done: defer.Deferred = field(default_factory=defer.Deferred)


@dataclass
class _Outcome:
    """How a command run ended."""

    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    read_error: Exception | None = None  # reading the spool failed mid-batch
    unread: bool = False  # the command closed its input before the batch's end
    written: int = 0
    stderr: bytes = b""

    def first_error_line(self) -> str:
        """The first non-empty line of the command's stderr (shortened)."""
        for line in self.stderr.decode("utf-8", "replace").splitlines():
            if line.strip():
                line = line.strip()
                return line if len(line) <= 300 else line[:297] + "..."
        return ""


@implementer(IPullProducer)
class _BatchProcess(ProcessProtocol):
    """Runs one command: streams the batch ``pieces`` to its stdin as the
    pipe asks for more (a pull producer), keeps the start of its stderr,
    kills it after ``timeout`` seconds. ``ended`` fires with an ``_Outcome``."""

    def __init__(self, pieces: Iterator[bytes], clock, timeout: float) -> None:
        self.ended: defer.Deferred = defer.Deferred()
        self.outcome = _Outcome()
        self._pieces = pieces
        self._clock = clock
        self._timeout = timeout
        self._timer = None
        self._producing = False
        self._finished = False  # the whole batch was written

    # ---------------------------------------------------------- process

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._timeout, self._time_out)
        self._producing = True
        self.transport.registerProducer(self, False)

    def outReceived(self, data: bytes) -> None:
        pass  # nothing to read there; dropped (bounded memory)

    def errReceived(self, data: bytes) -> None:
        room = STDERR_KEPT - len(self.outcome.stderr)
        if room > 0:
            self.outcome.stderr += data[:room]

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 0 and not self._finished and self.outcome.read_error is None:
            self.outcome.unread = True  # it stopped reading: it has not got the whole batch
            self._producing = False

    def processEnded(self, reason: Failure) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._producing = False
        if reason.check(ProcessDone):
            self.outcome.exit_code = 0
        elif reason.check(ProcessTerminated):
            self.outcome.exit_code = reason.value.exitCode
            self.outcome.signal = reason.value.signal
        self.ended.callback(self.outcome)

    # ---------------------------------------------------------- producer

    def resumeProducing(self) -> None:
        """The pipe wants more: write the next non-empty piece, or end the input."""
        if not self._producing:
            return
        while True:
            try:
                piece = next(self._pieces)
            except StopIteration:
                self._finish()
                return
            except Exception as error:  # an OSError reading the spool, a BatchError
                self._abort(error)
                return
            if piece:
                self.outcome.written += len(piece)
                self.transport.write(piece)
                return

    def pauseProducing(self) -> None:
        pass  # a pull producer is only ever asked for more

    def stopProducing(self) -> None:
        """The pipe is gone (the command closed its input or died)."""
        self._producing = False

    def _finish(self) -> None:
        self._producing = False
        self._finished = True
        self.transport.unregisterProducer()
        self.transport.closeStdin()  # EOF: the command sees the whole batch

    def _abort(self, error: Exception) -> None:
        # Never close stdin on a half-written batch: the command could take
        # the truncated batch for a whole one. Kill it instead.
        self._producing = False
        self.outcome.read_error = error
        self.transport.unregisterProducer()
        self._kill()

    def _time_out(self) -> None:
        self._timer = None
        self.outcome.timed_out = True
        self._producing = False
        self._kill()

    def _kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")
        except Exception:  # noqa: BLE001 - already gone (ProcessExitedAlready)
            pass
        # Our ends of the pipes too: a grandchild holding them must not keep
        # processEnded from coming.
        self.transport.loseConnection()


@implementer(IDeliveryAgent)
class UucpAgent:
    """Delivers the mail of one UUCP site as BSMTP batches through its command.

    :param site: the ``mailsvc.relayconfig.UucpSiteConfig``.
    :param spool: the ``ISpool`` messages are read from.
    :param reactor: provides ``IReactorProcess`` and ``IReactorTime``.
    :param timeout: seconds a command may run before it is killed.
    :param hostname: our name, in the batch's EHLO.
    :param window: seconds to wait, after a message arrives, for more to
        join its batch; ``0`` sends each message in a batch of its own.
    :param environ: the command's environment (default: ours).
    :param log: a ``twisted.logger.Logger``.
    """

    def __init__(
        self,
        site,
        spool,
        reactor,
        timeout: float = 600,
        hostname: str = "localhost",
        window: float = 1.0,
        environ: Mapping[str, str] | None = None,
        log: Logger | None = None,
    ) -> None:
        self.site = site
        self._spool = spool
        self._reactor = reactor
        self._timeout = timeout
        self._hostname = hostname
        self._window = window
        self._environ = dict(os.environ if environ is None else environ)
        self._log = log or Logger(namespace="mailsvc.delivery.uucp")
        self._gathering: list[_Entry] = []
        self._gathered_bytes = 0
        self._timer = None
        self.runs = 0  # commands started (batches sent), for tests and logs

    # ---------------------------------------------------------- IDeliveryAgent

    def deliver(self, message: QueuedMessage) -> defer.Deferred:
        """Put ``message`` in the batch being gathered; fire with the batch's
        result for its pending recipients (``{address: None | DeliveryError}``)."""
        recipients: dict[str, Recipient] = {}
        for r in message.envelope.recipients:
            if r.state is RecipientState.PENDING and r.address not in recipients:
                recipients[r.address] = r
        if not recipients:
            return defer.succeed({})
        size = self._size(message)
        entry = _Entry(message, tuple(recipients.values()), size)
        site = self.site
        if self._gathering and (
            len(self._gathering) >= site.max_messages or self._gathered_bytes + size > site.max_bytes
        ):
            self._send_gathered()
        self._gathering.append(entry)
        self._gathered_bytes += size
        if len(self._gathering) >= site.max_messages or self._gathered_bytes >= site.max_bytes or self._window <= 0:
            self._send_gathered()
        elif self._timer is None:
            self._timer = self._reactor.callLater(self._window, self._send_gathered)
        return entry.done

    def _size(self, message: QueuedMessage) -> int:
        """Octets of the message as sent: prepended headers and data."""
        headers = message.envelope.prepend_headers
        head = len(("\r\n".join(headers) + "\r\n").encode("utf-8", "surrogateescape")) if headers else 0
        try:
            return head + self._spool.size(message)
        except (OSError, ValueError):
            return head

    # ---------------------------------------------------------- batches

    def _send_gathered(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        entries, self._gathering, self._gathered_bytes = self._gathering, [], 0
        if not entries:
            return
        d = defer.Deferred.fromCoroutine(self._send(entries))

        def failed(failure: Failure) -> None:
            self._log.failure("UUCP batch for site {site} failed unexpectedly", failure, site=self.site.name)
            error = TemporaryDeliveryError(f"internal error: {failure.getErrorMessage()}", STATUS)
            for entry in entries:
                if not entry.done.called:
                    entry.done.callback({r.address: error for r in entry.recipients})

        d.addErrback(failed)

    async def _send(self, entries: list[_Entry]) -> None:
        """Run the command with a batch of ``entries``; fire each entry's Deferred."""
        sources = []
        batch: list[tuple[_Entry, object]] = []
        try:
            for entry in entries:
                try:
                    source = self._spool.open(entry.message)
                except (OSError, ValueError) as e:
                    self._fire(entry, TemporaryDeliveryError(f"cannot read the message from the spool: {e}", STATUS))
                    continue
                sources.append(source)
                batch.append((entry, source))
            if not batch:
                return
            error = await self._run(batch)
        finally:
            for source in sources:
                try:
                    source.close()
                except OSError:
                    pass
        for entry, _ in batch:
            self._fire(entry, error)

    @staticmethod
    def _fire(entry: _Entry, error: DeliveryError | None) -> None:
        entry.done.callback({r.address: error for r in entry.recipients})

    async def _run(self, batch: list[tuple[_Entry, object]]) -> DeliveryError | None:
        """Start the command with ``batch`` on its stdin; None when it exited 0."""
        argv = command_for(self.site)
        shown = " ".join(argv)
        if len(shown) > 100:
            shown = shown[:97] + "..."
        executable = shutil.which(argv[0], path=self._environ.get("PATH", os.defpath))
        if executable is None:
            self._log.error("UUCP site {site}: command not found: {command}", site=self.site.name, command=argv[0])
            return TemporaryDeliveryError(f"command not found: {argv[0]} (in {shown})", STATUS)
        messages = [
            bsmtp.BatchMessage(entry.message.envelope, entry.recipients, _read_chunks(source), entry.size)
            for entry, source in batch
        ]
        process = _BatchProcess(bsmtp.write_batch(self._hostname, messages), self._reactor, self._timeout)
        self.runs += 1
        try:
            self._reactor.spawnProcess(process, executable, argv, env=self._environ)
        except OSError as e:
            return TemporaryDeliveryError(f"cannot start {shown}: {e}", STATUS)
        outcome: _Outcome = await process.ended
        ids = ",".join(entry.message.id for entry, _ in batch)
        error = self._judge(outcome, shown)
        if error is None:
            self._log.info(
                "UUCP site {site}: batch of {count} message(s) ({octets} octets) handed to {command}: ids={ids}",
                site=self.site.name, count=len(batch), octets=outcome.written, command=shown, ids=ids,
            )
        else:
            self._log.warn(
                "UUCP site {site}: batch of {count} message(s) not handed on: {error}; ids={ids}",
                site=self.site.name, count=len(batch), error=str(error), ids=ids,
            )
        return error

    def _judge(self, outcome: _Outcome, shown: str) -> DeliveryError | None:
        """What the command's end means for every message of its batch."""
        line = outcome.first_error_line()
        said = f": {line}" if line else ""
        if outcome.read_error is not None:
            return TemporaryDeliveryError(f"cannot read the message from the spool: {outcome.read_error}", STATUS)
        if outcome.timed_out:
            return TemporaryDeliveryError(f"{shown} did not exit within {self._timeout:g} s and was killed{said}", STATUS)
        if outcome.signal is not None:
            return TemporaryDeliveryError(f"{shown} was killed by signal {outcome.signal}{said}", STATUS)
        if outcome.exit_code != 0:
            return TemporaryDeliveryError(f"{shown} exited with status {outcome.exit_code}{said}", STATUS)
        if outcome.unread:
            return TemporaryDeliveryError(
                f"{shown} exited with status 0 without reading the whole batch"
                f" (it stopped after {outcome.written} octets)", STATUS,
            )
        return None

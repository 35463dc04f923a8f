"""The control socket: ``mailsvc queue flush|hold|release|delete`` on a running server.

The server listens with Twisted AMP (``twisted.protocols.amp``) on the UNIX
socket ``[server] control_socket`` (mode 0600, so only the server's user,
and root, may use it). Each command names a queue ID (or, for ``Flush``, an
optional domain or ID) and acts on the spool and the queue runner together:

- ``Flush``: every queued message with a pending recipient (in ``domain``,
  or with that ``id``) is tried now, whatever its next attempt time.
- ``Hold``: the message is put on hold (``C.`` renamed ``H.``) in every hop
  that has it, and the runner forgets it; it stays until released.
- ``Release``: held copies go back to the queue; the next scan tries them.
- ``Delete``: the message is removed from every hop, queued or held.

An unknown ID answers the error ``UnknownMessage``; releasing a message that
is not held, ``NotHeld``; a spool failure, ``SpoolError``.

The client side (``call``) is what ``mailsvc.cli`` runs under
``twisted.internet.task.react``. No reactor is imported here: it is passed in.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Callable

from twisted.application import service
from twisted.internet import defer, endpoints, error, protocol, threads
from twisted.logger import Logger
from twisted.protocols import amp

from mailsvc.envelope import RecipientState
from mailsvc.errors import SpoolError

log = Logger(namespace="mailsvc.control")

CALL_TIMEOUT = 60.0  # seconds the client waits for an answer
CONNECT_TIMEOUT = 10.0


class UnknownMessage(Exception):
    """No hop of the spool has a message with this queue ID."""


class NotHeld(Exception):
    """``Release`` of a message that is queued, not held."""


class ServerUnreachable(Exception):
    """The client could not connect to the control socket."""


_ERRORS = {UnknownMessage: b"UNKNOWN_MESSAGE", NotHeld: b"NOT_HELD", SpoolError: b"SPOOL_ERROR"}


class Flush(amp.Command):
    """Try queued messages now: all, those with a pending recipient in
    ``domain``, or the one with queue ID ``id``. Answers how many are being tried."""

    arguments = [(b"domain", amp.Unicode(optional=True)), (b"id", amp.Unicode(optional=True))]
    response = [(b"count", amp.Integer())]
    errors = _ERRORS


class Hold(amp.Command):
    """Put message ``id`` on hold; answers the hops where it is now held."""

    arguments = [(b"id", amp.Unicode())]
    response = [(b"hops", amp.ListOf(amp.Unicode()))]
    errors = _ERRORS


class Release(amp.Command):
    """Take message ``id`` off hold; answers the hops where it is queued again."""

    arguments = [(b"id", amp.Unicode())]
    response = [(b"hops", amp.ListOf(amp.Unicode()))]
    errors = _ERRORS


class Delete(amp.Command):
    """Remove message ``id`` from the spool; answers the hops it was removed from."""

    arguments = [(b"id", amp.Unicode())]
    response = [(b"hops", amp.ListOf(amp.Unicode()))]
    errors = _ERRORS


COMMANDS = {"flush": Flush, "hold": Hold, "release": Release, "delete": Delete}


def recipient_in(domain: str) -> Callable:
    """A predicate: the message has a pending recipient whose domain is ``domain``
    (without regard to case or a trailing dot)."""
    wanted = domain.lower().strip().removeprefix("@").removesuffix(".")

    def matches(message) -> bool:
        return any(
            r.address.rpartition("@")[2].lower().removesuffix(".") == wanted
            for r in message.envelope.recipients
            if r.state is RecipientState.PENDING
        )

    return matches


class QueueControl:
    """What the control commands do, on a spool and a queue runner.

    :param spool: the ``ISpool``.
    :param runner: the ``QueueRunner`` (``flush``, ``suspend``, ``resume``).
    :param run_blocking: ``run_blocking(f, *args) -> Deferred`` for spool calls
        (a thread pool in the server; ``maybeDeferred`` in tests).
    """

    def __init__(self, spool, runner, run_blocking: Callable = defer.maybeDeferred) -> None:
        self.spool = spool
        self.runner = runner
        self.run_blocking = run_blocking

    @defer.inlineCallbacks
    def _find(self, id: str):
        try:
            found = yield self.run_blocking(self.spool.find, id)
        except ValueError:
            raise UnknownMessage(f"{id!r} is not a queue ID") from None
        if not found:
            raise UnknownMessage(f"no message {id} in the queue")
        return found

    def flush(self, domain: str | None = None, id: str | None = None) -> defer.Deferred:
        """Fires with the number of messages being tried now."""
        tests = []
        if domain:
            tests.append(recipient_in(domain))
        if id:
            tests.append(lambda message: message.id == id)
        predicate = (lambda message: all(test(message) for test in tests)) if tests else None
        log.info("flush requested domain={domain} id={id}", domain=domain or "*", id=id or "*")
        return self.runner.flush(predicate)

    @defer.inlineCallbacks
    def hold(self, id: str):
        """Fires with the hops where ``id`` is held; already held copies count."""
        hops = []
        for message, held in (yield self._find(id)):
            if not held:
                self.runner.suspend(message.hop, id)  # stays so until released
                try:
                    yield self.run_blocking(self.spool.hold, message.hop, id)
                except SpoolError:
                    self.runner.resume(message.hop, id)
                    raise
                log.info("held id={id} hop={hop}", id=id, hop=message.hop)
            hops.append(message.hop)
        return hops

    @defer.inlineCallbacks
    def release(self, id: str):
        """Fires with the hops where ``id`` was held and is queued again."""
        hops = []
        for message, held in (yield self._find(id)):
            if held:
                yield self.run_blocking(self.spool.release, message.hop, id)
                self.runner.resume(message.hop, id)
                log.info("released id={id} hop={hop}", id=id, hop=message.hop)
                hops.append(message.hop)
        if not hops:
            raise NotHeld(f"message {id} is not on hold")
        return hops

    @defer.inlineCallbacks
    def delete(self, id: str):
        """Fires with the hops ``id`` was removed from."""
        hops = []
        for message, _ in (yield self._find(id)):
            self.runner.suspend(message.hop, id)
            try:
                yield self.run_blocking(self.spool.delete, message.hop, id)
            finally:
                self.runner.resume(message.hop, id)
            log.info("deleted id={id} hop={hop}", id=id, hop=message.hop)
            hops.append(message.hop)
        return hops


class ControlProtocol(amp.AMP):
    """The server side of one control connection."""

    def __init__(self, control: QueueControl) -> None:
        super().__init__()
        self.control = control

    @Flush.responder
    def flush(self, domain=None, id=None):
        return self.control.flush(domain, id).addCallback(lambda count: {"count": count})

    @Hold.responder
    def hold(self, id):
        return self.control.hold(id).addCallback(lambda hops: {"hops": hops})

    @Release.responder
    def release(self, id):
        return self.control.release(id).addCallback(lambda hops: {"hops": hops})

    @Delete.responder
    def delete(self, id):
        return self.control.delete(id).addCallback(lambda hops: {"hops": hops})


class ControlServerFactory(protocol.Factory):
    """Makes a ``ControlProtocol`` per connection, all sharing one ``QueueControl``."""

    def __init__(self, control: QueueControl) -> None:
        self.control = control

    def buildProtocol(self, addr) -> ControlProtocol:
        proto = ControlProtocol(self.control)
        proto.factory = self
        return proto


def clear_stale_socket(path: str) -> None:
    """Remove ``path`` if it is a socket nobody listens on (a crash left it).

    :raise OSError: ``path`` is something else than a socket, or a live
        server answers on it (``EADDRINUSE``).
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: nobody accepts on it
        return
    except OSError:
        return  # not ours to judge (e.g. permission); let listening report it
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another server listens on it", path)


class ControlService(service.Service):
    """Listens on the control socket while the application runs.

    :param spool: the ``ISpool``; :param runner: the ``QueueRunner``;
    :param path: the socket's path (``[server] control_socket``);
    :param reactor: provides ``IReactorUNIX`` and a thread pool.

    At start its directory is created (mode 0700) if missing and a stale
    socket file is replaced; the socket is mode 0600. If it cannot listen,
    the error is logged naming the key and mail service goes on without it.
    """

    def __init__(self, spool, runner, path, reactor) -> None:
        self.path = os.fspath(path)
        self.reactor = reactor

        def run_blocking(f, *args):
            return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

        self.factory = ControlServerFactory(QueueControl(spool, runner, run_blocking))
        self.port = None

    def startService(self) -> None:
        super().startService()
        try:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
            clear_stale_socket(self.path)
            old = os.umask(0o077)  # no moment with a socket others may use
            try:
                self.port = self.reactor.listenUNIX(self.path, self.factory, mode=0o600)
            finally:
                os.umask(old)
        except (OSError, error.CannotListenError) as e:
            log.error(
                "[server] control_socket: cannot listen on {path}: {error}; "
                "`mailsvc queue` cannot reach this server",
                path=self.path,
                error=getattr(e, "socketError", None) or e,
            )

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()  # removes the socket file
        return None


@defer.inlineCallbacks
def call(reactor, path, command: type[amp.Command], **arguments):
    """Connect to the control socket at ``path``, send ``command``, return its answer.

    :raise ServerUnreachable: nothing listens there (the server is not running).
    :raise UnknownMessage, NotHeld, SpoolError: the server's refusal.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ServerUnreachable(f"cannot reach the server at {path}: is it running?")
    endpoint = endpoints.UNIXClientEndpoint(reactor, path, timeout=CONNECT_TIMEOUT)
    try:
        client = yield endpoints.connectProtocol(endpoint, amp.AMP())
    except (error.ConnectError, OSError) as e:
        raise ServerUnreachable(f"cannot reach the server at {path}: is it running?") from e
    try:
        answer = yield client.callRemote(command, **arguments).addTimeout(CALL_TIMEOUT, reactor)
    except defer.TimeoutError:
        raise ServerUnreachable(f"the server at {path} did not answer within {CALL_TIMEOUT:g} s") from None
    finally:
        client.transport.loseConnection()
    return answer

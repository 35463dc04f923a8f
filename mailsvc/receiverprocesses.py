"""SMTP served by child processes: ``[server] receiver_processes = N``.

One CPython process runs on one core at a time; receiving is most of the
work a message costs (about four fifths: bench/RESULTS.md). With N > 0, the
main process binds the SMTP listeners (``[smtp] listen``, ``[submission]``)
as always, stops accepting on them, and starts N receiver processes
(``mailsvc.receiverchild``) that accept on the same sockets, which they
inherit (the kernel gives each connection to one that is waiting; while
none is, connections wait in the listen queue). Each is a whole receiver: EHLO to end of data, STARTTLS, AUTH, the
policies and the recipient directory, and its own commit to the spool (fsync
and rename, DESIGN rule 1) before its 250. The main process keeps the rest:
the queue runner (the spool's one reader), local delivery, relaying, POP3,
the control socket.

What they say to each other goes over a socket pair, in AMP:

- ``Queued(id, hop, message)``, from a receiver: a message is committed
  (the ``QueuedMessage`` comes along); the queue runner tries it now (a
  notice lost in a crash is found by the runner's next scan of the spool);
- ``Etrn(option, node, client)``, from a receiver: ETRN (rfc1985) starts the
  queue, which is here; the reply goes back to the client;
- ``Spent(names)``, to a receiver: removed spool files it may reuse for new
  messages. This process removes delivered messages and knows when a
  removal is durable (``spool.recycle``), so it keeps them and hands them
  out: the receivers neither make a file per message nor does this process
  delete one (either costs ~0.1 ms of kernel time). Files given to a
  receiver that ends and still in ``spent/`` (it did not use them: a used
  one is renamed away, and names are never used twice) are taken back.

A receiver's log events come on its standard error, one JSON object a line,
already rendered (``logobserver.event_text``), and are logged here as they
would have been in one process. A receiver that ends is started again
(after 1 s, doubling up to a minute while it keeps dying young); a receiver
whose main process is gone (the socket pair closes) stops. Stopping the main
process stops the receivers (SIGTERM: they say 421 to their clients).

Limits are per process: ``[smtp] max_connections`` and
``max_connections_per_client``, and the failed-AUTH counts, apply in each
receiver process alone. TURN and ATRN need the held mail in the process
serving the connection: the config refuses receiver processes when a
``[[hold.site]]`` exists.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import sys
import time

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import Logger, LogLevel
from twisted.protocols import amp

from mailsvc.smtp import events as ev

log = Logger(namespace="mailsvc.receiverprocesses")

FIRST_DELAY = 1.0  # before starting a receiver that ended
MAX_DELAY = 60.0  # the delay doubles while receivers die within YOUNG seconds
YOUNG = 10.0
STOP_TIMEOUT = 30.0  # SIGTERM, then SIGKILL after this long
MAX_LINE = 64 * 1024  # octets of a receiver's log line held before it is logged as it is


class Queued(amp.Command):
    """A receiver committed message ``id`` for ``hop``: the queue runner
    takes it. ``message``: the ``QueuedMessage`` as committed, pickled (our
    own child on a private socket pair; 10 us to read where parsing the
    control file takes 130), or empty when too big for one AMP value: the
    main process then reads it from the spool."""

    arguments = [
        (b"id", amp.Unicode()),
        (b"hop", amp.Unicode()),
        (b"message", amp.String()),
        (b"spare", amp.Integer()),  # spent files the receiver has ready now
        (b"received", amp.Integer()),  # spent file names it got so far, in all
    ]
    requiresAnswer = False


MAX_MESSAGE = 60000  # octets of a pickled QueuedMessage sent along (an AMP value holds 65535)


def pickled(message) -> bytes:
    """What ``Queued`` carries for ``message``: pickled, or b"" when too big."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return data if len(data) <= MAX_MESSAGE else b""


class Spent(amp.Command):
    """To a receiver: files of ``spent/`` it may reuse for new messages
    (``FileSpool.give_spent``: removed here, their removal durable)."""

    arguments = [(b"names", amp.ListOf(amp.Unicode()))]
    requiresAnswer = False


# A receiver is given spent files when it has fewer than LOW (counting those
# on their way), up to BATCH; removed files are settled (their directories
# fsync'd, in a thread) once SETTLE_AT of them wait.
LOW = 64
BATCH = 256
SETTLE_AT = 64
# The names given to a receiver are looked over (which are still unused in
# spent/) when there are this many: it holds at most LOW + BATCH unused.
GIVEN_CHECK_AT = 4 * BATCH


class Etrn(amp.Command):
    """ETRN from ``client`` (rfc1985): the reply of the main process's TurnAround."""

    arguments = [(b"option", amp.Unicode()), (b"node", amp.Unicode()), (b"client", amp.Unicode())]
    response = [(b"code", amp.Integer()), (b"enhanced", amp.Unicode()), (b"lines", amp.ListOf(amp.Unicode()))]


# ---------------------------------------------------------------- log lines

def log_line(event: dict, text: str) -> bytes:
    """A receiver's log event, rendered, as one line for its standard error."""
    level = event.get("log_level")
    system = event.get("log_system")
    return json.dumps(
        {
            "time": event.get("log_time"),
            "namespace": str(event.get("log_namespace", "-")),
            "level": None if level is None else level.name,
            "system": None if system is None else str(system),
            "text": text,
        },
        ensure_ascii=False,
    ).encode("utf-8") + b"\n"


def event_of_line(line: bytes, number: int) -> dict:
    """The log event for one line of receiver ``number``'s standard error:
    its own event when the line is ``log_line``'s (its system shown as
    ``receiver N <namespace>#<level>``), else the line as a warning (a
    Python traceback written before logging began)."""
    try:
        record = json.loads(line)
        text = record["text"]
        level = LogLevel.levelWithName(record["level"]) if record["level"] else None
        namespace = str(record["namespace"])
        system = record.get("system")
        if system is None:
            system = f"{namespace}#{'-' if level is None else level.name}"
        return {
            "log_time": float(record["time"]) if record["time"] is not None else time.time(),
            "log_namespace": namespace,
            "log_level": level,
            # Which process said it: [receiver 1 mailsvc.protocol#info].
            "log_system": f"receiver {number} {system}",
            "log_format": "{receiver_text}",
            "receiver_text": str(text),
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        return {
            "log_time": time.time(),
            "log_namespace": "mailsvc.receiverprocesses",
            "log_level": LogLevel.warn,
            "log_format": "receiver process {number}: {receiver_text}",
            "number": number,
            "receiver_text": line.decode("utf-8", "replace"),
        }


# ---------------------------------------------------------------- main process

class _Client:
    """What TurnAround.on_etrn reads of a connection: the client's address."""

    session = None

    def __init__(self, client_address: str) -> None:
        self.client_address = client_address


class _MainSide(amp.AMP):
    """The main process's end of a receiver's socket pair."""

    def __init__(self, owner: "ReceiverProcesses") -> None:
        super().__init__()
        self.owner = owner
        self.given = 0  # spent file names sent to this receiver, in all
        # Those of them it may not have used yet (a superset), to be taken
        # back if it ends (ReceiverProcesses.ended).
        self.given_names: set[str] = set()

    @Queued.responder
    def queued(self, id: str, hop: str, message: bytes, spare: int, received: int):
        self.owner.take(id, hop, message)
        self.owner.feed(self, spare, received)
        return {}

    @Etrn.responder
    def etrn(self, option: str, node: str, client: str):
        d = defer.maybeDeferred(self.owner.turnaround.on_etrn, _Client(client), ev.Etrn(node=node, option=option))
        return d.addCallback(lambda reply: {"code": reply.code, "enhanced": reply.enhanced, "lines": list(reply.lines)})


class _Receiver(protocol.ProcessProtocol):
    """One receiver process as the main process sees it."""

    def __init__(self, owner: "ReceiverProcesses", number: int) -> None:
        self.owner = owner
        self.number = number
        self.started = owner.reactor.seconds()
        self.ended = defer.Deferred()
        self.side: _MainSide | None = None  # its end of the socket pair
        self._partial = {1: b"", 2: b""}  # an unfinished line, per stream

    def childDataReceived(self, fd: int, data: bytes) -> None:
        # Log lines come on stderr (2); stdout (1) gets nothing but is logged too.
        lines = (self._partial.get(fd, b"") + data).split(b"\n")
        rest = lines.pop()
        if len(rest) > MAX_LINE:  # bounded memory: a line this long is logged in pieces
            lines.append(rest)
            rest = b""
        self._partial[fd] = rest
        for line in lines:
            if line:
                log.observer(event_of_line(line, self.number))

    def processEnded(self, reason) -> None:
        for fd, rest in self._partial.items():
            if rest:
                log.observer(event_of_line(rest, self.number))
                self._partial[fd] = b""
        self.owner.ended(self, reason)
        self.ended.callback(None)


def _family(address) -> int:
    if isinstance(address, IPv6Address):
        return socket.AF_INET6
    if isinstance(address, IPv4Address):
        return socket.AF_INET
    if isinstance(address, UNIXAddress):
        return socket.AF_UNIX
    raise ValueError(f"cannot hand a listener on {address!r} to a receiver process")


class ReceiverProcesses(service.Service):
    """Starts ``count`` receiver processes on ``listeners`` (``Listener``
    services, started before this one) and keeps them running.

    :param config_path: the config file the receivers read.
    :param config_text: its text as this process read it, given to each
        receiver on its standard input, so that a receiver started after
        the file was edited still runs the config this process runs
        (changes take effect on a restart of the server); ``""``: the
        receivers read the file.
    :param spool: the ``ISpool`` (``find``: a committed message's control file).
    :param runner: the ``QueueRunner`` (``submit``).
    :param turnaround: the ``TurnAround`` (``on_etrn``).
    :param python: the interpreter receivers run with (this one).
    """

    name = "receiver processes"

    def __init__(self, reactor, count: int, config_path, listeners, spool, runner, turnaround,
                 run_blocking=defer.maybeDeferred, python: str = sys.executable, config_text: str = "") -> None:
        self.reactor = reactor
        self.run_blocking = run_blocking
        self._settling = False
        self.count = count
        self.config_path = os.fspath(config_path)
        self.config_text = config_text
        self.listeners = list(listeners)
        self.spool = spool
        self.runner = runner
        self.turnaround = turnaround
        self.python = python
        self.children: dict[int, _Receiver] = {}
        self._restarts: dict[int, object] = {}  # number -> DelayedCall
        self._delays: dict[int, float] = {}

    def startService(self) -> None:
        super().startService()
        for listener in self.listeners:
            listener.port.stopReading()  # the receivers accept; this process does not
        for number in range(1, self.count + 1):
            self._start(number)

    def _start(self, number: int) -> None:
        self._restarts.pop(number, None)
        main_end, receiver_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        listen = []
        child_fds: dict[int, object] = {0: "w", 1: "r", 2: "r", 3: receiver_end.fileno()}
        for fd, listener in enumerate(self.listeners, start=4):
            child_fds[fd] = listener.port.fileno()
            listen.append([listener.key, fd, _family(listener.port.getHost())])
        argv = [
            self.python, "-m", "mailsvc.receiverchild", "--config", self.config_path,
            "--number", str(number), "--channel", "3", "--listen", json.dumps(listen),
            *(["--config-on-stdin"] if self.config_text else []),
        ]
        # The receiver imports what this process imports (plugins included).
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        child = _Receiver(self, number)
        try:
            self.reactor.spawnProcess(child, self.python, argv, env=env, childFDs=child_fds)
        finally:
            receiver_end.close()
        if self.config_text:
            child.transport.writeToChild(0, self.config_text.encode("utf-8"))
        child.transport.closeChildFD(0)  # end of the config (or nothing) for the receiver
        main_end.setblocking(False)
        child.side = side = _MainSide(self)
        factory = protocol.Factory.forProtocol(lambda: side)
        self.reactor.adoptStreamConnection(main_end.fileno(), socket.AF_UNIX, factory)
        main_end.close()
        self.children[number] = child
        log.info("receiver process {number} started, pid {pid}", number=number, pid=child.transport.pid)

    def take(self, id: str, hop: str, pickled_message: bytes = b"") -> None:
        """A receiver committed ``id`` for ``hop`` (``pickled_message``: from
        ``pickled``, or b""): submit it to the queue runner."""
        try:
            if pickled_message:
                found = [(pickle.loads(pickled_message), False)]
            else:
                found = self.spool.find(id)
        except Exception as error:  # noqa: BLE001 - the runner's scan finds it later
            log.error("cannot read queued message {id}: {error}", id=id, error=error)
            return
        for message, held in found:
            if message.hop == hop and not held:
                self.runner.submit(message)

    def feed(self, side: _MainSide, spare: int, received: int) -> None:
        """Give a receiver spent files when it runs low (``spool.recycle``:
        files removed here, reused there, so that neither side makes or
        deletes a file per message); settle the removed ones in a thread."""
        on_the_way = side.given - received
        if spare + on_the_way < LOW:
            names = self.spool.give_spent(BATCH - spare - on_the_way)
            if names:
                side.given += len(names)
                side.given_names.update(names)
                if len(side.given_names) >= GIVEN_CHECK_AT:
                    side.given_names = set(self.spool.spent_given_unused(side.given_names))
                side.callRemote(Spent, names=names)
        if not self._settling and self.spool.spent_pending() >= SETTLE_AT:
            self._settling = True
            d = self.run_blocking(self.spool.settle_spent)
            d.addErrback(lambda f: log.warn("cannot settle removed spool files: {error}", error=f.getErrorMessage()))
            d.addBoth(self._settled)

    def _settled(self, _) -> None:
        self._settling = False

    def ended(self, child: _Receiver, reason) -> None:
        if self.children.get(child.number) is child:
            del self.children[child.number]
        if child.side is not None and child.side.given_names:
            # The spent files it was given and did not use are this process's
            # again (else they wait in spent/ for the next start's recovery).
            names, child.side.given_names = child.side.given_names, set()
            taken = self.spool.take_back_spent(names)
            if taken:
                log.info("took back {count} unused spool file(s) of receiver process {number}",
                         count=taken, number=child.number)
        if not self.running:
            return
        young = self.reactor.seconds() - child.started < YOUNG
        delay = min(self._delays.get(child.number, FIRST_DELAY / 2) * 2, MAX_DELAY) if young else FIRST_DELAY
        self._delays[child.number] = delay
        log.warn("receiver process {number} ended ({why}); starting it again in {delay:g} s",
                 number=child.number, why=reason.getErrorMessage(), delay=delay)
        self._restarts[child.number] = self.reactor.callLater(delay, self._start, child.number)

    def stopService(self):
        super().stopService()
        for call in self._restarts.values():
            call.cancel()
        self._restarts.clear()
        children = list(self.children.values())
        for child in children:
            _signal(child, "TERM")
        if not children:
            return None
        killer = self.reactor.callLater(STOP_TIMEOUT, lambda: [_signal(c, "KILL") for c in children])
        done = defer.DeferredList([child.ended for child in children])
        done.addBoth(lambda _: killer.cancel() if killer.active() else None)
        return done


def _signal(child: _Receiver, name: str) -> None:
    try:
        child.transport.signalProcess(name)
    except Exception:  # noqa: BLE001 - it ended meanwhile
        pass

"""A receiver process: SMTP on the listening sockets of the main process.

Started by ``mailsvc.receiverprocesses`` (``[server] receiver_processes``),
never by hand::

    python -m mailsvc.receiverchild --config FILE --number N --channel FD \\
        --listen '[["[smtp] listen[0]", FD, FAMILY], ...]'

It reads the same config (with ``--config-on-stdin``, the text the main
process loaded, from standard input: the file may have been edited since),
builds the same listeners' factories
(``mailsvc.listeners.smtp_listeners``: the receiver, policies, directory,
STARTTLS, AUTH) and accepts on the inherited sockets. A message is committed
to the spool here (fsync, rename) before the 250; then ``Queued`` tells the
main process, whose queue runner takes it. ETRN is answered by the main
process (``Etrn``); TURN gets the one-process answers (no ``[[hold.site]]``
exists with receiver processes). Log events go to standard error, one JSON
line each (``receiverprocesses.log_line``). It stops on SIGTERM (421 to its
clients) or when the main process goes away (the channel closes).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from twisted.internet import defer, protocol
from twisted.logger import Logger, globalLogBeginner
from twisted.protocols import amp

from mailsvc import config as configuration
from mailsvc import tap
from mailsvc.clientprotocol import timeouts_from
from mailsvc.delivery.router import Router
from mailsvc.flushworker import FlushWorker
from mailsvc.listeners import smtp_listeners
from mailsvc.logobserver import event_text
from mailsvc.receiverprocesses import Etrn, Queued, Spent, log_line, pickled
from mailsvc.smtp.replies import Reply
from mailsvc.spool.filespool import FileSpool
from mailsvc.turnaround import TurnAround

log = Logger(namespace="mailsvc.receiverchild")


class _ReceiverSide(amp.AMP):
    """The receiver's end of the socket pair; losing it stops the process."""

    def __init__(self, reactor, spool) -> None:
        super().__init__()
        self.reactor = reactor
        self.spool = spool
        self.received = 0  # spent file names given by the main process, in all

    @Spent.responder
    def spent(self, names: list[str]):
        self.received += len(names)
        self.spool.take_spent(names)
        return {}

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        if self.reactor.running:
            log.info("the main process is gone; stopping")
            self.reactor.stop()


class MainChannel:
    """The receiver's calls to the main process."""

    def __init__(self, side: _ReceiverSide) -> None:
        self.side = side

    def queued(self, message) -> None:
        """ReceiverContext.submit: the message is committed; the main process takes it."""
        side = self.side
        side.callRemote(
            Queued, id=message.id, hop=message.hop, message=pickled(message),
            spare=side.spool.spent_ready(), received=side.received,
        )

    @defer.inlineCallbacks
    def etrn(self, protocol, event):
        answer = yield self.side.callRemote(Etrn, option=event.option, node=event.node, client=protocol.client_address)
        return Reply(answer["code"], answer["enhanced"], tuple(answer["lines"]))


class ReceiverTurnAround(TurnAround):
    """TURN as in one process (no held sites: 530 or 502); ETRN asked of
    the main process, where the queue is."""

    def __init__(self, channel: MainChannel, **kwargs) -> None:
        super().__init__(sites=(), spool=None, runner=None, hold_agent=None, **kwargs)
        self.channel = channel

    def on_etrn(self, protocol, event):
        return self.channel.etrn(protocol, event)


def _log_to_stderr(stream) -> None:
    def observe(event) -> None:
        stream.write(log_line(event, event_text(event)))
        stream.flush()

    globalLogBeginner.beginLoggingTo([observe], redirectStandardIO=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mailsvc.receiverchild", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--listen", required=True, help="JSON: [[key, fd, address family], ...]")
    parser.add_argument("--config-on-stdin", action="store_true", help="the config's text is on standard input")
    args = parser.parse_args(argv)
    _log_to_stderr(sys.stderr.buffer)

    from twisted.internet import reactor

    if args.config_on_stdin:
        cfg = configuration.loads(sys.stdin.buffer.read().decode("utf-8"), Path(args.config))
    else:
        cfg = configuration.load(Path(args.config))
    run_blocking = tap.thread_pool_runner(reactor)
    flusher = FlushWorker(reactor)
    reactor.addSystemEventTrigger("after", "shutdown", flusher.stop)
    spool_log = Logger(namespace="mailsvc.spool")
    # Removed files are reused here when the main process, which removes
    # them and knows when that is durable, gives them (spool.recycle); none
    # is kept here (recycle=0): this process removes nothing.
    spool = FileSpool(cfg.server.spool_dir, log=lambda text: spool_log.warn("{text}", text=text), recycle=0)

    os.set_blocking(args.channel, False)
    side = _ReceiverSide(reactor, spool)
    reactor.adoptStreamConnection(args.channel, socket.AF_UNIX, protocol.Factory.forProtocol(lambda: side))
    os.close(args.channel)
    channel = MainChannel(side)

    context = tap.receiver_context(
        cfg, tap.make_directory(cfg), spool, channel.queued, run_blocking, flusher.submit, Router.from_config(cfg)
    )
    turnaround = ReceiverTurnAround(
        channel, clock=reactor, helo_name=cfg.relay.helo_name or cfg.server.hostname, timeouts=timeouts_from(cfg.relay)
    )
    factory, listeners = smtp_listeners(cfg, reactor, context, run_blocking, turnaround=turnaround)
    by_key = {listener.key: listener for listener in listeners}
    ports = []
    for key, fd, family in json.loads(args.listen):
        ports.append(reactor.adoptStreamPort(fd, family, by_key[key].factory))
        os.close(fd)  # adoptStreamPort works on a copy

    def stopping():
        factory.shutdown()  # 421 4.3.2 to every client (rfc5321 3.8)
        return defer.DeferredList([defer.maybeDeferred(port.stopListening) for port in ports])

    reactor.addSystemEventTrigger("before", "shutdown", stopping)
    log.info("receiver process {number} serving {count} listener(s)", number=args.number, count=len(ports))
    reactor.run()


if __name__ == "__main__":
    main()

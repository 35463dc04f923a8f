"""``twistd mailsvc``: command-line options and the service tree.

``makeService`` reads the config, finds the store, directory and policy
plugins by name, and builds a ``MultiService``: the queue runner, then one
listener per ``[smtp] listen`` (MX) and ``[submission]`` endpoint
(``mailsvc.listeners``), and one ``CallInService`` per ``[[callin]]``
(``mailsvc.callinservice``). Stopping it says 421 to connected
clients, stops listening, and lets deliveries in progress finish.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import ILogObserver, Logger
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.python.components import Componentized

from mailsvc import config as configuration
from mailsvc.callinservice import CallInService
from mailsvc.control import ControlService
from mailsvc.clientprotocol import timeouts_from
from mailsvc.delivery.bounce import Bouncer
from mailsvc.delivery.hold import HoldAgent
from mailsvc.delivery.local import LocalDeliveryAgent
from mailsvc.delivery.mx import MXResolver
from mailsvc.delivery.relay import RelayAgent, endpoint_connector
from mailsvc.delivery.router import LOCAL, RELAY, Router
from mailsvc.delivery.runner import QueueRunner
from mailsvc.delivery.uucp import UucpAgent
from mailsvc.errors import ConfigError
from mailsvc.flushworker import FlushWorker
from mailsvc.interfaces import IMailboxStoreFactory, IPolicyFactory, IRecipientDirectoryFactory
from mailsvc.listeners import smtp_listeners
from mailsvc.logobserver import observer_for
from mailsvc.protocol import SMTPServerFactory
from mailsvc.receiver import ReceiverContext, ReceiverSettings
from mailsvc.receiverprocesses import ReceiverProcesses
from mailsvc.spool.filespool import FileSpool
from mailsvc.spool.schedule import RetrySchedule
from mailsvc.turnaround import TurnAround

log = Logger(namespace="mailsvc")


class Options(usage.Options):
    """twistd mailsvc [--config FILE]"""

    synopsis = "[--config FILE]"
    longdesc = (
        "Run mailsvc, a multi-role mail server: an SMTP receiver (MX, with "
        "ETRN), submission with STARTTLS, implicit TLS and AUTH, a durable "
        "spool, delivery into Maildir or mbox mailboxes, relaying (MX, routes, "
        "a smarthost), POP3, TURN/ATRN for held sites, and UUCP batches. "
        "Which of them listen is set in the TOML config file; see "
        "etc/mailsvc.toml for every key and its default."
    )
    optParameters = [
        ["config", "c", "etc/mailsvc.toml", "The TOML configuration file."],
    ]


def find_plugin(interface, name: str, key: str):
    """The plugin providing ``interface`` called ``name``, or a ConfigError naming ``key``."""
    found = {plugin.name: plugin for plugin in getPlugins(interface)}
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise ConfigError(f"{key}: no plugin named {name!r} (installed: {known})")
    return found[name]


class MailService(service.MultiService):
    """The service tree twistd runs; it brings twistd the text log observer.

    twistd logs through an ``ILogObserver`` component of its application
    when there is one (``twisted.application.app.AppLogger.start``), and the
    application is only made after ``makeService``: its first sight is the
    ``setServiceParent`` call twistd makes with it. ``log_observer`` is a
    factory from ``mailsvc.logobserver.observer_for``, or None to leave
    twistd's own.
    """

    log_observer: Callable[[], object] | None = None

    def setServiceParent(self, parent):
        if self.log_observer is not None and isinstance(parent, Componentized):
            if parent.getComponent(ILogObserver) is None:
                parent.setComponent(ILogObserver, self.log_observer())
        return super().setServiceParent(parent)


class QueueRunnerService(service.Service):
    """Starts the queue runner with the application; stops it with it."""

    def __init__(self, runner: QueueRunner) -> None:
        self.runner = runner

    def startService(self) -> None:
        super().startService()
        self.runner.start()

    def stopService(self):
        super().stopService()
        return self.runner.stop()


class TurnAroundService(service.Service):
    """Stopped before the queue runner: drops the reversed (TURN/ATRN)
    connections, whose unacknowledged mail stays held, so that the runner's
    deliveries in flight end."""

    def __init__(self, turnaround: TurnAround) -> None:
        self.turnaround = turnaround

    def stopService(self):
        super().stopService()
        self.turnaround.shutdown()


class GoodbyeService(service.Service):
    """Stopped first: says 421 4.3.2 to every connected SMTP client."""

    def __init__(self, factory: SMTPServerFactory) -> None:
        self.factory = factory

    def stopService(self):
        super().stopService()
        self.factory.shutdown()


def _dns_resolver(server: str):
    """The ``twisted.names`` resolver for MX lookups: ``[relay] resolver``
    ("host:port") when set, else the system's (/etc/resolv.conf). It runs on
    the global reactor (``createResolver`` takes none)."""
    from twisted.names import client

    if not server:
        return client.createResolver()
    host, _, port = server.rpartition(":")
    return client.createResolver(servers=[(host.strip("[]"), int(port))])


def thread_pool_runner(reactor) -> Callable:
    """``run_blocking(f, *args)``: ``f`` in the reactor's thread pool, a Deferred of its result."""

    def run_blocking(f, *args):
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run_blocking


def make_directory(cfg: configuration.Config):
    """The ``IRecipientDirectory`` of ``[local] directory``."""
    key = f"{cfg.path.name}: [local] directory"
    return find_plugin(IRecipientDirectoryFactory, cfg.local.directory, key).makeDirectory(cfg)


def receiver_context(cfg: configuration.Config, directory, spool, submit, run_blocking, run_steps, router) -> ReceiverContext:
    """What every SMTP session of a receiving process shares (``mailsvc.receiver``)."""
    where = cfg.path.name
    policies = [
        find_plugin(IPolicyFactory, p.name, f"{where}: [[policy]][{i}] name").makePolicy(dict(p.options))
        for i, p in enumerate(cfg.policies)
    ]
    return ReceiverContext(
        settings=ReceiverSettings.from_config(cfg),
        directory=directory,
        spool=spool,
        submit=submit,
        run_blocking=run_blocking,
        policies=policies,
        router=router,
        run_steps=run_steps,
    )


def build(cfg: configuration.Config, reactor) -> service.MultiService:
    """The whole service tree for ``cfg``, on ``reactor``."""
    where = cfg.path.name  # config errors name the file, then the key
    store_options = dict(cfg.store.options)
    store = find_plugin(IMailboxStoreFactory, cfg.store.type, f"{where}: [store] type").makeStore(store_options)
    directory = make_directory(cfg)
    run_blocking = thread_pool_runner(reactor)

    # One thread for the spool's commits and Maildir deliveries: their
    # fsyncs shared by rounds (mailsvc.flushworker).
    flusher = FlushWorker(reactor)
    reactor.addSystemEventTrigger("after", "shutdown", flusher.stop)
    spool_log = Logger(namespace="mailsvc.spool")
    spool = FileSpool(cfg.server.spool_dir, log=lambda text: spool_log.warn("{text}", text=text))
    delivery = cfg.delivery
    router = Router.from_config(cfg)
    bouncer = Bouncer(spool, directory, cfg.server.hostname, submit=lambda m: runner.submit(m), run_blocking=run_blocking, routes=router.routes,
        give_up_after=delivery.give_up_after)
    relay = cfg.relay
    resolver = _dns_resolver(relay.resolver)
    relay_agent = RelayAgent(
        relay,
        MXResolver(resolver, our_hostnames={cfg.server.hostname}),
        endpoint_connector(reactor),
        reactor,
        spool,
        relay.helo_name or cfg.server.hostname,
        run_blocking=run_blocking,
    )
    # QUIT the idle outgoing connections kept for reuse before the reactor stops.
    reactor.addSystemEventTrigger("before", "shutdown", relay_agent.close)
    # [[hold.site]] mail waits for its site to call in (mailsvc.delivery.hold).
    hold_agent = HoldAgent(cfg.hold_sites)
    runner = QueueRunner(
        spool,
        {
            **{hop: hold_agent for hop in hold_agent.hops},
            LOCAL: LocalDeliveryAgent(store, spool, run_blocking, run_steps=flusher.submit),
            RELAY: relay_agent,
            **{site.hop: UucpAgent(site, spool, reactor, hostname=cfg.server.hostname) for site in cfg.uucp_sites},
        },
        reactor,
        RetrySchedule(first=delivery.retry_first, maximum=delivery.retry_max, give_up_after=delivery.give_up_after),
        scan_interval=delivery.scan_interval,
        concurrency=delivery.concurrency,
        run_blocking=run_blocking,  # spool updates fsync: keep them off the reactor thread
        reporter=bouncer.report,
        delay_warning_after=cfg.relay.delay_warning_after,
        on_demand_hops=hold_agent.hops,
        run_short=defer.maybeDeferred,  # removal: renames, no fsync; on the reactor thread
    )
    context = receiver_context(cfg, directory, spool, runner.submit, run_blocking, flusher.submit, router)
    # The MX, submission and implicit-TLS listeners (mailsvc.listeners).
    # TURN, ATRN and ETRN (mailsvc.turnaround).
    turnaround = TurnAround(
        sites=cfg.hold_sites,
        spool=spool,
        runner=runner,
        hold_agent=hold_agent,
        clock=reactor,
        helo_name=relay.helo_name or cfg.server.hostname,
        timeouts=timeouts_from(relay),
        run_blocking=run_blocking,
        relay_agent=relay_agent,
        routed_domains=[route.domain for route in relay.routes],
        local_domains=cfg.local.domains,
        etrn_queues=(RELAY, *(site.hop for site in cfg.uucp_sites)),
    )
    factory, listeners = smtp_listeners(cfg, reactor, context, run_blocking, turnaround=turnaround)
    receivers = None
    if cfg.server.receiver_processes:
        # SMTP served by child processes on these listeners' sockets.
        receivers = ReceiverProcesses(
            reactor, cfg.server.receiver_processes, cfg.path.resolve(), listeners, spool, runner, turnaround,
            run_blocking=run_blocking, config_text=cfg.text,
        )
    if cfg.pop3.enabled:  # imported here: twisted.mail imports the global reactor
        from mailsvc.pop3 import pop3_listeners

        listeners = [*listeners, *pop3_listeners(cfg, reactor, store, run_blocking)]
    top = MailService()
    QueueRunnerService(runner).setServiceParent(top)
    TurnAroundService(turnaround).setServiceParent(top)  # stopped before the runner
    for listener in listeners:
        listener.setServiceParent(top)
    GoodbyeService(factory).setServiceParent(top)  # stopped first (reverse order)
    if receivers is not None:
        receivers.setServiceParent(top)  # started once the listeners listen
    ControlService(spool, runner, cfg.server.control_socket, reactor).setServiceParent(top)
    # [[callin]]: call providers in on a schedule (mailsvc.callinservice); stopped
    # before the runner, which takes what they receive.
    for entry in cfg.callins:
        CallInService(entry, cfg, reactor, runner.submit).setServiceParent(top)
    return top


def makeService(options: Options) -> service.IService:
    """twistd's entry point: read the config and build the service tree."""
    from twisted.internet import reactor

    try:
        cfg = configuration.load(options["config"])
        top = build(cfg, reactor)
    except ConfigError as error:
        # DESIGN rule 6: one line naming the key, and a non-zero exit.
        sys.stderr.write(f"mailsvc: config error: {error}\n")
        raise SystemExit(78)  # EX_CONFIG
    # twistd's options are the parent of ours (None when called from Python).
    top.log_observer = observer_for(options.parent)
    return top

"""A provider and a customer wired in memory (``twisted.test.iosim``), for the
turn-around tests. Not a test module.

The provider: a real ``FileSpool`` holding mail under ``hold.customer``, a
``QueueRunner`` with the ``HoldAgent``, a ``TurnAround``, AUTH through the
real ``twisted.cred`` portal, and two factories: an SMTP listener (TURN)
and an ODMR listener (ATRN). The customer: its own spool and directory
(``customer.example`` is local there) behind a ``CalledInServerFactory``,
driven by a ``CallInProtocol``. TLS is iosim's pretend TLS: both sides call
``startTLS`` and the pump plays the handshake.
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.test import iosim

from mailsvc import auth as authmod
from mailsvc.callin import CalledInServerFactory, CallInOptions, CallInProtocol
from mailsvc.delivery.hold import HoldAgent
from mailsvc.delivery.router import Router
from mailsvc.delivery.runner import QueueRunner
from mailsvc.envelope import Envelope, Recipient
from mailsvc.limits import AuthFailures
from mailsvc.passwords import PasswordFile, make_entry, write_entry
from mailsvc.protocol import SMTPServerFactory
from mailsvc.receiver import ReceiverContext, ReceiverSettings
from mailsvc.smtp.server import ServerSettings
from mailsvc.spool.filespool import FileSpool
from mailsvc.spool.schedule import RetrySchedule
from mailsvc.turnaround import TurnAround
from mailsvc.turnconfig import HoldSiteConfig
from test_protocol import TableDirectory

PASSWORD = "s3cret-pass"
CUSTOMER = HoldSiteConfig("customer", ("customer.example", "other.example"), ("custuser",))
ELSEWHERE = HoldSiteConfig("elsewhere", ("elsewhere.example",), ("bob",))


class FakeTLS:
    """A TLS context for iosim's pretend handshake."""

    def iosimVerify(self, other) -> bool:
        return True


class Provider:
    """The provider's side: spool, runner, hold agent, turn-around, two factories."""

    def __init__(self, root, *, tls: bool = True, clock=None, relay_agent=None, routed=(),
                 schedule: RetrySchedule | None = None) -> None:
        self.clock = clock or task.Clock()
        root.mkdir(parents=True, exist_ok=True)
        self.spool = FileSpool(root / "spool")
        self.submitted = []
        password_file = root / "passwd"
        for user in ("custuser", "bob", "alice"):
            write_entry(password_file, user, make_entry(user, PASSWORD).line())
        passwords = PasswordFile(password_file)
        failures = AuthFailures(self.clock, max_failures=0, window=600, delay=0, max_delay=0)
        self.authenticator = authmod.Authenticator(
            authmod.make_portal(passwords, None, defer.maybeDeferred),
            passwords, "provider.test", ["provider.test"], failures, self.clock, defer.maybeDeferred,
        )
        self.sites = (CUSTOMER, ELSEWHERE)
        self.hold = HoldAgent(self.sites)
        self.delivered_elsewhere = []
        agents = {hop: self.hold for hop in self.hold.hops}
        if relay_agent is not None:
            agents["relay"] = relay_agent
        self.runner = QueueRunner(
            self.spool, agents, self.clock, schedule or RetrySchedule(), scan_interval=60,
            on_demand_hops=self.hold.hops,
        )
        self.runner.start()
        self.turnaround = TurnAround(
            sites=self.sites, spool=self.spool, runner=self.runner, hold_agent=self.hold, clock=self.clock,
            helo_name="provider.test", local_domains=["provider.test"], relay_agent=relay_agent, routed_domains=routed,
        )
        router = Router({d: site.hop for site in self.sites for d in site.domains})
        context = ReceiverContext(
            settings=ReceiverSettings(hostname="provider.test", default_domain="provider.test"),
            directory=TableDirectory(domains=("provider.test",)), spool=self.spool,
            submit=self.runner.submit, run_blocking=defer.maybeDeferred, router=router,
        )
        common = dict(authenticator=self.authenticator, turnaround=self.turnaround, tls=FakeTLS() if tls else None)
        self.smtp = SMTPServerFactory(context, ServerSettings(
            "provider.test", starttls=tls, auth_mechanisms=("PLAIN",), auth_without_tls=not tls, etrn=True,
        ), self.clock, **common)
        self.odmr = SMTPServerFactory(context, ServerSettings(
            "provider.test", odmr=True, starttls=tls, auth_mechanisms=("PLAIN", "CRAM-MD5"),
            auth_without_tls=not tls, challenge_auth_without_tls=True,
        ), self.clock, **common)

    def hold_mail(self, *addresses: str, body: bytes = b"Subject: held\r\n\r\nKept for you.\r\n", parameters=()) -> str:
        """Commit one message for ``addresses`` under their hold hops (other
        domains: the relay hop); return its ID."""
        router = Router({d: site.hop for site in self.sites for d in site.domains})
        recipients = tuple(Recipient(address=a) for a in addresses)
        writer = self.spool.newMessage()
        writer.write(body)
        envelope = Envelope(sender="sender@far.test", recipients=recipients, received_at=self.clock.seconds() + 1,
                            prepend_headers=("Received: from far.test by provider.test",), parameters=tuple(parameters))
        writer.commit(envelope, router.routes(recipients))
        return writer.id

    def held(self, hop: str = "hold.customer") -> list:
        """The queued messages of ``hop`` with a pending recipient."""
        return [m for m in self.spool.queued() if m.hop == hop]


class Customer:
    """The customer's side: its own spool, ``customer.example`` local, and the call-in client."""

    def __init__(self, root, clock, policies=()) -> None:
        self.clock = clock
        root.mkdir(parents=True, exist_ok=True)
        self.spool = FileSpool(root / "spool")
        self.received: list[str] = []
        context = ReceiverContext(
            settings=ReceiverSettings(hostname="customer.example", default_domain="customer.example"),
            directory=TableDirectory(users=("u", "v"), domains=("customer.example", "other.example")),
            spool=self.spool, submit=lambda m: self.received.append(m.id), run_blocking=defer.maybeDeferred,
            policies=policies,
        )
        self.factory = CalledInServerFactory(context, ServerSettings("customer.example"), clock)

    def call(self, **options) -> CallInProtocol:
        """A ``CallInProtocol`` for custuser (ATRN, STARTTLS with pretend TLS, by default)."""
        values = dict(user="custuser", password=PASSWORD, helo_name="customer.example", tls_options=FakeTLS())
        values.update(options)
        return CallInProtocol(CallInOptions(**values), self.factory, self.clock)

    def messages(self) -> list[bytes]:
        """The data of every message the customer's spool holds."""
        out = []
        for message in self.spool.queued():
            with self.spool.open(message) as f:
                out.append(f.read())
        return out


class RelayRecorder:
    """A stand-in relay agent: records each message and says delivered."""

    def __init__(self) -> None:
        self.messages = []

    def deliver(self, message):
        self.messages.append(message)
        return defer.succeed({r.address: None for r in message.envelope.recipients})


def connect(server_factory, client_protocol, clock):
    """Connect ``client_protocol`` to a protocol of ``server_factory`` in memory; return the pump."""
    server = server_factory.buildProtocol(None)
    server_io = iosim.makeFakeServer(server)
    client_io = iosim.makeFakeClient(client_protocol)
    return iosim.connect(server, server_io, client_protocol, client_io, greet=False, clock=clock)


def run(pump, rounds: int = 50) -> None:
    """Pump until quiet, letting the clock run a little between rounds."""
    for _ in range(rounds):
        pump.flush()
        pump.clock.advance(0.01)
        if not pump.pump():
            break

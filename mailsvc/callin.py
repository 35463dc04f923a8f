"""``mailsvc turn``: call the provider in and receive the mail it held for us.

The customer's half of TURN (rfc821 4.1.1) and ATRN (rfc2645)::

    mailsvc turn HOST[:PORT] --user U --password-file F [--atrn | --turn]
                 [--domains d1,d2] [--cafile FILE [--tls-name NAME] | --insecure | --no-tls]

``CallInProtocol`` drives the client machine (``mailsvc.smtp.client``):
greeting, EHLO, STARTTLS (then EHLO again) and AUTH PLAIN (LOGIN when only
that is offered) through ``mailsvc.clientprotocol.SessionOpener``, as the
relay client does, then ATRN (default, port 366) or TURN (port 25). On 250
the roles reverse on the same connection and the same TLS session:
``switch_protocol`` puts our SMTP server glue (``mailsvc.protocol``) in its place, which greets the
provider with 220 and takes the mail through the normal receiving path of
our config (same policies, recipient directory, router and spool; 250 only
once a message is on disk), as ``mailsvc rsmtp`` does. When the provider has
said QUIT and the connection is closed, the command reports how many
messages arrived, asks the running server (if any) to deliver them now, and
exits 0. Our own queued mail for the provider is not sent first (use the
normal relay for that).

The password goes only over TLS: when the provider offers no STARTTLS the
command stops, unless ``--no-tls`` (for a provider on a trusted link). The
provider's certificate is checked against ``--cafile`` (for the name given
by ``--tls-name``, default HOST); ``--insecure`` skips the check (a
self-signed certificate); by default the system's trusted CAs are used.

Exit status: 0 done (also when no mail waited: 453), 1 refused (AUTH, TURN
or ATRN refused, TLS not offered or not trusted), 64 bad command line,
75 try again later (cannot connect, 451, connection lost before QUIT),
78 bad config.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from twisted.internet import defer, endpoints
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from mailsvc import config as configuration
from mailsvc.clientsession import OPEN, OpeningFailed, SessionOpener, SessionSecurity
from mailsvc.errors import ConfigError, SpoolError
from mailsvc.protocol import SMTPServerFactory, SMTPServerProtocol
from mailsvc.smtp import client_events as ev
from mailsvc.smtp.client import ClientConnection, ClientSettings, State
from mailsvc.smtp.server import ServerSettings
from mailsvc.tls import CertificateRejected, ClientTLSContext, TLSError
from mailsvc.turnaround import switch_protocol

DEFAULT_CONFIG = "etc/mailsvc.toml"
EX_OK, EX_REFUSED, EX_USAGE, EX_TEMPFAIL, EX_CONFIG = 0, 1, 64, 75, 78
ODMR_PORT, SMTP_PORT = 366, 25  # rfc2645 4; rfc5321 4.5.4.2


class CallInFailed(Exception):
    """The call-in ended before the roles reversed: ``status`` is the exit status."""

    def __init__(self, text: str, status: int = EX_REFUSED) -> None:
        super().__init__(text)
        self.status = status


@dataclasses.dataclass
class CallInOptions:
    """What the customer asks for, and how."""

    user: str
    password: str
    command: str = "ATRN"  # or "TURN"
    domains: tuple[str, ...] = ()  # ATRN only; empty: all of ours
    starttls: bool = True  # False: --no-tls (the password may go in clear)
    tls_policy: str = ""  # "required", "opportunistic" or "none"; empty: from starttls
    tls_options: object = None  # an IOpenSSLClientConnectionCreator for STARTTLS
    helo_name: str = "localhost"
    timeout: float = 600.0  # rfc2645 5.2.1: at least 10 minutes for ATRN


@dataclasses.dataclass
class CallInResult:
    """How the call-in went: the IDs committed, and whether it ended well."""

    received: list[str] = dataclasses.field(default_factory=list)
    no_mail: str = ""  # the 453 reply, when nothing waited
    quit: bool = False  # the provider said QUIT (or the session closed normally)


class CalledInServer(SMTPServerProtocol):
    """Our server glue on the reversed connection; tells when it closes."""

    def connectionLost(self, reason: Failure = None) -> None:
        super().connectionLost(reason)
        self.factory.call.server_closed(self)


class CallInProtocol(Protocol):
    """The customer's opening half: EHLO, STARTTLS, AUTH, TURN/ATRN; then the switch.

    :param options: a ``CallInOptions``.
    :param server_factory: the ``SMTPServerFactory`` whose protocol takes over
        (its ``implicit_tls`` is set to whether the session is encrypted).
    :param clock: an ``IReactorTime``.
    """

    def __init__(self, options: CallInOptions, server_factory: SMTPServerFactory, clock) -> None:
        self.options = options
        self.server_factory = server_factory
        self.clock = clock
        self.machine = ClientConnection(ClientSettings(options.helo_name))
        # The password goes only over TLS, unless --no-tls (then no STARTTLS at all)
        # or opportunistic TLS ([[callin]] tls: in clear when STARTTLS is not offered).
        policy = options.tls_policy or ("required" if options.starttls else "none")
        security = SessionSecurity(
            tls=policy,
            tls_options=options.tls_options if policy != "none" else None,
            username=options.user,
            password=options.password,
            auth_without_tls=policy != "required",
        )
        self.opener = SessionOpener(self.machine, security, lambda tls: self.transport.startTLS(tls))
        self.result = CallInResult()
        self.done: defer.Deferred = defer.Deferred()  # fires with result, or fails with CallInFailed
        self.server: SMTPServerProtocol | None = None
        self._error: CallInFailed | None = None
        self._timer = None

    # ---------------------------------------------------------- Protocol

    def connectionMade(self) -> None:
        self._restart_timer()

    def dataReceived(self, data: bytes) -> None:
        self.machine.receive_data(data)
        self._pump()

    def connectionLost(self, reason: Failure = None) -> None:
        self._cancel_timer()
        if self.done.called:
            return
        if self._error is None and self.result.no_mail:
            self.done.callback(self.result)
            return
        if self._error is None and reason is not None and reason.check(CertificateRejected):
            # Not trusted (mailsvc.tls.ClientTLSContext): refused, not "try again".
            self._error = CallInFailed(f"TLS with the provider failed: {reason.getErrorMessage()}", EX_REFUSED)
        why = reason.getErrorMessage() if reason is not None else "closed"
        self.done.errback(self._error or CallInFailed(f"connection lost before the roles reversed: {why}", EX_TEMPFAIL))

    # ---------------------------------------------------------- after the switch

    def server_closed(self, server: SMTPServerProtocol) -> None:
        """The reversed session is over: the provider said QUIT, or the connection broke."""
        self._cancel_timer()
        self.result.quit = server.machine.closed
        if not self.done.called:
            self.done.callback(self.result)

    # ---------------------------------------------------------- the pump

    def _pump(self) -> None:
        while self.server is None and not self.done.called:
            event = self.machine.next_event()
            if event is None:
                break
            self._on_event(event)
        if self.server is None:
            out = self.machine.data_to_send()
            if out and self.transport is not None:
                self.transport.write(out)
            self._restart_timer()

    def _fail(self, text: str, status: int = EX_REFUSED) -> None:
        if self._error is None:
            self._error = CallInFailed(text, status)
        if self.machine.state in (State.READY, State.REFUSED):
            self.machine.quit()  # polite; the connection closes after 221
        else:
            self.transport.loseConnection()

    def _on_event(self, event) -> None:
        o = self.options
        if isinstance(event, SessionOpener.OPENING_EVENTS):
            try:
                step = self.opener.handle(event)
            except OpeningFailed as e:
                self._fail(_opening_text(e))
                return
            if step == OPEN:  # TLS and AUTH done
                if o.command == "TURN":
                    self.machine.turn()
                else:
                    self.machine.atrn(o.domains)
        elif isinstance(event, ev.TurnRefused):
            if event.reply.code == 453:  # rfc2645 7: "You have no mail"
                self.result.no_mail = str(event.reply)
                self.machine.quit()
            elif event.reply.code in (421, 451):
                self._fail(f"{o.command} refused for now: {event.reply}", EX_TEMPFAIL)
            else:
                self._fail(f"{o.command} refused: {event.reply}")
        elif isinstance(event, ev.Turned):
            self._become_server()
        elif isinstance(event, (ev.GreetingRefused, ev.HelloRefused)):
            self._fail(f"the provider refused us: {event.reply}", EX_TEMPFAIL if event.reply.code < 500 else EX_REFUSED)
        elif isinstance(event, ev.ConnectionFailed):
            self._error = self._error or CallInFailed(f"the provider ended the session: {event.reply}", EX_TEMPFAIL)
            self.transport.loseConnection()
        elif isinstance(event, ev.ProtocolError):
            self._error = self._error or CallInFailed(f"protocol error: {event.reason}", EX_TEMPFAIL)
            self.transport.loseConnection()
        elif isinstance(event, ev.Closed):
            self.transport.loseConnection()

    def _become_server(self) -> None:
        """rfc821 4.1.1: "program-A becomes the receiver-SMTP ... then sends the 220"."""
        self._cancel_timer()
        trailing = self.machine.trailing_data
        self.server_factory.implicit_tls = self.machine.tls_active
        self.server_factory.call = self
        self.server = self.server_factory.buildProtocol(self.transport.getPeer())
        switch_protocol(self, self.server, trailing)

    # ---------------------------------------------------------- timeout

    def _restart_timer(self) -> None:
        self._cancel_timer()
        if self.server is None and not self.done.called:
            self._timer = self.clock.callLater(self.options.timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self._error = self._error or CallInFailed(f"no answer within {self.options.timeout:g} s", EX_TEMPFAIL)
        self.transport.abortConnection()


def _opening_text(failure: OpeningFailed) -> str:
    """What went wrong before ATRN/TURN, in the words of this command."""
    if failure.kind == "no-starttls":
        return "the provider offers no STARTTLS: not sending the password in clear (--no-tls allows it)"
    if failure.kind == "auth-refused":
        return f"AUTH refused: {failure.reply}"
    return f"the provider: {failure.reason}"


class CalledInServerFactory(SMTPServerFactory):
    """The receiving factory of a call-in: ``CalledInServer`` protocols."""

    call: CallInProtocol | None = None

    def buildProtocol(self, addr) -> SMTPServerProtocol:
        return CalledInServer(self)


def receiving_factory(cfg: configuration.Config, clock, submit):
    """Our MX receiving path, built from ``cfg`` as ``mailsvc rsmtp`` builds it
    (policies, directory, router, spool), for the reversed session; each
    committed message is passed to ``submit``."""
    from mailsvc import rsmtp

    context, _ = rsmtp.build(cfg)
    context = dataclasses.replace(context, submit=submit)
    smtp = cfg.smtp
    settings = ServerSettings(
        hostname=cfg.server.hostname,
        max_message_size=smtp.max_message_size,
        max_recipients=smtp.max_recipients,
        max_errors=smtp.max_errors,
        smtputf8=smtp.smtputf8,
    )
    return CalledInServerFactory(
        context, settings, clock, command_timeout=smtp.command_timeout, data_timeout=smtp.data_timeout
    )


def tls_options(host: str, *, cafile: str | None, insecure: bool, tls_name: str | None) -> ClientTLSContext:
    """The client TLS settings for STARTTLS (``mailsvc.tls.ClientTLSContext``,
    as the relay client uses): TLS 1.2 or newer; the certificate checked for
    ``tls_name`` (default ``host``) against ``cafile`` or the system's CAs,
    or not at all with ``insecure``.

    :raise TLSError: ``cafile`` holds no usable certificate.
    """
    name = tls_name or host
    if insecure:
        return ClientTLSContext((name,), verify=False)
    return ClientTLSContext((name,), verify=True, ca_file=cafile)


async def call_in(reactor, host: str, port: int, options: CallInOptions, server_factory) -> CallInResult:
    """Connect, call in, receive; the result once the connection is closed.

    :raise CallInFailed: it did not work (``status`` says how).
    """
    endpoint = endpoints.HostnameEndpoint(reactor, host, port, timeout=30)
    factory = Factory.forProtocol(lambda: CallInProtocol(options, server_factory, reactor))
    try:
        protocol = await endpoint.connect(factory)
    except Exception as e:
        raise CallInFailed(f"cannot connect to {host}:{port}: {e}", EX_TEMPFAIL) from None
    return await protocol.done


# ---------------------------------------------------------------- command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailsvc turn",
        description="Call the provider in (ATRN or TURN) and receive the mail it holds for us.",
    )
    parser.add_argument("server", metavar="HOST[:PORT]", help="the provider (port 366 for ATRN, 25 for TURN)")
    parser.add_argument("--user", required=True, help="our AUTH login at the provider")
    parser.add_argument("--password-file", required=True, metavar="FILE", help="a file holding the password (first line)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--atrn", dest="command", action="store_const", const="ATRN", help="ATRN (rfc2645; the default)")
    which.add_argument("--turn", dest="command", action="store_const", const="TURN", help="TURN (rfc821)")
    parser.add_argument("--domains", default="", help="ATRN only: d1,d2 (default: every domain of ours)")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--cafile", metavar="FILE", help="trust the provider's certificate if signed by (or equal to) this PEM")
    tls.add_argument("--insecure", action="store_true", help="do not check the provider's certificate")
    tls.add_argument("--no-tls", action="store_true", help="no STARTTLS: the password may cross in clear")
    parser.add_argument("--tls-name", metavar="NAME", help="the name the certificate must carry (default: HOST)")
    parser.add_argument("--helo", metavar="NAME", help="our EHLO name (default: [server] hostname)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each answer (default 600)")
    parser.add_argument("--config", default=None, help="our config (default: $MAILSVC_CONFIG or etc/mailsvc.toml)")
    parser.set_defaults(command="ATRN")
    return parser


def _host_port(text: str, default: int) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, default


def _say(text: str) -> None:
    sys.stderr.write(f"mailsvc turn: {text}\n")


def main(argv: list[str] | None = None) -> int:
    """Run ``mailsvc turn`` with ``argv``; return the exit status."""
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return EX_USAGE if e.code else EX_OK
    try:
        host, port = _host_port(args.server, ODMR_PORT if args.command == "ATRN" else SMTP_PORT)
    except ValueError:
        _say(f"bad HOST[:PORT]: {args.server}")
        return EX_USAGE
    path = args.config or os.environ.get("MAILSVC_CONFIG") or DEFAULT_CONFIG
    try:
        cfg = configuration.load(path)
    except ConfigError as e:
        _say(f"config error: {e}")
        return EX_CONFIG
    try:
        with open(args.password_file, encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
    except OSError as e:
        _say(f"cannot read the password file: {e}")
        return EX_USAGE
    if not password:
        _say(f"the password file is empty: {args.password_file}")
        return EX_USAGE
    domains = tuple(d.strip().lower() for d in args.domains.split(",") if d.strip())
    if domains and args.command == "TURN":
        _say("--domains is for ATRN only (TURN takes no argument)")
        return EX_USAGE
    try:
        tls = None if args.no_tls else tls_options(host, cafile=args.cafile, insecure=args.insecure, tls_name=args.tls_name)
    except (OSError, TLSError) as e:
        _say(f"cannot use the CA file: {e}")
        return EX_USAGE
    options = CallInOptions(
        user=args.user, password=password, command=args.command, domains=domains, starttls=not args.no_tls,
        tls_options=tls, helo_name=args.helo or cfg.server.hostname, timeout=args.timeout,
    )
    outcome: dict = {}

    async def run(reactor):
        from mailsvc import control

        ids: list[str] = []
        try:
            factory = receiving_factory(cfg, reactor, lambda message: message.id in ids or ids.append(message.id))
        except (ConfigError, SpoolError) as e:
            outcome["error"] = CallInFailed(str(e), EX_CONFIG if isinstance(e, ConfigError) else EX_TEMPFAIL)
            return
        try:
            result = await call_in(reactor, host, port, options, factory)
        except CallInFailed as e:
            outcome["error"] = e
            outcome["ids"] = ids
            return
        result.received = ids
        outcome["result"] = result
        for message_id in ids:  # deliver now if our server runs; else its next scan does
            try:
                await control.call(reactor, cfg.server.control_socket, control.Flush, id=message_id)
            except Exception:  # noqa: BLE001 - queued is queued
                break

    from twisted.internet.task import react
    from twisted.logger import (
        FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner, textFileLogObserver,
    )

    # Warnings and errors (a refused delivery, a broken session) go to stderr.
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.warn)])],
        redirectStandardIO=False,
    )
    try:
        react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            _say(f"internal error (status {e.code})")
            return EX_TEMPFAIL
    if "error" in outcome:
        error = outcome["error"]
        got = len(outcome.get("ids", []))
        _say(str(error) + (f" ({got} message(s) were received and kept)" if got else ""))
        return error.status
    result = outcome["result"]
    if result.no_mail:
        print(f"mailsvc turn: no mail waiting at {host} ({result.no_mail})")
        return EX_OK
    count = len(result.received)
    if not result.quit:
        _say(f"the connection to {host} broke before QUIT; {count} message(s) received and kept")
        return EX_TEMPFAIL
    print(f"mailsvc turn: {count} message{'s' if count != 1 else ''} received from {host}")
    return EX_OK


if __name__ == "__main__":
    raise SystemExit(main())

"""The SMTP listeners of a server, one role each, built from the config.

- **mx** (``[smtp] listen``): mail for local domains from anyone; relaying
  only for trusted networks (or, with ``[smtp] auth``, authenticated users).
  STARTTLS offered when ``[smtp] starttls``.
- **submission** (``[submission] listen``, rfc6409): STARTTLS, AUTH required
  before any mail command (530 5.7.0), then the user may send anywhere;
  the sender may be tied to the user; Date/Message-ID fix-ups.
- **submission over implicit TLS** (``[submission] listen_implicit_tls``,
  rfc8314): the same, with TLS from the first octet.

Every listener shares one ``ConnectionPool`` (total and per-client limits)
and one ``mailsvc.auth.Authenticator`` (and so the failed-AUTH counts).
The certificate is made on first start when ``[tls] generate_self_signed``.
"""

from __future__ import annotations

import dataclasses
import sys

from twisted.application import service
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailsvc import config as configuration
from mailsvc import tls
from mailsvc.auth import Authenticator, make_portal
from mailsvc.errors import ConfigError
from mailsvc.limits import AuthFailures
from mailsvc.passwords import PasswordFile, SecretsFile
from mailsvc.protocol import ConnectionPool, SMTPServerFactory
from mailsvc.receiver import ReceiverContext
from mailsvc.smtp.server import ServerSettings

log = Logger(namespace="mailsvc.listeners")

EX_OSERR = 71  # sysexits.h: a port that cannot be opened


class Listener(service.Service):
    """One listening port of the config (``key``, e.g. ``[smtp] listen[0]``).

    A port that cannot be opened at start (in use, no permission) stops
    start-up with one line naming the key and the reason, and exit status 71,
    as Postfix's master does: a mail server running without its port would
    only look alive. (Twisted's default logs the error and runs on.)

    ``port`` is the listening port once started (``IListeningPort``): the
    receiver processes (``mailsvc.receiverprocesses``) accept on its socket.
    """

    def __init__(self, reactor, description: str, factory, key: str) -> None:
        self.key = key
        self.description = description
        self.factory = factory
        self.endpoint = endpoints.serverFromString(reactor, description)
        self.port = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.port is not None:
            return
        failures: list = []
        # A stream server endpoint listens at once: the port or the error is here now.
        self.endpoint.listen(self.factory).addCallbacks(self._listening, failures.append)
        if failures:
            error = failures[0].value
            if not isinstance(error, CannotListenError):
                failures[0].raiseException()
            reason = getattr(error.socketError, "strerror", None) or str(error.socketError)
            line = f"mailsvc: {self.key}: cannot listen on {self.description}: {reason}"
            log.critical("{line}", line=line)
            sys.__stderr__.write(line + "\n")
            raise SystemExit(EX_OSERR)

    def _listening(self, port) -> None:
        self.port = port

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()


def tls_context(cfg: configuration.Config) -> tls.ServerTLSContext:
    """The server's TLS context; the self-signed certificate is made first if
    allowed and missing. :raise ConfigError: naming the ``[tls]`` key at fault."""
    where, t = cfg.path.name, cfg.tls
    if t.generate_self_signed:
        try:
            if tls.ensure_certificate(t.cert_file, t.key_file, cfg.server.hostname):
                log.warn(
                    "made a self-signed certificate for {host} in {cert}: clients will not trust it; see README",
                    host=cfg.server.hostname,
                    cert=str(t.cert_file),
                )
        except tls.TLSError as error:
            raise ConfigError(f"{where}: [tls] {error.key}: {error}") from None
    for key, path in (("cert_file", t.cert_file), ("key_file", t.key_file)):
        if not path.exists():
            raise ConfigError(f"{where}: [tls] {key}: file not found: {path} (or set generate_self_signed = true)")
    try:
        return tls.ServerTLSContext(t.cert_file, t.key_file, t.min_version)
    except tls.TLSError as error:
        raise ConfigError(f"{where}: [tls] {error.key}: {error}") from None


def authenticator(cfg: configuration.Config, reactor, run_blocking) -> Authenticator:
    """The AUTH machinery: password file, CRAM-MD5 secrets, failure limits."""
    auth = cfg.auth
    auth_log = Logger(namespace="mailsvc.auth")

    def warn(text: str) -> None:
        auth_log.warn("{text}", text=text)

    passwords = PasswordFile(auth.password_file, log=warn)
    if not auth.password_file.exists():
        warn(f"no password file at {auth.password_file}: nobody can log in until `mailsvc passwd USER`")
    secrets = SecretsFile(auth.cram_md5_secrets_file, log=warn) if auth.cram_md5_secrets_file else None
    failures = AuthFailures(
        reactor,
        max_failures=auth.max_failures,
        window=auth.failure_window,
        delay=auth.failure_delay,
        max_delay=auth.max_failure_delay,
    )
    return Authenticator(
        make_portal(passwords, secrets, run_blocking),
        passwords,
        cfg.server.hostname,
        cfg.local.domains,
        failures,
        reactor,
        run_blocking,
    )


def smtp_listeners(cfg: configuration.Config, reactor, context: ReceiverContext, run_blocking, turnaround=None):
    """``(mx_factory, services)``: the MX factory (its ``shutdown()`` says 421
    to every connection of every listener) and one service per endpoint.

    With a ``turnaround`` (``mailsvc.turnaround.TurnAround``): TURN on every
    listener, ETRN on the MX ones, and the ODMR listeners of ``[atrn]``
    (rfc2645; only when a ``[[hold.site]]`` exists)."""
    smtp, submission = cfg.smtp, cfg.submission
    odmr_listen = cfg.atrn.listen if turnaround is not None and cfg.hold_sites else ()
    needs_tls = (smtp.starttls and smtp.listen) or submission.listen or submission.listen_implicit_tls or odmr_listen
    context_tls = tls_context(cfg) if needs_tls else None
    auth = authenticator(cfg, reactor, run_blocking)
    pool = ConnectionPool(smtp.max_connections, smtp.max_connections_per_client)
    mx_settings = ServerSettings(
        hostname=cfg.server.hostname,
        max_message_size=smtp.max_message_size,
        max_recipients=smtp.max_recipients,
        starttls=smtp.starttls,
        auth_mechanisms=cfg.auth.mechanisms if smtp.auth else (),
        auth_without_tls=cfg.auth.allow_plaintext_without_tls,
        max_errors=smtp.max_errors,
        etrn=turnaround is not None,  # rfc1985, on the MX listeners
        chunking=True,  # rfc3030 BDAT, on the MX and submission listeners
        smtputf8=smtp.smtputf8,  # rfc6531, on every listener
    )
    common = dict(
        clock=reactor,
        command_timeout=smtp.command_timeout,
        data_timeout=smtp.data_timeout,
        pool=pool,
        turnaround=turnaround,
    )
    mx = SMTPServerFactory(
        context,
        mx_settings,
        tls=context_tls if smtp.starttls else None,
        authenticator=auth if smtp.auth else None,
        **common,
    )
    submission_context = dataclasses.replace(
        context,
        settings=dataclasses.replace(
            context.settings,
            submission=submission.add_missing_headers,
            require_sender_match=submission.require_sender_match,
        ),
    )
    submission_settings = dataclasses.replace(
        mx_settings, starttls=True, auth_mechanisms=cfg.auth.mechanisms, auth_required=True, etrn=False
    )
    starttls = SMTPServerFactory(submission_context, submission_settings, tls=context_tls, authenticator=auth, **common)
    implicit = SMTPServerFactory(
        submission_context,
        dataclasses.replace(submission_settings, starttls=False),
        implicit_tls=True,
        authenticator=auth,
        **common,
    )
    services = []
    for i, description in enumerate(smtp.listen):
        services.append(Listener(reactor, description, mx, f"[smtp] listen[{i}]"))
    for i, description in enumerate(submission.listen):
        services.append(Listener(reactor, description, starttls, f"[submission] listen[{i}]"))
    for i, description in enumerate(submission.listen_implicit_tls):
        wrapped = TLSMemoryBIOFactory(context_tls, False, implicit)  # rfc8314 3.3: TLS first
        services.append(Listener(reactor, description, wrapped, f"[submission] listen_implicit_tls[{i}]"))
    if odmr_listen:
        # rfc2645: EHLO, AUTH (CRAM-MD5 before TLS when allowed), ATRN, QUIT; the rest 502.
        odmr_settings = dataclasses.replace(
            mx_settings, odmr=True, etrn=False, starttls=True, auth_mechanisms=cfg.auth.mechanisms,
            challenge_auth_without_tls=cfg.atrn.challenge_auth_without_tls, chunking=False,
        )
        odmr = SMTPServerFactory(context, odmr_settings, tls=context_tls, authenticator=auth, **common)
        for i, description in enumerate(odmr_listen):
            services.append(Listener(reactor, description, odmr, f"[atrn] listen[{i}]"))
    return mx, services

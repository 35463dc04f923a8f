"""What the receiver decides: the answers to the server machine's decisions.

One ``ReceivingSession`` per connection. It asks the recipient directory,
the relay rule and the policy plugins, streams message data into a spool
writer and commits it at end of data. It knows nothing of transports: the
Twisted glue (``mailsvc.protocol``) feeds it events and writes its replies.

Each ``on_*`` method answers one decision: ``None`` means the machine's
usual positive reply, a ``Reply`` is sent as is; either may come in a
Deferred. MAIL, RCPT and end of data answer with the plain value when the
policies and the directory have answered at once, and with a Deferred once
one of them answers with a Deferred not fired yet (or fails).

Relaying (DESIGN rule 4) is for trusted networks and authenticated users
(``SessionInfo.user``, set by ``mailsvc.auth``). On a submission listener
(``ReceiverSettings.submission``, rfc6409) the sender may be tied to the
user's own addresses and a missing ``Date:`` or ``Message-ID:`` is added.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.utils import format_datetime
from datetime import datetime, timezone

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsvc.delivery import router
from mailsvc.envelope import Envelope, Recipient
from mailsvc.errors import SpoolError
from mailsvc.policy import SessionInfo, ask
from mailsvc.receiverqueries import QueryAnswers
from mailsvc.smtp import events as ev
from mailsvc.smtp.parameters import original_recipient
from mailsvc.smtp.replies import Reply
from mailsvc.submission import HeaderScanner, missing_headers, protocol_name

log = Logger(namespace="mailsvc.receiver")


# The server machine's events each ReceivingSession method answers (or is told
# of): the wiring both the SMTP glue (mailsvc.protocol) and rsmtp use.
SESSION_HANDLERS = {
    ev.Hello: "on_hello",
    ev.MailFrom: "on_mail",
    ev.RcptTo: "on_rcpt",
    ev.DataCommand: "on_data_command",
    ev.DataChunk: "on_data_chunk",
    ev.DataEnd: "on_data_end",
    ev.DataRefused: "on_data_refused",
    ev.Reset: "on_reset",
    ev.Verify: "on_verify",
    ev.Expand: "on_expand",
    ev.Turn: "on_turn",
}


@dataclass(frozen=True)
class ReceiverSettings:
    """The parts of the config the receiver acts on."""

    hostname: str
    vrfy: str = "directory"  # "directory" | "always-252" | "off"
    expn: bool = False
    trusted_networks: tuple = ()
    default_domain: str = ""  # the domain VRFY/EXPN add to a bare user name
    # rfc6409: a submission listener; adds a missing Date:/Message-ID: (8.2, 8.3).
    submission: bool = False
    # rfc6409 6.1: an authenticated user may only send as one of its own addresses.
    require_sender_match: bool = False

    @classmethod
    def from_config(cls, cfg, **overrides) -> "ReceiverSettings":
        """The settings ``[server]``, ``[smtp]`` and ``[local]`` give; ``overrides``
        set the rest (``submission``, ``require_sender_match``)."""
        smtp = cfg.smtp
        return cls(
            hostname=cfg.server.hostname,
            vrfy=smtp.vrfy,
            expn=smtp.expn,
            trusted_networks=tuple(smtp.trusted_networks),
            default_domain=cfg.local.domains[0] if cfg.local.domains else "",
            **overrides,
        )


@dataclass
class ReceiverContext:
    """What every session shares: settings, directory, policies, spool, runner."""

    settings: ReceiverSettings
    directory: object  # IRecipientDirectory
    spool: object  # ISpool
    submit: Callable  # QueueRunner.submit: called with each committed QueuedMessage
    run_blocking: Callable  # run_blocking(f, *args) -> Deferred (a thread pool in production)
    policies: Sequence = ()
    now: Callable[[], float] = time.time
    router: router.Router = router.DEFAULT_ROUTER
    # run_steps(steps) -> Deferred: the flush worker (mailsvc.flushworker), which
    # shares the fsyncs of commits in flight; None: commit with run_blocking.
    run_steps: Callable | None = None

    def is_trusted(self, address: str) -> bool:
        """Whether a client address is in a trusted network (may relay)."""
        if not self.settings.trusted_networks:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.settings.trusted_networks)


@dataclass
class _Transaction:
    sender: str = ""
    parameters: dict = field(default_factory=dict)
    recipients: list[Recipient] = field(default_factory=list)
    writer: object = None  # IMessageWriter while DATA is being received
    write_error: SpoolError | None = None
    headers: HeaderScanner | None = None  # submission: watches for Date/Message-ID


class ReceivingSession(QueryAnswers):
    """The receiving side of one SMTP connection (VRFY, EXPN and TURN: ``QueryAnswers``)."""

    def __init__(self, context: ReceiverContext, info: SessionInfo) -> None:
        self.context = context
        self.info = info
        info.trusted = context.is_trusted(info.client_address)
        self._txn = _Transaction()

    def on_tls_started(self) -> None:
        """STARTTLS done: forget the session so far (rfc3207 4.2), note TLS."""
        self._clear()
        self.info.helo, self.info.extended = "", False
        self.info.user = None
        self.info.extra.pop("auth_mechanism", None)
        self.info.tls = True

    # ---------------------------------------------------------- connection

    def on_connect(self):
        """Policy connect hook; a refusal replaces the greeting."""
        return ask(self.context.policies, "connect", self.info).addCallback(_refusal)

    def on_hello(self, event: ev.Hello):
        """HELO/EHLO: ask the policies; an accepted one starts afresh."""
        asked = ask(self.context.policies, "helo", self.info, event.name)
        verdict = _now(asked)
        if verdict is _PENDING:
            return asked.addCallback(self._hello_verdict, event)
        try:
            return self._hello_verdict(verdict, event)
        except BaseException:
            return defer.fail()  # as from the callback it ran in before

    def _hello_verdict(self, verdict, event: ev.Hello):
        if verdict.reply is None:
            self.info.helo, self.info.extended = event.name, event.extended
            self._clear()
        return verdict.reply

    # ---------------------------------------------------------- transaction

    def on_mail(self, event: ev.MailFrom):
        """MAIL FROM: the sender rule of submission, the policies, then remember the sender."""
        try:
            if self.context.settings.require_sender_match and self.info.user is not None:
                owned = self._sender_owned(event.sender)
                if isinstance(owned, defer.Deferred):
                    return owned.addCallback(self._mail_owned, event)
                return self._mail_owned(owned, event)
            return self._mail_asked(event)
        except BaseException:
            return defer.fail()

    def _mail_owned(self, owned: bool, event: ev.MailFrom):
        if not owned:
            return Reply.of(553, "5.7.1", f"<{event.sender}>: sender address not owned by user {self.info.user}")
        return self._mail_asked(event)

    def _mail_asked(self, event: ev.MailFrom):
        asked = ask(self.context.policies, "mail", self.info, event.sender, event.parameters)
        verdict = _now(asked)
        if verdict is _PENDING:
            return asked.addCallback(self._mail_verdict, event)
        return self._mail_verdict(verdict, event)

    def _mail_verdict(self, verdict, event: ev.MailFrom):
        if verdict.reply is None:
            self._clear()
            self._txn.sender = event.sender
            # rfc4954 5: AUTH= is not trusted from clients; it is not kept.
            self._txn.parameters = {k: v for k, v in event.parameters.items() if k != "AUTH"}
        return verdict.reply

    def _sender_owned(self, sender: str):
        """Whether the authenticated user may send as ``sender``: an address in
        a local domain that the directory delivers to the user's own mailbox
        (the user's address, or an alias that includes the user). A bool, or
        a Deferred of it when the directory answers with one."""
        local, at, domain = sender.rpartition("@")
        if not at or not local:
            return False  # <> and bare names are not the user's
        is_local = self.context.directory.isLocalDomain(domain.lower())
        value = _now(is_local)
        if value is _PENDING:
            return _later(is_local).addCallback(self._sender_in_local_domain, sender)
        return self._sender_in_local_domain(value, sender)

    def _sender_in_local_domain(self, is_local, sender: str):
        if not is_local:
            return False
        mailboxes = self.context.directory.resolve(sender)
        value = _now(mailboxes)
        if value is _PENDING:
            return _later(mailboxes).addCallback(self._user_among)
        return self._user_among(value)

    def _user_among(self, mailboxes) -> bool:
        return any(m.mailbox == self.info.user for m in mailboxes or ())

    def on_rcpt(self, event: ev.RcptTo):
        """RCPT TO: a local recipient, a relay by a trusted client, or a refusal."""
        try:
            orcpt = event.parameters.get("ORCPT")
            # rfc3461 4.2 (rfc6533 3 for utf-8;): the address the sender originally used.
            original = original_recipient(orcpt) if orcpt else event.recipient
            found = router.find_recipients(self.context.directory, event.recipient, original)
            recipients = _now(found)
            if recipients is _PENDING:
                return found.addCallback(self._rcpt_found, event)
            return self._rcpt_found(recipients, event)
        except BaseException:
            return defer.fail()

    def _rcpt_found(self, recipients, event: ev.RcptTo):
        if recipients is None:
            return Reply.of(550, "5.1.1", f"<{event.recipient}>: no such user here")
        if self.context.router.hop_for(recipients[0]) == router.RELAY and not (self.info.trusted or self.info.user):
            # DESIGN rule 4: no open relay; trusted networks and authenticated users only.
            return Reply.of(550, "5.7.1", f"<{event.recipient}>: relay access denied")
        asked = ask(self.context.policies, "rcpt", self.info, event.recipient, event.parameters)
        verdict = _now(asked)
        if verdict is _PENDING:
            return asked.addCallback(self._rcpt_verdict, event, recipients)
        return self._rcpt_verdict(verdict, event, recipients)

    def _rcpt_verdict(self, verdict, event: ev.RcptTo, recipients):
        if verdict.reply is not None:
            return verdict.reply
        notify = event.parameters.get("NOTIFY")
        if notify:
            recipients = [r.evolve(notify=notify) for r in recipients]
        known = {r.address.lower() for r in self._txn.recipients}
        for recipient in recipients:  # one copy per mailbox (duplicate elimination)
            if recipient.address.lower() not in known:
                known.add(recipient.address.lower())
                self._txn.recipients.append(recipient)
        return None

    def on_data_command(self, event: ev.DataCommand):
        """DATA: open a spool writer for the message; 451 if the spool cannot."""
        try:
            self._txn.writer = self.context.spool.newMessage()
        except SpoolError as error:
            log.error("spool unavailable: {error}", error=error)
            return _spool_reply(error)
        self._txn.write_error = None
        if self.context.settings.submission:
            self._txn.headers = HeaderScanner()
        return None

    def on_data_chunk(self, event: ev.DataChunk) -> None:
        """Message bytes: straight to the spool file, never held whole."""
        txn = self._txn
        if txn.writer is None or txn.write_error is not None:
            return
        if txn.headers is not None:
            txn.headers.feed(event.data)
        try:
            txn.writer.write(event.data)
        except SpoolError as error:
            txn.write_error = error

    def on_data_end(self, event: ev.DataEnd):
        """End of data: policies, then commit, then (only then) 250."""
        writer = None
        try:
            txn, self._txn = self._txn, _Transaction()
            writer = txn.writer
            if txn.write_error is not None:
                writer.abort()
                log.error("spool write failed: {error}", error=txn.write_error)
                return _spool_reply(txn.write_error)
            envelope = self._envelope(txn, writer.id)
            asked = ask(self.context.policies, "endOfData", self.info, envelope)
            verdict = _now(asked)
            if verdict is _PENDING:
                answer = asked.addCallback(self._data_verdict, event, writer, envelope)
            else:
                answer = self._data_verdict(verdict, event, writer, envelope)
        except BaseException:
            if writer is not None:
                writer.abort()  # nothing half-received stays in the spool
            return defer.fail()
        if isinstance(answer, defer.Deferred):
            answer.addErrback(_abort_writer, writer)
        return answer

    def _data_verdict(self, verdict, event: ev.DataEnd, writer, envelope: Envelope):
        """The end-of-data verdict: refuse, or start the commit (its answer comes later)."""
        if verdict.reply is not None:
            writer.abort()
            return verdict.reply
        if verdict.headers:
            envelope = envelope.evolve(prepend_headers=envelope.prepend_headers + verdict.headers)
        try:
            routes = self.context.router.routes(envelope.recipients)
            if self.context.run_steps is not None:
                committing = self.context.run_steps(writer.commit_steps(envelope, routes))
            else:
                committing = self.context.run_blocking(writer.commit, envelope, routes)
        except SpoolError as error:
            return self._commit_failed(error, writer)
        if not isinstance(committing, defer.Deferred):
            return self._committed(committing, event, writer, envelope)
        return committing.addCallbacks(
            self._committed, self._commit_errback, callbackArgs=(event, writer, envelope), errbackArgs=(writer,)
        )

    def _commit_errback(self, failure: Failure, writer):
        if not failure.check(SpoolError):
            return failure
        return self._commit_failed(failure.value, writer)

    def _commit_failed(self, error: SpoolError, writer) -> Reply:
        log.error("spool commit failed for {id}: {error}", id=writer.id, error=error)
        return _spool_reply(error)

    def _committed(self, queued, event: ev.DataEnd, writer, envelope: Envelope) -> Reply:
        log.info(
            "accepted id={id} from=<{sender}> to={to} size={size} client=[{client}]",
            id=writer.id,
            sender=envelope.sender,
            to=",".join(f"<{r.address}>" for r in envelope.recipients),
            size=event.size,
            client=self.info.client_address,
        )
        for message in queued:
            self.context.submit(message)
        # rfc5321 4.1.1.4: 250 only once the message is safely stored (DESIGN rule 1).
        return Reply.of(250, "2.0.0", f"Ok: queued as {writer.id}")

    def on_data_refused(self, event: ev.DataRefused) -> None:
        """The machine refused the data: drop what was spooled."""
        self._clear()

    def on_reset(self, event: ev.Reset) -> None:
        """RSET: forget the transaction (rfc5321 4.1.1.5)."""
        self._clear()

    def abort(self) -> None:
        """The connection is gone: nothing half-received stays in the spool."""
        self._clear()

    def _clear(self) -> None:
        if self._txn.writer is not None:
            self._txn.writer.abort()
        self._txn = _Transaction()

    def _envelope(self, txn: _Transaction, message_id: str) -> Envelope:
        now = self.context.now()
        info = self.info
        protocol = protocol_name(info.extended, info.tls, info.user is not None, "SMTPUTF8" in txn.parameters)
        headers = [received_header(self.context.settings.hostname, info, protocol, message_id, txn.recipients, now)]
        if txn.headers is not None:
            txn.headers.finish()
            # rfc6409 8.2, 8.3: a submission server may add Message-ID and Date.
            headers.extend(missing_headers(txn.headers, self.context.settings.hostname, message_id, now))
        return Envelope(
            sender=txn.sender,
            recipients=tuple(txn.recipients),
            parameters=tuple(sorted((k, v or "") for k, v in txn.parameters.items())),
            helo=self.info.helo,
            client_address=self.info.client_address,
            protocol=protocol,
            received_at=now,
            prepend_headers=tuple(headers),
        )


def received_header(
    hostname: str, info: SessionInfo, protocol: str, message_id: str, recipients: Sequence[Recipient], now: float
) -> str:
    """The ``Received:`` trace line (rfc5321 4.4; ``with`` per rfc3848)."""
    literal = f"[IPv6:{info.client_address}]" if ":" in info.client_address else f"[{info.client_address}]"
    parts = [f"Received: from {info.helo or 'unknown'} ({literal})", f"by {hostname} (mailsvc) with {protocol} id {message_id}"]
    if len(recipients) == 1:
        # rfc5321 4.4: "for" names a single recipient only, to keep lists private.
        parts.append(f"for <{recipients[0].original or recipients[0].address}>")
    return " ".join(parts) + f"; {_date(int(now))}"


@functools.lru_cache(maxsize=4)
def _date(seconds: int) -> str:
    """The rfc5322 3.3 date of a time in whole seconds (made once a second)."""
    return format_datetime(datetime.fromtimestamp(seconds, timezone.utc))


def _refusal(verdict) -> Reply | None:
    return verdict.reply


_PENDING = object()


def _now(result):
    """The value ``result`` (a plain value or a Deferred) holds now, or
    ``_PENDING``: a Deferred not fired yet or failed, or a ``Failure``."""
    if isinstance(result, defer.Deferred):
        seen: list = []

        def look(value):
            seen.append(value)
            return value  # passed on untouched: the Deferred keeps its result

        result.addBoth(look)  # runs at once when the result is there already
        if seen and not isinstance(seen[0], Failure):
            return seen[0]
        return _PENDING
    if isinstance(result, Failure):
        return _PENDING
    return result


def _abort_writer(failure: Failure, writer) -> Failure:
    """A failure at end of data (a policy, the commit): drop the message's
    files; a no-op once the writer committed or aborted."""
    writer.abort()
    return failure


def _later(result) -> defer.Deferred:
    """A Deferred of ``result`` (a Deferred or a ``Failure``), as ``maybeDeferred`` makes it."""
    return result if isinstance(result, defer.Deferred) else defer.fail(result)


def _spool_reply(error: SpoolError) -> Reply:
    """rfc5321 4.2.3 / rfc3463: 452 4.3.1 for a full disk, 451 4.3.0 otherwise."""
    if error.temporary_full:
        return Reply.of(452, "4.3.1", "Insufficient system storage; try again later")
    return Reply.of(451, "4.3.0", "Local error in processing; try again later")

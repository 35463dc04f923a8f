"""Bounces: a delivery status notification queued back to the sender.

When recipients of a message fail for good, the queue runner hands them to
a ``Bouncer``. It builds an rfc3464 report (``mailsvc.delivery.dsn``) and
queues it like any message, from the null sender ``<>`` (rfc5321 4.5.5), so
a report is never answered by another report. The one exception, as in
Postfix: a report that itself cannot be delivered is sent once to the local
postmaster (a "double bounce"); if that fails too, it is only logged.

A report that must be an internationalized one (rfc6533: the message came
with SMTPUTF8, or an address it names is not ASCII) is queued with the
SMTPUTF8 parameter, so that it is relayed with ``MAIL FROM:<> SMTPUTF8``
(rfc6531 3.4) and may carry UTF-8 in its header fields (rfc6532 3.2), and
with BODY=8BITMIME when it holds 8-bit octets (rfc6152 2).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence

from twisted.internet import defer
from twisted.logger import Logger

from mailsvc.delivery import router
from mailsvc.delivery.dsnglobal import is_global
from mailsvc.delivery.dsn import RecipientOutcome, build_dsn, wants_dsn
from mailsvc.envelope import Envelope, QueuedMessage, Recipient

log = Logger(namespace="mailsvc.delivery.bounce")

# Marks a report sent to postmaster about a report that failed: never bounced again.
DOUBLE_BOUNCE = "X-MAILSVC-DOUBLE-BOUNCE"
_STATUS = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")  # rfc3463 2
_REMOTE = re.compile(r"^host (\S+) said: ")
_DEFAULT_STATUS = {"failed": "5.0.0", "delayed": "4.0.0"}  # rfc3463 3.1: undefined


def outcome_of(recipient: Recipient, action: str = "failed") -> RecipientOutcome:
    """The report line for ``recipient``, from its last error text.

    Agents write errors as ``"<x.y.z> <text>"``; relay errors as
    ``"<x.y.z> host <name> said: <reply>"``, which names the remote MTA.
    """
    if action in ("delivered", "relayed"):
        return RecipientOutcome(recipient=recipient, status="2.0.0")
    error = recipient.last_error
    match = _STATUS.search(error)
    status = match.group(1) if match else _DEFAULT_STATUS[action]
    diagnostic = error[match.end() :].strip() if match and match.start() == 0 else error
    remote = _REMOTE.match(diagnostic)
    remote_mta = remote.group(1) if remote else ""
    if remote:
        diagnostic = diagnostic[remote.end() :]
    return RecipientOutcome(recipient=recipient, status=status, diagnostic=diagnostic, remote_mta=remote_mta)


class Bouncer:
    """Queues delivery reports about queued messages.

    :param spool: the ``ISpool`` to read originals from and queue reports into.
    :param directory: the ``IRecipientDirectory`` (a report to a local sender is local).
    :param hostname: our name, the Reporting-MTA.
    :param submit: called with each queued report (``QueueRunner.submit``).
    :param run_blocking: ``run_blocking(f, *args) -> Deferred`` for disk work.
    """

    def __init__(
        self,
        spool,
        directory,
        hostname: str,
        submit: Callable,
        run_blocking: Callable = defer.maybeDeferred,
        now: Callable[[], float] = time.time,
        routes: Callable = router.routes,
        give_up_after: float = 0,
    ) -> None:
        self.spool = spool
        self.directory = directory
        self.hostname = hostname
        self.submit = submit
        self.run_blocking = run_blocking
        self.now = now
        self.routes = routes  # Router.routes: which hop each report recipient goes to
        self.give_up_after = give_up_after  # for Will-Retry-Until in delay reports

    @defer.inlineCallbacks
    def report(self, message: QueuedMessage, recipients: Sequence[Recipient], action: str = "failed"):
        """Queue a report on ``recipients`` of ``message``; fires with the queued
        messages (``[]`` when no report is due). Never fails: a report that
        cannot be queued is logged (the original's state is still saved)."""
        envelope = message.envelope
        # rfc3461 4.1: NOTIFY says which reports each recipient's sender wants.
        recipients = [r for r in recipients if wants_dsn(action, r.notify or None)]
        if not recipients:
            return []
        if envelope.sender:
            to = envelope.sender
        elif action == "failed" and not envelope.parameter(DOUBLE_BOUNCE):
            to = "postmaster"  # a report failed: tell the postmaster, once
        else:
            log.error(
                "dropping report on id={id}: the null sender gets no bounce (rfc5321 4.5.5); to={to}",
                id=message.id,
                to=",".join(f"<{r.address}>" for r in recipients),
            )
            return []
        try:
            targets = yield router.recipients_for(self.directory, to)
            if targets is None:
                log.error("no mailbox for the report on id={id} to <{to}>", id=message.id, to=to)
                return []
            outcomes = [outcome_of(r, action) for r in recipients]
            queued = yield self.run_blocking(self._queue, message, outcomes, targets, action, to == "postmaster")
        except Exception:
            log.failure("could not queue the report on id={id}", id=message.id)
            return []
        log.info(
            "report action={action} on id={id} queued as id={report} to=<{to}>",
            action=action,
            id=message.id,
            report=queued[0].id,
            to=to,
        )
        for report in queued:
            self.submit(report)
        return queued

    def _queue(self, message, outcomes, targets, action, double) -> list[QueuedMessage]:
        """Blocking: build the report from the original and commit it."""
        now = self.now()
        with self.spool.open(message) as original:
            retry_until = None
            if action == "delayed" and self.give_up_after:
                retry_until = message.envelope.received_at + self.give_up_after  # rfc3464 2.3.9
            data = build_dsn(self.hostname, message.envelope, outcomes, original, now, action=action, retry_until=retry_until)
        writer = self.spool.newMessage()
        try:
            writer.write(data)
            envelope = Envelope(
                sender="",
                recipients=tuple(targets),
                parameters=_report_parameters(message.envelope, outcomes, data, double),
                helo=self.hostname,
                client_address="127.0.0.1",
                protocol="local",
                received_at=now,
            )
            return writer.commit(envelope, self.routes(targets))
        except BaseException:
            writer.abort()
            raise


def _report_parameters(envelope: Envelope, outcomes, data: bytes, double: bool) -> tuple[tuple[str, str], ...]:
    """The MAIL parameters the report on ``outcomes`` of ``envelope`` is queued with."""
    parameters = [(DOUBLE_BOUNCE, "yes")] if double else []
    if is_global(envelope, outcomes):
        # rfc6531 3.2: with DSN advertised, RFC 6533 is implemented; a global
        # report (mailsvc.delivery.dsnglobal) goes as SMTPUTF8 mail.
        parameters.append(("SMTPUTF8", ""))
        if not data.isascii():
            parameters.append(("BODY", "8BITMIME"))  # rfc6152 2
    return tuple(parameters)

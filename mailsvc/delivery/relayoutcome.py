"""What a relay attempt comes to for each recipient.

Pure functions, no I/O, used by ``mailsvc.delivery.relay.RelayAgent`` (and
``mailsvc.turnaround``): the transaction an envelope allows (when part of it
is bad, a bad recipient fails alone), the DSN parameters passed on for a
recipient (rfc3461), whether SMTPUTF8 stops a message going to a peer
(rfc6531 3.2), and the delivery result that each reply, refusal,
failed connection or broken session means for each recipient: ``Delivered``,
``TemporaryDeliveryError`` or ``PermanentDeliveryError``, the peer's words
written ``"<x.y.z> host <name> said: <reply>"`` so that bounces name the
Remote-MTA (``mailsvc.delivery.bounce.outcome_of``).
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet import defer
from twisted.internet import error as net_error

from mailsvc.clientresults import SendResult, SMTPSessionError
from mailsvc.clientsession import OpeningFailed
from mailsvc.envelope import Delivered, Recipient
from mailsvc.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError
from mailsvc.smtp import xtext
from mailsvc.smtp.client_events import Transaction
from mailsvc.smtp.replies import Reply

# The MAIL parameters of the received message that are passed on (when the
# peer offers their extension; the client machine checks that). SMTPUTF8 is
# needed, and then required of the peer, only as ``Transaction`` says.
PASSED_ON = ("RET", "ENVID", "SMTPUTF8")


def envelope_transaction(envelope, addresses, size: int, ascii_headers: bool = False):
    """The transaction sending ``envelope`` to ``addresses`` (all of one
    domain): ``(transaction or None, valid addresses, errors)``, as
    ``checked_transaction``. ``ascii_headers``: the header section was found
    all ASCII, so SMTPUTF8, if the sender gave it, is not needed unless an
    address of this transaction is not ASCII (rfc6531 3.4)."""
    mail_params = {}
    for key in PASSED_ON:
        value = envelope.parameter(key)
        if value is not None:
            mail_params[key] = value or None
    body_8bit = (envelope.parameter("BODY") or "").upper() == "8BITMIME"
    by_address = {r.address: r for r in envelope.recipients}
    rcpts = tuple((address, dsn_parameters(by_address.get(address))) for address in addresses)
    try:
        # The whole envelope is checked once; only when something in it
        # is wrong is it taken apart to find what (checked_transaction).
        transaction = Transaction(envelope.sender, rcpts, mail_params, size, body_8bit, ascii_headers=ascii_headers)
    except ValueError:
        return checked_transaction(envelope, addresses, by_address, mail_params, size, body_8bit, ascii_headers)
    return transaction, addresses, {}


def checked_transaction(envelope, addresses, by_address, mail_params, size, body_8bit, ascii_headers=False):
    """The transaction for ``addresses`` when their envelope did not pass as a
    whole: ``(transaction or None, valid addresses, errors)``. A bad recipient
    fails alone (5.1.3); parameters we cannot repeat are dropped rather than
    the message (but SMTPUTF8, which cannot be bad, is kept: rfc6531 3.4);
    a bad sender fails every recipient (5.1.7)."""
    results: dict = {}
    valid = []
    for address in addresses:
        try:
            Transaction("", (address,))
        except ValueError as e:
            results[address] = PermanentDeliveryError(f"bad recipient address <{address}>: {e}", "5.1.3")
        else:
            valid.append(address)
    if not valid:
        return None, valid, results
    rcpts = tuple((address, dsn_parameters(by_address.get(address))) for address in valid)
    try:
        try:
            transaction = Transaction(envelope.sender, rcpts, mail_params, size, body_8bit, ascii_headers=ascii_headers)
        except ValueError:
            # A parameter we cannot repeat is dropped rather than the message.
            kept = {key: None for key in mail_params if key == "SMTPUTF8"}
            transaction = Transaction(envelope.sender, tuple(valid), kept, size, body_8bit, ascii_headers=ascii_headers)
    except ValueError as e:
        # rfc3463 3.2: X.1.7 bad sender's mailbox address syntax.
        return None, valid, {**results, **same_for_all(valid, PermanentDeliveryError(f"bad envelope: {e}", "5.1.7"))}
    return transaction, valid, results


def smtputf8_refusal(name: str, transaction: Transaction, extensions: dict) -> DeliveryError | None:
    """The failure of a message that needs SMTPUTF8 to a peer that does not
    offer it, saying why (rfc6531 3.2: "MUST NOT transmit an internationalized
    email address" nor UTF-8 headers; it "SHOULD reject the message": a
    bounce, 5.6.7 as rfc6531 3.5 and Postfix give); ``None`` when it may go."""
    need = transaction.smtputf8_need
    if not need or "SMTPUTF8" in extensions:
        return None
    return PermanentDeliveryError(
        f"host {name} does not offer SMTPUTF8, which the message needs: {need}", "5.6.7"
    )


def same_for_all(addresses: Iterable[str], error: DeliveryError | None) -> dict:
    """``{address: error}`` for every one of ``addresses``."""
    return {address: error for address in addresses}


def reply_error(name: str, reply: Reply) -> DeliveryError:
    """The peer's refusal as the error text bounces read: ``host <name> said: <reply>``."""
    permanent = reply.code >= 500
    status = reply.enhanced or ("5.0.0" if permanent else "4.0.0")
    kind = PermanentDeliveryError if permanent else TemporaryDeliveryError
    return kind(f"host {name} said: {reply}", status)


def session_error(name: str, where: str, error: SMTPSessionError) -> DeliveryError:
    """A session that ended before the end of data: a 5xx from the peer is
    permanent; anything else means trying the next address."""
    if error.reply is not None:
        return reply_error(name, error.reply)
    # rfc3463 3.5: X.4.2 bad connection (timeouts, lost connections).
    return TemporaryDeliveryError(f"conversation with {where} failed: {error.reason}", "4.4.2")


def opening_error(where: str, failure: OpeningFailed) -> DeliveryError:
    """STARTTLS or AUTH did not go as the route demands: always temporary."""
    if failure.tls:
        # rfc3463 3.8: X.7.5 cryptographic failure (X.7.4 is "useful only as
        # a permanent error").
        hint = {
            "no-starttls": " (TLS is required for this route)",
            "starttls-refused": " (TLS is required for this route)",
            "auth-needs-tls": ' (tls = "none" on the route allows AUTH in clear)',
        }[failure.kind]
        return TemporaryDeliveryError(f"{where}: {failure.reason}{hint}", "4.7.5")
    if failure.kind == "auth-refused" and failure.reply is not None:
        # Deferred, not bounced, like Postfix's smtp_sasl_auth_soft_bounce:
        # the password is ours to fix. rfc4954 6: 535 5.7.8 → 4.7.8.
        enhanced = failure.reply.enhanced
        status = "4" + enhanced[1:] if enhanced else ("4.7.8" if failure.reply.code == 535 else "4.7.0")
        return TemporaryDeliveryError(f"{where}: {failure.reason}", status)
    return TemporaryDeliveryError(f"{where}: {failure.reason}", "4.7.0")


def unanswered(error: SMTPSessionError) -> bool:
    """True when the session broke before the peer answered any RCPT (lost,
    timed out, or 421): nothing of the transaction was done, so it may be
    started again on a new connection."""
    answered = error.partial is not None and bool(error.partial.recipients)
    return not answered and (error.reply is None or error.reply.code == 421)


def dsn_parameters(recipient: Recipient | None) -> dict:
    """rfc3461 4.1, 4.2: the NOTIFY and ORCPT to pass on for ``recipient``
    (sent only if the peer offers DSN: the client machine filters them)."""
    if recipient is None:
        return {}
    parameters = {}
    if recipient.notify:
        parameters["NOTIFY"] = recipient.notify
    if recipient.original and recipient.original != recipient.address and "@" in recipient.original:
        parameters["ORCPT"] = "rfc822;" + xtext.encode(recipient.original)
    return parameters


def transaction_results(name: str, transaction: Transaction, result: SendResult, peer_dsn: bool = False):
    """Per-recipient results of a finished transaction, or one error for all.

    A success is ``Delivered.PASSED_ON`` when the peer took the DSN request
    over (rfc3461 5.2.1), else ``Delivered.RELAYED`` (5.2.2)."""
    if result.refusal is not None:
        reply = result.refusal
        if result.synthetic:
            # Our machine refused before sending (SIZE, 8BITMIME, SMTPUTF8).
            text = f"host {name}: {reply.lines[0]}"
            kind = PermanentDeliveryError if reply.code >= 500 else TemporaryDeliveryError
            return kind(text, reply.enhanced or "5.0.0")
        # MAIL refused: 5xx fails everyone; 4xx concerns the whole transaction.
        return reply_error(name, reply)
    results: dict = {}
    accepted = set(result.accepted)
    for address, _ in transaction.recipients:
        reply = result.recipients.get(address)
        if reply is None:
            results[address] = TemporaryDeliveryError(f"host {name} gave no reply to RCPT", "4.4.2")
        elif reply.code >= 400:
            results[address] = reply_error(name, reply)
        elif address not in accepted or result.reply is None:
            results[address] = TemporaryDeliveryError(f"host {name} gave no reply to the message", "4.4.2")
        elif result.reply.code >= 400:
            results[address] = reply_error(name, result.reply)
        else:
            results[address] = Delivered.PASSED_ON if peer_dsn else Delivered.RELAYED
    return results


def results_lost_after_data(name, where, transaction, error: SMTPSessionError) -> dict:
    """The session broke after the end of data: the accepted recipients may
    have the message; they are retried (at least once, never lost)."""
    partial = error.partial or SendResult()
    results = {}
    for address, _ in transaction.recipients:
        reply = partial.recipients.get(address)
        if reply is not None and reply.code >= 400:
            results[address] = reply_error(name, reply)
        else:
            results[address] = TemporaryDeliveryError(
                f"connection to {where} broken after the end of data"
                f" (the message may have been delivered): {error.reason}",
                "4.4.2",
            )
    return results


def connect_failure_reason(error: BaseException) -> str:
    """A short reason for a failed connection, for the error text."""
    if isinstance(error, (defer.TimeoutError, TimeoutError, net_error.TimeoutError, defer.CancelledError)):
        return "connection timed out"
    if isinstance(error, net_error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, net_error.DNSLookupError):
        return "host name lookup failed"
    return str(error) or error.__class__.__name__

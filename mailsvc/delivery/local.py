"""Local delivery: each pending recipient gets its own copy in its mailbox."""

from __future__ import annotations

import errno
from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailsvc.envelope import QueuedMessage, RecipientState
from mailsvc.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError
from mailsvc.interfaces import IDeliveryAgent, IFlushingMailboxStore

# rfc3463 3.4: X.3.1 "mail system full"; other storage trouble is X.3.0.
_FULL = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code)


@implementer(IDeliveryAgent)
class LocalDeliveryAgent:
    """Delivers into an ``IMailboxStore``, one recipient at a time.

    :param store: the ``IMailboxStore``.
    :param spool: the ``ISpool`` the message is read from.
    :param run_blocking: ``run_blocking(f, *args)`` returns a Deferred of
        ``f(*args)`` (production: a thread pool; tests: ``maybeDeferred``).
    :param log: a ``twisted.logger.Logger``.
    :param run_steps: ``run_steps(steps)`` returns a Deferred of the result
        of step generator ``steps`` (``mailsvc.flushworker.FlushWorker.submit``).
        With one, a store providing ``IFlushingMailboxStore`` delivers through
        it (its fsyncs shared with other deliveries and commits); other
        stores, and every store without one, go through ``run_blocking``.
    """

    def __init__(self, store, spool, run_blocking: Callable, log: Logger | None = None,
                 run_steps: Callable | None = None) -> None:
        self._store = store
        self._spool = spool
        self._run_blocking = run_blocking
        self._run_steps = run_steps if IFlushingMailboxStore.providedBy(store) else None
        self._log = log or Logger(namespace="mailsvc.delivery.local")

    def deliver(self, message: QueuedMessage) -> defer.Deferred:
        """Deliver to every PENDING recipient, one after the other; never
        errbacks per recipient.

        :return: a Deferred firing with ``{address: None | DeliveryError}``.
        """
        recipients = message.envelope.recipients
        if len(recipients) == 1 and recipients[0].state is RecipientState.PENDING:
            # The common case, one recipient: its own Deferred carries the
            # result, already as the dict, with no chain of callbacks to build
            # and wait on (one callback more is ~4% of the CPU of this path).
            try:
                return self._deliver_one(message, recipients[0], keyed=True)
            except BaseException:
                return defer.fail()  # as the chain below would (a Deferred catches all)
        results: dict[str, DeliveryError | None] = {}
        d = defer.succeed(None)
        for recipient in message.envelope.recipients:
            if recipient.state is not RecipientState.PENDING or recipient.address in results:
                continue
            results[recipient.address] = None  # a place in order; filled below
            d.addCallback(lambda _, r=recipient: self._deliver_one(message, r))
            d.addCallback(lambda error, address=recipient.address: results.__setitem__(address, error))
        return d.addCallback(lambda _: results)

    def _deliver_one(self, message: QueuedMessage, recipient, keyed: bool = False) -> defer.Deferred:
        """A Deferred of None (delivered) or the ``DeliveryError``, or with
        ``keyed`` of ``{address: that}``; never errbacks."""
        if not recipient.mailbox:
            error = PermanentDeliveryError(f"no local mailbox for <{recipient.address}>", "5.1.1")
            return defer.succeed({recipient.address: error} if keyed else error)
        # rfc5321 4.4: the final delivery adds Return-Path with the reverse-path.
        headers = [
            f"Return-Path: <{message.envelope.sender}>",
            f"Delivered-To: {recipient.address}",
        ]
        if self._run_steps is not None:
            d = self._run_steps(self._store_copy_steps(message, recipient.mailbox, headers))
        else:
            d = self._run_blocking(self._store_copy, message, recipient.mailbox, headers)
        # None: the queue runner logs the delivery
        if keyed:
            return d.addCallbacks(
                _keyed_success, self._keyed_failure, callbackArgs=(recipient.address,), errbackArgs=(message, recipient)
            )
        return d.addCallbacks(_success, self._failed, errbackArgs=(message, recipient))

    def _keyed_failure(self, failure: Failure, message: QueuedMessage, recipient) -> dict:
        return {recipient.address: self._failed(failure, message, recipient)}

    def _failed(self, failure: Failure, message: QueuedMessage, recipient) -> DeliveryError:
        error = failure.value
        if isinstance(error, DeliveryError):
            return error
        if isinstance(error, OSError):
            status = "4.3.1" if error.errno in _FULL else "4.3.0"
            return TemporaryDeliveryError(f"cannot store in mailbox {recipient.mailbox}: {error}", status)
        self._log.failure(
            "local delivery of id={id} to <{to}> failed unexpectedly",
            failure,
            id=message.id,
            to=recipient.address,
        )
        return TemporaryDeliveryError(f"internal error: {error.__class__.__name__}: {error}", "4.3.0")

    def _store_copy(self, message: QueuedMessage, mailbox: str, headers: list[str]):
        """Blocking: read the message from the spool into the store."""
        with self._spool.open(message) as source:
            return self._store.deliver(mailbox, headers, source)

    def _store_copy_steps(self, message: QueuedMessage, mailbox: str, headers: list[str]):
        """``_store_copy`` as steps (``IFlushingMailboxStore.deliverSteps``)."""
        with self._spool.open(message) as source:
            return (yield from self._store.deliverSteps(mailbox, headers, source))


def _success(_) -> None:
    return None


def _keyed_success(_, address: str) -> dict:
    return {address: None}

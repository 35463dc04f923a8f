"""Local delivery: each pending recipient gets its own copy in its mailbox."""

from __future__ import annotations

import errno
from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger
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
        """Deliver to every PENDING recipient; never errbacks per recipient.

        :return: a Deferred firing with ``{address: None | DeliveryError}``.
        """
        return defer.Deferred.fromCoroutine(self._deliver_all(message))

    async def _deliver_all(self, message: QueuedMessage) -> dict:
        results: dict[str, DeliveryError | None] = {}
        for recipient in message.envelope.recipients:
            if recipient.state is not RecipientState.PENDING or recipient.address in results:
                continue
            results[recipient.address] = await self._deliver_one(message, recipient)
        return results

    async def _deliver_one(self, message: QueuedMessage, recipient) -> DeliveryError | None:
        if not recipient.mailbox:
            return PermanentDeliveryError(f"no local mailbox for <{recipient.address}>", "5.1.1")
        # rfc5321 4.4: the final delivery adds Return-Path with the reverse-path.
        headers = [
            f"Return-Path: <{message.envelope.sender}>",
            f"Delivered-To: {recipient.address}",
        ]
        try:
            if self._run_steps is not None:
                await self._run_steps(self._store_copy_steps(message, recipient.mailbox, headers))
            else:
                await self._run_blocking(self._store_copy, message, recipient.mailbox, headers)
        except DeliveryError as e:
            return e
        except OSError as e:
            status = "4.3.1" if e.errno in _FULL else "4.3.0"
            return TemporaryDeliveryError(f"cannot store in mailbox {recipient.mailbox}: {e}", status)
        except Exception as e:
            self._log.failure(
                "local delivery of id={id} to <{to}> failed unexpectedly",
                id=message.id,
                to=recipient.address,
            )
            return TemporaryDeliveryError(f"internal error: {e.__class__.__name__}: {e}", "4.3.0")
        return None  # the queue runner logs the delivery

    def _store_copy(self, message: QueuedMessage, mailbox: str, headers: list[str]):
        """Blocking: read the message from the spool into the store."""
        with self._spool.open(message) as source:
            return self._store.deliver(mailbox, headers, source)

    def _store_copy_steps(self, message: QueuedMessage, mailbox: str, headers: list[str]):
        """``_store_copy`` as steps (``IFlushingMailboxStore.deliverSteps``)."""
        with self._spool.open(message) as source:
            return (yield from self._store.deliverSteps(mailbox, headers, source))

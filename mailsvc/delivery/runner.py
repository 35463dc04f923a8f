"""The queue runner: the spool's one reader, driving agents by the clock.

rfc5321 4.5.4.1: mail that cannot be sent at once is queued and retried
periodically, with a delay after each failure and a give-up time; a new
message gets "immediate attention" (``submit``). rfc5321 6.1: the spool
keeps the message until every recipient is delivered or has failed for good.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailsvc.envelope import Delivered, QueuedMessage, RecipientState
from mailsvc.errors import DeliveryError, TemporaryDeliveryError
from mailsvc.spool.schedule import RetrySchedule

PENDING = RecipientState.PENDING


def _key(message: QueuedMessage) -> tuple[str, str]:
    return (message.hop, message.id)


def _pending(message: QueuedMessage) -> list:
    return [r for r in message.envelope.recipients if r.state is PENDING]


def _has_pending(message: QueuedMessage) -> bool:
    """Whether a recipient of ``message`` is PENDING (``bool(_pending(message))``
    without building the list: asked once per delivery)."""
    for r in message.envelope.recipients:
        if r.state is PENDING:
            return True
    return False


class QueueRunner:
    """Delivers what is in the spool, each message through the agent of its hop.

    :param spool: the ``ISpool``.
    :param agents: a mapping from hop name to ``IDeliveryAgent``.
    :param clock: an ``IReactorTime`` (``seconds``, ``callLater``).
    :param schedule: a ``RetrySchedule``.
    :param scan_interval: seconds between scans of the spool for due messages.
    :param concurrency: most deliveries in flight at once.
    :param log: a ``twisted.logger.Logger``.
    :param run_blocking: ``run_blocking(f, *args)`` returns a Deferred of
        ``f(*args)``; the spool's blocking calls go through it. Default: call
        in the reactor thread. Production may pass a thread-pool runner.
    :param run_short: the same, for the spool's short calls that never wait
        for the disk (``remove``: renames, no fsync); default
        ``run_blocking``. Production calls them on the reactor thread
        (``maybeDeferred``): no hand-off to a thread.

    A delivery in flight covers the agent's work and the spool update after
    it; the same ``(hop, id)`` is never in flight twice.

    ``on_demand_hops`` are hops whose mail waits until asked for: mail held
    for a site that calls in (TURN, ATRN, ETRN). The runner never tries it
    on its own (not on arrival, recovery, scan or retry); only ``flush``
    does, when the site asks. A scan still hands the agent a message older
    than the schedule's ``give_up_after``, so that held mail expires (and is
    bounced) like any other.
    """

    def __init__(
        self,
        spool,
        agents: Mapping[str, object],
        clock,
        schedule: RetrySchedule,
        scan_interval: float = 60,
        concurrency: int = 20,
        log: Logger | None = None,
        run_blocking: Callable | None = None,
        reporter: Callable | None = None,
        delay_warning_after: float = 0,
        on_demand_hops: Iterable[str] = (),
        run_short: Callable | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency!r}")
        self._spool = spool
        self._agents = dict(agents)
        self._clock = clock
        self._schedule = schedule
        self._scan_interval = scan_interval
        self._concurrency = concurrency
        self._log = log or Logger(namespace="mailsvc.delivery.runner")
        self._blocking = run_blocking or defer.maybeDeferred
        self._short = run_short or self._blocking
        # reporter(message, failed_recipients) -> Deferred: queues the bounce
        # (mailsvc.delivery.bounce.Bouncer.report). Called before the failed
        # state is saved, so a crash in between repeats a bounce, never loses one.
        self._reporter = reporter
        # Seconds after arrival when a still-pending recipient's sender is
        # warned once (rfc3464 Action: delayed); 0 = never.
        self._delay_warning_after = delay_warning_after
        self._on_demand = frozenset(on_demand_hops)
        self._idle_watchers: list[tuple[set, defer.Deferred]] = []  # see ``idle``
        self._running = False
        self._inflight: set[tuple[str, str]] = set()
        self._waiting: OrderedDict[tuple[str, str], QueuedMessage] = OrderedDict()
        self._timers: dict[tuple[str, str], object] = {}
        self._scan_call = None
        self._scanning = False
        # Keys whose state changed while a scan ran: the scan may have read
        # them before the change, so its copy is stale.
        self._changed_during_scan: set[tuple[str, str]] = set()
        self._idle: list[defer.Deferred] = []
        # Queue control (mailsvc.control): keys on hold or being deleted are
        # never enqueued nor scheduled; each flush reading the spool watches
        # for keys whose state changed meanwhile (as a scan does).
        self._suspended: set[tuple[str, str]] = set()
        self._flush_watchers: list[set[tuple[str, str]]] = []

    # ------------------------------------------------------------ control

    def start(self) -> defer.Deferred:
        """Recover the spool, schedule what it holds, then scan periodically.

        Returns a Deferred that fires once recovery is done.
        """
        if self._running:
            raise RuntimeError("the queue runner is already started")
        self._running = True
        d = self._blocking(self._spool.recover)

        def recovered(messages):
            self._log.info("recovered {count} queued messages", count=len(messages))
            for message in messages:
                self._schedule_message(message)

        d.addCallback(recovered)
        d.addErrback(lambda f: self._log.failure("spool recovery failed", f))
        d.addBoth(lambda _: self._next_scan())
        return d

    def stop(self) -> defer.Deferred:
        """Stop scanning and retrying; fire when in-flight deliveries end."""
        self._running = False
        if self._scan_call is not None and self._scan_call.active():
            self._scan_call.cancel()
        self._scan_call = None
        for call in self._timers.values():
            if call.active():
                call.cancel()
        self._timers.clear()
        waiting, self._waiting = list(self._waiting), OrderedDict()
        for key in waiting:
            if key not in self._inflight:
                self._settle_watchers(key)
        if not self._inflight:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle.append(d)
        return d

    def submit(self, message: QueuedMessage) -> None:
        """Try ``message`` now (the receiver calls this right after commit)."""
        if self._running and message.hop not in self._on_demand:
            self._enqueue(message)

    def flush(
        self, predicate: Callable[[QueuedMessage], bool] | None = None, keys: set | None = None
    ) -> defer.Deferred:
        """Try now every queued message with a pending recipient for which
        ``predicate(message)`` is true (every one when ``None``), whatever
        its next attempt time: ``mailsvc queue flush`` (as ETRN asks a
        server to start its queue for a domain, rfc1985).

        Reads the spool (held messages are not in it). Fires with the
        number of messages now being tried (those already in flight or in
        line count too); their ``(hop, id)`` keys are added to ``keys`` when
        given, for ``idle``.
        """
        if not self._running:
            return defer.succeed(0)
        changed: set[tuple[str, str]] = set()
        self._flush_watchers.append(changed)
        d = self._blocking(self._spool.queued)

        def read(messages) -> int:
            count = 0
            for message in messages:
                key = _key(message)
                if not _has_pending(message) or key in self._suspended:
                    continue
                if predicate is not None and not predicate(message):
                    continue
                if key in self._inflight or key in self._waiting:
                    pass  # already being tried: counts too
                elif key not in changed and self._running:  # else: tried while we read, our copy is stale
                    if keys is not None:
                        keys.add(key)  # before _enqueue, which may deliver it at once
                    self._enqueue(message)
                else:
                    continue
                if keys is not None:
                    keys.add(key)
                count += 1
            return count

        def done(result):
            self._flush_watchers.remove(changed)
            return result

        return d.addCallback(read).addBoth(done)

    def idle(self, keys: Iterable[tuple[str, str]]) -> defer.Deferred:
        """A Deferred firing (with ``None``) once none of ``keys`` (``(hop,
        id)`` pairs, e.g. those a ``flush`` counted) is in line or in flight:
        every delivery asked for is done and its result saved."""
        left = {key for key in keys if key in self._inflight or key in self._waiting}
        if not left:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle_watchers.append((left, d))
        return d

    def _settle_watchers(self, key) -> None:
        if not self._idle_watchers or key in self._waiting:
            return
        for left, d in list(self._idle_watchers):
            left.discard(key)
            if not left:
                self._idle_watchers.remove((left, d))
                d.callback(None)

    def suspend(self, hop: str, id: str) -> None:
        """Stop trying ``(hop, id)`` until ``resume``: drop its timer and its
        place in line; nothing enqueues or schedules it meanwhile. Used
        while the message is put on hold or deleted. A delivery in flight
        ends normally; its new state is saved only if the spool still has
        the message queued (``update`` of a held message fails)."""
        key = (hop, id)
        self._suspended.add(key)
        self._cancel_timer(key)
        if self._waiting.pop(key, None) is not None and key not in self._inflight:
            self._settle_watchers(key)

    def resume(self, hop: str, id: str) -> None:
        """Undo ``suspend``: the next scan finds the message if it is queued and due."""
        self._suspended.discard((hop, id))

    # ------------------------------------------------------------ scheduling

    def _schedule_message(self, message: QueuedMessage) -> None:
        """Enqueue ``message`` if due, else set a timer for when it is."""
        if _key(message) in self._suspended:
            return
        pending = _pending(message)
        if not pending:
            self._finish_done(message)
            return
        if message.hop in self._on_demand:
            return  # waits for its site to ask (flush); expiry is the scan's
        due = min(r.next_attempt for r in pending)
        delay = due - self._clock.seconds()
        if delay <= 0:
            self._enqueue(message)
            return
        key = _key(message)
        self._cancel_timer(key)
        self._timers[key] = self._clock.callLater(delay, self._timer_fired, message)

    def _timer_fired(self, message: QueuedMessage) -> None:
        self._timers.pop(_key(message), None)
        self._enqueue(message)

    def _cancel_timer(self, key) -> None:
        call = self._timers.pop(key, None)
        if call is not None and call.active():
            call.cancel()

    def _enqueue(self, message: QueuedMessage) -> None:
        if not self._running:
            return
        key = _key(message)
        if key in self._inflight or key in self._waiting or key in self._suspended:
            return
        self._cancel_timer(key)
        self._waiting[key] = message
        self._pump()

    def _pump(self) -> None:
        while self._running and self._waiting and len(self._inflight) < self._concurrency:
            key, message = self._waiting.popitem(last=False)
            self._inflight.add(key)
            self._deliver(message).addBoth(self._released, key)

    def _released(self, _, key) -> None:
        self._inflight.discard(key)
        self._settle_watchers(key)
        if self._scanning:
            self._changed_during_scan.add(key)
        for changed in self._flush_watchers:
            changed.add(key)
        if not self._inflight and self._idle:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)
        self._pump()

    # ------------------------------------------------------------ scanning

    def _next_scan(self) -> None:
        if self._running:
            self._scan_call = self._clock.callLater(self._scan_interval, self._scan)

    def _scan(self) -> None:
        self._scan_call = None
        self._scanning = True
        self._changed_during_scan.clear()
        d = self._blocking(self._spool.queued)

        def scanned(messages):
            now = self._clock.seconds()
            for message in messages:
                key = _key(message)
                if key in self._changed_during_scan:
                    continue
                pending = _pending(message)
                if message.hop in self._on_demand:
                    # Held mail is tried only when asked for, or once too old:
                    # the agent defers it and the schedule gives up (a bounce).
                    if pending and message.envelope.received_at + self._schedule.give_up_after <= now:
                        self._enqueue(message)
                    continue
                if pending and min(r.next_attempt for r in pending) <= now:
                    self._enqueue(message)

        d.addCallback(scanned)
        d.addErrback(lambda f: self._log.failure("spool scan failed", f))

        def done(_):
            self._scanning = False
            self._changed_during_scan.clear()
            self._next_scan()

        d.addBoth(done)

    # ------------------------------------------------------------ delivering

    def _deliver(self, message: QueuedMessage) -> defer.Deferred:
        """Run the agent on ``message``'s pending recipients, then record results."""
        agent = self._agents.get(message.hop)
        if agent is None:
            self._log.error(
                "no delivery agent for hop={hop}; id={id} stays queued", hop=message.hop, id=message.id
            )
            return defer.succeed(None)
        # Only pending recipients are ever shown to the agent. At a first
        # attempt every recipient is: the message is shown as it is (it is
        # frozen), not copied.
        pending = _pending(message)
        if len(pending) == len(message.envelope.recipients):
            attempt = message
        else:
            attempt = message.evolve(envelope=message.envelope.evolve(recipients=tuple(pending)))
        d = defer.maybeDeferred(agent.deliver, attempt)
        d.addCallbacks(self._record, self._agent_failed, callbackArgs=(message,), errbackArgs=(message,))
        d.addErrback(self._record_failed, message)
        return d

    def _agent_failed(self, failure: Failure, message: QueuedMessage) -> defer.Deferred:
        """The agent failed as a whole: every pending recipient gets a temporary error."""
        self._log.failure(
            "agent for hop={hop} failed on id={id}", failure, hop=message.hop, id=message.id
        )
        error = TemporaryDeliveryError(f"internal error: {failure.getErrorMessage()}", "4.3.0")
        return self._record({r.address: error for r in _pending(message)}, message)

    def _record_failed(self, failure: Failure, message: QueuedMessage) -> None:
        self._log.failure("recording results of id={id} failed", failure, id=message.id)

    def _record(self, results, message: QueuedMessage) -> defer.Deferred:
        """Fold the agent's ``results`` into the recipients' state; save it."""
        if not isinstance(results, Mapping):
            self._log.error(
                "agent for hop={hop} returned {results!r} for id={id}, not a mapping",
                hop=message.hop,
                id=message.id,
                results=results,
            )
            results = {}
        now = self._clock.seconds()
        late = bool(self._delay_warning_after) and (
            message.envelope.received_at + self._delay_warning_after <= now
        )
        # One pass over the recipients: each pending one gets its new state
        # and, when a report on it is due, joins its group.
        recipients = list(message.envelope.recipients)
        failed = []
        # Only recipients that asked (rfc3461 NOTIFY) may want a success
        # report; the agent says which (rfc3461 5.2: none when passed on).
        successes: dict[str, list] = {"delivered": [], "relayed": []}
        delayed = []
        for index, old in enumerate(recipients):
            if old.state is not PENDING:
                continue
            new = self._outcome(message, old, results.get(old.address, _NO_RESULT), now)
            if new.state is RecipientState.FAILED:
                failed.append(new)
            elif new.state is RecipientState.DELIVERED:
                if new.notify:
                    how = results.get(new.address) or Delivered.DELIVERED
                    if how is not Delivered.PASSED_ON:
                        successes[how.value].append(new)
            elif late and not new.warned:
                new = new.evolve(warned=True)
                delayed.append(new)
            recipients[index] = new
        updated = message.evolve(envelope=message.envelope.evolve(recipients=tuple(recipients)))
        reports_due = failed or delayed or successes["delivered"] or successes["relayed"]
        if reports_due and self._reporter is not None:
            groups = [("failed", failed), *successes.items(), ("delayed", delayed)]
            d = defer.succeed(None)
            for action, group in groups:
                if group:
                    d.addCallback(lambda _, a=action, g=group: self._reporter(message, g, a))
            d.addErrback(lambda f: self._log.failure("report for id={id} failed", f, id=message.id))
            d.addCallback(lambda _: self._save(updated))
            return d
        return self._save(updated)

    def _save(self, updated: QueuedMessage) -> defer.Deferred:
        """Write the recipients' new state, or remove the message when none is pending."""
        if _has_pending(updated):
            # After a failed update, no timer: the next scan reads what the
            # spool really holds (a message removed meanwhile stays removed).
            d = self._blocking(self._spool.update, updated)
            d.addCallbacks(
                lambda _: self._running and self._schedule_message(updated),
                self._save_failed,
                errbackArgs=("update", updated),
            )
        else:
            d = self._short(self._spool.remove, updated)
            d.addErrback(self._save_failed, "remove", updated)
        return d

    def _outcome(self, message: QueuedMessage, r, error, now: float):
        attempts = r.attempts + 1
        if error is None or isinstance(error, Delivered):
            self._log.info(
                "delivered id={id} to=<{to}> hop={hop}",
                id=message.id,
                to=r.address,
                hop=message.hop,
                attempts=attempts,
            )
            return r.evolve(state=RecipientState.DELIVERED, attempts=attempts, last_error="")
        fields = dict(id=message.id, to=r.address, hop=message.hop, attempts=attempts)
        if not isinstance(error, DeliveryError):
            result = "nothing" if error is _NO_RESULT else repr(error)
            self._log.error(
                "agent gave no usable result for id={id} to=<{to}> hop={hop}: {result}",
                result=result,
                **fields,
            )
            error = TemporaryDeliveryError("delivery agent gave no result", "4.3.0")
        text = str(error)
        if error.permanent:
            self._log.error("failed id={id} to=<{to}> hop={hop} error={error}", error=text, **fields)
            return r.evolve(state=RecipientState.FAILED, attempts=attempts, last_error=text)
        # rfc5321 4.5.4.1: retry later, and give up at last.
        when = self._schedule.next_attempt(attempts, message.envelope.received_at, now)
        if when is None:
            text = f"4.4.7 gave up after {self._schedule.describe_give_up()}: {text}"
            self._log.error("failed id={id} to=<{to}> hop={hop} error={error}", error=text, **fields)
            return r.evolve(state=RecipientState.FAILED, attempts=attempts, last_error=text)
        self._log.info(
            "deferred id={id} to=<{to}> hop={hop} attempts={attempts} next_in={delay:.0f}s"
            " error={error}",
            delay=when - now,
            error=text,
            **fields,
        )
        return r.evolve(attempts=attempts, next_attempt=when, last_error=text)

    def _save_failed(self, failure: Failure, action: str, message: QueuedMessage) -> None:
        # The old state stays on disk: recipients may be tried again (at
        # least once, never lost; DESIGN rule 1).
        if _key(message) in self._suspended:
            # Put on hold or deleted during this delivery: the spool refused
            # to bring it back, as it should. Dropped here; not an error.
            self._log.info(
                "id={id} hop={hop} was held or deleted during delivery; its new state is not saved ({error})",
                id=message.id,
                hop=message.hop,
                error=failure.getErrorMessage(),
            )
            return
        self._log.failure(
            "spool {action} of {hop}/{id} failed", failure, action=action, hop=message.hop, id=message.id
        )

    def _finish_done(self, message: QueuedMessage) -> None:
        d = self._short(self._spool.remove, message)
        d.addErrback(self._save_failed, "remove", message)


_NO_RESULT = object()

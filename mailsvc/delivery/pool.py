"""Outgoing SMTP connections kept open between messages, under caps.

rfc5321 3.3 lets one session carry any number of transactions; a relay that
sends several messages to one server saves a connection, a greeting and an
EHLO for each message after the first. ``ConnectionPool`` is the relay
agent's bookkeeping of that: it hands out a *slot* for a destination
(``(host, port)``), either with an idle connection already in it or empty
(the caller connects), and takes it back afterwards, to keep it idle or to
close it.

- Caps: at most ``max_connections`` slots in all and
  ``max_per_destination`` per destination, counting busy connections, idle
  ones, and ones being closed (until they are closed). A caller over a cap
  waits, first come first served. When only the total cap stands in the
  way, the oldest idle connection to another destination is closed to make
  room.
- An idle connection is handed out again (the most recently used first)
  until it has carried ``max_uses`` transactions; after ``idle_timeout``
  seconds unused it gets QUIT. One the peer closes while idle leaves the
  pool at once.
- ``close()`` (on shutdown) QUITs every idle connection (dropping those
  that have not closed within its timeout); busy ones are QUIT when given
  back.

The pool knows three things about a connection: ``quit()``, ``abort()``
and ``when_closed()`` of ``mailsvc.clientprotocol.SMTPClientProtocol``;
whether a session may carry another message is the caller's call.
"""

from __future__ import annotations

from twisted.internet import defer

Destination = tuple[str, int]  # (host, port)


class PooledConnection:
    """One slot of the pool: a connection to ``destination`` (``protocol``),
    or ``None`` there while the holder connects.

    ``uses`` counts the transactions the holder started on it; ``reused``
    is true when it came from the idle list; ``closed`` once the connection
    is gone.
    """

    def __init__(self, destination: Destination) -> None:
        self.destination = destination
        self.protocol = None
        self.uses = 0
        self.reused = False
        self.closed = False
        self.idle_since = 0.0
        self._timer = None
        self._freed = False


class ConnectionPool:
    """See the module docstring.

    :param clock: an ``IReactorTime`` for the idle timeout.
    :param max_connections: slots in all.
    :param max_per_destination: slots per ``(host, port)``.
    :param max_uses: the most transactions one connection carries.
    :param idle_timeout: seconds an idle connection is kept.
    """

    def __init__(self, clock, max_connections: int, max_per_destination: int, max_uses: int, idle_timeout: float) -> None:
        self._clock = clock
        self._max = max_connections
        self._max_per_destination = max_per_destination
        self._max_uses = max_uses
        self._idle_timeout = idle_timeout
        self._total = 0
        self._counts: dict[Destination, int] = {}
        self._idle: dict[Destination, list[PooledConnection]] = {}
        self._closing_now: set[PooledConnection] = set()  # QUIT or abort on the way
        self._waiting: list[tuple[Destination, defer.Deferred]] = []
        self._closed = False

    # ---------------------------------------------------------- the holder's calls

    def acquire(self, destination: Destination) -> defer.Deferred:
        """A Deferred firing with a ``PooledConnection`` for ``destination``
        once the caps allow; cancelling it gives up the place in line."""

        def cancel(d: defer.Deferred) -> None:
            self._waiting = [(k, w) for k, w in self._waiting if w is not d]

        d = defer.Deferred(cancel)
        self._waiting.append((destination, d))
        self._serve()
        return d

    def connected(self, slot: PooledConnection, protocol) -> None:
        """The holder of ``slot`` has connected ``protocol`` (new, unused)."""
        slot.protocol, slot.uses, slot.reused, slot.closed = protocol, 0, False, False
        protocol.when_closed().addCallback(self._lost, slot, protocol)

    def discard(self, slot: PooledConnection) -> None:
        """The connection in ``slot`` turned out dead: drop it and keep the
        slot, for the holder to connect again."""
        protocol, slot.protocol = slot.protocol, None
        slot.uses, slot.reused, slot.closed = 0, False, False
        if protocol is not None:
            protocol.abort()

    def release(self, slot: PooledConnection, reuse: bool, abort: bool = False) -> None:
        """The holder is done with ``slot``. With ``reuse`` (the session may
        carry another message) the connection is kept idle when it may carry
        more; otherwise it is QUIT (``abort``: dropped at once)."""
        protocol = slot.protocol
        if protocol is None or slot.closed:
            self._free(slot)
            return
        if abort:
            self._closing_now.add(slot)
            protocol.abort()
        elif reuse and not self._closed and slot.uses < self._max_uses:
            slot.idle_since = self._clock.seconds()
            self._idle.setdefault(slot.destination, []).append(slot)
            self._serve()
            # The idle timer only once nobody waiting has taken it: with a
            # backlog it is handed on at once, and a timer set and cancelled
            # for each message would be wasted.
            if slot._timer is None and slot in self._idle.get(slot.destination, ()):
                slot._timer = self._clock.callLater(self._idle_timeout, self._expire, slot)
        else:
            self._quit(slot)

    def close(self, timeout: float = 10.0) -> defer.Deferred:
        """QUIT every idle connection; from now on, connections given back are
        QUIT too. The Deferred fires once every connection being closed is;
        those still open after ``timeout`` seconds are dropped."""
        self._closed = True
        for slots in list(self._idle.values()):
            for slot in list(slots):
                self._take(slot)
                self._quit(slot)
        closing = list(self._closing_now)
        done = defer.gatherResults([slot.protocol.when_closed() for slot in closing])
        timer = self._clock.callLater(timeout, lambda: [s.protocol.abort() for s in closing if not s.closed])
        return done.addCallback(lambda _: timer.cancel() if timer.active() else None)

    # ---------------------------------------------------------- what it holds

    @property
    def idle(self) -> int:
        """How many idle connections the pool holds."""
        return sum(len(slots) for slots in self._idle.values())

    @property
    def in_use(self) -> int:
        """Slots taken: busy, idle and closing connections."""
        return self._total

    # ---------------------------------------------------------- internals

    def _serve(self) -> None:
        """Hand out what the caps allow, in order of arrival; close idle
        connections elsewhere for those only the total cap holds back."""
        ready, held_by_total = [], 0
        # Destinations at their cap with no idle connection: they stay so for
        # this pass, so the many callers often waiting for one are skipped fast.
        blocked = set()
        for destination, d in list(self._waiting):
            if destination in blocked:
                continue
            slots = self._idle.get(destination)
            if slots:
                slot = slots[-1]  # the most recently used
                self._take(slot)
                slot.reused = True
            elif self._counts.get(destination, 0) >= self._max_per_destination:
                blocked.add(destination)
                continue
            elif self._total >= self._max:
                held_by_total += 1
                continue
            else:
                slot = PooledConnection(destination)
                self._total += 1
                self._counts[destination] = self._counts.get(destination, 0) + 1
            self._waiting.remove((destination, d))
            ready.append((d, slot))
        evict = held_by_total - len(self._closing_now)
        if evict > 0:
            oldest = sorted((s for slots in self._idle.values() for s in slots), key=lambda s: s.idle_since)
            for slot in oldest[:evict]:
                self._take(slot)
                self._quit(slot)
        for d, slot in ready:
            d.callback(slot)

    def _take(self, slot: PooledConnection) -> None:
        """Out of the idle list, its timer stopped."""
        slots = self._idle.get(slot.destination, [])
        if slot in slots:
            slots.remove(slot)
            if not slots:
                del self._idle[slot.destination]
        if slot._timer is not None and slot._timer.active():
            slot._timer.cancel()
        slot._timer = None

    def _expire(self, slot: PooledConnection) -> None:
        slot._timer = None
        self._take(slot)
        self._quit(slot)

    def _quit(self, slot: PooledConnection) -> None:
        """Say QUIT; the slot is free once the connection is closed (bounded
        by the client's own reply timeout)."""
        self._closing_now.add(slot)
        slot.protocol.quit()

    def _lost(self, _, slot: PooledConnection, protocol) -> None:
        """The connection of ``slot`` is gone (closed by us or the peer)."""
        if slot.protocol is not protocol:
            return  # discarded earlier
        slot.closed = True
        if slot in self._closing_now or any(slot in slots for slots in self._idle.values()):
            self._take(slot)
            self._free(slot)
        # A busy one is freed when its holder gives it back.

    def _free(self, slot: PooledConnection) -> None:
        if slot._freed:
            return
        slot._freed = True
        self._closing_now.discard(slot)
        self._total -= 1
        left = self._counts[slot.destination] - 1
        if left:
            self._counts[slot.destination] = left
        else:
            del self._counts[slot.destination]
        self._serve()

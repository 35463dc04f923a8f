"""Abuse limits per client address: concurrent connections and failed AUTH attempts.

Pure bookkeeping with an injected clock (``clock.seconds()``), shared by every
listener of a server so that a client cannot get around a limit by changing
port. The Twisted glue asks; this module only counts.

- ``ClientConnections``: at most ``limit`` connections at once from one
  address (rfc5321 3.8 / 4.3.2: 421 4.7.0 to the one over).
- ``AuthFailures``: failed AUTH attempts per address within ``window``
  seconds. Each failure delays the next 535 reply (``delay``, doubling, at
  most ``max_delay``); at ``max_failures`` the address is blocked (421 4.7.0
  and close) until its failures age out. Memory stays bounded: at most
  ``max_failures`` times per address (32 with no limit), and at most ``max_addresses``
  addresses (the oldest are forgotten first).
"""

from __future__ import annotations

import collections


class ClientConnections:
    """Counts open connections per client address."""

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit  # 0 = no limit
        self._open: collections.Counter[str] = collections.Counter()

    def admit(self, address: str) -> bool:
        """Count a new connection from ``address`` in, unless it already has ``limit``."""
        if self.limit and self._open[address] >= self.limit:
            return False
        self._open[address] += 1
        return True

    def release(self, address: str) -> None:
        """A connection from ``address`` ended."""
        self._open[address] -= 1
        if self._open[address] <= 0:
            del self._open[address]

    def count(self, address: str) -> int:
        """Connections open now from ``address``."""
        return self._open.get(address, 0)


class AuthFailures:
    """Failed AUTH attempts per client address, forgotten after ``window`` seconds."""

    def __init__(
        self,
        clock,
        max_failures: int = 10,
        window: float = 900.0,
        delay: float = 1.0,
        max_delay: float = 30.0,
        max_addresses: int = 10000,
    ) -> None:
        self.clock = clock
        self.max_failures = max_failures
        self.window = window
        self.base_delay = delay
        self.max_delay = max_delay
        self.max_addresses = max_addresses
        self._failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def _recent(self, address: str) -> collections.deque[float]:
        times = self._failures.get(address)
        if times is None:
            return collections.deque()
        cutoff = self.clock.seconds() - self.window
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._failures[address]
        return times

    def count(self, address: str) -> int:
        """Failures from ``address`` within the window."""
        return len(self._recent(address))

    def blocked(self, address: str) -> bool:
        """Whether ``address`` has used up its attempts (421 and close)."""
        return bool(self.max_failures) and self.count(address) >= self.max_failures

    def record(self, address: str) -> None:
        """One more failure from ``address``."""
        times = self._recent(address)
        times.append(self.clock.seconds())
        while len(times) > (self.max_failures or 32):
            times.popleft()
        self._failures[address] = times
        self._failures.move_to_end(address)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)

    def delay(self, address: str) -> float:
        """Seconds to wait before answering a failure: ``delay`` × 2^(n-1), capped."""
        n = self.count(address)
        if n == 0 or not self.base_delay:
            return 0.0
        return min(self.base_delay * 2 ** (n - 1), self.max_delay)

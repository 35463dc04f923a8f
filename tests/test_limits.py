"""``mailsvc.limits``: connections per client and failed AUTH attempts, on a fake clock."""

from __future__ import annotations

from twisted.internet import task

from mailsvc.limits import AuthFailures, ClientConnections


def test_connections_per_client_are_counted_and_capped():
    """The limit applies per address; releasing makes room again; 0 = no limit."""
    connections = ClientConnections(2)
    assert connections.admit("a") and connections.admit("a") and not connections.admit("a")
    assert connections.admit("b")
    connections.release("a")
    assert connections.count("a") == 1 and connections.admit("a")
    unlimited = ClientConnections(0)
    assert all(unlimited.admit("a") for _ in range(1000))


def test_auth_failures_block_then_age_out():
    """max_failures within the window blocks the address; the window forgets them."""
    clock = task.Clock()
    failures = AuthFailures(clock, max_failures=3, window=60, delay=1, max_delay=30)
    for _ in range(2):
        failures.record("a")
    assert not failures.blocked("a")
    failures.record("a")
    assert failures.blocked("a") and not failures.blocked("b")
    clock.advance(61)
    assert not failures.blocked("a") and failures.count("a") == 0


def test_auth_failure_delay_doubles_and_is_capped():
    """delay × 2^(n-1), at most max_delay; no failures, no delay."""
    clock = task.Clock()
    failures = AuthFailures(clock, max_failures=0, window=600, delay=1, max_delay=5)
    assert failures.delay("a") == 0
    delays = []
    for _ in range(5):
        failures.record("a")
        delays.append(failures.delay("a"))
    assert delays == [1, 2, 4, 5, 5]
    assert not failures.blocked("a")  # max_failures 0: never blocked


def test_auth_failures_memory_is_bounded():
    """At most max_addresses addresses are remembered (the oldest go first), and
    at most max_failures times per address."""
    clock = task.Clock()
    failures = AuthFailures(clock, max_failures=3, window=600, max_addresses=100)
    for n in range(1000):
        failures.record(f"192.0.2.{n}")
    for _ in range(50):
        failures.record("x")
    assert len(failures._failures) == 100 and len(failures._failures["x"]) == 3
    assert failures.count("192.0.2.0") == 0 and failures.count("192.0.2.999") == 1

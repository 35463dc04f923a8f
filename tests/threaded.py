"""Helpers for tests that run code in several threads at once (group commit)."""

from __future__ import annotations

import threading

import pytest

WAIT = 30  # seconds: only a bound against a hung test, never a measurement


def run_threads(count, target):
    """Run ``target(i)`` in ``count`` threads; return their results, or the
    exception each raised (reported, never lost in the thread)."""
    results = [None] * count

    def run(i):
        try:
            results[i] = target(i)
        except BaseException as error:
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive(), f"thread {thread.name} never returned"
    return results


def wait_until(predicate):
    """Spin until ``predicate()``; fail the test rather than hang."""
    event = threading.Event()
    for _ in range(WAIT * 1000):
        if predicate():
            return
        event.wait(0.001)
    pytest.fail("condition never met")

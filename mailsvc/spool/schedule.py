"""When to try a deferred delivery again: a pure function of attempts and age.

rfc5321 4.5.4.1: a client MUST delay retrying after a failed attempt, keeps
trying until it gives up ("generally ... at least 4-5 days"), and the
parameters MUST be configurable. The default follows Postfix: first retry
after 5 minutes, the delay doubling each time, at most an hour apart, giving
up 5 days after arrival.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetrySchedule:
    """Exponential backoff with a cap and a deadline, all in seconds.

    ``first`` is the delay after the first failed attempt, ``maximum`` the
    longest delay between two attempts, ``give_up_after`` the age (counted
    from arrival) after which a recipient still not delivered fails for good.
    """

    first: float = 300.0
    maximum: float = 3600.0
    give_up_after: float = 432000.0

    def __post_init__(self) -> None:
        if self.first <= 0:
            raise ValueError(f"first must be positive, not {self.first!r}")
        if self.maximum < self.first:
            raise ValueError(f"maximum ({self.maximum!r}) must be at least first ({self.first!r})")
        if self.give_up_after <= 0:
            raise ValueError(f"give_up_after must be positive, not {self.give_up_after!r}")

    def delay(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed attempts (0 for none)."""
        if attempts <= 0:
            return 0.0
        delay = float(self.first)
        # Double until capped; the loop ends quickly because delay grows
        # geometrically, and it never overflows however large attempts is.
        for _ in range(attempts - 1):
            delay *= 2
            if delay >= self.maximum:
                return float(self.maximum)
        return min(delay, float(self.maximum))

    def next_attempt(self, attempts: int, arrival: float, now: float) -> float | None:
        """The POSIX time of the next attempt, or ``None`` to give up.

        :param attempts: attempts made so far, the one that just failed included.
        :param arrival: when the message was accepted (POSIX time).
        :param now: the current time (POSIX time).

        Gives up once the message is ``give_up_after`` old. The last attempt
        is never later than the deadline, so a message gives up at the
        deadline's first attempt rather than up to ``maximum`` after it.
        """
        deadline = arrival + self.give_up_after
        if now >= deadline:
            return None
        return min(now + self.delay(attempts), deadline)

    def describe_give_up(self) -> str:
        """``give_up_after`` for people: ``"5 days"``, ``"2 hours"``..."""
        return describe_duration(self.give_up_after)


def describe_duration(seconds: float) -> str:
    """A duration in the largest whole unit that divides it: ``"5 days"``."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'' if count == 1 else 's'}"
    count = int(seconds) if float(seconds).is_integer() else seconds
    return f"{count} second{'' if count == 1 else 's'}"

"""The retry schedule: a pure function of attempts, arrival and now."""

import pytest

from mailsvc.spool.schedule import RetrySchedule, describe_duration

DAY = 86400


@pytest.mark.parametrize(
    "attempts, delay",
    [(0, 0), (1, 300), (2, 600), (3, 1200), (4, 2400), (5, 3600), (6, 3600), (10_000, 3600)],
)
def test_default_delay_doubles_up_to_an_hour(attempts, delay):
    """Like Postfix: 5 minutes after the first failure, doubling, capped at 1 hour."""
    assert RetrySchedule().delay(attempts) == delay


@pytest.mark.parametrize(
    "attempts, arrival, now, expected",
    [
        (1, 1000.0, 1000.0, 1300.0),
        (2, 1000.0, 1300.0, 1900.0),
        (3, 1000.0, 1900.0, 3100.0),
        (7, 1000.0, 50_000.0, 53_600.0),
        # The last attempt is not later than the deadline...
        (100, 1000.0, 1000.0 + 5 * DAY - 60, 1000.0 + 5 * DAY),
        # ...and at the deadline it gives up (rfc5321 4.5.4.1: 4-5 days).
        (101, 1000.0, 1000.0 + 5 * DAY, None),
        (101, 1000.0, 1000.0 + 6 * DAY, None),
    ],
)
def test_default_next_attempt(attempts, arrival, now, expected):
    """next_attempt is now + delay, clipped to the deadline, None past it."""
    assert RetrySchedule().next_attempt(attempts, arrival, now) == expected


@pytest.mark.parametrize(
    "attempts, now, expected",
    [(1, 0, 60), (2, 60, 180), (3, 180, 420), (4, 420, 900), (5, 900, 1500), (6, 3500, 3600), (7, 3600, None)],
)
def test_configured_schedule(attempts, now, expected):
    """The parameters are configurable (rfc5321 4.5.4.1 MUST)."""
    schedule = RetrySchedule(first=60, maximum=600, give_up_after=3600)
    assert schedule.next_attempt(attempts, 0.0, now) == expected


@pytest.mark.parametrize(
    "kwargs",
    [dict(first=0), dict(first=-1), dict(first=600, maximum=60), dict(give_up_after=0)],
)
def test_bad_parameters_are_refused(kwargs):
    """A schedule that would retry in a loop or never is refused."""
    with pytest.raises(ValueError):
        RetrySchedule(**kwargs)


@pytest.mark.parametrize(
    "seconds, text",
    [(432000, "5 days"), (86400, "1 day"), (7200, "2 hours"), (90, "90 seconds"), (120, "2 minutes"), (1, "1 second"), (1.5, "1.5 seconds")],
)
def test_describe_duration(seconds, text):
    """Durations read well in the give-up error text."""
    assert describe_duration(seconds) == text


def test_default_give_up_text():
    """The default gives up after 5 days."""
    assert RetrySchedule().describe_give_up() == "5 days"

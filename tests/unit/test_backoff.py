"""The one backoff helper every retry loop uses (bus watch, supervisor, listener
processes, the fleet CA follower, cluster redirects)."""

from __future__ import annotations

import pytest

from fleetgate.backoff import backoff_delay


def test_each_attempt_takes_its_delay_then_the_last_one_repeats() -> None:
    schedule = (0.1, 0.5, 2.0)
    assert [backoff_delay(schedule, n) for n in range(6)] == [0.1, 0.5, 2.0, 2.0, 2.0, 2.0]


def test_a_negative_attempt_takes_the_first_delay() -> None:
    assert backoff_delay((0.1, 0.5), -1) == 0.1


def test_an_empty_schedule_is_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="at least one delay"):
        backoff_delay((), 0)

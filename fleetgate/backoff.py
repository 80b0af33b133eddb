"""Backoff schedules: the wait before each retry, as a tuple of seconds whose last entry
repeats for as long as the retries go on."""

from __future__ import annotations

from collections.abc import Sequence


def backoff_delay(schedule: Sequence[float], attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (0 for the first): the schedule's entry
    for it, or its last entry once the attempts run past the end."""
    if not schedule:
        raise ValueError("a backoff schedule needs at least one delay")
    return schedule[min(max(attempt, 0), len(schedule) - 1)]

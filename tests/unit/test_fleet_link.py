"""The agent's link to the fleet on a clock of its own: when a cut-off agent stops
opening new sessions, and what it tells the client."""

from __future__ import annotations

from dbservice.gateway.offline import FleetLink, rough_duration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_new_sessions_within_grace_then_refused_with_how_long() -> None:
    clock = Clock()
    link = FleetLink(None, grace=900.0, clock=clock)
    assert link.every == 5.0
    clock.now += 60
    link.contact()  # a probe answered
    clock.now += 3
    link.lost("no JetStream answers (no responders)")
    assert link.cut_for() == 3.0 and link.refusal() is None
    clock.now += 900 - 3  # exactly the grace after the last contact
    assert link.refusal() is None
    clock.now += 63
    assert link.refusal() == (
        "this agent has been cut off from the fleet for 16m (offline_grace 15m): new "
        "sessions are refused until it reconnects"
    )
    link.contact()
    assert link.linked and link.cut_for() == 0.0 and link.refusal() is None


def test_a_zero_grace_refuses_as_soon_as_the_link_is_gone() -> None:
    clock = Clock()
    link = FleetLink(None, grace=0.0, clock=clock)
    assert link.every == 0.2
    link.lost("not connected to NATS")
    clock.now += 0.5
    assert (link.refusal() or "").startswith(
        "this agent has been cut off from the fleet for 500ms (offline_grace 0ms)"
    )


def test_rough_durations() -> None:
    assert [rough_duration(s) for s in (0.25, 42.9, 960, 3600, 3900)] == [
        "250ms",
        "42s",
        "16m",
        "1h",
        "1h5m",
    ]

"""RootTasks: a root whose cancellation got lost does not hold its process's stop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fleetgate import supervise
from fleetgate.supervise import RootTasks


async def test_a_root_that_loses_its_cancellation_is_cancelled_again(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a root does when a library drops the cancellation (Python 3.11's wait_for
    returning a result that met it): the stop would otherwise wait forever."""
    monkeypatch.setattr(supervise, "RECANCEL_AFTER", 0.2)
    lost = 0

    async def deaf() -> None:
        nonlocal lost
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost += 1  # the first one is lost

    stop = asyncio.Event()
    async with asyncio.timeout(10):
        async with RootTasks(stop) as roots:
            roots.start("deaf-loop", deaf())
            await asyncio.sleep(0.01)
            stop.set()
    assert lost == 1
    assert roots.failed == []
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("deaf-loop did not stop") for m in warned), warned


async def test_roots_that_stop_promptly_are_not_cancelled_twice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = asyncio.Event()
    ended: list[str] = []

    async def polite() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            ended.append("polite")

    async with RootTasks(stop) as roots:
        roots.start("polite", polite())
        await asyncio.sleep(0.01)
        stop.set()
    assert ended == ["polite"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

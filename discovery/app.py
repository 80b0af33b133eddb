"""The discovery service: one bus connection, one poller, an apscheduler interval job."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from bus import BUCKETS, Bus, BusError, subjects
from discovery.aws.session import AwsSession
from discovery.poller import Poller
from discovery.settings import DiscoveryConfig
from fleetgate.aio import stop_on_signals
from fleetgate.durations import format_duration

logger = logging.getLogger(__name__)

START_WAIT = 30.0
"""Seconds the service keeps trying to reach NATS at start before giving up."""


async def run_discovery(config: DiscoveryConfig, *, nats_url: str, once: bool) -> int:
    """Poll once (exit status 0 only if every fetcher succeeded) or until SIGTERM/SIGINT."""
    settings = config.discovery_service
    # A service waits a while for NATS (it may be starting beside it); --once does not.
    wait = 0.0 if once else START_WAIT
    async with await Bus.connect(nats_url, name="fleetgate-discovery", wait=wait) as bus:
        # Only the buckets discovery writes: NATS permissions may forbid creating others.
        await bus.provision(
            BUCKETS[subjects.DATABASES_BUCKET], BUCKETS[subjects.DISCOVERY_STATUS_BUCKET]
        )
        poller = Poller(settings=settings, bus=bus, session=AwsSession())
        if once:
            report = await poller.poll_once()
            return 0 if report.ok else 1
        return await _serve(poller, settings.poll_interval, settings.poll_jitter)


async def _serve(poller: Poller, interval: float, jitter: float) -> int:
    stop = asyncio.Event()
    stop_on_signals(stop)
    running: set[asyncio.Task[Any]] = set()

    async def job() -> None:
        task = asyncio.current_task()
        assert task is not None
        running.add(task)
        try:
            await poller.poll_once()
        except BusError as exc:
            logger.error("poll aborted, the registry was not reachable: %s", exc)
        finally:
            running.discard(task)

    scheduler = AsyncIOScheduler()
    scheduler.add_job(
        job,
        IntervalTrigger(seconds=interval, jitter=int(interval * jitter) or None),
        next_run_time=datetime.now().astimezone(),
        max_instances=1,
        coalesce=True,
        misfire_grace_time=None,
        id="poll",
    )
    logger.info(
        "discovery running: %d fetchers, polling every %s",
        len(poller.fetchers),
        format_duration(interval),
    )
    scheduler.start()
    try:
        await stop.wait()
    finally:
        logger.info("stopping discovery")
        scheduler.shutdown(wait=False)
        for task in list(running):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return 0

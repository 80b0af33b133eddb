"""The discovery service: one bus connection, one poller, an apscheduler interval job."""

from __future__ import annotations

import asyncio
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
        if config.jetstream is not None:
            bus.replication = config.jetstream.replication()
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
        # The poll runs in a task of its own, which the stop cancels and waits for; the
        # scheduler's task only waits for it (cancelling that one would make apscheduler
        # log the cancellation as a failed job, with a traceback).
        if stop.is_set():  # started by the scheduler just before its shutdown
            return
        poll = asyncio.create_task(poller.poll_once(), name="poll")
        running.add(poll)
        try:
            await asyncio.wait([poll])
        finally:
            if poll.done():
                running.discard(poll)
        if poll.cancelled():
            logger.info("poll stopped")
            return
        error = poll.exception()
        if isinstance(error, BusError):
            logger.error("poll aborted, the registry was not reachable: %s", error)
        elif error is not None:
            raise error  # apscheduler logs it; the next poll comes on time

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
        polls = list(running)
        for task in polls:
            task.cancel()
        if polls:
            # wait() rather than awaiting each: a cancellation of *this* task must not
            # be taken for the poll's own.
            await asyncio.wait(polls)
    return 0

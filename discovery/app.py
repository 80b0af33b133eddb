"""The discovery service: one bus connection, its leases, one poller, an apscheduler
interval job, and an immediate poll of every fetcher taken over from another replica."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from bus import BUCKETS, Bus, BusError, subjects
from bus.client import when_jetstream_answers
from bus.settings import START_WAIT, NatsConnection
from bus.specs import DISCOVERY_LEASES
from discovery.aws.session import AwsSession
from discovery.lease import Leases
from discovery.matchers import expand
from discovery.metrics import DiscoveryMetrics
from discovery.poller import Poller
from discovery.settings import DiscoveryConfig
from fleetgate.aio import stop_on_signals
from fleetgate.config import ConfigError
from fleetgate.durations import format_duration
from fleetgate.metrics import Check, DiagServer

logger = logging.getLogger(__name__)


async def run_discovery(
    config: DiscoveryConfig, *, nats_url: str | NatsConnection, once: bool
) -> int:
    """Poll once (exit status 0 only if every fetcher polled succeeded; those another
    replica holds are left to it) or until SIGTERM/SIGINT. Either way only the fetchers
    whose lease this replica holds are polled, and the leases are released at the end."""
    settings = config.discovery_service
    metrics = DiscoveryMetrics()
    state = _State()
    diag = None
    if settings.diag_addr is not None and not once:
        diag = DiagServer(
            settings.diag_addr, metrics.registry, state.readiness, process="discovery"
        )
        try:
            await diag.start()
        except OSError as exc:
            raise ConfigError(
                f"discovery_service.diag_addr {settings.diag_addr}: cannot listen ({exc})"
            ) from None
        logger.info("diagnostics on http://%s/ (metrics, healthz, readyz)", settings.diag_addr)
    try:
        return await _run(config, nats_url=nats_url, once=once, metrics=metrics, state=state)
    finally:
        if diag is not None:
            await diag.aclose()


class _State:
    """What ``/readyz`` reports: NATS connected, and the last poll's outcome."""

    def __init__(self) -> None:
        self.bus: Bus | None = None
        self.poller: Poller | None = None

    def readiness(self) -> list[Check]:
        connected = self.bus is not None and self.bus.connected
        checks = [Check("nats", connected, "" if connected else "not connected to NATS")]
        last = self.poller.last if self.poller is not None else None
        if last is None:
            checks.append(Check("last poll", False, "no poll has ended yet"))
        elif last.ok:
            checks.append(Check("last poll", True, f"{len(last.results)} fetchers ok"))
        else:
            checks.append(Check("last poll", False, "; ".join(last.failures)))
        return checks


async def _run(
    config: DiscoveryConfig,
    *,
    nats_url: str | NatsConnection,
    once: bool,
    metrics: DiscoveryMetrics,
    state: _State,
) -> int:
    settings = config.discovery_service
    # A service waits a while for NATS (it may be starting beside it); --once does not.
    wait = 0.0 if once else START_WAIT
    async with await Bus.connect(nats_url, name="fleetgate-discovery", wait=wait) as bus:
        state.bus = bus
        if config.jetstream is not None:
            bus.replication = config.jetstream.replication()
        # Only the buckets discovery writes: NATS permissions may forbid creating others.
        await when_jetstream_answers(
            lambda: bus.provision(
                BUCKETS[subjects.DATABASES_BUCKET],
                BUCKETS[subjects.DISCOVERY_STATUS_BUCKET],
                DISCOVERY_LEASES,
            ),
            wait=wait,
            what="setting up discovery's buckets",
        )
        leases = Leases(
            bus,
            group=settings.discovery_group,
            period=settings.lease.period,
            wanted={k.status_key for k in expand(settings.aws)},
        )
        poller = Poller(
            settings=settings, bus=bus, session=AwsSession(), leases=leases, metrics=metrics
        )
        state.poller = poller
        await leases.start()
        try:
            logger.info(
                "discovery replica %s polls %d of %d fetchers (lease period %s)",
                leases.replica,
                len(leases.held()),
                len(poller.fetchers),
                format_duration(settings.lease.period),
            )
            if once:
                report = await poller.poll_once()
                if report.skipped:
                    logger.warning(
                        "%d fetcher(s) not polled, another replica holds them: %s",
                        len(report.skipped),
                        ", ".join(report.skipped),
                    )
                return 0 if report.ok else 1
            return await _serve(poller, leases, settings.poll_interval, settings.poll_jitter)
        finally:
            await leases.stop(release=True)


async def _serve(poller: Poller, leases: Leases, interval: float, jitter: float) -> int:
    stop = asyncio.Event()
    stop_on_signals(stop)
    running: set[asyncio.Task[Any]] = set()
    jobs: set[asyncio.Task[Any]] = set()

    async def job(only: set[str] | None = None) -> None:
        # The poll runs in a task of its own, which the stop cancels and waits for; the
        # scheduler's task only waits for it, and the stop lets it end before shutting
        # the scheduler down (a cancelled job is logged by apscheduler as a failed one,
        # with a traceback).
        if stop.is_set():  # started by the scheduler just before its shutdown
            return
        poll = asyncio.create_task(poller.poll_once(only), name="poll")
        running.add(poll)
        me = asyncio.current_task()
        assert me is not None
        jobs.add(me)
        try:
            await asyncio.wait([poll])
        finally:
            jobs.discard(me)
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

    async def takeover(names: set[str]) -> None:
        try:
            await job(names)
        except Exception:
            logger.exception("the poll of fetchers taken over failed; polled again on time")

    def taken_over(names: set[str]) -> None:
        # A fetcher taken from a replica that stopped is polled now, not at our next
        # interval: its last poll may be up to an interval old already.
        task = asyncio.create_task(takeover(names), name="takeover-poll")
        running.add(task)
        task.add_done_callback(running.discard)

    leases.on_acquired = taken_over
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
        scheduler.pause()  # no new job; the one running ends once its poll has
        leases.on_acquired = None
        polls = list(running)
        for task in polls:
            task.cancel()
        if polls or jobs:
            # wait() rather than awaiting each: a cancellation of *this* task must not
            # be taken for the poll's own.
            await asyncio.wait([*polls, *jobs], timeout=10)
        scheduler.shutdown(wait=False)
    return 0

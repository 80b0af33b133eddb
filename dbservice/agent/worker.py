"""One served database: a health loop and a heartbeat loop, living and dying together
(:class:`DatabaseWorker`); or, in a listener process, only its latest copy
(:class:`PassiveWorker`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Callable, Mapping
from typing import Protocol

from bus.schemas import DatabaseResource, utcnow
from dbservice.agent.config import DbService
from dbservice.agent.health import (
    HealthState,
    Prober,
    ProbeResult,
    Target,
    TLSContexts,
    build_target,
    probe,
)
from dbservice.agent.heartbeat import Announcer

logger = logging.getLogger(__name__)

HEARTBEAT_JITTER = 0.2
"""Each heartbeat interval is shortened by up to this fraction, at random."""


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; return early (True) when ``event`` is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
            return True
    return False


class Worker(Protocol):
    """What the supervisor keeps per served database."""

    resource: DatabaseResource

    @property
    def name(self) -> str: ...

    def update(self, resource: DatabaseResource) -> None: ...

    async def run(self) -> None: ...


class PassiveWorker:
    """A listener process's worker: it keeps the database's latest copy for the
    listener and does nothing else (the leader probes and announces)."""

    def __init__(self, resource: DatabaseResource) -> None:
        self.resource = resource

    @property
    def name(self) -> str:
        return self.resource.name

    def update(self, resource: DatabaseResource) -> None:
        self.resource = resource

    async def run(self) -> None:
        await asyncio.Event().wait()  # until cancelled


class DatabaseWorker:
    """Probes one database on a jittered interval and keeps its heartbeat fresh; a
    status change is announced at once. :meth:`run` returns only by cancellation."""

    def __init__(
        self,
        resource: DatabaseResource,
        *,
        settings: DbService,
        announcer: Announcer,
        contexts: TLSContexts,
        prober: Prober = probe,
        probe_slots: asyncio.Semaphore | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.resource = resource
        self.settings = settings
        self.announcer = announcer
        self.contexts = contexts
        self.prober = prober
        self.probe_slots = probe_slots or asyncio.Semaphore(1)
        """Shared by every worker: bounds the probes (and sockets) in flight at once."""
        self.rng = rng
        self.aliases: Mapping[str, str] = settings.host_aliases
        self.state = self._new_state()
        self._announce = asyncio.Event()
        self._reprobe = asyncio.Event()

    @property
    def name(self) -> str:
        return self.resource.name

    def _new_state(self) -> HealthState:
        check = self.settings.health_check
        return HealthState(check.healthy_threshold, check.unhealthy_threshold)

    def _target(self) -> Target | ProbeResult:
        try:
            return build_target(self.resource, aliases=self.aliases, contexts=self.contexts)
        except (ValueError, ssl.SSLError) as exc:
            return ProbeResult(False, f"cannot dial {self.resource.spec.uri!r}: {exc}")

    def update(self, resource: DatabaseResource) -> None:
        """The database changed in the registry: announce the new copy now; start the
        health count over when the way to reach it changed."""
        old, self.resource = self.resource, resource
        if old.spec != resource.spec:
            self.state = self._new_state()
            self._reprobe.set()
        self._announce.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._health_loop(), name=f"health:{self.name}")
            group.create_task(self._heartbeat_loop(), name=f"heartbeat:{self.name}")

    async def _health_loop(self) -> None:
        interval = self.settings.health_check.interval
        timeout = self.settings.health_check.timeout
        first = True
        while True:
            self._reprobe.clear()
            target = self._target()
            if isinstance(target, Target):
                self.state.address, self.state.protocol = target.address, target.protocol
                async with self.probe_slots:
                    result = await self.prober(target, timeout)
            else:
                result = target
            state = self.state
            was = state.status
            if state.observe(result, utcnow()):
                log = logger.warning if state.status == "unhealthy" else logger.info
                if was == "unknown" and state.status == "healthy":
                    log = logger.debug  # the expected start: one line per database is noise
                log(
                    "%s is %s: %s%s",
                    self.name,
                    state.status,
                    state.message,
                    f" ({result.error})" if result.error else "",
                )
                self._announce.set()
            # The first wait is fully jittered, so databases added together spread out.
            delay = interval * (self.rng() if first else 1 - self.rng() / 7)
            first = False
            await wait_event(self._reprobe, max(delay, 0.05))

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat.interval
        while True:
            self._announce.clear()
            ok = await self.announcer.put(self.resource, self.state.snapshot())
            delay = interval * (1 - HEARTBEAT_JITTER * self.rng()) if ok else min(1.0, interval)
            await wait_event(self._announce, delay)

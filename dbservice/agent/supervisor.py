"""One worker per served database, reconciled against the desired set. A worker that
fails is logged, counted and restarted with backoff; the others never notice. Without an
announcer (a listener process) nothing is announced, so nothing is deleted either."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from bus.schemas import DatabaseResource
from dbservice.agent.heartbeat import Announcer
from dbservice.agent.worker import Worker
from fleetgate.backoff import backoff_delay

logger = logging.getLogger(__name__)

BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
HEALTHY_RUN = 60.0
"""A worker that ran this long before failing starts its backoff over."""
STOP_TIMEOUT = 5.0
"""How long a stopping agent tries to delete its heartbeats before leaving them to
expire."""


@dataclass
class Handle:
    worker: Worker
    task: asyncio.Task[None] | None = None
    failures: int = 0
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    """Owns every per-database task of the process."""

    def __init__(
        self,
        *,
        make_worker: Callable[[DatabaseResource], Worker],
        announcer: Announcer | None,
        backoff: tuple[float, ...] = BACKOFF,
    ) -> None:
        self.make_worker = make_worker
        self.announcer = announcer
        self.backoff = backoff
        self.handles: dict[str, Handle] = {}
        self.failures = 0
        """Worker failures since start, over all databases."""

    @property
    def served(self) -> dict[str, DatabaseResource]:
        return {name: h.worker.resource for name, h in self.handles.items()}

    async def adjust(self, desired: Mapping[str, DatabaseResource]) -> None:
        """Stop workers of databases no longer desired, then update or start the rest."""
        gone = [name for name in self.handles if name not in desired]
        await asyncio.gather(*(self.remove(name, "no longer served") for name in gone))
        for resource in desired.values():
            self.upsert(resource)

    def upsert(self, resource: DatabaseResource) -> None:
        handle = self.handles.get(resource.name)
        if handle is not None:
            if handle.worker.resource != resource:
                handle.worker.update(resource)
            return
        handle = Handle(self.make_worker(resource))
        handle.task = asyncio.create_task(self._supervise(handle), name=f"db:{resource.name}")
        self.handles[resource.name] = handle
        logger.info("serving %s (%s)", resource.name, resource.spec.uri)

    async def remove(self, name: str, why: str) -> None:
        """Stop serving ``name`` now: stop its worker and delete its heartbeat."""
        handle = self.handles.pop(name, None)
        if handle is None:
            return
        await self._cancel(handle)
        if self.announcer is not None:
            await self.announcer.delete(name)
        logger.info("stopped serving %s: %s", name, why)

    async def stop_all(self) -> None:
        """The agent is leaving: stop every worker, then delete every heartbeat."""
        handles, self.handles = self.handles, {}
        await asyncio.gather(*(self._cancel(h) for h in handles.values()))
        if self.announcer is None:
            return
        if handles and not self.announcer.connected:
            logger.warning(
                "NATS is unreachable: %d heartbeats expire with their TTL (%gs)",
                len(handles),
                self.announcer.ttl,
            )
            return
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                announcer = self.announcer
                await asyncio.gather(*(announcer.delete(n) for n in handles))
        except TimeoutError:
            logger.warning("some heartbeats were not deleted in time; they expire with the TTL")

    async def _cancel(self, handle: Handle) -> None:
        task, handle.task = handle.task, None
        if task is not None:
            task.cancel()
            # wait() rather than awaiting the task: a cancellation of *our* caller must
            # not be swallowed as if it were the worker's.
            await asyncio.wait({task})
            if not task.cancelled() and task.exception() is not None:
                logger.debug("worker ended with %r", task.exception())

    async def _supervise(self, handle: Handle) -> None:
        attempt = 0
        while True:
            handle.started = time.monotonic()
            try:
                await handle.worker.run()
                raise RuntimeError("worker returned")
            except Exception:
                if time.monotonic() - handle.started > HEALTHY_RUN:
                    attempt = 0
                delay = backoff_delay(self.backoff, attempt)
                attempt += 1
                handle.failures += 1
                self.failures += 1
                logger.exception(
                    "worker for %s failed (%d times); restarting in %gs",
                    handle.worker.name,
                    handle.failures,
                    delay,
                )
            await asyncio.sleep(delay)
            # A restart starts from the latest copy of the database, with fresh state.
            handle.worker = self.make_worker(handle.worker.resource)

"""The diagnostics listener of every long-running process (``diag_addr``): ``/metrics``
in the Prometheus text format, ``/healthz`` and ``/readyz``, each with a body a person
can read.

Each process keeps its metrics in its own :class:`prometheus_client.CollectorRegistry`
(never the library's global one: tests and the sandbox embed several services in one
Python process). The server is aiohttp on the process's own event loop: a scrape costs
one request handler, no thread."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from fleetgate.addresses import split_host_port
from fleetgate.aio import cancel_and_wait

LAG_INTERVAL = 0.5
"""Seconds between two event-loop lag samples."""
UNRESPONSIVE = 5.0
"""``/healthz`` answers 503 when the loop was this many seconds late (or the lag monitor
has not run for that long)."""


@dataclass(frozen=True)
class Check:
    """One line of ``/readyz``: what is checked, whether it is fine, and why not."""

    name: str
    ok: bool
    detail: str = ""


Readiness = Callable[[], Iterable[Check]]


class LoopLag:
    """Measures how late the event loop wakes a task that sleeps :data:`LAG_INTERVAL`
    seconds; the last lag and the worst since the last scrape are exported."""

    def __init__(self, registry: CollectorRegistry, interval: float = LAG_INTERVAL) -> None:
        self.interval = interval
        self.last = 0.0
        self.sampled = time.monotonic()
        self.gauge = Gauge(
            "fleetgate_event_loop_lag_seconds",
            "How late the event loop ran a task that asked to run now (last sample)",
            registry=registry,
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval)
            self.last = max(0.0, loop.time() - before - self.interval)
            self.sampled = time.monotonic()
            self.gauge.set(self.last)

    def stale_for(self) -> float:
        """Seconds since the monitor last ran, beyond its interval."""
        return max(0.0, time.monotonic() - self.sampled - self.interval)


class DiagServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``addr`` (``host:port``)."""

    def __init__(
        self, addr: str, registry: CollectorRegistry, ready: Readiness, *, process: str
    ) -> None:
        self.addr = addr
        self.registry = registry
        self.ready = ready
        self.process = process
        self.lag = LoopLag(registry)
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._lag_task: asyncio.Task[None] | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        return app

    async def start(self) -> None:
        """Listen (OSError when the address cannot be used) and start the lag monitor."""
        host, port = split_host_port(self.addr)
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        addresses = runner.addresses
        self.port = int(addresses[0][1]) if addresses else port
        self._lag_task = asyncio.create_task(self.lag.run(), name="loop-lag")

    async def aclose(self) -> None:
        if self._lag_task is not None:
            lag, self._lag_task = self._lag_task, None
            await cancel_and_wait(lag)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> DiagServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(self, request: web.Request) -> web.Response:
        lag, stale = self.lag.last, self.lag.stale_for()
        worst = max(lag, stale)
        ok = worst < UNRESPONSIVE
        text = (
            f"{self.process}: {'alive' if ok else 'unresponsive'}, event loop lag "
            f"{lag * 1000:.1f} ms"
            + (f", lag monitor {stale:.1f}s late" if stale >= UNRESPONSIVE else "")
            + "\n"
        )
        return web.Response(status=200 if ok else 503, text=text)

    async def readyz(self, request: web.Request) -> web.Response:
        checks = list(self.ready())
        ok = all(c.ok for c in checks)
        lines = [f"{self.process}: {'ready' if ok else 'not ready'}"]
        for c in checks:
            lines.append(
                f"  {'ok  ' if c.ok else 'FAIL'} {c.name}" + (f": {c.detail}" if c.detail else "")
            )
        return web.Response(status=200 if ok else 503, text="\n".join(lines) + "\n")

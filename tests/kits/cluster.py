"""Helpers for the cluster engine tests: the engine in front of a 3-shard stand-in on a
loopback port, in a background thread (so sync clients can drive it), as the proxy
engine's kit runs it (:class:`tests.kits.proxy.ThreadedServer`)."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from dbservice.engine.cluster.testing import LoopbackCluster
from dbservice.engine.proxy import PassThroughHooks, ProxyLimits, SessionHooks
from dbservice.engine.proxy.settings import CommandBuffers
from sandbox.memorydb import ThreadedStandin
from tests.kits.proxy import ThreadedServer


class ClusterProxy(ThreadedServer[LoopbackCluster]):
    """``with ClusterProxy(standin) as proxy:`` the engine on ``proxy.port``."""

    thread_name = "cluster-proxy"

    def __init__(
        self,
        standin: ThreadedStandin,
        *,
        hooks: Callable[[], SessionHooks] = PassThroughHooks,
        limits: ProxyLimits | None = None,
        buffers: CommandBuffers | None = None,
    ) -> None:
        super().__init__()
        self.standin = standin
        self.hooks = hooks
        self.limits = limits
        self.buffers = buffers

    def _server(self) -> LoopbackCluster:
        tls = ssl.create_default_context(cafile=str(self.standin.ca_file))
        return LoopbackCluster(
            self.standin.endpoint,
            tls=tls,
            hooks=self.hooks,
            limits=self.limits,
            buffers=self.buffers,
        )

    def probe(self, interval: float = 0.002) -> LoopProbe:
        """``with proxy.probe() as probe:`` measures the engine's event loop meanwhile."""
        assert self._loop is not None
        return LoopProbe(self._loop, interval)


class LoopProbe:
    """How long an event loop is kept from its other work: a task on the loop wakes every
    ``interval`` seconds and records, per wake-up, ``lag`` (wall seconds late) and
    ``stall`` (of that lag, the CPU time the loop's own thread spent meanwhile: a
    callback that held the loop, not the machine running something else, as other
    engineers' tests on a loaded machine do)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self.loop = loop
        self.interval = interval
        self.lags: list[float] = []
        self.stalls: list[float] = []
        self._stop = threading.Event()
        self._future: Future[None] | None = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            wall, cpu = time.perf_counter(), time.thread_time()
            await asyncio.sleep(self.interval)
            lag = time.perf_counter() - wall - self.interval
            self.lags.append(lag)
            self.stalls.append(max(0.0, min(lag, time.thread_time() - cpu)))

    def __enter__(self) -> LoopProbe:
        self._future = asyncio.run_coroutine_threadsafe(self._run(), self.loop)
        while not self.lags:
            time.sleep(0.001)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._future is not None
        self._future.result(10)

    @staticmethod
    def quantile(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

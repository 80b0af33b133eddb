"""Helpers for the cluster engine tests: a 3-shard stand-in and the engine in front of
it on a loopback port, in a background thread (so sync clients can drive it)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import redis
import uvloop

from dbservice.engine.cluster.testing import LoopbackCluster
from dbservice.engine.proxy import PassThroughHooks, ProxyLimits, SessionHooks, SessionStats
from dbservice.engine.proxy.settings import CommandBuffers
from sandbox.memorydb import ThreadedStandin


class ClusterProxy:
    """``with ClusterProxy(standin) as proxy:`` the engine on ``proxy.port``; with
    ``client_tls`` its clients connect with TLS as they do to the agent
    (:meth:`connect`), by a certificate of the stand-in's CA."""

    def __init__(
        self,
        standin: ThreadedStandin,
        *,
        hooks: Callable[[], SessionHooks] = PassThroughHooks,
        limits: ProxyLimits | None = None,
        buffers: CommandBuffers | None = None,
        client_tls: bool = False,
    ) -> None:
        self.standin = standin
        self.client_tls = client_tls
        self.hooks = hooks
        self.limits = limits
        self.buffers = buffers
        self.port = 0
        self.proxy: LoopbackCluster | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="cluster-proxy", daemon=True)

    def __enter__(self) -> ClusterProxy:
        self._thread.start()
        if not self._ready.wait(10) or self.error is not None:
            raise RuntimeError(f"cluster proxy did not start: {self.error!r}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(self._main())
        except BaseException as exc:
            self.error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        tls = ssl.create_default_context(cafile=str(self.standin.ca_file))
        client_tls = None
        if self.client_tls:
            ca = self.standin.standin.ca
            directory = Path(self.standin.standin.config.dir) / "engine-tls"
            client_tls = ca.server_context(ca.issue_server_cert(), directory)
        async with LoopbackCluster(
            self.standin.endpoint,
            tls=tls,
            hooks=self.hooks,
            limits=self.limits,
            buffers=self.buffers,
            client_tls=client_tls,
        ) as proxy:
            self.proxy = proxy
            self.port = proxy.port
            self._ready.set()
            await self._stop.wait()

    def probe(self, interval: float = 0.002) -> LoopProbe:
        """``with proxy.probe() as probe:`` measures the engine's event loop meanwhile."""
        assert self._loop is not None
        return LoopProbe(self._loop, interval)

    def client(self, protocol: int = 2, **kwargs: object) -> redis.Redis:
        if self.client_tls:
            kwargs = {"ssl": True, "ssl_ca_certs": str(self.standin.ca_file), **kwargs}
        return redis.Redis(
            port=self.port,
            protocol=protocol,
            socket_timeout=10,
            **kwargs,  # type: ignore[arg-type]
        )

    def connect(self, timeout: float = 60) -> socket.socket:
        """A raw connection to the engine (TLS with ``client_tls``)."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        if not self.client_tls:
            return sock
        context = ssl.create_default_context(cafile=str(self.standin.ca_file))
        return context.wrap_socket(sock, server_hostname="localhost")

    def finished(self, count: int, limit: float = 5.0) -> list[SessionStats]:
        deadline = time.monotonic() + limit
        while True:
            assert self.proxy is not None
            done = list(self.proxy.finished)
            if len(done) >= count or time.monotonic() > deadline:
                return done
            time.sleep(0.01)


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


def read_exactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes from a blocking socket (EOFError if it ends before)."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], min(size - got, 1 << 20))
        if not n:
            raise EOFError(f"connection closed after {got} of {size} bytes")
        got += n
    return bytes(buf)


@dataclass
class Measured:
    """What :func:`measure` saw: the action's wall time, the engine loop's stalls
    (:class:`LoopProbe`), and another session's PING round trips meanwhile."""

    took: float = 0.0
    stalls: list[float] = field(default_factory=list)
    pings: list[float] = field(default_factory=list)

    def __repr__(self) -> str:
        pings = sorted(self.pings)
        return (
            f"took {self.took:.3f} s; engine loop stall max {max(self.stalls) * 1000:.1f} ms; "
            f"other session's PING max {pings[-1] * 1000:.1f} ms, median "
            f"{pings[len(pings) // 2] * 1000:.1f} ms"
        )


def measure(
    connect: Callable[[], socket.socket],
    probe: Callable[[], LoopProbe],
    action: Callable[[socket.socket], None],
) -> Measured:
    """``action`` on a connection of its own (``connect``) while another session PINGs
    every 10 ms and the engine's loop is probed."""
    measured = Measured()
    stop = threading.Event()

    def ping() -> None:
        with connect() as other:
            while not stop.is_set():
                started = time.monotonic()
                other.sendall(b"PING\r\n")
                assert read_exactly(other, 7) == b"+PONG\r\n"
                measured.pings.append(time.monotonic() - started)
                time.sleep(0.01)

    pinger = threading.Thread(target=ping)
    pinger.start()
    try:
        while not measured.pings and pinger.is_alive():
            time.sleep(0.01)
        with connect() as sock, probe() as probing:
            started = time.monotonic()
            action(sock)
            measured.took = time.monotonic() - started
        time.sleep(0.1)
    finally:
        stop.set()
        pinger.join()
    measured.stalls = probing.stalls
    return measured

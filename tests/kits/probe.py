"""Measuring an engine's event loop while a test drives it: :class:`LoopProbe` (how long
the loop is kept from its other work), and :func:`measure` (an action on one session
while another PINGs), shared by both engines' kits."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field


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

"""Giving freed heap pages back to the system after a burst of closed connections.

Under glibc's ``malloc`` a process that opens and closes many TLS connections keeps the
pages those connections touched: OpenSSL's per-connection state and the event loop's
read buffers are freed, but glibc returns free memory in the middle of its heap only
when ``malloc_trim`` is called, so each burst of connections leaves the resident size
higher than the last (about 50 MiB per 1,000 mutual-TLS sessions in the agent, measured
in ``benchmarks/proxy.py``). :class:`HeapTrimmer` calls ``malloc_trim(0)`` once enough
connections have closed: in a worker thread, since it takes about 10 ms per 1,000
sessions' worth of freed memory, at most once per ``every`` seconds, and a moment after
the close that crossed the threshold so one trim covers the whole burst. Elsewhere (musl,
macOS, jemalloc preloaded) it does nothing.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import logging
import time
from collections.abc import Callable
from typing import Final

logger = logging.getLogger(__name__)

AFTER: Final = 256
"""Closed connections since the last trim that make the next one worth its cost."""
EVERY: Final = 5.0
"""Seconds between two trims at least."""
SETTLE: Final = 0.5
"""Seconds from the close that crossed ``AFTER`` to the trim (the rest of the burst)."""


def _glibc_trim() -> Callable[[], int] | None:
    """``malloc_trim(0)`` when this process allocates with glibc, else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    if _preloaded_allocator():
        return None
    return lambda: int(trim(0))


def _preloaded_allocator() -> bool:
    """True when another allocator (jemalloc, tcmalloc, mimalloc) replaces glibc's."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
            text = maps.read()
    except OSError:
        return False
    return any(name in text for name in ("libjemalloc", "libtcmalloc", "libmimalloc"))


class HeapTrimmer:
    """Call :meth:`closed` when a connection ends; the trims happen on their own.
    ``trim`` gives the memory back (None: nothing to do, as on musl or under jemalloc)."""

    def __init__(
        self,
        *,
        after: int = AFTER,
        every: float = EVERY,
        settle: float = SETTLE,
        trim: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.after = after
        self.every = every
        self.settle = settle
        self._trim = trim
        self.clock = clock
        self.closed_since = 0
        self.trims = 0
        self._last = -float("inf")
        self._pending: asyncio.TimerHandle | None = None
        self._running: asyncio.Task[None] | None = None

    @classmethod
    def for_this_process(cls) -> HeapTrimmer:
        """Trimming with glibc's ``malloc_trim``, or a trimmer that does nothing."""
        return cls(trim=_glibc_trim())

    @property
    def enabled(self) -> bool:
        return self._trim is not None

    def closed(self) -> None:
        if self._trim is None:
            return
        self.closed_since += 1
        if self.closed_since < self.after or self._pending is not None or self._running is not None:
            return
        loop = asyncio.get_running_loop()
        wait = max(self.settle, self._last + self.every - self.clock())
        # about the process, not the connection that happened to close last
        self._pending = loop.call_later(wait, self._start, context=contextvars.Context())

    def _start(self) -> None:
        self._pending = None
        self._running = asyncio.get_running_loop().create_task(self._run(), name="heap-trim")

    async def _run(self) -> None:
        trim = self._trim
        assert trim is not None
        self.closed_since = 0
        began = self.clock()
        try:
            await asyncio.to_thread(trim)
        finally:
            self._last = self.clock()
            self._running = None
        self.trims += 1
        logger.debug("heap trimmed in %.1f ms", (self._last - began) * 1000)

    def close(self) -> None:
        """Drop a trim that has not started (a running one finishes in its thread)."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    async def aclose(self) -> None:
        """:meth:`close`, then wait for a trim already running (it is short, in its
        thread, and cannot be interrupted), so that no task is left behind."""
        self.close()
        running = self._running
        if running is not None:
            await asyncio.wait([running])

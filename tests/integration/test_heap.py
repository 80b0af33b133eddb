"""HeapTrimmer: when trims happen (at the seam of the trim call), and that a real glibc
trim gives freed pages back."""

from __future__ import annotations

import asyncio
import platform
import subprocess
import sys
import textwrap

import pytest

from fleetgate.heap import HeapTrimmer, _glibc_trim

GLIBC = platform.libc_ver()[0] == "glibc"


def counting() -> tuple[list[int], HeapTrimmer]:
    calls: list[int] = []
    return calls, HeapTrimmer(after=3, every=0.3, settle=0.05, trim=lambda: calls.append(1) or 1)


async def test_one_trim_after_a_burst_of_closes() -> None:
    calls, heap = counting()
    heap.closed()
    heap.closed()
    await asyncio.sleep(0.15)
    assert calls == []  # below the threshold: nothing to give back yet
    for _ in range(10):  # the burst crossing it: one trim, after it settles
        heap.closed()
    assert calls == []
    await asyncio.sleep(0.15)
    assert calls == [1]
    assert heap.trims == 1 and heap.closed_since == 0


async def test_trims_are_spaced_by_every() -> None:
    calls, heap = counting()
    for _ in range(3):
        heap.closed()
    await asyncio.sleep(0.1)
    assert len(calls) == 1
    for _ in range(3):
        heap.closed()
    await asyncio.sleep(0.1)
    assert len(calls) == 1  # 0.3 s must pass since the last trim
    await asyncio.sleep(0.3)
    assert len(calls) == 2


async def test_close_drops_a_pending_trim() -> None:
    calls, heap = counting()
    for _ in range(3):
        heap.closed()
    heap.close()
    await asyncio.sleep(0.15)
    assert calls == []


async def test_without_a_trim_function_it_does_nothing() -> None:
    heap = HeapTrimmer(trim=None)  # as on musl or under a preloaded allocator
    for _ in range(1000):
        heap.closed()
    assert not heap.enabled and heap.closed_since == 0


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_glibc_trim_gives_freed_pages_back() -> None:
    assert _glibc_trim() is not None
    script = textwrap.dedent(
        """
        import asyncio, ctypes
        from fleetgate.heap import HeapTrimmer
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]

        def rss_kib():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])

        # Connection-like memory: a large read buffer and small state per connection,
        # one in 50 kept, so the free memory sits between live blocks.
        blocks = []
        for _ in range(2000):
            p = libc.malloc(256 * 1024)
            ctypes.memset(p, 1, 64 * 1024)
            blocks.append(p)
            for _ in range(20):
                q = libc.malloc(1500)
                ctypes.memset(q, 1, 1500)
                blocks.append(q)
        for i, p in enumerate(blocks):
            if i % 50:
                libc.free(p)

        async def main():
            heap = HeapTrimmer.for_this_process()
            heap.after, heap.settle = 1, 0.0
            before = rss_kib()
            heap.closed()
            while heap.trims == 0:
                await asyncio.sleep(0.01)
            print(before, rss_kib())

        asyncio.run(main())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    before, after = (int(x) for x in out.stdout.split())
    assert before - after > 32 * 1024, (before, after)  # tens of MiB given back

"""Small asyncio helpers: a uvloop runner, turning SIGTERM/SIGINT into a stop event, and
taking a stream's transport over (its unread bytes)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop (the asyncio default loop when uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def stop_on_signals(stop: asyncio.Event) -> None:
    """Set ``stop`` on SIGTERM or SIGINT (instead of KeyboardInterrupt in random places)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def take_buffered(reader: asyncio.StreamReader) -> bytes:
    """What the stream has received but nobody has read yet, removed from it: for code
    that takes the transport over with its own protocol. StreamReader has no public call
    for this; its buffer has been ``_buffer`` since Python 3.4."""
    buffer = getattr(reader, "_buffer", None)
    if not buffer:
        return b""
    data = bytes(buffer)
    buffer.clear()
    return data

"""Small asyncio helpers: a uvloop runner, turning SIGTERM/SIGINT into a stop event,
taking a stream's transport over (its unread bytes), and TCP_NODELAY."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
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
    # A process inherits its parent's signal mask: one started with SIGTERM blocked would
    # leave it pending forever and never stop.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})


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


def set_nodelay(conn: asyncio.BaseTransport | asyncio.StreamWriter) -> None:
    """TCP_NODELAY on a TCP connection (a transport or a stream writer): a proxy writes
    each reply as soon as it has it, and Nagle's algorithm would hold small ones back."""
    sock = conn.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

"""Small asyncio helpers: a uvloop runner, turning SIGTERM/SIGINT into a stop event,
stopping a child task without swallowing the caller's own cancellation, taking a
stream's transport over (its unread bytes), and TCP_NODELAY."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

CANCEL_AGAIN_AFTER = 2.0
"""Seconds after which :func:`cancel_and_wait` cancels a child again that runs on."""


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


async def cancel_and_wait(task: asyncio.Future[Any]) -> BaseException | None:
    """Cancel ``task`` and wait until it has ended; its error (None when it ended by its
    cancellation or returned).

    ``task.cancel(); with suppress(CancelledError): await task`` is wrong: when the
    *caller* is cancelled during that wait, its own CancelledError is swallowed too, and
    it goes on as if nothing happened (a root task that never stops, a process that
    outlives SIGTERM). Here the caller's cancellation is raised once the child has ended;
    the child is never left running on its own. A child still running
    :data:`CANCEL_AGAIN_AFTER` seconds after its cancellation is cancelled again: a
    cancellation can be lost (see :func:`cancellation_kept`)."""
    task.cancel()
    interrupted = False
    while not task.done():
        try:
            await asyncio.wait([task], timeout=CANCEL_AGAIN_AFTER)
        except asyncio.CancelledError:
            interrupted = True
        task.cancel()
    if interrupted:
        raise asyncio.CancelledError
    return None if task.cancelled() else task.exception()


async def finished(task: asyncio.Future[Any], limit: float | None = None) -> None:
    """Wait until ``task`` has ended (without raising its error), also when the caller
    is cancelled meanwhile: that cancellation is raised after. For a call that would
    leave half-made state behind if interrupted; run it as a task and await this.
    After ``limit`` seconds the task is cancelled (and waited for)."""
    loop = asyncio.get_running_loop()
    deadline = None if limit is None else loop.time() + limit
    interrupted = False
    while not task.done():
        left = None if deadline is None else deadline - loop.time()
        if left is not None and left <= 0:
            task.cancel()
            left = None
            deadline = None
        try:
            await asyncio.wait([task], timeout=left)
        except asyncio.CancelledError:
            interrupted = True
    if not task.cancelled():
        task.exception()  # retrieved: its caller reads the result, or has no use for it
    if interrupted:
        raise asyncio.CancelledError


@contextlib.contextmanager
def cancellation_kept() -> Iterator[None]:
    """Raise CancelledError at the end of the block when the current task was cancelled
    during it and the cancellation got lost on the way.

    Python 3.11's ``asyncio.wait_for`` returns the inner result when it completes in the
    same loop iteration as the caller's cancellation, and the cancellation is gone
    (fixed in 3.12). nats-py waits for every request's reply that way, so a task
    cancelled while a NATS reply arrives would go on as if never cancelled: a root task
    that never stops, an agent that outlives SIGTERM. The task's ``cancelling()`` count
    still says so; this turns it back into the cancellation it was. (``asyncio.timeout``
    and TaskGroup take back their own cancellations, so they do not trip it.)"""
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    yield
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError


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


def take_over(
    reader: asyncio.StreamReader, transport: asyncio.BaseTransport, protocol: asyncio.BaseProtocol
) -> tuple[bytes, bool]:
    """Give a stream's transport to ``protocol`` (code that reads with callbacks from
    then on): returns what the stream had received that nobody read (removed from it)
    and whether it had seen the end. Both are read before the protocol changes, so no
    byte is both left in the stream and delivered to ``protocol``: the caller handles
    those bytes (and the end) before it resumes reading."""
    buffered = take_buffered(reader)
    at_eof = reader.at_eof()
    transport.set_protocol(protocol)
    return buffered, at_eof


def set_nodelay(conn: asyncio.BaseTransport | asyncio.StreamWriter) -> None:
    """TCP_NODELAY on a TCP connection (a transport or a stream writer): a proxy writes
    each reply as soon as it has it, and Nagle's algorithm would hold small ones back."""
    sock = conn.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

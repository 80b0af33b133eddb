"""One client session: a client stream pair and an upstream stream pair, two pumps.

The client pump reads what the client sends, lets :class:`CommandParser` decide per
command and forwards at once (it never waits for a reply, so pipelines stay pipelines).
The reply pump reads the server, lets :class:`ReplyParser` find reply boundaries and
passes the bytes on. Both wait on the other side's ``drain()`` above the write-buffer
high-water mark, and the client pump also stops reading while ``max_pending`` commands
are unanswered, so memory stays bounded whichever side is slow.

The agent runs one per accepted, authorised connection::

    upstream = await connector.connect()
    session = ProxySession((reader, writer), upstream, hooks=hooks, limits=..., timeouts=...)
    stats = await session.run()     # returns when either side closes, on idle, on error
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from .commands import CommandParser
from .errors import ProtocolError, UpstreamProtocolError
from .hooks import SessionHooks
from .pending import Item, Local
from .replies import ReplyParser
from .settings import ProxyLimits, ProxyTimeouts

logger = logging.getLogger(__name__)

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass(slots=True)
class SessionStats:
    """Counters for ``db.session.end``."""

    commands: int = 0
    """Commands received (forwarded or answered by the engine)."""
    refused: int = 0
    """Commands answered by the engine instead of the server (hook refusals)."""
    replies: int = 0
    """Replies from the server matched to commands."""
    pushes: int = 0
    """Push and pub/sub messages passed to the client."""
    bytes_from_client: int = 0
    bytes_to_client: int = 0
    started: float = field(default_factory=time.time)
    duration: float = 0.0
    reason: str = ""
    """Why the session ended: ``client closed``, ``server closed``, ``idle``,
    ``protocol error: ...``, ``server protocol error: ...``, ``stopped``."""


def set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ProxySession:
    """Proxies one client connection over one upstream connection until either ends."""

    def __init__(
        self,
        client: Streams,
        upstream: Streams,
        *,
        hooks: SessionHooks,
        limits: ProxyLimits | None = None,
        timeouts: ProxyTimeouts | None = None,
        inspect: Iterable[str] = (),
    ) -> None:
        self._limits = limits or ProxyLimits()
        self._timeouts = timeouts or ProxyTimeouts()
        self._client_reader, self._client_writer = client
        self._up_reader, self._up_writer = upstream
        self.stats = SessionStats()
        self._pending: deque[Item] = deque()
        self._progress = asyncio.Event()
        self._close_written = False
        self._closed = False
        self._last = 0.0
        self._client_write = self._client_writer.write
        self._client_transport = self._client_writer.transport
        self._commands = CommandParser(
            hooks=hooks,
            limits=self._limits,
            forward=self._up_writer.write,
            local=self._local,
            pending=self._pending,
            inspect=inspect,
        )
        self._replies = ReplyParser(
            hooks=hooks,
            limits=self._limits,
            write=self._to_client,
            pending=self._pending,
            on_close_reply=self._close_reply_written,
        )

    @property
    def resp3(self) -> bool:
        """The client switched the connection to RESP3 (HELLO 3 succeeded)."""
        return self._replies.resp3

    @property
    def owed(self) -> int:
        """Replies owed to the client right now."""
        return len(self._pending)

    # -- writing to the client -----------------------------------------------------------

    def _to_client(self, data: bytes | memoryview) -> None:
        self.stats.bytes_to_client += len(data)
        self._client_write(data)

    def _local(self, item: Local) -> None:
        """An engine reply: now if nothing is owed before it, else in its turn."""
        if not self._pending and self._replies.at_boundary:
            self._to_client(item.reply)
            if item.close:
                self._close_reply_written()
        else:
            self._pending.append(item)

    def _close_reply_written(self) -> None:
        self._close_written = True
        self._progress.set()

    # -- running -------------------------------------------------------------------------

    async def run(self) -> SessionStats:
        """Proxy until the client or the server closes, the session idles out, or the
        task is cancelled; always closes both connections. Returns the counters."""
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        high = self._limits.write_high_water
        for writer in (self._client_writer, self._up_writer):
            set_nodelay(writer)
            with contextlib.suppress(AttributeError, NotImplementedError):
                writer.transport.set_write_buffer_limits(high=high)
        tasks = [
            asyncio.create_task(self._client_pump(), name="proxy-client"),
            asyncio.create_task(self._reply_pump(), name="proxy-replies"),
        ]
        if self._timeouts.idle is not None:
            tasks.append(asyncio.create_task(self._idle(self._timeouts.idle), name="proxy-idle"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            first = next(t for t in tasks if t in done)
            self.stats.reason = first.result()
        except asyncio.CancelledError:
            self.stats.reason = "stopped"
            raise
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._count()
            self.stats.duration = time.time() - self.stats.started
            await self.aclose()
        return self.stats

    def _count(self) -> None:
        stats, commands, replies = self.stats, self._commands, self._replies
        stats.commands = commands.commands
        stats.refused = commands.refused
        stats.replies = replies.replies
        stats.pushes = replies.pushes

    async def aclose(self) -> None:
        """Close both connections (flushing what is buffered, briefly). Idempotent."""
        if self._closed:
            return
        self._closed = True
        writers = (self._client_writer, self._up_writer)
        for writer in writers:
            writer.close()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._timeouts.close_grace):
                    for writer in writers:
                        with contextlib.suppress(OSError):
                            await writer.wait_closed()
        finally:  # on timeout or cancellation: drop what is still buffered
            for writer in writers:
                writer.transport.abort()

    async def _client_pump(self) -> str:
        read = self._client_reader.read
        size = self._limits.read_size
        feed = self._commands.feed
        stats = self.stats
        up = self._up_writer
        up_transport = up.transport
        high = self._limits.write_high_water
        max_pending = self._limits.max_pending
        pending = self._pending
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await read(size)
            except (ConnectionError, OSError):
                data = b""
            if not data:
                await self._settle()
                return "client closed"
            stats.bytes_from_client += len(data)
            self._last = loop.time()
            try:
                feed(data)
            except ProtocolError as exc:
                self._local(Local(exc.reply, close=True))
                await self._settle()
                return f"protocol error: {exc.detail}"
            if up_transport.get_write_buffer_size() > high:
                await up.drain()
            while len(pending) > max_pending:
                self._progress.clear()
                await self._progress.wait()

    async def _settle(self) -> None:
        """Wait (bounded) for the replies still owed to reach the client."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeouts.close_grace):
                while self._pending and not self._close_written:
                    self._progress.clear()
                    await self._progress.wait()
                if self._client_transport.get_write_buffer_size():
                    await self._client_writer.drain()

    async def _reply_pump(self) -> str:
        read = self._up_reader.read
        size = self._limits.read_size
        replies = self._replies
        feed = replies.feed
        client = self._client_writer
        transport = self._client_transport
        high = self._limits.write_high_water
        progress = self._progress
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await read(size)
            except (ConnectionError, OSError):
                data = b""
            if not data:
                return "server closed"
            self._last = loop.time()
            try:
                feed(data)
            except UpstreamProtocolError as exc:
                logger.warning("closing a session: the server's replies did not parse: %s", exc)
                return f"server protocol error: {exc}"
            progress.set()
            if transport.get_write_buffer_size() > high:
                await client.drain()

    async def _idle(self, idle: float) -> str:
        loop = asyncio.get_running_loop()
        while True:
            remaining = self._last + idle - loop.time()
            if remaining <= 0:
                return "idle"
            await asyncio.sleep(remaining)

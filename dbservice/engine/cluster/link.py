"""One connection from a cluster session to one node, opened on first use.

Commands are written at once (pipelined) and each gets a future for its whole reply,
resolved in order by the link's reader task. While the connection is being opened
(dial, TLS, the login strategy, the session's protocol and name) commands are buffered
and written when it is ready. A link that cannot open, or whose connection ends, fails
every future it still holds with :class:`LinkError`; the session opens a new link the
next time it needs that node.

Commands sent in one turn of the event loop leave in one write. A backlog larger than
:data:`SLICE` (a large value) leaves :data:`SLICE` bytes per turn, and none while the
connection's write buffer is over its high-water mark, so encrypting and sending it
never holds the event loop for long and other sessions run in between; a session stops
reading its client while one of its links holds more than ``write_high_water`` bytes
not yet written (:attr:`Link.congested`, :meth:`Link.drained`).

Pushes (RESP3 ``>`` frames) are not replies: they go to ``on_push``. A link opened for
pub/sub (``pubsub=True``) hands every frame it reads to ``on_push`` instead, since a
subscribed connection's replies are messages and confirmations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, cast

from dbservice.engine.proxy.errors import UpstreamProtocolError
from dbservice.engine.proxy.session import Streams
from dbservice.engine.proxy.settings import ProxyLimits
from fleetgate.aio import cancel_and_wait, take_over

from .pieces import Pieces
from .resp import FrameReader, Payload
from .topology import Address

logger = logging.getLogger(__name__)

Dial = Callable[[Address], Awaitable[Streams]]
"""Connect to a node (the agent applies host aliases and TLS)."""
Prepare = Callable[["Link", Streams], Awaitable[None]]
"""Make a fresh connection the session's (login, protocol, name) before first use."""

SLICE: Final = 256 * 1024
"""Most bytes a link writes in one turn of the event loop when more are queued (TLS
encrypts about 1 MB in 3-4 ms on the reference machine: a slice costs about one)."""


class LinkError(Exception):
    """The link could not open or its connection ended; the message says which node
    and why, and is shown to the client."""


class Waiter:
    """What takes its reply from the link itself instead of through a future (a plain
    forwarded command, :class:`~.entries.Sent`): a call per reply, no future per
    command."""

    __slots__ = ()

    def answer(self, frame: bytes) -> None:
        """The reply arrived."""
        raise NotImplementedError

    def fail(self, error: LinkError) -> None:
        """The link ended before the reply arrived."""
        raise NotImplementedError


class Link:
    def __init__(
        self,
        address: Address,
        *,
        dial: Dial,
        prepare: Prepare,
        limits: ProxyLimits,
        on_push: Callable[[Link, bytes], None] | None = None,
        pubsub: bool = False,
        on_answer: Callable[[], None] | None = None,
    ) -> None:
        self.address = address
        self._on_answer = on_answer
        """Told after a read answered (or the link's end failed) a :class:`Waiter`."""
        self._dial = dial
        self._prepare = prepare
        self._limits = limits
        self._on_push = on_push
        self.pubsub = pubsub
        self._waiters: deque[asyncio.Future[bytes] | Waiter] = deque()
        self._buffer = Pieces()
        """What waits to be written."""
        self._paused = False
        """The connection's write buffer is over its high-water mark."""
        self._drain: asyncio.Future[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._transport: asyncio.WriteTransport | None = None
        self._task: asyncio.Task[None] | None = None
        self.failed: LinkError | None = None
        self.closed = False
        self._flush_scheduled = False
        self.serves: Address | None = None
        """The node this link reaches when ``address`` is the configuration endpoint
        and the endpoint led to a primary (messages then name both)."""
        self.used = 0
        """Writes asked of the link so far (:meth:`quiet_for` compares them)."""
        self._seen = -1
        self._quiet = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        """The event loop, kept at first use: ``asyncio.get_running_loop`` costs a
        system call (``getpid``) per call on Python 3.11, once per command here."""

    @property
    def name(self) -> str:
        own = f"{self.address[0]}:{self.address[1]}"
        if self.serves is None or self.serves == self.address:
            return own
        return f"{self.serves[0]}:{self.serves[1]} (through the configuration endpoint {own})"

    @property
    def ready(self) -> bool:
        return self._writer is not None

    @property
    def owed(self) -> int:
        return len(self._waiters)

    def quiet_for(self, now: float) -> float:
        """Seconds the link has been open with nothing to write, no reply owed and no
        command sent, as far as the calls to this method (at ``now``) could see: 0.0
        the first time, and whenever any of that changed since the last call."""
        if (
            self.used != self._seen
            or self._waiters
            or self._buffer
            or self._writer is None
            or self.failed is not None
            or self.closed
        ):
            self._seen, self._quiet = self.used, now
            return 0.0
        return now - self._quiet

    def start(self, streams: Streams | None = None) -> None:
        """Open the link (or adopt ``streams``, a connection already made ready)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(streams), name=f"cluster-link-{self.name}")

    @property
    def congested(self) -> bool:
        """More than ``write_high_water`` bytes wait to be written."""
        return self._buffer.queued > self._limits.write_high_water

    async def drained(self) -> None:
        """Return once the link is not :attr:`congested` (or has ended)."""
        while self.congested and self.failed is None and not self.closed:
            if self._drain is None:
                self._drain = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drain)

    def _wake_drained(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def send(self, payload: Payload, replies: int = 1) -> list[asyncio.Future[bytes]]:
        """Write ``payload`` (``replies`` commands) now, or once the link is open."""
        if self.failed is not None or self.closed:
            raise self.failed or LinkError(f"node {self.name}: link closed")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(replies)]
        if not self.pubsub:
            self._waiters.extend(futures)
        self._queue(payload)
        return futures

    def send_one(self, payload: Payload) -> asyncio.Future[bytes]:
        """:meth:`send` of one command (the common case, with no list made)."""
        if self.failed is not None or self.closed:
            raise self.failed or LinkError(f"node {self.name}: link closed")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        if not self.pubsub:
            self._waiters.append(future)
        self.used += 1
        if type(payload) is bytes and self._writer is not None:  # the common case
            self._buffer.append(payload)
            self._schedule()
        else:
            self._queue(payload)
        return future

    def send_waiter(self, waiter: Waiter, payload: bytes) -> bool:
        """:meth:`send_one` for a link that is open (:attr:`ready`, not failed or
        closed, not pub/sub) and one command in one piece: ``waiter`` takes the reply.
        Returns :attr:`congested`."""
        self._waiters.append(waiter)
        self.used += 1
        buffer = self._buffer
        buffer.append(payload)
        if not self._flush_scheduled and not self._paused:
            self._schedule()
        return buffer.queued > self._limits.write_high_water

    def write(self, payload: Payload) -> None:
        """Write without expecting replies (a pub/sub link's commands)."""
        self._queue(payload)

    def _queue(self, payload: Payload) -> None:
        """Commands sent in one turn of the event loop leave in one write."""
        self.used += 1
        if isinstance(payload, bytes):
            self._buffer.append(payload)
        else:
            self._buffer.extend(payload)
        if self._writer is None:
            self.start()
        else:
            self._schedule()

    def _schedule(self) -> None:
        if not self._flush_scheduled and not self._paused:
            self._flush_scheduled = True
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport, buffer = self._transport, self._buffer
        if transport is None or self._paused or not buffer:
            return
        transport.write(buffer.take(SLICE))  # all of it, or SLICE now and the rest later
        if buffer:
            self._schedule()
        if self._drain is not None and not self.congested:
            self._wake_drained()

    def hold_reading(self, held: bool) -> None:
        """Stop reading the node's replies (``held``), or go on: the session's client
        does not take what it was sent, so the node keeps the rest meanwhile."""
        transport = self._transport
        if transport is not None:
            with contextlib.suppress(AttributeError, RuntimeError):
                reading = cast(asyncio.ReadTransport, transport)
                if held:
                    reading.pause_reading()
                else:
                    reading.resume_reading()

    def _pause(self) -> None:
        self._paused = True

    def _resume(self) -> None:
        self._paused = False
        if self._buffer:
            self._schedule()

    async def call(self, payload: Payload) -> bytes:
        """One command, its reply (for the session's own bookkeeping commands)."""
        (future,) = self.send(payload)
        return await future

    async def _run(self, adopted: Streams | None) -> None:
        streams: Streams | None = adopted
        try:
            try:
                if streams is None:
                    streams = await self._dial(self.address)
                    await self._prepare(self, streams)
            except (OSError, TimeoutError, ValueError) as exc:
                raise LinkError(f"cannot reach node {self.name}: {_reason(exc)}") from None
            reader, writer = streams
            self._writer = writer
            await self._read(reader)
        except LinkError as exc:
            self._fail(exc)
        except (OSError, asyncio.IncompleteReadError) as exc:
            self._fail(LinkError(f"connection to node {self.name} lost: {_reason(exc)}"))
        except UpstreamProtocolError as exc:
            self._fail(LinkError(f"node {self.name} sent a reply that did not parse: {exc}"))
        except asyncio.CancelledError:
            self._fail(LinkError(f"node {self.name}: link closed"))
            raise
        except Exception as exc:
            logger.exception("cluster link to %s failed", self.name)
            self._fail(LinkError(f"node {self.name}: internal error {exc!r}"))
        finally:
            if streams is not None:
                streams[1].transport.abort()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        """Read replies until the connection ends: the link takes the transport over
        with its own protocol, so each read goes from the event loop straight into the
        frame reader and the futures, with no task to wake."""
        assert self._writer is not None
        transport = self._writer.transport
        protocol = _Replies(FrameReader(self._limits), self._frames, self._pause, self._resume)
        buffered, at_eof = take_over(reader, transport, protocol)
        self._transport = transport
        self._flush()  # what was sent while the connection was being opened
        if buffered:
            protocol.data_received(buffered)
        if at_eof:
            raise asyncio.IncompleteReadError(b"", None)
        with contextlib.suppress(AttributeError, RuntimeError):
            cast(asyncio.ReadTransport, transport).resume_reading()
        await protocol.ended

    def _frames(self, frames: list[bytes]) -> None:
        waiters = self._waiters
        answered = False
        try:
            for frame in frames:
                if self.pubsub or frame[0] == 62:  # '>'
                    if self._on_push is not None:
                        self._on_push(self, frame)
                    continue
                if not waiters:
                    raise UpstreamProtocolError("a reply nobody asked for")
                waiter = waiters.popleft()
                if isinstance(waiter, Waiter):
                    waiter.answer(frame)
                    answered = True
                elif not waiter.done():
                    waiter.set_result(frame)
        finally:
            if answered and self._on_answer is not None:
                self._on_answer()

    def _fail(self, error: LinkError) -> None:
        if self.failed is None:
            self.failed = error
        self._writer = self._transport = None
        self._buffer.clear()
        self._wake_drained()
        answered = False
        while self._waiters:
            future = self._waiters.popleft()
            if isinstance(future, Waiter):
                future.fail(error)
                answered = True
            elif not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: nobody may be waiting any more
        if answered and self._on_answer is not None:
            self._on_answer()
        if self.pubsub and self._on_push is not None and not self.closed:
            self._on_push(self, b"")

    async def aclose(self) -> None:
        self.closed = True
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        self._fail(LinkError(f"node {self.name}: link closed"))


class _Replies(asyncio.Protocol):
    """The link's protocol once its connection is ready: bytes in, futures resolved
    (``received`` takes the whole frames; ``pause``/``resume`` follow the write buffer)."""

    def __init__(
        self,
        frames: FrameReader,
        received: Callable[[list[bytes]], None],
        pause: Callable[[], None],
        resume: Callable[[], None],
    ) -> None:
        self.feed = frames.feed
        self.received = received
        self.pause_writing = pause  # type: ignore[method-assign]
        self.resume_writing = resume  # type: ignore[method-assign]
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        try:
            self.received(self.feed(data))
        except Exception as exc:
            self._end(exc)

    def eof_received(self) -> bool:
        self._end(asyncio.IncompleteReadError(b"", None))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc or asyncio.IncompleteReadError(b"", None))

    def _end(self, exc: BaseException) -> None:
        if not self.ended.done():
            self.ended.set_exception(exc)
            self.ended.exception()  # retrieved, even when the link stopped waiting


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the server closed the connection"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__

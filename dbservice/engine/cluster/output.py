"""What a cluster session writes to its client, in order: replies and pushes.

Bytes that fit in a :data:`~.link.SLICE` leave at once, in one write, when nothing is
waiting before them (the common case: small replies, pipelined or not). A large reply,
and whatever comes after it until it is out, is written a slice per turn of the event
loop, and none while the client's connection is over its high-water mark (the
transport's ``pause_writing`` until ``resume_writing``, through ``drain``): encrypting
and sending it never holds the event loop for long, so other sessions run in between,
and a client that reads slowly holds up the session's writer (:meth:`ClientOutput.drained`)
instead of the agent buffering all of it in the connection.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .link import SLICE


class ClientOutput:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pieces: deque[bytes] = deque()
        self._offset = 0
        """Bytes of the first piece already written."""
        self._queued = 0
        """Bytes in ``_pieces`` not yet written."""
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._wanted = 0
        """``drained`` waits for no more than this many bytes to wait."""
        self.error: OSError | None = None
        """Why the connection took no more (the rest was dropped)."""

    @property
    def queued(self) -> int:
        """Bytes waiting to be handed to the connection."""
        return self._queued

    def write(self, data: bytes) -> None:
        if self.error is not None:
            return
        if not self._pieces and len(data) <= SLICE:
            self._writer.write(data)
            return
        self._pieces.append(data)
        self._queued += len(data)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._pump(), name="cluster-session-output"
            )

    async def drained(self, limit: int = 0) -> None:
        """Return once at most ``limit`` bytes wait; raises when the connection failed."""
        while self._queued > limit and self.error is None:
            self._wanted = limit
            if self._waiter is None:
                self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._waiter)
        if self.error is not None:
            raise ConnectionResetError(str(self.error) or "the client connection failed")

    async def _pump(self) -> None:
        writer = self._writer
        try:
            while self._pieces:
                writer.write(self._take())
                if self._queued <= self._wanted:
                    self._wake()
                await writer.drain()  # nothing more while the connection is over its mark
                await asyncio.sleep(0)  # other sessions run between two slices
        except OSError as exc:  # ConnectionResetError and the like: the client is gone
            self.error = exc
            self._pieces.clear()
            self._queued = self._offset = 0
        finally:
            self._task = None
            self._wake()

    def _take(self) -> bytes | memoryview:
        """The next :data:`SLICE` bytes (or fewer, when fewer wait)."""
        pieces = self._pieces
        parts: list[bytes | memoryview] = []
        budget = SLICE
        while pieces and budget:
            piece, offset = pieces[0], self._offset
            left = len(piece) - offset
            if left <= budget:
                parts.append(memoryview(piece)[offset:] if offset else piece)
                pieces.popleft()
                self._offset = 0
                budget -= left
            else:
                parts.append(memoryview(piece)[offset : offset + budget])
                self._offset = offset + budget
                budget = 0
        self._queued -= SLICE - budget
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def aclose(self) -> None:
        """Stop writing (the session has ended); what waits is dropped."""
        task = self._task
        self._pieces.clear()
        self._queued = self._offset = 0
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._wake()

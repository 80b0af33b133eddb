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

from .link import SLICE
from .pieces import Pieces


class ClientOutput:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pieces = Pieces()
        """What waits to be handed to the connection."""
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._wanted = 0
        """``drained`` waits for no more than this many bytes to wait."""
        self.error: OSError | None = None
        """Why the connection took no more (the rest was dropped)."""

    @property
    def queued(self) -> int:
        """Bytes waiting to be handed to the connection."""
        return self._pieces.queued

    def write(self, data: bytes) -> None:
        if self.error is not None:
            return
        if not self._pieces and len(data) <= SLICE:
            self._writer.write(data)
            return
        self._pieces.append(data)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._pump(), name="cluster-session-output"
            )

    async def drained(self, limit: int = 0) -> None:
        """Return once at most ``limit`` bytes wait; raises when the connection failed."""
        while self._pieces.queued > limit and self.error is None:
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
                writer.write(self._pieces.take(SLICE))
                if self._pieces.queued <= self._wanted:
                    self._wake()
                await writer.drain()  # nothing more while the connection is over its mark
                await asyncio.sleep(0)  # other sessions run between two slices
        except OSError as exc:  # ConnectionResetError and the like: the client is gone
            self.error = exc
            self._pieces.clear()
        finally:
            self._task = None
            self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def aclose(self) -> None:
        """Stop writing (the session has ended); what waits is dropped."""
        task = self._task
        self._pieces.clear()
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._wake()

"""Bytes waiting to be written, in the pieces they came in, taken at most a slice at a
time: how the cluster engine sends a large value or reply without one write (and one
encryption) of it all holding the event loop. Used by a shard link and by the output
to the client."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class Pieces:
    """A queue of byte pieces; :meth:`take` gives up to ``limit`` bytes from its front
    (a memoryview into a piece it cuts, so nothing large is copied whole)."""

    def __init__(self) -> None:
        self._pieces: deque[bytes] = deque()
        self._offset = 0
        """Bytes of the first piece already taken."""
        self.queued = 0
        """Bytes not yet taken."""

    def __bool__(self) -> bool:
        return bool(self._pieces)

    def append(self, piece: bytes) -> None:
        self._pieces.append(piece)
        self.queued += len(piece)

    def extend(self, pieces: Iterable[bytes]) -> None:
        for piece in pieces:
            self.append(piece)

    def clear(self) -> None:
        self._pieces.clear()
        self.queued = self._offset = 0

    def take(self, limit: int) -> bytes | memoryview:
        """Up to ``limit`` bytes from the front, in order (all of them joined once when
        they fit and none was cut before: the common case)."""
        pieces = self._pieces
        if self.queued <= limit and not self._offset:
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            self.clear()
            return data
        parts: list[bytes | memoryview] = []
        budget = limit
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
        self.queued -= limit - budget
        return parts[0] if len(parts) == 1 else b"".join(parts)

"""A client command's place in the reply order, and the requests it sent to nodes.

The reader plans each command into an :class:`Entry` and queues it; the writer takes
the entries in the client's order and awaits :meth:`Entry.resolve` of each for the
reply to write. An entry answered here (:class:`Local`), one request to one node
(:class:`Forward`), or several requests merged into one reply (:class:`Fan`);
transactions and pub/sub have their own (``transactions.Transaction``,
``pubsub.PubSubEntry``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

from .link import LinkError, Waiter
from .redirects import complete
from .resp import Payload, encode_payload
from .topology import Address

if TYPE_CHECKING:
    from .session import ClusterSession


class Request:
    """One command to one node; ``future`` is its reply."""

    __slots__ = ("address", "args", "future", "payload", "slot")

    def __init__(
        self,
        args: Sequence[bytes],
        slot: int | None,
        address: Address,
        payload: Payload | None = None,
    ) -> None:
        self.args = args
        self.payload = payload or encode_payload(args)
        self.slot = slot
        self.address = address
        self.future: asyncio.Future[bytes] | None = None


class Entry:
    """One client command's place in the reply order."""

    __slots__ = ("close", "counted", "name")

    holds: ClassVar[bool] = False
    """The reader plans nothing after this entry until it is answered: how the next
    command is answered depends on this one's reply (a RESP2 subscribe)."""

    def __init__(self, name: str, *, counted: bool = True, close: bool = False) -> None:
        self.name = name
        self.counted = counted
        self.close = close

    async def resolve(self, session: ClusterSession) -> bytes:
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether :meth:`resolve` can answer without waiting (for sure)."""
        return False


class Local(Entry):
    __slots__ = ("reply",)

    def __init__(self, name: str, reply: bytes, *, counted: bool = True, close: bool = False):
        super().__init__(name, counted=counted, close=close)
        self.reply = reply

    async def resolve(self, session: ClusterSession) -> bytes:
        return self.reply

    def ready(self) -> bool:
        return True


class Forward(Entry):
    __slots__ = ("after", "request")

    def __init__(
        self, name: str, request: Request, after: Callable[[bytes], bytes] | None = None
    ) -> None:
        self.name, self.counted, self.close = name, True, False  # Entry's, made per command
        self.request = request
        self.after = after

    async def resolve(self, session: ClusterSession) -> bytes:
        frame = await complete(session, self.request)
        return self.after(frame) if self.after is not None else frame

    def ready(self) -> bool:
        future = self.request.future
        return future is not None and future.done()


class Sent(Entry, Waiter):
    """The common case of :class:`Forward`, made cheap: one client command sent as it
    came (``payload``) to its slot's owner over a link already open. The link hands it
    its reply (or its error) itself, with no future per command and no
    :class:`Request`: the writer asks for a future (:meth:`waiter`) only for the entry
    it must wait for, and a reply that is not a plain one (an error, perhaps a
    redirect) goes through :meth:`resolve` as a :class:`Forward`'s does."""

    __slots__ = ("address", "args", "error", "future", "payload", "reply", "slot")

    def __init__(
        self, name: str, args: Sequence[bytes], slot: int, address: Address, payload: bytes
    ) -> None:
        self.name, self.counted, self.close = name, True, False  # Entry's, made per command
        self.args = args
        self.slot = slot
        self.address = address
        self.payload = payload
        self.reply: bytes | None = None
        """The node's reply, once the link has it."""
        self.error: LinkError | None = None
        """Why the link could not give one (a :class:`~.link.LinkError`)."""
        self.future: asyncio.Future[bytes] | None = None
        """Made by :meth:`waiter` only; the link resolves it too."""

    def answer(self, frame: bytes) -> None:
        """The link's: the reply arrived."""
        self.reply = frame
        future = self.future
        if future is not None and not future.done():
            future.set_result(frame)

    def fail(self, error: LinkError) -> None:
        """The link's: it ended before the reply arrived."""
        if self.reply is None and self.error is None:
            self.error = error
            future = self.future
            if future is not None and not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: nobody may be waiting any more

    def waiter(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[bytes]:
        """A future of the reply (resolved already when it is here)."""
        future = self.future
        if future is None:
            future = self.future = loop.create_future()
            if self.reply is not None:
                future.set_result(self.reply)
            elif self.error is not None:
                future.set_exception(self.error)
                future.exception()
        return future

    async def resolve(self, session: ClusterSession) -> bytes:
        request = Request(self.args, self.slot, self.address, self.payload)
        request.future = self.waiter(asyncio.get_running_loop())
        return await complete(session, request)

    def ready(self) -> bool:
        return self.reply is not None or self.error is not None


class Fan(Entry):
    __slots__ = ("merge", "requests")

    def __init__(
        self, name: str, requests: list[Request], merge: Callable[[list[bytes]], bytes]
    ) -> None:
        super().__init__(name)
        self.requests = requests
        self.merge = merge

    async def resolve(self, session: ClusterSession) -> bytes:
        frames = [await complete(session, request) for request in self.requests]
        return self.merge(frames)


END = Local("", b"", counted=False, close=True)
"""The client is done: the writer stops after the replies before it."""


def chain(
    first: Callable[[bytes], bytes] | None, then: Callable[[bytes], bytes]
) -> Callable[[bytes], bytes]:
    if first is None:
        return then
    return lambda frame: then(first(frame))


def retrieve(future: asyncio.Future[bytes]) -> None:
    """A done-callback for a reply nobody reads (its error is not "never retrieved")."""
    if not future.cancelled():
        future.exception()

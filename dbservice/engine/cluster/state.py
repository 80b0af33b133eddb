"""What every session of one cluster database shares: its topology and its command
table, learned through a session's own (logged-in) connection and refreshed on demand.

A refresh asked for while one is running waits for that one instead of starting
another, so a burst of ``MOVED`` replies costs one ``CLUSTER SHARDS``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .keyspecs import CommandTable
from .link import Link
from .resp import decode, encode_command, error_of
from .topology import Topology, TopologyError, from_shards, from_slots

logger = logging.getLogger(__name__)

_SHARDS = encode_command([b"CLUSTER", b"SHARDS"])
_SLOTS = encode_command([b"CLUSTER", b"SLOTS"])
_COMMAND = encode_command([b"COMMAND"])


class ClusterState:
    def __init__(self, name: str = "") -> None:
        self.name = name
        self.topology: Topology | None = None
        self.table: CommandTable | None = None
        self.refreshed = 0.0
        """``time.monotonic()`` of the last refresh."""
        self.refreshes = 0
        self.redirects: dict[str, int] = {"MOVED": 0, "ASK": 0, "TRYAGAIN": 0, "CLUSTERDOWN": 0}
        """Redirects and retries followed by every session (for operators and tests)."""
        self._running: asyncio.Future[Topology] | None = None
        self._no_shards = False

    async def ensure(self, link: Link) -> tuple[Topology, CommandTable]:
        """The topology and the command table, loading what is missing through ``link``."""
        topology = self.topology or await self.refresh(link)
        if self.table is None:
            frame = await link.call(_COMMAND)
            if (err := error_of(frame)) is not None:
                raise TopologyError(f"COMMAND: {err.decode('utf-8', 'replace')}")
            self.table = CommandTable.from_reply(decode(frame))
        return topology, self.table

    async def refresh(self, link: Link) -> Topology:
        """Ask the cluster again (one request at a time for all sessions)."""
        if self._running is not None:
            return await asyncio.shield(self._running)
        future: asyncio.Future[Topology] = asyncio.get_running_loop().create_future()
        self._running = future
        try:
            topology = await self._load(link)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()
            raise
        else:
            future.set_result(topology)
            self.topology, self.refreshed = topology, time.monotonic()
            self.refreshes += 1
            logger.debug("cluster %s: %r", self.name, topology)
            return topology
        finally:
            self._running = None

    async def _load(self, link: Link) -> Topology:
        if not self._no_shards:
            frame = await link.call(_SHARDS)
            err = error_of(frame)
            if err is None:
                return from_shards(decode(frame))
            if b"unknown subcommand" not in err.lower() and not err.startswith(b"ERR unknown"):
                raise TopologyError(f"CLUSTER SHARDS: {err.decode('utf-8', 'replace')}")
            self._no_shards = True
        frame = await link.call(_SLOTS)
        if (err := error_of(frame)) is not None:
            raise TopologyError(f"CLUSTER SLOTS: {err.decode('utf-8', 'replace')}")
        return from_slots(decode(frame))

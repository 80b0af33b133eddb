"""Heartbeats: one record per served database in ``fleetgate_db_servers``, written with
the configured TTL, so a killed agent's records expire on their own."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from bus import Bus
from bus.client import FAILURES
from bus.schemas import DatabaseResource, utcnow
from bus.servers import DbServerHeartbeat, TargetHealth
from bus.watch import describe

logger = logging.getLogger(__name__)

WRITE_ERRORS = FAILURES
"""What a write may fail with while NATS is away; the caller retries."""


@dataclass(frozen=True)
class AgentIdentity:
    host_id: str
    hostname: str
    version: str
    addr: str


class Announcer:
    """Writes and deletes this agent's heartbeats; at most ``concurrency`` writes in
    flight, each bounded by ``write_timeout``."""

    def __init__(
        self,
        *,
        bus: Bus,
        identity: AgentIdentity,
        ttl: float,
        write_timeout: float = 5.0,
        concurrency: int = 64,
    ) -> None:
        self.bus = bus
        self.identity = identity
        self.ttl = ttl
        self.write_timeout = write_timeout
        self._slots = asyncio.Semaphore(concurrency)
        self.writes = 0
        self.failures = 0
        self.last_write: float | None = None
        """``time.monotonic()`` of the last heartbeat written (the metrics' heartbeat age)."""
        self._failing = False
        self.cert_status: Callable[[], tuple[datetime | None, str]] | None = None
        """The agent's certificate expiry and last renewal error (agents that joined)."""

    @property
    def connected(self) -> bool:
        return bool(self.bus.nc.is_connected)

    def record(self, database: DatabaseResource, health: TargetHealth) -> DbServerHeartbeat:
        me = self.identity
        cert_expires, cert_error = self.cert_status() if self.cert_status else (None, "")
        return DbServerHeartbeat(
            host_id=me.host_id,
            hostname=me.hostname,
            version=me.version,
            addr=me.addr,
            database=database,
            target_health=health,
            expires=utcnow() + timedelta(seconds=self.ttl),
            cert_expires=cert_expires,
            cert_error=cert_error,
        )

    async def put(self, database: DatabaseResource, health: TargetHealth) -> bool:
        """Write one heartbeat; False (logged) when the bus is not reachable."""
        try:
            async with self._slots, asyncio.timeout(self.write_timeout):
                await self.bus.put_db_server(self.record(database, health), self.ttl)
        except WRITE_ERRORS as exc:
            self.failures += 1
            if not self._failing:  # once per outage, not once per database and retry
                self._failing = True
                logger.warning(
                    "heartbeats are not being written (%s, first for %s); retrying every second",
                    describe(exc),
                    database.name,
                )
            else:
                logger.debug("heartbeat for %s not written: %s", database.name, describe(exc))
            return False
        self.writes += 1
        self.last_write = time.monotonic()
        if self._failing:
            self._failing = False
            logger.info("heartbeats are written again (%d failed writes so far)", self.failures)
        return True

    async def delete(self, name: str) -> bool:
        """Remove this agent's heartbeat for ``name`` now; False (logged) on failure,
        in which case it expires with its TTL."""
        try:
            async with self._slots, asyncio.timeout(self.write_timeout):
                await self.bus.delete_db_server(name, self.identity.host_id)
        except WRITE_ERRORS as exc:
            logger.warning(
                "heartbeat for %s not deleted (%s); it expires within %gs",
                name,
                describe(exc),
                self.ttl,
            )
            return False
        return True

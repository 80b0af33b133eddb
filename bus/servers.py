"""Agent heartbeats (bucket ``fleetgate_db_servers``): one record per (database, agent).

Each record is written with a per-message TTL (the agent's ``heartbeat.ttl``), so a
killed agent's records expire on their own; a stopping agent deletes them at once.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from bus.schemas import SCHEMA_VERSION, DatabaseResource, Record

HealthStatus = Literal["unknown", "healthy", "unhealthy"]

HEALTH_ORDER: dict[str, int] = {"healthy": 0, "unknown": 1, "unhealthy": 2}
"""Healthy agents first, then unknown, then unhealthy (which are still worth a try)."""


class TargetHealth(Record):
    """Whether an agent can reach a database, as its health checks last decided."""

    status: HealthStatus = "unknown"
    message: str = ""
    """``"initialized"``, ``"2 health checks passed"``, ``"1 health check failed"`` ..."""
    error: str = ""
    """The last probe's error (kept after recovery until the next failure)."""
    address: str = ""
    """What was probed, ``host:port`` (after host aliases)."""
    protocol: str = ""
    """What the probe spoke: ``TCP+RESP`` or ``TCP+TLS+RESP``."""
    transition_time: datetime | None = None
    """When ``status`` last changed."""
    checked_at: datetime | None = None
    """When the last probe finished."""


class DbServerHeartbeat(Record):
    """One agent serving one database."""

    schema_version: int = SCHEMA_VERSION
    kind: Literal["db_server"] = "db_server"
    host_id: str
    hostname: str
    version: str
    addr: str
    """Where clients reach the agent (``advertise_addr``)."""
    database: DatabaseResource
    """The database as served: labels, endpoint, and the assume-role that applies."""
    target_health: TargetHealth = TargetHealth()
    expires: datetime | None = None
    """When this record expires unless renewed."""
    cert_expires: datetime | None = None
    """When the agent's own certificate expires (agents that joined; else unset)."""
    cert_error: str = ""
    """Why the last renewal of that certificate failed (empty once one succeeds)."""

    @property
    def name(self) -> str:
        return self.database.name


def health_rank(server: DbServerHeartbeat) -> tuple[int, str, str]:
    """Sort key: healthy first, then by hostname and host_id."""
    return (HEALTH_ORDER.get(server.target_health.status, 1), server.hostname, server.host_id)

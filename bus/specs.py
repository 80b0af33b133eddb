"""How a KV bucket is provisioned: a plain record, importable without NATS."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BucketSpec:
    """How a KV bucket is provisioned."""

    name: str
    description: str
    history: int = 1
    ttl: float | None = None
    marker_ttl: float | None = None
    """Keep markers of expired keys this long, so watchers see expiries (per-message
    TTLs, :meth:`Bus.put_expiring`, need nats-server 2.11+)."""

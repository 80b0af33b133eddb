"""The contract between fleetgate's processes: records, names, and one client over NATS.

The names below load on first use, so that importing a record type (``bus.schemas``,
``bus.access``) or this package does not load nats-py; only what touches NATS does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bus import subjects
    from bus.client import Bus
    from bus.errors import BusError, BusUnavailable, RegistryError
    from bus.labels import matches, parse_label_filter
    from bus.schemas import (
        SCHEMA_VERSION,
        AWSSpec,
        DatabaseResource,
        DatabaseSpec,
        DiscoveryOrigin,
        FetcherStatus,
        MemoryDBSpec,
        Metadata,
        TLSSettings,
    )
    from bus.servers import DbServerHeartbeat, TargetHealth
    from bus.specs import BUCKETS, BucketSpec
    from bus.watch import Event

_WHERE = {
    "subjects": "bus.subjects",
    "BUCKETS": "bus.specs",
    "BucketSpec": "bus.specs",
    "Bus": "bus.client",
    "BusError": "bus.errors",
    "BusUnavailable": "bus.errors",
    "RegistryError": "bus.errors",
    "matches": "bus.labels",
    "parse_label_filter": "bus.labels",
    "SCHEMA_VERSION": "bus.schemas",
    "AWSSpec": "bus.schemas",
    "DatabaseResource": "bus.schemas",
    "DatabaseSpec": "bus.schemas",
    "DiscoveryOrigin": "bus.schemas",
    "FetcherStatus": "bus.schemas",
    "MemoryDBSpec": "bus.schemas",
    "Metadata": "bus.schemas",
    "TLSSettings": "bus.schemas",
    "DbServerHeartbeat": "bus.servers",
    "TargetHealth": "bus.servers",
    "Event": "bus.watch",
}

__all__ = [
    "BUCKETS",
    "SCHEMA_VERSION",
    "AWSSpec",
    "BucketSpec",
    "Bus",
    "BusError",
    "BusUnavailable",
    "DatabaseResource",
    "DatabaseSpec",
    "DbServerHeartbeat",
    "DiscoveryOrigin",
    "Event",
    "FetcherStatus",
    "MemoryDBSpec",
    "Metadata",
    "RegistryError",
    "TLSSettings",
    "TargetHealth",
    "matches",
    "parse_label_filter",
    "subjects",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'bus' has no attribute {name!r}")
    module = importlib.import_module(where)
    value = module if where == f"bus.{name}" else getattr(module, name)
    globals()[name] = value
    return value

"""The contract between fleetgate's processes: records, names, and one client over NATS."""

from bus import subjects
from bus.client import BUCKETS, BucketSpec, Bus
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
from bus.watch import Event

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

"""The records of the bus: pydantic v2 models, frozen, unknown fields ignored.

Older readers survive newer writers: every model ignores fields it does not know, and
records carry ``schema_version`` so a reader can tell it is behind. New fields are
always optional with a default.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
"""The version this code writes. Readers accept any version and ignore unknown fields."""


class Record(BaseModel):
    """Base of every bus record: immutable, forward-compatible."""

    model_config = ConfigDict(frozen=True, extra="ignore")


TLSMode = Literal["verify-full", "verify-ca", "insecure", "disabled"]


class TLSSettings(Record):
    """How an agent speaks TLS to the database."""

    mode: TLSMode = "verify-full"
    """verify-full checks chain and name; verify-ca the chain only; insecure nothing."""
    ca_cert: str | None = None
    """Extra PEM CA bundle trusted for this database, besides the system and Amazon roots."""
    server_name: str | None = None
    """Name to verify (and send as SNI) instead of the host of ``uri``."""


class MemoryDBSpec(Record):
    """What discovery learned about a MemoryDB cluster."""

    cluster_name: str
    acl_name: str = ""
    tls_enabled: bool = True
    endpoint_type: Literal["cluster", "node"] = "cluster"
    arn: str = ""
    engine: str = "redis"
    engine_version: str = ""
    iam_users: tuple[str, ...] | None = None
    """Users of the cluster's ACL whose authentication type is ``iam``; None if unknown."""


class AWSSpec(Record):
    """Where the database lives in AWS, and how to reach its APIs."""

    region: str
    account_id: str
    assume_role_arn: str | None = None
    external_id: str | None = None
    memorydb: MemoryDBSpec | None = None


class DatabaseSpec(Record):
    """How to reach the database."""

    protocol: Literal["redis"] = "redis"
    uri: str
    """``host:port`` of the endpoint (for MemoryDB the cluster configuration endpoint)."""
    tls: TLSSettings = TLSSettings()
    aws: AWSSpec | None = None


class Metadata(Record):
    """Name, description and labels of a resource."""

    name: str
    description: str = ""
    labels: dict[str, str] = Field(default_factory=dict)


class DiscoveryOrigin(Record):
    """Which discovery fetcher owns a resource: only it may update or delete it."""

    group: str = ""
    fetcher_id: str
    """Stable id of (matcher, type, region, account); see discovery.matchers."""


class DatabaseResource(Record):
    """A database in the registry (bucket ``fleetgate_databases``, key = name)."""

    schema_version: int = SCHEMA_VERSION
    kind: Literal["db"] = "db"
    metadata: Metadata
    spec: DatabaseSpec
    origin: DiscoveryOrigin | None = None

    @property
    def name(self) -> str:
        return self.metadata.name


class FetcherStatus(Record):
    """The outcome of one discovery fetcher's last poll (bucket ``fleetgate_discovery``)."""

    schema_version: int = SCHEMA_VERSION
    group: str = ""
    fetcher: str
    """Status key: type, region and matcher (see discovery.matchers.FetcherKey)."""
    fetcher_id: str = ""
    """Owner id of the fetcher's resources; empty while its account is unknown."""
    matcher: int
    """Index of the matcher in the discovery config."""
    type: str
    region: str
    account_id: str
    assume_role_arn: str | None = None
    state: Literal["ok", "partial", "failed"]
    """ok: every call succeeded; partial: some clusters kept as last known;
    failed: nothing this fetcher owns was changed."""
    error: str = ""
    clusters_seen: int = 0
    databases: int = 0
    last_attempt: datetime
    last_success: datetime | None = None
    replica: str = ""
    """The discovery replica that polled the fetcher (host, pid and a random part)."""


class DiscoveryLease(Record):
    """Which discovery replica polls a fetcher (bucket ``fleetgate_discovery_leases``,
    keyed like the fetcher's status). Taken and renewed by compare-and-set; another
    replica may take it over once its revision has not changed for ``period`` seconds
    by that replica's own clock (no wall clocks are compared)."""

    schema_version: int = SCHEMA_VERSION
    holder: str
    """The replica holding it: ``<host>-<pid>-<random>``."""
    period: float
    """Seconds the holder may go without renewing before another replica takes over."""
    acquired: datetime
    renewed: datetime
    config: str = ""
    """A digest of the fetchers the holder's config has: replicas of one group should
    share it (they differ only during a rolling change of the config)."""


def utcnow() -> datetime:
    """The current time, timezone-aware."""
    return datetime.now(UTC)

"""How every KV bucket of the bus is provisioned: one static registry, importable without
NATS.

Whichever call opens a bucket first creates it (:meth:`bus.client.Bus.bucket`), always
with the spec below, so its history and expiry never depend on which process or command
came first. :data:`BUCKETS` is the subset every process provisions at start; the others
are created by the processes that write them (access buckets by admins and the auth
service, compare-and-set buckets by agents, discovery and the auth service), so a process that
never touches them needs no permission for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from bus import subjects

REPLICA_COUNTS: Final = (1, 3, 5)
"""The replica counts JetStream offers for a stream (a Raft group needs an odd size)."""


@dataclass(frozen=True)
class Replication:
    """How many copies of each bucket and of the audit stream JetStream keeps, and where
    (a cluster's name and server tags, for a super-cluster or tagged servers). R1, no
    placement: one server (the sandbox, a small fleet); the hub cluster runs R3."""

    replicas: int = 1
    cluster: str | None = None
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.replicas not in REPLICA_COUNTS:
            raise ValueError(f"replicas must be 1, 3 or 5, not {self.replicas}")

    @property
    def placed(self) -> bool:
        return self.cluster is not None or bool(self.tags)

    def describe(self) -> str:
        """``3 replicas in cluster hub, on servers tagged ssd``."""
        return describe_replication(self.replicas, self.cluster, self.tags)

    def matches(self, replicas: int, cluster: str | None, tags: Sequence[str]) -> bool:
        """Whether a stream with these settings is placed as this asks."""
        return (replicas, cluster, sorted(tags)) == (self.replicas, self.cluster, sorted(self.tags))

    def edit_flags(self) -> str:
        """The ``nats stream edit`` flags that give a stream this replication."""
        flags = f"--replicas {self.replicas}"
        if self.cluster is not None:
            flags += f" --cluster {self.cluster}"
        return flags + "".join(f" --tag {tag}" for tag in self.tags)


def describe_replication(replicas: int, cluster: str | None, tags: Sequence[str]) -> str:
    """How an existing stream is replicated and placed, in words."""
    text = f"{replicas} replica{'s' if replicas != 1 else ''}"
    if cluster is not None:
        text += f" in cluster {cluster}"
    if tags:
        text += f", on servers tagged {', '.join(tags)}"
    return text


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


TOTP_KEEP: Final = 3600.0
"""How long a user's last accepted one-time-code step is kept (far longer than a code is
valid; see :mod:`bus.totp`)."""

LOGIN_FAILURES_KEEP: Final = 86400.0
"""How long a user's failed logins are kept after the last one: the longest rate-limit
window (see :mod:`bus.login_failures`)."""

AWS_SIGNATURES_KEEP: Final = 1800.0
"""How long a used AWS signature is remembered: STS refuses a signature more than 15
minutes from its date either way, so after 30 minutes none can be used again anyway."""

# -- provisioned by every process -----------------------------------------------------

DATABASES: Final = BucketSpec(
    subjects.DATABASES_BUCKET, "fleetgate database resources (written by discovery)"
)
DISCOVERY_STATUS: Final = BucketSpec(
    subjects.DISCOVERY_STATUS_BUCKET, "fleetgate discovery fetcher status"
)
DB_SERVERS: Final = BucketSpec(
    subjects.DB_SERVERS_BUCKET,
    "fleetgate agent heartbeats (written by agents, each with its own TTL)",
    marker_ttl=60.0,
)

# -- access (bus.access): users, roles and the fleet CA --------------------------------

AUTH: Final = BucketSpec(subjects.AUTH_BUCKET, "fleetgate fleet CA certificate (never keys)")
ROLES: Final = BucketSpec(subjects.ROLES_BUCKET, "fleetgate roles", history=5)
USERS: Final = BucketSpec(subjects.USERS_BUCKET, "fleetgate users and password hashes", history=5)
AWS_RULES: Final = BucketSpec(
    subjects.AWS_RULES_BUCKET, "fleetgate AWS identities that may log in (users add-aws)", history=5
)

# -- written by compare-and-set (bus.leases) -------------------------------------------

DISCOVERY_LEASES: Final = BucketSpec(
    subjects.DISCOVERY_LEASES_BUCKET,
    "fleetgate discovery replicas' leases: which replica polls each fetcher",
    history=1,
)

LEASES: Final = BucketSpec(
    subjects.LEASES_BUCKET,
    "fleetgate managed MemoryDB users: versions, rotation leases (written by agents)",
    history=1,
)
TOTP: Final = BucketSpec(
    subjects.TOTP_BUCKET,
    "fleetgate last accepted one-time-code step per user (written by the auth service)",
    history=1,
    ttl=TOTP_KEEP,
)
LOGIN_FAILURES: Final = BucketSpec(
    subjects.LOGIN_FAILURES_BUCKET,
    "fleetgate recent failed logins per user name (written by the auth service)",
    history=1,
    ttl=LOGIN_FAILURES_KEEP,
)
JOIN_TOKENS: Final = BucketSpec(
    subjects.JOIN_TOKENS_BUCKET,
    "fleetgate one-time agent join tokens: keyed hashes, never secrets (spent by compare-and-set)",
    history=1,
)
AGENTS: Final = BucketSpec(
    subjects.AGENTS_BUCKET,
    "fleetgate joined agents: certificate serials and expiry (written by the auth service)",
    history=1,
)

AWS_SIGNATURES: Final = BucketSpec(
    subjects.AWS_SIGNATURES_BUCKET,
    "fleetgate signed AWS requests already used to log in (written by the auth service)",
    history=1,
    ttl=AWS_SIGNATURES_KEEP,
)


def _by_name(*specs: BucketSpec) -> Mapping[str, BucketSpec]:
    return MappingProxyType({spec.name: spec for spec in specs})


BUCKETS: Final = _by_name(DATABASES, DISCOVERY_STATUS, DB_SERVERS)
"""The buckets every process provisions at start (:meth:`Bus.provision` without specs)."""

ACCESS_BUCKETS: Final = (AUTH, ROLES, USERS)
"""Users, roles and the CA: provisioned by admins and the auth service, never discovery."""

SPECS: Final = _by_name(
    *BUCKETS.values(),
    *ACCESS_BUCKETS,
    DISCOVERY_LEASES,
    LEASES,
    TOTP,
    LOGIN_FAILURES,
    AWS_RULES,
    AWS_SIGNATURES,
    JOIN_TOKENS,
    AGENTS,
)
"""Every bucket of the bus by name: the spec it is created with, whoever opens it first."""

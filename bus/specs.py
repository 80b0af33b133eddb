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

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from bus import subjects


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


def _by_name(*specs: BucketSpec) -> Mapping[str, BucketSpec]:
    return MappingProxyType({spec.name: spec for spec in specs})


BUCKETS: Final = _by_name(DATABASES, DISCOVERY_STATUS, DB_SERVERS)
"""The buckets every process provisions at start (:meth:`Bus.provision` without specs)."""

ACCESS_BUCKETS: Final = (AUTH, ROLES, USERS)
"""Users, roles and the CA: provisioned by admins and the auth service, never discovery."""

SPECS: Final = _by_name(
    *BUCKETS.values(), *ACCESS_BUCKETS, DISCOVERY_LEASES, LEASES, TOTP, LOGIN_FAILURES
)
"""Every bucket of the bus by name: the spec it is created with, whoever opens it first."""

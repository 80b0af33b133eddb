"""What the fleet knows about one managed MemoryDB user, and the pure rules around it.

The record (:class:`ManagedUser`) lives in the bus bucket ``fleetgate_leases`` under
``<region>.<account>.<user>``. It never holds a password: only which Secrets Manager
version the MemoryDB user was last brought in line with, when, which agent holds the
rotation lease, and whether any agent still uses the user.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import uuid
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict

MANAGED_TAG: Final = "fleetgate.dev/managed"
"""Tag on a MemoryDB user that asks fleetgate to manage its password."""
MANAGED_BY_TAG: Final = "fleetgate.dev/managed-by"
"""Tag on the secrets fleetgate creates (value: the agent's host id that created it)."""
CLUSTER_TAG: Final = "fleetgate.dev/cluster"
"""Tag on the secrets: the MemoryDB cluster (or clusters, comma-separated) using the user."""
FALSE_VALUES: Final = frozenset({"false", "no", "off", "disable", "disabled"})
DEFAULT_PREFIX: Final = "fleetgate/"
PASSWORD_LENGTH: Final = 64
_ALPHABET: Final = string.ascii_letters + string.digits
_TOKEN_NAMESPACE: Final = uuid.UUID("6f1c2c1e-9c4b-4f0e-8d55-2f7a3f0f7e11")

Phase = Literal["active", "unused"]


class ManagedUser(BaseModel):
    """One managed user's shared state (no secret in it)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = 1
    user: str
    region: str
    account: str
    user_arn: str = ""
    secret_name: str
    roles: tuple[tuple[str, str], ...] = ()
    """The role chain (ARN, external id) that reaches the user's account, for cleanup."""
    databases: tuple[str, ...] = ()
    """Databases (registry names) whose cluster's ACL holds the user; their heartbeats
    tell whether any agent still uses it."""
    clusters: tuple[str, ...] = ()
    """MemoryDB clusters whose ACL holds the user."""
    applied_version: str = ""
    """The secret's AWSCURRENT version last set on the user (with AWSPREVIOUS beside it)."""
    started_at: float = 0.0
    """Wall-clock time the cycle that applied ``applied_version`` began."""
    rotated_at: float = 0.0
    """Wall-clock time ``applied_version`` was applied."""
    next_at: float = 0.0
    """When the next rotation is due (interval plus this rotation's jitter)."""
    holder: str = ""
    """Host id of the agent holding the rotation lease, or empty."""
    held_until: float = 0.0
    phase: Phase = "active"
    unused_since: float = 0.0
    """When the last agent using the user stopped (``phase`` ``unused``)."""

    def held(self, now: float) -> bool:
        return bool(self.holder) and now < self.held_until


def is_managed_tag(value: str | None) -> bool:
    """The tag asks for management unless its value is false/no/off/disable(d)."""
    return value is not None and value.strip().lower() not in FALSE_VALUES


def secret_name(prefix: str, region: str, account: str, user: str) -> str:
    """``<prefix>memorydb/<region>/<account>/user/<name>``; the default prefix is
    ``fleetgate/``."""
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return f"{prefix}memorydb/{region}/{account}/user/{user}"


def new_password(length: int = PASSWORD_LENGTH) -> str:
    """A random password from the CSPRNG (letters and digits, at least 64 characters)."""
    if length < PASSWORD_LENGTH:
        raise ValueError(f"passwords have at least {PASSWORD_LENGTH} characters")
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def request_token(secret: str, after_version: str) -> str:
    """The ClientRequestToken of the version that follows ``after_version``: the same
    for every agent, so Secrets Manager accepts one new version per current version."""
    digest = hashlib.sha256(f"{secret}\n{after_version}".encode()).hexdigest()
    return str(uuid.uuid5(_TOKEN_NAMESPACE, digest))


def setup_token(secret: str) -> str:
    """The ClientRequestToken of a user's first secret version."""
    return request_token(secret, "setup")

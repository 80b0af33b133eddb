"""A signed AWS identity request logs in once, across every auth service instance.

Each signature used for a login is created in :data:`~bus.subjects.AWS_SIGNATURES_BUCKET`
(key: the signature's hex) with a create-only write: of several instances racing with
the same signed request exactly one succeeds, and a request used anywhere is refused
everywhere after. Records expire after :data:`KEEP` (STS itself refuses a signature
more than 15 minutes from its date, so none can be replayed later), which bounds the
bucket by the number of genuine logins in half an hour: a signature is only recorded
after STS accepted it, so forged ones cost nothing.
"""

from __future__ import annotations

from datetime import datetime

from bus import leases, specs, subjects
from bus.client import Bus
from bus.schemas import Record

KEEP = specs.AWS_SIGNATURES_KEEP
AWS_SIGNATURES = specs.AWS_SIGNATURES


class UsedSignature(Record):
    """When the request was signed (for people reading the bucket)."""

    signed_at: datetime


async def provision_aws_logins(bus: Bus) -> None:
    """Create the buckets of AWS logins that do not exist yet (rules, used signatures)."""
    await bus.provision(specs.AWS_RULES, AWS_SIGNATURES)


async def claim_signature(bus: Bus, signature: str, signed_at: datetime) -> bool:
    """True when this call is the first to use ``signature``; False when it was used
    before (by any instance). Raises :class:`~bus.errors.RegistryError` when NATS cannot
    answer (the login is then refused, never let through unchecked)."""
    key = subjects.kv_token(signature.lower())
    record = UsedSignature(signed_at=signed_at)
    revision = await leases.create(bus, AWS_SIGNATURES.name, key, record)
    return revision is not None

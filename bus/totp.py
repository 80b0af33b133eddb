"""One-time codes work once across every auth service instance (RFC 6238, section 5.2).

The last time step accepted for each user is one record in
:data:`~bus.subjects.TOTP_BUCKET`. :func:`claim_step` accepts a step only by writing it
there with compare-and-set (:mod:`bus.leases`): of several instances racing with the
same code exactly one succeeds, and a code accepted anywhere is refused everywhere
after. When NATS does not answer the claim fails with an error: a second factor is
never accepted unchecked.

Records expire after :data:`KEEP`: a code is valid for at most three steps (90 s), so an
older record can no longer refuse anything.
"""

from __future__ import annotations

from bus import leases, specs, subjects
from bus.client import Bus
from bus.schemas import Record

KEEP = specs.TOTP_KEEP
"""How long a user's last accepted step is kept (far longer than a code is valid)."""

TOTP = specs.TOTP
"""The bucket of last accepted steps (its spec lives with every other in :mod:`bus.specs`)."""


class UsedStep(Record):
    """The last one-time-code time step accepted for a user."""

    step: int


async def provision_totp(bus: Bus) -> None:
    """Create the bucket if it does not exist yet (and open it with its spec)."""
    await bus.provision(TOTP)


async def claim_step(bus: Bus, user: str, step: int) -> bool:
    """Record ``step`` as the last one-time-code step accepted for ``user``. True when
    this call wrote it (the code may be accepted); False when that step or a later one
    was accepted before, by any instance. A write that loses a race is decided again
    once on a fresh read; losing twice also answers False (refuse; the next code works).
    Raises :class:`~bus.errors.RegistryError` when NATS cannot answer."""
    key = subjects.totp_key(user)
    record = UsedStep(step=step)
    for _ in range(2):
        found = await leases.read(bus, TOTP.name, key, UsedStep)
        if found is not None and found.record.step >= step:
            return False
        if found is None:
            revision = await leases.create(bus, TOTP.name, key, record)
        else:
            revision = await leases.update(bus, TOTP.name, key, record, last=found.revision)
        if revision is not None:
            return True
    return False

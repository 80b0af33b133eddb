"""The per-user limit on failed logins holds across every auth service instance.

Each user name's recent failed logins are one record in
:data:`~bus.subjects.LOGIN_FAILURES_BUCKET`: their times (seconds since the epoch),
oldest first, at most the limit and only those within the window. Every instance
*reserves* an attempt before it checks a password (:func:`reserve`): the attempt is
added to the record by compare-and-set (:mod:`bus.leases`) only while fewer than the
limit are recorded, so failures spread over instances, and attempts sent all at once,
add up to one count: at most the limit of passwords are checked per window, however
many arrive together. A reserved attempt that fails stays as the failure; a successful
login clears what it saw (:func:`release`). The times are wall-clock times from each
instance: keep the instances' clocks synchronised (NTP).

Records expire :data:`KEEP` after their last write; a rate-limit window may not be
longer (:data:`KEEP` is also the longest window the auth service accepts).
"""

from __future__ import annotations

from dataclasses import dataclass

from bus import leases, specs, subjects
from bus.client import Bus
from bus.leases import Versioned
from bus.schemas import Record

KEEP = specs.LOGIN_FAILURES_KEEP
"""How long a user's failed logins are kept after the last one (the longest window)."""

ATTEMPTS = 5
"""Compare-and-set attempts to add a failure before giving up. A write loses only to
another one that succeeded, so up to this many failures at once are all counted."""

LOGIN_FAILURES = specs.LOGIN_FAILURES
"""The bucket of failed logins (its spec lives with every other in :mod:`bus.specs`)."""


class Failures(Record):
    """The recent failed logins of one user name: their times, oldest first."""

    times: tuple[float, ...] = ()


async def provision_login_failures(bus: Bus) -> None:
    """Create the bucket if it does not exist yet (and open it with its spec)."""
    await bus.provision(LOGIN_FAILURES)


async def _read(bus: Bus, user: str) -> Versioned[Failures] | None:
    return await leases.read(bus, LOGIN_FAILURES.name, subjects.login_failures_key(user), Failures)


def within(times: tuple[float, ...], window: float, now: float) -> tuple[float, ...]:
    """The times not older than ``window`` at ``now``."""
    return tuple(t for t in times if t > now - window)


async def recent(bus: Bus, user: str, *, window: float, now: float) -> Versioned[Failures] | None:
    """``user``'s failed logins within ``window`` at ``now`` (None when there are none),
    with the revision they were read at. Raises :class:`~bus.errors.RegistryError` when
    NATS cannot answer."""
    found = await _read(bus, user)
    if found is None:
        return None
    times = within(found.record.times, window, now)
    if not times:
        return None
    return Versioned(Failures(times=times), found.revision)


async def add(bus: Bus, user: str, *, limit: int, window: float, now: float) -> bool:
    """Add a failed login at ``now`` to ``user``'s record, keeping at most ``limit`` times
    within ``window``. True when written; False when :data:`ATTEMPTS` writes all lost a
    race (other instances added failures meanwhile). Raises
    :class:`~bus.errors.RegistryError` when NATS cannot answer."""
    key = subjects.login_failures_key(user)
    for _ in range(ATTEMPTS):
        found = await _read(bus, user)
        earlier = within(found.record.times, window, now) if found else ()
        record = Failures(times=tuple(sorted((*earlier, now)))[-limit:])
        if found is None:
            revision = await leases.create(bus, LOGIN_FAILURES.name, key, record)
        else:
            revision = await leases.update(
                bus, LOGIN_FAILURES.name, key, record, last=found.revision
            )
        if revision is not None:
            return True
    return False


async def forget(bus: Bus, user: str, seen: Versioned[Failures]) -> bool:
    """Clear ``user``'s failures as read in ``seen`` (after a successful login). False
    when a failure was added since: it stands. Raises :class:`~bus.errors.RegistryError`
    when NATS cannot answer."""
    key = subjects.login_failures_key(user)
    written = await leases.update(bus, LOGIN_FAILURES.name, key, Failures(), last=seen.revision)
    return written is not None


@dataclass(frozen=True)
class Reserved:
    """An attempt counted in the user's record before its password is checked."""

    at: float
    """Its time in the record."""
    earlier: tuple[float, ...]
    """The failures within the window recorded before it (what a success clears)."""


@dataclass(frozen=True)
class Full:
    """No attempt may be made now: ``limit`` are recorded within the window (or, when
    ``contended``, other attempts kept winning the write)."""

    retry_after: float
    contended: bool = False


async def reserve(bus: Bus, user: str, *, limit: int, window: float, now: float) -> Reserved | Full:
    """Count an attempt at ``now`` in ``user``'s record unless ``limit`` attempts are
    recorded within ``window``: compare-and-set, so of any number of attempts at once at
    any instances at most ``limit`` get through. Raises
    :class:`~bus.errors.RegistryError` when NATS cannot answer."""
    key = subjects.login_failures_key(user)
    # A write loses only to another that succeeded: a reservation (at most ``limit``
    # before the record is full) or a release; past that many losses, refuse.
    for _ in range(limit + ATTEMPTS):
        found = await _read(bus, user)
        earlier = within(found.record.times, window, now) if found else ()
        if len(earlier) >= limit:
            oldest = earlier[-limit]
            return Full(min(window, max(0.0, oldest + window - now)))
        record = Failures(times=tuple(sorted((*earlier, now))))
        if found is None:
            revision = await leases.create(bus, LOGIN_FAILURES.name, key, record)
        else:
            revision = await leases.update(
                bus, LOGIN_FAILURES.name, key, record, last=found.revision
            )
        if revision is not None:
            return Reserved(now, earlier)
    return Full(1.0, contended=True)


async def release(bus: Bus, user: str, times: tuple[float, ...]) -> bool:
    """Remove ``times`` (a reservation, or a reservation and the failures it saw) from
    ``user``'s record; others recorded meanwhile stay. False when other writers kept
    winning. Raises :class:`~bus.errors.RegistryError` when NATS cannot answer."""
    key = subjects.login_failures_key(user)
    for _ in range(ATTEMPTS):
        found = await _read(bus, user)
        if found is None:
            return True
        left = list(found.record.times)
        for t in times:
            if t in left:
                left.remove(t)
        if len(left) == len(found.record.times):
            return True
        written = await leases.update(
            bus, LOGIN_FAILURES.name, key, Failures(times=tuple(left)), last=found.revision
        )
        if written is not None:
            return True
    return False

"""Deleting the secrets of managed users nobody uses any more, after a grace period.

A user is *unused* when no live agent heartbeat names any of the databases in its
record. Its last activity is the later of: when the last agent left (``unused_since``),
its last rotation and its last lease. Once that is ``grace`` seconds ago, :func:`sweep`
takes the record's lease (so two sweepers never race), deletes the secret (recoverable
for ``recovery_days`` by default) and removes the record. A secret without fleetgate's
managed-by tag is never deleted (:class:`~dbservice.managed.aws.NotOurs`): only the
record goes. The MemoryDB user keeps the
passwords it has; give it new ones with ``aws memorydb update-user`` to hand it back to
people.

Agents sweep on their own (``managed_users.cleanup``); ``fleetgate managed cleanup``
does the same by hand, with ``--grace 0`` to do it at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from bus import Bus, leases, subjects
from dbservice.managed.aws import ManagedAws, ManagedError, NotOurs
from dbservice.managed.state import ManagedUser
from dbservice.upstream.iam import IamAuth, Role

logger = logging.getLogger(__name__)

KEPT = "kept: not fleetgate's secret (no managed-by tag)"
"""The verdict for a record whose secret fleetgate did not create: the secret is left
alone (never deleted) and only the record is removed."""


@dataclass(frozen=True)
class Verdict:
    key: str
    record: ManagedUser
    action: str
    """``in use``, ``waiting`` (grace not over), ``deleted``, ``would delete``,
    :data:`KEPT` or ``failed: <reason>``."""


def last_activity(record: ManagedUser) -> float:
    return max(record.unused_since, record.rotated_at, record.held_until)


async def sweep(
    bus: Bus,
    auth: IamAuth,
    *,
    grace: float,
    now: float | None = None,
    recovery_days: int | None = 7,
    dry_run: bool = False,
    users: set[str] | None = None,
) -> list[Verdict]:
    """Look at every managed-user record (or only ``users``) and delete what is due."""
    now = time.time() if now is None else now
    records = await leases.records(bus, subjects.LEASES_BUCKET, ManagedUser)
    serving = {hb.name for hb in await bus.list_db_servers()}
    out: list[Verdict] = []
    for key, found in sorted(records.items()):
        record = found.record
        if users is not None and record.user not in users:
            continue
        if any(d in serving for d in record.databases):
            out.append(Verdict(key, record, "in use"))
            continue
        if now < last_activity(record) + grace or record.held(now):
            out.append(Verdict(key, record, "waiting"))
            continue
        if dry_run:
            out.append(Verdict(key, record, "would delete"))
            continue
        lease = record.model_copy(update={"holder": "cleanup", "held_until": now + 60})
        revision = await leases.update(bus, subjects.LEASES_BUCKET, key, lease, last=found.revision)
        if revision is None:
            out.append(Verdict(key, record, "waiting"))
            continue
        roles = tuple(Role(arn, ext or None) for arn, ext in record.roles)
        try:
            await ManagedAws(auth, record.region, roles).delete_secret(
                record.secret_name, recovery_days=recovery_days
            )
        except NotOurs as exc:
            # Not fleetgate's secret (a lease record was written before the agents saw
            # that): leave it exactly as it is, and drop fleetgate's own record of it.
            await leases.delete(bus, subjects.LEASES_BUCKET, key, last=revision)
            logger.warning("managed user %s (%s): %s", record.user, record.region, exc)
            out.append(Verdict(key, record, KEPT))
            continue
        except ManagedError as exc:
            out.append(Verdict(key, record, f"failed: {exc}"))
            continue
        await leases.delete(bus, subjects.LEASES_BUCKET, key, last=revision)
        logger.info(
            "managed user %s (%s): unused since %.0fs; secret %s deleted",
            record.user,
            record.region,
            now - last_activity(record),
            record.secret_name,
        )
        out.append(Verdict(key, record, "deleted"))
    return out

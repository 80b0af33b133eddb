"""One rotation cycle of one managed user, safe with any number of agents.

Every agent serving a managed user runs :meth:`Rotator.cycle` for it on its own timer.
The shared record (:class:`~dbservice.managed.state.ManagedUser`, in ``fleetgate_leases``)
decides who acts: a cycle that finds nothing due costs one KV read and no AWS call; one
that finds work takes the record's lease by compare-and-set (only one agent wins), acts,
and releases it in the same write that records the outcome.

With the lease, the cycle does one of three things:

* **set up** (no secret yet): CreateSecret with a new password, then UpdateUser with
  that one password;
* **repair** (the secret's AWSCURRENT is not the version the record says the user has,
  or there is no record): UpdateUser with [AWSPREVIOUS, AWSCURRENT] as the secret holds
  them; no new version;
* **rotate** (due): new password -> PutSecretValue with a ClientRequestToken derived
  from the current version (so Secrets Manager itself accepts only one new version per
  current version, whoever sends it) -> UpdateUser [previous, new].

A crash between any two steps leaves a state in which logins still work (the version
at AWSPREVIOUS is on the user in every state) and which the next cycle of any agent
repairs once the lease has expired. Users whose authentication type is ``iam`` are
never touched: the user is described right before each UpdateUser.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Literal

from bus import Bus, leases, subjects
from dbservice.managed.aws import (
    ManagedAws,
    ManagedError,
    SecretConflict,
    SecretVersion,
    secret_value,
)
from dbservice.managed.state import (
    CLUSTER_TAG,
    MANAGED_BY_TAG,
    ManagedUser,
    new_password,
    request_token,
    setup_token,
)
from dbservice.upstream.iam import Role

logger = logging.getLogger(__name__)

Outcome = Literal["set-up", "repaired", "rotated", "not-due", "held", "lost", "skipped"]
Step = Literal["leased", "secret-written", "user-updated"]
StepHook = Callable[[Step, "UserRef"], Awaitable[None]]

DEFAULT_JITTER: Final = 1 / 7


@dataclass(frozen=True)
class UserRef:
    """A managed user and how to reach it (no secret)."""

    user: str
    region: str
    account: str
    user_arn: str
    roles: tuple[Role, ...]
    secret_name: str
    kms_key_id: str | None = None
    databases: tuple[str, ...] = ()
    clusters: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return subjects.managed_user_key(self.region, self.account, self.user)


@dataclass
class RotationSettings:
    interval: float = 900.0
    jitter: float = DEFAULT_JITTER
    """The next rotation is due ``interval * (1 + uniform(0, jitter))`` after this one."""
    lease: float = 60.0
    """How long a lease holder may take before another agent may take over."""


async def no_hook(step: Step, ref: UserRef) -> None:
    """The :data:`StepHook` that does nothing (the default outside tests)."""
    return None


@dataclass
class Rotator:
    """Runs cycles for one agent (``host_id``)."""

    bus: Bus
    host_id: str
    aws_for: Callable[[UserRef], ManagedAws]
    settings: RotationSettings = field(default_factory=RotationSettings)
    hook: StepHook = no_hook
    """Awaited after each step (tests stop an agent there)."""
    clock: Callable[[], float] = time.time
    outcomes: dict[str, int] = field(default_factory=dict)
    due: dict[str, float] = field(default_factory=dict)
    """User key -> when its next rotation is due, as last seen (so the caller can wake
    up then instead of a tick later)."""

    def _count(self, outcome: Outcome) -> Outcome:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        return outcome

    async def cycle(self, ref: UserRef) -> Outcome:
        """Do what is due for ``ref`` (see the module docstring)."""
        now = self.clock()
        found = await leases.read(self.bus, subjects.LEASES_BUCKET, ref.key, ManagedUser)
        record = found.record if found is not None else None
        if record is not None and record.held(now):
            self.due[ref.key] = record.held_until
            return self._count("held")
        if record is not None and record.applied_version and now < record.next_at:
            self.due[ref.key] = record.next_at
            if record.phase != "active" or not set(ref.databases) <= set(record.databases):
                await self._touch(ref, record, found.revision if found else 0)
            return self._count("not-due")
        base = record or ManagedUser(
            user=ref.user,
            region=ref.region,
            account=ref.account,
            user_arn=ref.user_arn,
            secret_name=ref.secret_name,
        )
        leased = self._with(base, ref).model_copy(
            update={"holder": self.host_id, "held_until": now + self.settings.lease}
        )
        if found is None:
            revision = await leases.create(self.bus, subjects.LEASES_BUCKET, ref.key, leased)
        else:
            revision = await leases.update(
                self.bus, subjects.LEASES_BUCKET, ref.key, leased, last=found.revision
            )
        if revision is None:
            return self._count("lost")
        await self.hook("leased", ref)
        aws = self.aws_for(ref)
        current = await aws.get_version(ref.secret_name, "AWSCURRENT")
        if (
            current is not None
            and record is not None
            and current.version_id == record.applied_version
        ):
            rotated = await self._rotate(aws, ref, leased, revision, current)
            if rotated is None:
                return self._count("lost")
            outcome: Outcome = "rotated"
            applied, revision = rotated
        else:
            info = await aws.require_ours(ref.secret_name)  # NotOurs without the tag
            if info is None:
                await self._check_not_iam(aws, ref)  # no secret for an IAM user, ever
                outcome, applied = "set-up", await self._set_up(aws, ref)
            else:
                outcome, applied = "repaired", await self._repair(aws, ref)
        done = self.clock()
        # The schedule keeps its rhythm (a late start does not push every later rotation
        # back by its lateness), unless it fell a whole interval behind (agents were
        # away): then from now. Never two starts less than an interval apart.
        due = record.next_at if record is not None and record.applied_version else now
        anchor = due if now - due < self.settings.interval else now
        jitter = self.settings.interval * random.uniform(0, self.settings.jitter)
        final = leased.model_copy(
            update={
                "applied_version": applied,
                "started_at": now,
                "rotated_at": done,
                "next_at": max(
                    anchor + self.settings.interval + jitter, now + self.settings.interval
                ),
                "holder": "",
                "held_until": 0.0,
            }
        )
        if (
            await leases.update(self.bus, subjects.LEASES_BUCKET, ref.key, final, last=revision)
            is None
        ):
            logger.warning("managed user %s: lease lost before the record was written", ref.user)
            return self._count("lost")
        self.due[ref.key] = final.next_at
        logger.info("managed user %s (%s): %s in %.2fs", ref.user, ref.region, outcome, done - now)
        return self._count(outcome)

    # -- the three actions ------------------------------------------------------------

    async def _set_up(self, aws: ManagedAws, ref: UserRef) -> str:
        password = new_password()
        try:
            version = await aws.create_secret(
                ref.secret_name,
                secret_value(ref.user, password, ref.user_arn),
                token=setup_token(ref.secret_name),
                tags={MANAGED_BY_TAG: self.host_id, CLUSTER_TAG: ",".join(ref.clusters)},
                kms_key_id=ref.kms_key_id,
            )
        except SecretConflict:
            # Created meanwhile (lease taken over after a stall): bring the user in line,
            # if fleetgate created it (never set a password someone else chose).
            await aws.require_ours(ref.secret_name)
            return await self._repair(aws, ref)
        await self.hook("secret-written", ref)
        await self._check_not_iam(aws, ref)
        await aws.set_passwords(ref.user, [password])
        del password
        await self.hook("user-updated", ref)
        return version

    async def _repair(self, aws: ManagedAws, ref: UserRef) -> str:
        current = await aws.get_version(ref.secret_name, "AWSCURRENT")
        if current is None:
            raise ManagedError(f"secret {ref.secret_name} has no AWSCURRENT version")
        previous = await aws.get_version(ref.secret_name, "AWSPREVIOUS")
        passwords = [current.password]
        if previous is not None and previous.version_id != current.version_id:
            passwords.insert(0, previous.password)
        await self._check_not_iam(aws, ref)
        await aws.set_passwords(ref.user, passwords)
        del passwords
        await self.hook("user-updated", ref)
        logger.warning(
            "managed user %s (%s): the user did not match secret version %s; set it again",
            ref.user,
            ref.region,
            current.version_id,
        )
        return current.version_id

    async def _rotate(
        self,
        aws: ManagedAws,
        ref: UserRef,
        leased: ManagedUser,
        revision: int,
        current: SecretVersion,
    ) -> tuple[str, int] | None:
        password = new_password()
        try:
            version = await aws.put_secret(
                ref.secret_name,
                secret_value(ref.user, password, ref.user_arn),
                token=request_token(ref.secret_name, current.version_id),
            )
        except SecretConflict:
            logger.info("managed user %s: another agent wrote this version first", ref.user)
            return None
        await self.hook("secret-written", ref)
        # Still ours? (A holder that stalled past its lease must not undo a newer state.)
        renewed = await leases.update(
            self.bus,
            subjects.LEASES_BUCKET,
            ref.key,
            leased.model_copy(update={"held_until": self.clock() + self.settings.lease}),
            last=revision,
        )
        if renewed is None:
            return None
        await self._check_not_iam(aws, ref)
        await aws.set_passwords(ref.user, [current.password, password])
        del password
        await self.hook("user-updated", ref)
        return version, renewed

    # -- helpers ------------------------------------------------------------------------

    async def _check_not_iam(self, aws: ManagedAws, ref: UserRef) -> None:
        info = await aws.describe_user(ref.user)
        if info is None:
            raise ManagedError(f"MemoryDB has no user {ref.user!r} in {ref.region}")
        if info.auth_type == "iam":
            raise ManagedError(
                f"MemoryDB user {ref.user!r} uses IAM authentication: fleetgate never "
                "manages (or changes) IAM users"
            )

    def _with(self, record: ManagedUser, ref: UserRef) -> ManagedUser:
        return record.model_copy(
            update={
                "user_arn": ref.user_arn or record.user_arn,
                "secret_name": ref.secret_name,
                "roles": tuple((r.arn, r.external_id or "") for r in ref.roles),
                "databases": tuple(sorted({*record.databases, *ref.databases})),
                "clusters": tuple(sorted({*record.clusters, *ref.clusters})),
                "phase": "active",
                "unused_since": 0.0,
            }
        )

    async def _touch(self, ref: UserRef, record: ManagedUser, revision: int) -> None:
        """Mark the record in use by ``ref``'s databases again (no lease needed)."""
        await leases.update(
            self.bus, subjects.LEASES_BUCKET, ref.key, self._with(record, ref), last=revision
        )

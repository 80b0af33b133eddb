"""The agent's managed-user service: which users of the databases it serves are managed,
their rotation cycles, and what happens when it stops serving them.

One :class:`ManagedUsers` per agent (a root task beside the listener):

* **Which users** (every ``refresh``, per served MemoryDB database with an ACL): the
  ACL's members (:mod:`~dbservice.managed.membership`), DescribeUsers of the region, and
  each member's tags; a member tagged ``fleetgate.dev/managed`` (any value but
  false/no/off/disable(d)) is managed, unless its authentication type is ``iam``: then
  the tag is ignored with a warning.
* **Rotation** (every ``interval / 4``, at most 30 s, jittered): one
  :meth:`~dbservice.managed.rotation.Rotator.cycle` per managed user; errors are logged
  per user and the loop goes on.
* **Leaving**: when the agent stops serving a database (or stops), a user no other
  agent still serves is marked ``unused`` in its record; its secret stays. Deleting it
  is :mod:`~dbservice.managed.cleanup`'s job, after a grace period.
* **Read-only** (an agent's listener processes): only *which users*, for logins; no
  rotation, no cleanup, nothing marked when it stops (the leader process does that).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from bus import Bus, BusError, DatabaseResource, leases, subjects
from dbservice.managed.aws import ClientPool, ManagedAws, ManagedError, MemoryDBUserInfo
from dbservice.managed.cleanup import sweep
from dbservice.managed.membership import AclMembership, DescribeAcls
from dbservice.managed.passwords import ManagedPasswords
from dbservice.managed.rotation import RotationSettings, Rotator, StepHook, UserRef, no_hook
from dbservice.managed.state import DEFAULT_PREFIX, MANAGED_TAG, ManagedUser, is_managed_tag
from dbservice.managed.state import secret_name as make_secret_name
from dbservice.upstream.iam import IamAuth, IamTarget, Role

logger = logging.getLogger(__name__)

MAX_TICK = 30.0
NEW_DATABASE_PAUSE = 1.0
"""How soon the next tick comes when a served cluster's users were never looked up."""


@dataclass(frozen=True)
class SecretStore:
    """Where a database's managed passwords are kept."""

    prefix: str = DEFAULT_PREFIX
    kms_key_id: str | None = None


@dataclass(frozen=True)
class ServiceSettings:
    interval: float = 900.0
    jitter: float = 1 / 7
    lease: float = 60.0
    refresh: float = 300.0
    grace: float = 86400.0
    """An unused user's secret is deleted this long after the last agent left."""
    recovery_days: int | None = 7
    """Recovery window of deleted secrets (None: delete at once)."""
    cleanup: bool = True
    """Whether this agent deletes unused secrets itself (else only by hand)."""


class ManagedUsers:
    def __init__(
        self,
        bus: Bus,
        *,
        host_id: str,
        auth: IamAuth,
        served: Callable[[], Iterable[DatabaseResource]],
        settings: ServiceSettings = ServiceSettings(),
        store_of: Callable[[DatabaseResource], SecretStore] = lambda _: SecretStore(),
        matcher_role: Callable[[DatabaseResource], Role | None] = lambda _: None,
        membership: AclMembership | None = None,
        hook: StepHook = no_hook,
        clock: Callable[[], float] = time.time,
        read_only: bool = False,
    ) -> None:
        self.bus = bus
        self.read_only = read_only
        """Only learn which users are managed (for logins): never rotate, sweep or mark."""
        self.host_id = host_id
        self.auth = auth
        self.served = served
        self.settings = settings
        self.store_of = store_of
        self.matcher_role = matcher_role
        self.membership = membership or DescribeAcls()
        self.clock = clock
        self.rotator = Rotator(
            bus,
            host_id,
            self.aws_for,
            RotationSettings(settings.interval, settings.jitter, settings.lease),
            hook=hook,
            clock=clock,
        )
        self.passwords = ManagedPasswords(bus, self.aws_for)
        self.by_database: dict[str, dict[str, UserRef]] = {}
        self._refreshed: dict[str, float] = {}
        self._warned: set[tuple[str, str]] = set()
        self._users_now: dict[tuple[str, tuple[Role, ...]], list[MemoryDBUserInfo]] = {}
        self._tags_now: dict[str, dict[str, str]] = {}
        self._last_sweep = 0.0
        self._tried: set[str] = set()
        """Databases whose users were looked up at least once (successfully or not)."""
        self.errors = 0
        self.ticks = 0
        self.calls: dict[str, int] = {}
        """AWS calls made for managed users, by operation."""
        self.pool = ClientPool(auth)

    def aws_for(self, ref: UserRef) -> ManagedAws:
        return ManagedAws(self.auth, ref.region, ref.roles, calls=self.calls, pool=self.pool)

    def managed(self, resource: DatabaseResource, db_user: str) -> UserRef | None:
        """The managed user ``db_user`` of ``resource``, or None."""
        return self.by_database.get(resource.name, {}).get(db_user)

    # -- the loop -------------------------------------------------------------------------

    @property
    def tick_every(self) -> float:
        return min(self.settings.interval / 4, MAX_TICK)

    async def run(self) -> None:
        """Forever (cancel to stop; call :meth:`aclose` after)."""
        while True:
            try:
                await self.tick()
            except Exception:  # a bug here must not take the agent's sessions down
                self.errors += 1
                self.rotator.due.clear()
                logger.exception("managed users: tick failed; trying again")
            await asyncio.sleep(self._pause())

    def _pause(self) -> float:
        """Until the next tick, or sooner when a user's rotation falls due before it, or
        in a second when the agent serves a cluster whose users are not known yet (at
        start, the registry is read after the first tick: set-up should not wait a whole
        tick for it)."""
        pause = self.tick_every * random.uniform(0.9, 1.1)
        unknown = {
            r.name
            for r in self.served()
            if r.spec.aws is not None
            and r.spec.aws.memorydb is not None
            and r.spec.aws.memorydb.acl_name
            and r.name not in self._tried
        }
        if unknown:
            pause = min(pause, NEW_DATABASE_PAUSE)
        keys = {r.key for r in self._refs()}
        due = [at for key, at in self.rotator.due.items() if key in keys]
        if due:
            pause = min(pause, max(0.01, min(due) - self.clock() + random.uniform(0, 0.02)))
        return pause

    async def tick(self) -> None:
        self.ticks += 1
        served = {
            r.name: r
            for r in self.served()
            if r.spec.aws is not None
            and r.spec.aws.memorydb is not None
            and r.spec.aws.memorydb.acl_name
        }
        gone = [name for name in self.by_database if name not in served]
        for name in gone:
            await self._leave(self.by_database.pop(name), stopping=False)
            self._refreshed.pop(name, None)
            self._tried.discard(name)
        now = self.clock()
        self._users_now.clear()  # DescribeUsers and ListTags answers, for this tick only
        self._tags_now.clear()
        for name, resource in served.items():
            if now - self._refreshed.get(name, -1e18) >= self.settings.refresh:
                self._tried.add(name)
                try:
                    self.by_database[name] = await self._discover(resource)
                    self._refreshed[name] = now
                except (ManagedError, ValueError) as exc:
                    self.errors += 1
                    logger.warning("managed users of %s: cannot list them (%s)", name, exc)
        for ref in [] if self.read_only else self._refs():
            try:
                await self.rotator.cycle(ref)
            except (ManagedError, BusError) as exc:
                self.errors += 1
                self.rotator.due.pop(ref.key, None)  # try again a tick later, not at once
                logger.warning("managed user %s (%s): %s", ref.user, ref.region, exc)
        if (
            self.settings.cleanup
            and not self.read_only
            and now - self._last_sweep >= self.settings.refresh
        ):
            self._last_sweep = now
            try:
                await sweep(
                    self.bus,
                    self.auth,
                    grace=self.settings.grace,
                    now=now,
                    recovery_days=self.settings.recovery_days,
                )
            except (ManagedError, BusError) as exc:
                logger.warning("managed users: cleanup failed (%s)", exc)

    def _refs(self) -> list[UserRef]:
        """One ref per user (merging the databases that share it)."""
        merged: dict[str, UserRef] = {}
        for refs in self.by_database.values():
            for ref in refs.values():
                old = merged.get(ref.key)
                if old is not None:
                    ref = UserRef(
                        **{
                            **ref.__dict__,
                            "databases": tuple(sorted({*old.databases, *ref.databases})),
                            "clusters": tuple(sorted({*old.clusters, *ref.clusters})),
                        }
                    )
                merged[ref.key] = ref
        return list(merged.values())

    async def _discover(self, resource: DatabaseResource) -> dict[str, UserRef]:
        target = IamTarget.of(resource, matcher_role=self.matcher_role(resource))
        aws = ManagedAws(self.auth, target.region, target.roles, calls=self.calls, pool=self.pool)
        place = (target.region, target.roles)
        users = self._users_now.get(place)
        if users is None:
            users = self._users_now[place] = await aws.describe_users()
        members = await self.membership.members(
            aws, account=target.account, acl_name=target.acl_name, users=users
        )
        store = self.store_of(resource)
        out: dict[str, UserRef] = {}
        for user in users:
            if user.name not in members:
                continue
            tags = self._tags_now.get(user.arn)
            if tags is None:
                tags = self._tags_now[user.arn] = await aws.user_tags(user.arn)
            if not is_managed_tag(tags.get(MANAGED_TAG)):
                continue
            if user.auth_type == "iam":
                if (target.region, user.name) not in self._warned:
                    self._warned.add((target.region, user.name))
                    logger.warning(
                        "MemoryDB user %s (%s) is tagged %s but uses IAM authentication: "
                        "IAM users are never managed; the tag is ignored",
                        user.name,
                        target.region,
                        MANAGED_TAG,
                    )
                continue
            out[user.name] = UserRef(
                user=user.name,
                region=target.region,
                account=target.account,
                user_arn=user.arn,
                roles=target.roles,
                secret_name=make_secret_name(
                    store.prefix, target.region, target.account, user.name
                ),
                kms_key_id=store.kms_key_id,
                databases=(resource.name,),
                clusters=(target.cluster,),
            )
        if set(out) != set(self.by_database.get(resource.name, {})):
            logger.info("managed users of %s: %s", resource.name, ", ".join(sorted(out)) or "none")
        return out

    # -- leaving ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """The agent stops: mark the users nobody else serves as unused."""
        refs = {ref.key: ref for refs in self.by_database.values() for ref in refs.values()}
        self.by_database.clear()
        try:
            await self._leave(refs, stopping=True)
        finally:
            await self.pool.aclose()

    async def _leave(self, refs: dict[str, UserRef], *, stopping: bool) -> None:
        if not refs:
            return
        if self.read_only:
            for ref in refs.values():
                self.passwords.forget(ref.key)
            return
        still = {r.key for r in self._refs()}
        try:
            serving = {
                hb.name for hb in await self.bus.list_db_servers() if hb.host_id != self.host_id
            }
        except BusError as exc:
            logger.warning("managed users: cannot read heartbeats (%s); not marking", exc)
            return
        for ref in refs.values():
            self.passwords.forget(ref.key)
            if ref.key in still:
                continue
            try:
                found = await leases.read(self.bus, subjects.LEASES_BUCKET, ref.key, ManagedUser)
                if found is None or any(d in serving for d in found.record.databases):
                    continue
                unused = found.record.model_copy(
                    update={"phase": "unused", "unused_since": self.clock()}
                )
                await leases.update(
                    self.bus, subjects.LEASES_BUCKET, ref.key, unused, last=found.revision
                )
                logger.info(
                    "managed user %s (%s): no agent serves it any more; its secret %s is "
                    "kept for the grace period",
                    ref.user,
                    ref.region,
                    ref.secret_name,
                )
            except BusError as exc:
                logger.warning("managed user %s: cannot mark it unused (%s)", ref.user, exc)

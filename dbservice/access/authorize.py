"""What an agent's listener calls when a client connects, in order:

1. :func:`trusted_cas` once at start (and on a timer or CA watch): the fleet CA(s) from
   the registry, for :func:`dbservice.access.ca.mtls_server_context` and verification.
2. :func:`dbservice.access.ca.identity_from_ssl` on the accepted TLS connection: who it is
   (raises CertificateRejected: expired, other CA, no identity).
3. :func:`authorize_session`: the roles' current definitions (so role edits apply to the
   next connection), the access decision for this database and db user, and the
   per-session :class:`~dbservice.access.rbac.CommandPolicy`. The agent keeps the roles
   in a :class:`RoleCache` fed by a watch of the registry, so a session start reads
   nothing from NATS; while that watch is not live, the roles are read for the session.
4. Per command: ``grant.commands.check(name)``; audit through
   :class:`dbservice.access.audit.SessionAudit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from cryptography import x509

from bus import Bus, subjects
from bus.access import Identity, Role, get_ca, get_roles
from bus.errors import BusError
from dbservice.access.ca import load_certs
from dbservice.access.rbac import CommandPolicy, Decision, check_db_access
from fleetgate.backoff import backoff_delay

logger = logging.getLogger(__name__)

BUCKET_RETRY: Final = (0.5, 1.0, 2.0, 5.0)
"""Seconds between looks for the roles bucket while it does not exist."""


@dataclass(frozen=True)
class SessionGrant:
    """The outcome of :func:`authorize_session`."""

    identity: Identity
    decision: Decision
    commands: CommandPolicy
    """Deny-all when the session is refused."""
    roles: tuple[Role, ...]

    @property
    def allowed(self) -> bool:
        return self.decision.allowed


async def trusted_cas(bus: Bus) -> list[x509.Certificate]:
    """The CA certificates published by ``fleetgate auth init`` (empty when none yet)."""
    record = await get_ca(bus)
    return load_certs(record.pem) if record is not None else []


def grant_for(
    identity: Identity,
    roles: list[Role],
    *,
    database: str,
    labels: Mapping[str, str],
    db_user: str,
) -> SessionGrant:
    """The pure part of :func:`authorize_session`, for callers that cache roles."""
    decision = check_db_access(roles, identity.db_users, labels, db_user, database=database)
    granting = decision.roles if decision.allowed else ()
    commands = CommandPolicy.build(roles, granting=granting)
    return SessionGrant(identity, decision, commands, tuple(roles))


class RoleCache:
    """Every role of the registry, kept current by a watch (:meth:`follow`, a root task
    of the agent): the registry pushes each edit and deletion, so a session is decided
    on the roles as the watch last delivered them, with no NATS message of its own.

    :meth:`roles` answers only while the watch is *live*: synced since the last
    (re)connect to NATS, and connected now. Otherwise (before the first snapshot, while
    NATS is away, after a reconnect until the new snapshot) it answers None and the
    caller reads the roles from the registry as before, which fails while NATS is away:
    a session is never decided on roles the watch may have missed an edit of.

    :meth:`last_known` answers whatever the watch last delivered, live or not: what a
    cut-off agent decides on within its ``offline_grace`` (its caller's choice)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._by_key: dict[str, Role] = {}
        self._synced_at: int | None = None
        """``bus.reconnects`` when the watch last reported ``synced``."""
        self.synced = asyncio.Event()
        """Set once the watch delivered the whole bucket (it stays set)."""

    @property
    def live(self) -> bool:
        return self._synced_at == self.bus.reconnects and self.bus.connected

    def roles(self, names: tuple[str, ...] | list[str]) -> list[Role] | None:
        """The named roles (unknown names left out, as :func:`get_roles` does), or None
        when the watch is not live."""
        if not self.live:
            return None
        return self._named(names)

    def last_known(self, names: tuple[str, ...] | list[str]) -> list[Role] | None:
        """The named roles as the watch last delivered them, live or not; None before
        its first snapshot."""
        return self._named(names) if self.synced.is_set() else None

    def _named(self, names: tuple[str, ...] | list[str]) -> list[Role]:
        found = (self._by_key.get(subjects.role_key(name)) for name in names)
        return [role for role in found if role is not None]

    async def follow(self) -> None:
        """Watch the roles bucket forever (cancel to stop). Until it exists (before
        ``fleetgate auth init``) it is looked for again every few seconds."""
        attempt = 0
        while True:
            try:
                await self.bus.bucket(subjects.ROLES_BUCKET, create=False)
                break
            except BusError as exc:
                if attempt == 0:
                    logger.info("cannot watch the roles yet (%s); reading them per session", exc)
                await asyncio.sleep(backoff_delay(BUCKET_RETRY, attempt))
                attempt += 1
        watch = self.bus.watch(subjects.ROLES_BUCKET, Role, create=False)
        try:
            async with contextlib.aclosing(watch) as events:
                async for event in events:
                    if event.kind == "upsert" and event.value is not None:
                        self._by_key[event.key] = event.value
                    elif event.kind == "deleted":
                        self._by_key.pop(event.key, None)
                    elif event.kind == "synced":
                        self._synced_at = self.bus.reconnects
                        self.synced.set()
        finally:
            self._synced_at = None


async def authorize_session(
    bus: Bus,
    identity: Identity,
    *,
    database: str,
    labels: Mapping[str, str],
    db_user: str,
    cache: RoleCache | None = None,
) -> SessionGrant:
    """May ``identity`` reach ``database`` (with ``labels``) as ``db_user``? Decided on
    the current definitions of the roles named in the certificate: from ``cache`` while
    its watch is live, else read from the registry."""
    roles = cache.roles(identity.roles) if cache is not None else None
    if roles is None:
        roles = await get_roles(bus, identity.roles)
    return grant_for(identity, roles, database=database, labels=labels, db_user=db_user)

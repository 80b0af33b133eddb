"""What the NATS auth callout needs to know about a joined agent, read from the bus.

Before :class:`~dbservice.auth.natsrights.AgentAuthorizer` answers a connection of user
``agent-<host_id>``, :meth:`AgentRights.prepare` reads that agent's record
(:data:`~bus.subjects.AGENTS_BUCKET`) and its join token: no record (``fleetgate agents
rm``, or never joined here) or a removed token (``fleetgate tokens rm``) revokes it.
These two reads are made for every connection, not cached, so a revocation holds from
the agent's next connection on (an open one lasts until its user JWT expires,
``nats_callout.ttl``). When the agent's join token had labels, they are its selector:
it may write only the managed-user records of the databases they select
(:func:`~dbservice.auth.natsrights.lease_filters`); the database registry for that is
cached for :data:`REGISTRY_TTL`. Without labels the agent may write every managed-user
record, as before.

When the bus cannot be read, the connection is refused (never admitted unchecked).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from bus import Bus, joins
from bus.errors import BusError
from bus.schemas import DatabaseResource
from bus.settings import AGENT_USER_PREFIX
from dbservice.auth.natsrights import CalloutError, check_host_id, lease_filters

logger = logging.getLogger(__name__)

REGISTRY_TTL: Final = 10.0
"""How long the database registry read for lease scoping is reused (seconds)."""


@dataclass(frozen=True)
class Decision:
    revoked: str
    """Why the agent is refused ("" when it is not)."""
    leases: Sequence[str] = ()


class AgentRights:
    """``revoked`` and ``leases`` of :class:`AgentAuthorizer`, prepared per connection."""

    def __init__(self, bus: Bus, *, registry_ttl: float = REGISTRY_TTL) -> None:
        self.bus = bus
        self.registry_ttl = registry_ttl
        self._registry: tuple[float, list[DatabaseResource]] | None = None
        self._decided: dict[str, Decision] = {}

    async def decide(self, host_id: str) -> Decision:
        """Whether agent ``host_id`` may connect now, and the leases it may write."""
        try:
            found = await joins.get_agent(self.bus, host_id)
            if found is None:
                return Decision("not a joined agent (removed with fleetgate agents rm?)")
            agent = found.record
            if agent.token_id and await joins.get_token(self.bus, agent.token_id) is None:
                removed = f"its join token {agent.token_id} was removed (fleetgate tokens rm)"
                return Decision(removed)
            if not agent.labels:
                return Decision("", (">",))
            return Decision("", lease_filters(await self._databases(), agent.labels))
        except (BusError, OSError, TimeoutError) as exc:
            logger.warning("NATS auth callout: cannot read agent %s's record: %s", host_id, exc)
            return Decision(f"its record cannot be read now ({exc})")

    async def _databases(self) -> list[DatabaseResource]:
        now = time.monotonic()
        if self._registry is None or now - self._registry[0] > self.registry_ttl:
            self._registry = (now, await self.bus.list_resources(create=False))
        return self._registry[1]

    async def prepare(self, user: str) -> None:
        """Decide for the agent ``user`` names (nothing when it names none): what
        :meth:`revoked` and :meth:`leases` answer for it until :meth:`forget`."""
        if not user.startswith(AGENT_USER_PREFIX):
            return
        try:
            host_id = check_host_id(user[len(AGENT_USER_PREFIX) :])
        except CalloutError:
            return
        self._decided[host_id] = await self.decide(host_id)

    def forget(self, user: str) -> None:
        self._decided.pop(user[len(AGENT_USER_PREFIX) :], None)

    def revoked(self, host_id: str) -> bool:
        decision = self._decided.get(host_id)
        if decision is None:  # not prepared: never admitted unchecked
            return True
        if decision.revoked:
            logger.warning("NATS auth callout: agent %s refused: %s", host_id, decision.revoked)
        return bool(decision.revoked)

    def leases(self, host_id: str) -> Sequence[str]:
        decision = self._decided.get(host_id)
        return decision.leases if decision is not None else ()

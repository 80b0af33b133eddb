"""What the agent does without the fleet: its link to NATS, the roles it watches, and
``offline_grace``.

The agent serves from state it watches: the fleet CA
(:class:`~dbservice.gateway.listener.FleetTrust`), the registry
(:func:`~dbservice.agent.served.follow_registry`) and the roles
(:class:`~dbservice.access.authorize.RoleCache`). While it reaches JetStream, a new
session takes its roles from the live watch (or reads them when the watch is not live);
when it does not (:class:`FleetLink`: the connection is down,
or no JetStream answers behind it, as when a region's leaf node lost the hub), sessions
are checked against the last known CA, roles and registry, for at most
``offline_grace`` after the last contact. After that new sessions are refused with a
reason that says so; sessions already open are never cut for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final

from bus import Bus
from bus.link import connected, jetstream_answers
from fleetgate.durations import format_duration

logger = logging.getLogger(__name__)

PROBE_TIMEOUT: Final = 2.0
"""How long the link probe waits for JetStream's answer."""
BUCKET_RETRY: Final = (0.5, 1.0, 2.0, 5.0)
"""Seconds between looks for the roles bucket while it does not exist."""


def rough_duration(seconds: float) -> str:
    """``16m``, ``1h5m``, ``42s``: whole units, for people."""
    whole = int(seconds)
    if whole >= 3600:
        hours, rest = divmod(whole, 3600)
        return f"{hours}h{rest // 60}m" if rest >= 60 else f"{hours}h"
    if whole >= 60:
        return f"{whole // 60}m"
    if whole >= 1:
        return f"{whole}s"
    return f"{round(seconds * 1000)}ms"


class FleetLink:
    """Whether this agent reaches the fleet's JetStream, and since when it does not.
    :meth:`follow` probes it (a root task); sessions call :meth:`refusal`."""

    def __init__(
        self,
        bus: Bus | None,
        *,
        grace: float,
        every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus = bus
        self.grace = grace
        self.every = every if every is not None else min(5.0, max(grace / 4, 0.2))
        """Seconds between probes: 5 s, or a quarter of a short grace."""
        self.clock = clock
        self.last_contact = clock()
        """When JetStream last answered (the start counts: the agent just connected)."""
        self.linked = True
        self.reason = ""
        """Why the link is down (while it is)."""

    def contact(self) -> None:
        """JetStream answered."""
        self.last_contact = self.clock()
        if not self.linked:
            self.linked = True
            logger.info("reached the fleet again: sessions are checked against fresh roles")

    def lost(self, why: str) -> None:
        """Something that needs JetStream failed."""
        self.reason = why
        if self.linked:
            self.linked = False
            logger.warning(
                "cut off from the fleet (%s): clients are served from the last known CA, "
                "roles and registry; new sessions for at most %s (offline_grace) after the "
                "last contact",
                why,
                format_duration(self.grace),
            )

    def cut_for(self) -> float:
        """Seconds since the last contact while cut off; 0 while linked."""
        if self.bus is not None and self.linked and not connected(self.bus):
            self.lost("not connected to NATS")
        return 0.0 if self.linked else max(self.clock() - self.last_contact, 0.0)

    def refusal(self) -> str | None:
        """Why a new session is refused now (cut off beyond ``offline_grace``), or None."""
        cut = self.cut_for()
        if self.linked or cut <= self.grace:
            return None
        return (
            f"this agent has been cut off from the fleet for {rough_duration(cut)} "
            f"(offline_grace {format_duration(self.grace)}): new sessions are refused until "
            "it reconnects"
        )

    async def probe(self) -> bool:
        """Ask JetStream once; whether it answered."""
        if self.bus is None:
            return True
        why = await jetstream_answers(self.bus, wait=min(PROBE_TIMEOUT, self.every * 4))
        if why is None:
            self.contact()
            return True
        self.lost(why)
        return False

    async def follow(self) -> None:
        """Probe every :attr:`every` seconds, forever."""
        while True:
            await asyncio.sleep(self.every)
            await self.probe()

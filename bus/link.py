"""Whether a process reaches JetStream through its NATS connection: an agent's link to
the fleet. A region whose leaf node lost the hub looks like this from the agent: the
connection to the leaf may be up while no JetStream answers behind it."""

from __future__ import annotations

import asyncio

import nats.errors
import nats.js.errors

from bus import subjects
from bus.client import Bus
from bus.watch import describe

PROBE_STREAM = f"KV_{subjects.ROLES_BUCKET}"
"""The stream whose info the probe asks for: the roles, which agents read (and may ask
about, deploy/nats/nats-server.conf)."""


def connected(bus: Bus) -> bool:
    """Whether the NATS connection is up now (not reconnecting, not closed)."""
    return bool(bus.nc.is_connected)


async def jetstream_answers(bus: Bus, *, wait: float) -> str | None:
    """None when JetStream answered within ``wait`` seconds (any answer, "no such
    stream" included); else why not, in a few words."""
    if not connected(bus):
        return "not connected to NATS"
    try:
        async with asyncio.timeout(wait):
            await bus.js.stream_info(PROBE_STREAM)
    except nats.js.errors.ServiceUnavailableError:
        return "no JetStream answers (no responders)"
    except nats.js.errors.APIError:
        return None  # an answer, even "not found"
    except TimeoutError:
        return f"no JetStream answer within {wait:g}s"
    except nats.errors.Error as exc:
        return describe(exc)
    return None

"""The writer's side of one request: its reply, following ``MOVED`` / ``ASK`` /
``TRYAGAIN`` / ``CLUSTERDOWN``.

``MOVED`` refreshes the topology and sends the command to the new owner; ``ASK`` sends
``ASKING`` and the command to the node named, once per redirect; ``TRYAGAIN`` and
``CLUSTERDOWN`` are retried after a bounded backoff. While the writer handles one, the
reader stops sending (the session's *gate*) until every command sent before it is
answered, so two commands on one key are never reordered by a retry.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

from fleetgate.backoff import backoff_delay

from .link import LinkError
from .resp import error
from .topology import Address

if TYPE_CHECKING:
    from .entries import Request
    from .session import ClusterSession

MAX_REDIRECTS: Final = 5
BACKOFF: Final = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
"""Seconds before each retry after TRYAGAIN / CLUSTERDOWN (about 1.6 s in all)."""


async def complete(session: ClusterSession, request: Request) -> bytes:
    """The reply to ``request``, after the redirects and retries it meets."""
    attempt = 0
    while True:
        assert request.future is not None
        try:
            frame = await request.future
        except LinkError as exc:
            session.hold()
            await session.refresh_quietly()
            return error(f"ERR fleetgate: {exc}")
        if frame[0] != 45 or attempt >= MAX_REDIRECTS:  # not '-'
            return frame
        code = frame[1 : frame.find(b" ", 1)] if b" " in frame else frame[1:-2]
        if code not in (b"MOVED", b"ASK", b"TRYAGAIN", b"CLUSTERDOWN"):
            return frame
        session.hold()
        attempt += 1
        session.state.redirects[code.decode()] += 1
        if code == b"MOVED" or code == b"ASK":
            parts = frame[1:-2].split(b" ")
            address = parse_address(parts[2]) if len(parts) >= 3 else None
            if address is None:
                return frame
            if code == b"MOVED":
                await session.follow_moved(int(parts[1]), address)
            request.address = address
            session.send(request, asking=code == b"ASK")
            continue
        await asyncio.sleep(backoff_delay(BACKOFF, attempt - 1))
        if code == b"CLUSTERDOWN":
            await session.refresh_quietly()
        if request.slot is not None:
            request.address = session.owner(request.slot)
        session.send(request)


def parse_address(text: bytes) -> Address | None:
    host, sep, port = text.decode("latin-1").rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host, int(port)

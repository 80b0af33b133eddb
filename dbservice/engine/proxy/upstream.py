"""How a session reaches its server: the agent picks host, port and TLS; the engine
only receives the connected stream pair."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Protocol

from fleetgate.aio import set_nodelay

from .session import Streams


class UpstreamConnector(Protocol):
    async def connect(self) -> Streams:
        """A connected (reader, writer) pair to the database."""
        ...


@dataclass(frozen=True, slots=True)
class TcpConnector:
    """Plain TCP, or TLS when ``ssl`` is given (the agent builds the context: CA,
    verification mode, SNI via ``server_hostname``)."""

    host: str
    port: int
    ssl: ssl.SSLContext | None = None
    server_hostname: str | None = None
    connect_timeout: float = 10.0
    """Seconds for the TCP connect and TLS handshake together."""
    limit: int = 256 * 1024
    """StreamReader buffer limit."""

    async def connect(self) -> Streams:
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await asyncio.open_connection(
                self.host,
                self.port,
                ssl=self.ssl,
                server_hostname=(self.server_hostname or self.host) if self.ssl else None,
                limit=self.limit,
            )
        set_nodelay(writer)
        return reader, writer

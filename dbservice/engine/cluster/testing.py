"""A plain loopback listener running one :class:`ClusterSession` per connection, for
tests and benchmarks (the agent's listener adds mutual TLS, identities and roles)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from collections.abc import Callable

from dbservice.engine.login import ClientCredentials, UpstreamLogin
from dbservice.engine.proxy import PassThroughHooks, SessionHooks, Streams, TcpConnector
from dbservice.engine.proxy.settings import CommandBuffers, ProxyLimits, ProxyTimeouts
from dbservice.engine.proxy.testing import LoopbackServer

from .session import ClusterSession
from .state import ClusterState
from .topology import Address


class LoopbackCluster(LoopbackServer):
    """``async with LoopbackCluster(endpoint, tls=...) as proxy:`` listens on
    ``proxy.port``; every session shares one :class:`ClusterState`."""

    def __init__(
        self,
        endpoint: Address,
        *,
        tls: ssl.SSLContext | None = None,
        hooks: Callable[[], SessionHooks] = PassThroughHooks,
        login: Callable[[], UpstreamLogin] = ClientCredentials,
        db_user: str = "default",
        limits: ProxyLimits | None = None,
        timeouts: ProxyTimeouts | None = None,
        host: str = "127.0.0.1",
        buffers: CommandBuffers | None = None,
        client_tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(
            hooks=hooks, limits=limits, timeouts=timeouts, host=host, client_tls=client_tls
        )
        self.buffers = buffers or CommandBuffers(self.limits.max_command_buffer)
        """What the sessions hold of commands still arriving, all together."""
        self.endpoint = endpoint
        self.tls = tls
        self.login = login
        self.db_user = db_user
        self.state = ClusterState("loopback")
        self.dials = 0
        self.links_closed = 0
        self.live: list[ClusterSession] = []
        """The running sessions, oldest first."""
        """Shard connections the sessions closed for going unused (``link_idle``)."""
        self._ids = itertools.count(1)

    async def dial(self, address: Address) -> Streams:
        self.dials += 1
        connector = TcpConnector(address[0], address[1], ssl=self.tls, connect_timeout=5.0)
        return await connector.connect()

    def _link_closed(self) -> None:
        self.links_closed += 1

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        login = self.login()
        try:
            seed = await self.dial(self.endpoint)
            await login.login(seed, db_user=self.db_user)
        except (OSError, TimeoutError) as exc:
            writer.write(b"-ERR cannot reach the cluster: %s\r\n" % str(exc).encode())
            with contextlib.suppress(OSError):
                await writer.drain()
            return
        session = ClusterSession(
            (reader, writer),
            seed,
            seed_address=self.endpoint,
            state=self.state,
            dial=self.dial,
            login=login,
            db_user=self.db_user,
            hooks=self.hooks(),
            database="loopback",
            limits=self.limits,
            timeouts=self.timeouts,
            client_id=next(self._ids),
            buffers=self.buffers,
            on_link_closed=self._link_closed,
        )
        del seed  # the session's now: it may close it while the session goes on
        self.live.append(session)
        try:
            self.finished.append(await session.run())
        finally:
            self.live.remove(session)

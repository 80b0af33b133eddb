"""A plain loopback listener running one :class:`ClusterSession` per connection, for
tests and benchmarks (the agent's listener adds mutual TLS, identities and roles)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from collections.abc import Callable
from types import TracebackType

from dbservice.agent.login import ClientCredentials, UpstreamLogin
from dbservice.proxy import PassThroughHooks, SessionHooks, SessionStats, Streams, TcpConnector
from dbservice.proxy.settings import ProxyLimits, ProxyTimeouts

from .session import ClusterSession
from .state import ClusterState
from .topology import Address

logger = logging.getLogger(__name__)


class LoopbackCluster:
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
    ) -> None:
        self.endpoint = endpoint
        self.tls = tls
        self.hooks = hooks
        self.login = login
        self.db_user = db_user
        self.limits = limits or ProxyLimits()
        self.timeouts = timeouts or ProxyTimeouts()
        self.host = host
        self.port = 0
        self.state = ClusterState("loopback")
        self.finished: list[SessionStats] = []
        self.sessions: set[asyncio.Task[None]] = set()
        self.dials = 0
        self._ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._closing = False

    async def dial(self, address: Address) -> Streams:
        self.dials += 1
        connector = TcpConnector(address[0], address[1], ssl=self.tls, connect_timeout=5.0)
        return await connector.connect()

    async def __aenter__(self) -> LoopbackCluster:
        self._server = await asyncio.start_server(
            self._accept, self.host, 0, limit=self.limits.read_size
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
            self._server = None
        await asyncio.sleep(0)
        while self.sessions:
            tasks = list(self.sessions)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self.sessions.add(task)
        try:
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
            )
            self.finished.append(await session.run())
        except asyncio.CancelledError:
            if not self._closing:
                raise
        finally:
            self.sessions.discard(task)
            if not writer.transport.is_closing():
                writer.transport.abort()

"""Plain loopback listeners for tests and benchmarks (the agent's own listener adds
mutual TLS and identities): :class:`LoopbackServer` owns the listening socket and the
session tasks; :class:`LoopbackProxy` runs one :class:`ProxySession` per connection
(``dbservice.engine.cluster.testing.LoopbackCluster`` one cluster session)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Self

from .hooks import PassThroughHooks, SessionHooks
from .session import ProxySession, SessionStats
from .settings import ProxyLimits, ProxyTimeouts
from .upstream import UpstreamConnector

logger = logging.getLogger(__name__)


class LoopbackServer:
    """Listens on ``host:port`` (``port`` set once started) and runs :meth:`serve` for
    each connection as a task of its own; :meth:`aclose` stops listening and cancels
    the running sessions. Subclasses implement :meth:`serve`. With ``client_tls`` the
    clients connect with TLS, as they do to the agent."""

    def __init__(
        self,
        *,
        hooks: Callable[[], SessionHooks] = PassThroughHooks,
        limits: ProxyLimits | None = None,
        timeouts: ProxyTimeouts | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        client_tls: ssl.SSLContext | None = None,
    ) -> None:
        self.client_tls = client_tls
        self.hooks = hooks
        self.limits = limits or ProxyLimits()
        self.timeouts = timeouts or ProxyTimeouts()
        self.host = host
        self.port = port
        self.finished: list[SessionStats] = []
        self.sessions: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._closing = False

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, limit=self.limits.read_size, ssl=self.client_tls
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
            self._server = None
        # A connection accepted just now has a task that has not run yet: let it start
        # (it sees _closing and drops the connection), then stop the running ones.
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
            await self.serve(reader, writer)
        except asyncio.CancelledError:
            if not self._closing:
                raise
            # Stopped by aclose(): end quietly (asyncio's stream callback would
            # otherwise report the cancellation as an error).
        finally:
            self.sessions.discard(task)
            if not writer.transport.is_closing():
                writer.transport.abort()


class LoopbackProxy(LoopbackServer):
    """``async with LoopbackProxy(connector) as proxy:`` listens on ``proxy.port``."""

    def __init__(
        self,
        connector: UpstreamConnector,
        *,
        hooks: Callable[[], SessionHooks] = PassThroughHooks,
        limits: ProxyLimits | None = None,
        timeouts: ProxyTimeouts | None = None,
        inspect: Iterable[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(hooks=hooks, limits=limits, timeouts=timeouts, host=host, port=port)
        self.connector = connector
        self.inspect = inspect
        self.live: list[ProxySession] = []
        """The running sessions, oldest first."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream = await self.connector.connect()
        except (OSError, TimeoutError) as exc:
            logger.warning("upstream connect failed: %s", exc)
            writer.write(b"-ERR failed to connect to the target database\r\n")
            with contextlib.suppress(OSError):
                await writer.drain()
            writer.close()
            return
        session = ProxySession(
            (reader, writer),
            upstream,
            hooks=self.hooks(),
            limits=self.limits,
            timeouts=self.timeouts,
            inspect=self.inspect,
        )
        self.live.append(session)
        try:
            self.finished.append(await session.run())
        finally:
            self.live.remove(session)

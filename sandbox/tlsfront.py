"""A TLS front: an asyncio server that terminates TLS and pipes bytes to a plain upstream.

Each accepted connection runs :meth:`TLSFront.handle_connection`, which subclasses extend
to look at (or answer) the first command before the relay starts, e.g. to check AUTH.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Sequence

log = logging.getLogger(__name__)

Address = tuple[str, int]
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]

CHUNK = 65536


class TLSFront:
    """Listen on ``host:port`` (0: ephemeral) with TLS, relay each connection in clear
    to the first of ``upstreams`` that accepts; no upstream reachable: the client is
    dropped right after the handshake."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        upstreams: Sequence[Address],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "front",
        connect_timeout: float = 2.0,
        handshake_timeout: float = 5.0,
    ) -> None:
        self.ssl_context = ssl_context
        self.upstreams = list(upstreams)
        self.host = host
        self.port = port
        self.name = name
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> Address:
        return (self.host, self.port)

    async def start(self) -> None:
        """Bind and listen; ``port`` is known afterwards."""
        self._server = await asyncio.start_server(
            self._accept,
            self.host,
            self.port,
            ssl=self.ssl_context,
            ssl_handshake_timeout=self.handshake_timeout,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and cut every open connection; idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handle_connection(reader, writer)
        except asyncio.CancelledError:
            # close() cancels us; ending normally keeps 3.11's stream callback from
            # reporting the cancellation as an error (it calls task.exception()).
            pass
        except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError) as exc:
            log.debug("%s: connection ended: %r", self.name, exc)
        except Exception:
            log.exception("%s: connection failed", self.name)
        finally:
            writer.transport.abort()
            self._tasks.discard(task)

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one client (its TLS handshake done): open the upstream and relay.

        Override to intercept the first command (read it from ``reader``, answer on
        ``writer`` or forward it upstream), then call :meth:`relay`.
        """
        upstream = await self.open_upstream()
        if upstream is None:
            return
        await self.relay(reader, writer, *upstream)

    async def open_upstream(self) -> Stream | None:
        """A plain connection to the first upstream that accepts one, else None."""
        for host, port in self.upstreams:
            try:
                return await asyncio.wait_for(
                    asyncio.open_connection(host, port), timeout=self.connect_timeout
                )
            except (OSError, TimeoutError) as exc:
                log.debug("%s: upstream %s:%d: %r", self.name, host, port, exc)
        return None

    async def relay(
        self,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        upstream_reader: asyncio.StreamReader,
        upstream_writer: asyncio.StreamWriter,
    ) -> None:
        """Copy bytes both ways until the upstream side ends (a client EOF is passed on
        as a half-close, so the server's last replies still get through); close both."""
        to_upstream = asyncio.create_task(self.pipe(client_reader, upstream_writer))
        try:
            await self.pipe(upstream_reader, client_writer)
        finally:
            to_upstream.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await to_upstream
            upstream_writer.transport.abort()
            client_writer.transport.abort()

    @staticmethod
    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Copy ``src`` to ``dst`` until EOF or error, then half-close ``dst`` if it can."""
        try:
            while data := await src.read(CHUNK):
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof() and not dst.is_closing():
                dst.write_eof()
        except OSError as exc:
            log.debug("pipe ended: %r", exc)

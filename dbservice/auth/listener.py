"""The auth service's TLS listener: bounded connections before anything is read.

asyncio's own server (what ``web.TCPSite`` uses) accepts every connection and only hands
it to the application after the TLS handshake, so a flood of connections that never
finish a request holds file descriptors until the process runs out. Here fleetgate
accepts itself (:meth:`asyncio.loop.sock_accept`) and, before any TLS:

* refuses a connection (closes it at once) when its source address already has
  ``per_address`` connections open, or the service ``max_connections``;
* gives the TLS handshake ``handshake_timeout``
  (:meth:`asyncio.loop.connect_accepted_socket`), then hands the connection to aiohttp,
  whose ``keepalive_timeout`` (``header_timeout``) closes a connection that does not
  send a whole request head in time, and whose handler reads a body within
  ``body_timeout`` (:mod:`dbservice.auth.service`);
* logs what it refused, handshakes that failed and running out of file descriptors at
  most once per ``log_interval`` (:class:`RefusalLog`): one summary line, no
  traceback, however many connections are refused or reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

logger = logging.getLogger(__name__)

_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(frozen=True)
class ConnectionLimits:
    per_address: int = 100
    max_connections: int = 4096
    handshake_timeout: float = 10.0
    header_timeout: float = 15.0
    body_timeout: float = 15.0
    log_interval: float = 60.0


@dataclass
class RefusalLog:
    """Counts what was refused, and logs it at most once per ``interval``: the first
    refusal of an interval at once, the rest as one summary when the interval ends."""

    interval: float
    clock: Callable[[], float] = time.monotonic
    _pending: Counter[tuple[str, str]] = field(default_factory=Counter)
    _last: float | None = None
    _timer: asyncio.TimerHandle | None = None

    def note(self, what: str, address: str) -> None:
        """One refusal: ``what`` happened (e.g. ``more than 5 connections open``) to a
        connection from ``address``."""
        self._pending[(what, address)] += 1
        now = self.clock()
        if self._last is None or now - self._last >= self.interval:
            self.flush()
        elif self._timer is None:
            delay = self._last + self.interval - now
            self._timer = asyncio.get_running_loop().call_later(delay, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        self._last = self.clock()
        total = sum(self._pending.values())
        top = self._pending.most_common(5)
        parts = [f"{n} from {address}: {what}" for (what, address), n in top]
        more = len(self._pending) - len(parts)
        logger.warning(
            "refused %d connection%s or request%s (%s%s); further ones within %gs are "
            "counted and reported together",
            total, "" if total == 1 else "s", "" if total == 1 else "s",
            "; ".join(parts), f"; and {more} more sources" if more > 0 else "",
            self.interval,
        )  # fmt: skip
        self._pending.clear()


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, with a call when the connection is gone
    (so its place in the per-address count is given back)."""

    def __init__(self, inner: asyncio.Protocol, gone: Callable[[], None]) -> None:
        self._inner = inner
        self._gone: Callable[[], None] | None = gone

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._inner.connection_lost(exc)
        finally:
            gone, self._gone = self._gone, None
            if gone is not None:
                gone()

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class GuardedListener:
    """Accepts TLS connections for an aiohttp server within :class:`ConnectionLimits`."""

    def __init__(
        self,
        server: web.Server,
        ssl_context: ssl.SSLContext,
        limits: ConnectionLimits,
        refusals: RefusalLog,
    ) -> None:
        self.server = server
        self.ssl_context = ssl_context
        self.limits = limits
        self.refusals = refusals
        self.open: Counter[str] = Counter()
        """Open connections (handshakes included) per source address."""
        self._sockets: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        """Connections still in their TLS handshake."""
        self._accepting: list[asyncio.Future[None]] = []
        """One accept loop per bound socket."""

    @property
    def total(self) -> int:
        return sum(self.open.values())

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (every address the name has); the port bound."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        bound = port
        seen: set[tuple[int, object]] = set()
        try:
            for family, kind, proto, _, address in infos:
                if (family, address) in seen:
                    continue
                seen.add((family, address))
                sock = socket.socket(family, kind, proto)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if bound:
                    address = (address[0], bound, *address[2:])
                sock.bind(address)
                sock.listen(128)
                sock.setblocking(False)
                bound = sock.getsockname()[1]
        except OSError:
            self._close_sockets()
            raise
        for sock in self._sockets:
            self._accepting.append(asyncio.ensure_future(self._accept(sock)))
        return int(bound)

    async def serve(self) -> None:
        """Until the accept loops end: raises what one of them failed with, so the
        process that owns this listener (a root task of the auth service) stops with
        the reason instead of serving no one."""
        await asyncio.gather(*self._accepting)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        limits = self.limits
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self.refusals.note(f"cannot accept: {exc.strerror}", "any address")
                    await asyncio.sleep(0.1)
                    continue
                if sock.fileno() == -1:
                    return  # closed
                logger.debug("accept failed: %s", exc)
                await asyncio.sleep(0.01)
                continue
            try:
                self._admit(conn, str(peer[0]), limits)
            except BaseException:
                conn.close()  # not handed on: ours to close, whatever went wrong
                raise

    def _admit(self, conn: socket.socket, address: str, limits: ConnectionLimits) -> None:
        """Start the handshake of an accepted connection, or close it over a limit."""
        if self.open[address] >= limits.per_address:
            conn.close()
            self.refusals.note(f"more than {limits.per_address} connections open", address)
            return
        if self.total >= limits.max_connections:
            conn.close()
            self.refusals.note(
                f"the service has {limits.max_connections} connections open", address
            )
            return
        self.open[address] += 1
        self._spawn(self._handshake(conn, address))

    def _release(self, address: str) -> Callable[[], None]:
        """A call that gives ``address``'s place back, once however often it is made."""
        done = False

        def release() -> None:
            nonlocal done
            if done:
                return
            done = True
            self.open[address] -= 1
            if self.open[address] <= 0:
                del self.open[address]

        return release

    async def _handshake(self, conn: socket.socket, address: str) -> None:
        loop = asyncio.get_running_loop()
        handed = False
        gone = self._release(address)

        def protocol() -> asyncio.Protocol:
            nonlocal handed
            handed = True
            return _Counted(self.server(), gone)

        try:
            await loop.connect_accepted_socket(
                protocol,
                conn,
                ssl=self.ssl_context,
                ssl_handshake_timeout=self.limits.handshake_timeout,
            )
        except (TimeoutError, OSError) as exc:
            # The loop closed the socket; the protocol never saw a connection.
            gone()
            reason = "TLS handshake timed out" if _timed_out(exc) else "TLS handshake failed"
            logger.debug("connection from %s: %s (%s)", address, reason, exc)
            self.refusals.note(reason, address)
        except BaseException:
            gone()
            if not handed:
                conn.close()
            raise

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self._sockets.clear()

    async def close(self) -> None:
        """Stop accepting, and drop connections still in their TLS handshake (those
        already handed to aiohttp are closed by its runner)."""
        self._close_sockets()
        for task in [*self._accepting, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)  # handshakes: no news
        for ended in await asyncio.gather(*self._accepting, return_exceptions=True):
            if isinstance(ended, Exception):
                logger.error("an accept loop had failed: %s", ended, exc_info=ended)
        self._accepting.clear()
        self.refusals.flush()


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or "timed out" in str(exc).lower()

"""One client session: a client connection and an upstream connection, proxied.

The engine takes connected stream pairs (what ``asyncio.start_server`` and
``asyncio.open_connection`` give, TLS or not), then takes their transports over with
its own small protocols, so each read goes straight from the event loop into the
parsers and each write straight to the other transport: no task wake-up per read.
Bytes a stream had already buffered are processed first.

* The client side: :class:`CommandParser` decides per command and forwards at once; it
  never waits for a reply, so pipelines stay pipelines.
* The server side: :class:`ReplyParser` finds reply boundaries and passes the bytes on.
* Back-pressure with transport flow control: when one side's write buffer passes the
  high-water mark (``pause_writing``) the engine stops reading the other side until it
  drains (``resume_writing``); the client is also not read while ``max_pending``
  commands are unanswered. Memory stays bounded whichever side is slow.
* The agent's own commands (a renewed IAM ``AUTH``): :meth:`ProxySession.inject` writes
  one between two client commands and its reply is dropped, not sent to the client.
* ``RESET`` makes the server connection ``default``: when the hooks say how to log it
  in again (:meth:`SessionHooks.on_reset`), nothing the client sent after the RESET is
  read until that ``AUTH`` (written right behind the RESET) has succeeded; if it fails
  the session ends with an error. The client gets the server's ``+RESET``.

The agent runs one per accepted, authorised connection::

    upstream = await connector.connect()
    session = ProxySession((reader, writer), upstream, hooks=hooks, limits=..., timeouts=...)
    stats = await session.run()     # returns when either side closes, on idle, on error
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

from fleetgate.aio import set_nodelay, take_over

from .commands import CommandParser
from .errors import ProtocolError, UpstreamProtocolError, error_reply
from .halfclose import EofSignal, first_owed_blocks
from .hooks import SessionHooks
from .inline import encode_command
from .pending import Injected, Item, Local, Special, Sub
from .replies import ReplyParser
from .settings import ProxyLimits, ProxyTimeouts

logger = logging.getLogger(__name__)

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]

# Why a side is not being read (a bit each; it is read again when none is left).
_PEER_FULL = 1
_TOO_MANY_PENDING = 2
_STOPPED = 4
_RELOGIN = 8


@dataclass(slots=True)
class SessionStats:
    """Counters for ``db.session.end``."""

    commands: int = 0
    """Commands received (forwarded or answered by the engine)."""
    refused: int = 0
    """Commands answered by the engine instead of the server (hook refusals)."""
    replies: int = 0
    """Replies from the server matched to commands."""
    pushes: int = 0
    """Push and pub/sub messages passed to the client."""
    bytes_from_client: int = 0
    bytes_to_client: int = 0
    started: float = field(default_factory=time.time)
    duration: float = 0.0
    reason: str = ""
    """Why the session ended: ``client closed``, ``server closed``, ``idle``,
    ``protocol error: ...``, ``server protocol error: ...``, ``stopped``,
    ``internal error: ...``."""


class _Side(asyncio.Protocol):
    """The engine's protocol on one transport; everything is forwarded to the session's
    callbacks for this side (``pause``/``resume``: stop and restart reading the other
    side while this one's write buffer is full)."""

    def __init__(
        self,
        *,
        data: Callable[[bytes], None],
        eof: Callable[[], None],
        lost: Callable[[], None],
        pause: Callable[[], None],
        resume: Callable[[], None],
        tls: bool,
    ) -> None:
        self.tls = tls
        self.data_received = data  # type: ignore[method-assign,assignment]
        self._on_eof, self._on_lost = eof, lost
        self._on_pause, self._on_resume = pause, resume
        self.lost = asyncio.get_running_loop().create_future()

    def eof_received(self) -> bool:
        if self.tls:  # TLS cannot half-close: the peer cannot read any more
            self._on_lost()
        else:
            self._on_eof()
        # Keep the write side open for replies still owed (plain TCP; TLS cannot).
        return not self.tls

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self._on_lost()

    def pause_writing(self) -> None:
        self._on_pause()

    def resume_writing(self) -> None:
        self._on_resume()

    def release(self) -> None:
        """Let go of the session (it has ended): from now on, events go nowhere."""
        self.data_received = _ignore  # type: ignore[method-assign]
        self._on_eof = self._on_lost = self._on_pause = self._on_resume = _nothing


def _ignore(data: bytes) -> None:
    """Reads on a transport whose session has ended."""


def _nothing() -> None:
    """Other events on a transport whose session has ended."""


class ProxySession:
    """Proxies one client connection over one upstream connection until either ends."""

    def __init__(
        self,
        client: Streams,
        upstream: Streams,
        *,
        hooks: SessionHooks,
        limits: ProxyLimits | None = None,
        timeouts: ProxyTimeouts | None = None,
        inspect: Iterable[str] = (),
        eof_command: str | None = None,
    ) -> None:
        self._limits = limits or ProxyLimits()
        self._timeouts = timeouts or ProxyTimeouts()
        self._client_reader, self._client_writer = client
        self._up_reader, self._up_writer = upstream
        # Stream writers type their transport as write-only; these also read.
        self._client_transport = cast(asyncio.Transport, self._client_writer.transport)
        self._up_transport = cast(asyncio.Transport, self._up_writer.transport)
        self.stats = SessionStats()
        self._pending: deque[Item] = deque()
        self._max_pending = self._limits.max_pending
        self._paused = {True: 0, False: 0}
        self._closing_reason: str | None = None
        """Set when the client is done (EOF, protocol error): end once nothing is owed."""
        self._close_written = False
        self._done: asyncio.Future[str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last = 0.0
        self._timers: list[asyncio.TimerHandle] = []
        self._sides: list[_Side] = []
        self._closed = False
        self._released = False
        self._final_resp3 = False
        self._relogin: asyncio.Task[None] | None = None
        self._client_write = self._client_transport.write
        if eof_command is not None:  # the tunnel's word for its client's half-close
            hooks = EofSignal(hooks, eof_command, lambda: self._client_done("client closed"))
        self._commands = CommandParser(
            hooks=hooks,
            limits=self._limits,
            forward=self._up_transport.write,
            local=self._local,
            pending=self._pending,
            inspect=inspect,
        )
        self._replies = ReplyParser(
            hooks=hooks,
            limits=self._limits,
            write=self._to_client,
            pending=self._pending,
            on_close_reply=self._close_reply_written,
        )

    @property
    def resp3(self) -> bool:
        """The client switched the connection to RESP3 (HELLO 3 succeeded)."""
        return self._final_resp3 if self._released else self._replies.resp3

    @property
    def buffered(self) -> int:
        """Bytes held of a command still arriving: arguments are streamed, so at most a
        command the engine reads whole (``max_inspect``) plus one read."""
        return 0 if self._released else self._commands.buffered

    @property
    def owed(self) -> int:
        """Replies owed to the client right now."""
        return len(self._pending)

    # -- the agent's own commands -------------------------------------------------------

    def inject(self, args: Sequence[bytes], on_reply: Callable[[bool], None]) -> bool:
        """Write a command of the agent's own on the upstream connection now, between two
        client commands; its reply is kept from the client (replies keep their order for
        the client) and ``on_reply(ok)`` is called with False when it was an error.

        Returns False, writing nothing, when it cannot go now: the session is not
        running or is ending, a client command is half forwarded, the client is inside
        ``MULTI``, the connection is (or is about to be) in RESP2 subscribed mode or in
        ``MONITOR``, or a ``HELLO``/``RESET`` is still unanswered. The caller retries
        later. ``on_reply`` is not called when the session ends first. The command must
        be answered by one short reply (``AUTH``, ``PING`` outside pub/sub): it is
        dropped from a single read.
        """
        if self._done is None or self._done.done() or self._closing_reason is not None:
            return False
        commands, replies = self._commands, self._replies
        if (
            not commands.at_boundary
            or commands.in_multi
            or replies.monitor
            or commands.held is not None
        ):
            return False
        for item in self._pending:  # commands still owed a reply that change the mode
            if type(item) is Special or (type(item) is Sub and not replies.resp3):
                return False
        if replies.subscribed and not replies.resp3:
            return False
        self._pending.append(Injected(on_reply))
        self._up_transport.write(encode_command(args))
        return True

    # -- running -------------------------------------------------------------------------

    async def run(self) -> SessionStats:
        """Proxy until the client or the server closes, the session idles out, or the
        task is cancelled; always closes both connections. Returns the counters."""
        loop = self._loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        self._last = loop.time()
        high = self._limits.write_high_water
        try:
            for client, (reader, writer) in (
                (True, (self._client_reader, self._client_writer)),
                (False, (self._up_reader, self._up_writer)),
            ):
                set_nodelay(writer)
                transport = self._client_transport if client else self._up_transport
                with contextlib.suppress(AttributeError, NotImplementedError):
                    transport.set_write_buffer_limits(high=high)
                tls = transport.get_extra_info("sslcontext") is not None
                side = _Side(
                    data=self._client_data if client else self._upstream_data,
                    eof=functools.partial(self._eof, client=client),
                    lost=functools.partial(self._lost, client=client),
                    pause=functools.partial(self._pause, client=not client, why=_PEER_FULL),
                    resume=functools.partial(self._resume, client=not client, why=_PEER_FULL),
                    tls=tls,
                )
                self._sides.append(side)
                buffered, at_eof = take_over(reader, transport, side)
                if buffered:
                    side.data_received(buffered)
                if at_eof or transport.is_closing():
                    self._eof(client=client)
                elif not self._paused[client]:
                    transport.resume_reading()
            if self._timeouts.idle is not None:
                self._timers.append(loop.call_later(self._timeouts.idle, self._check_idle))
            self.stats.reason = await self._done
        except asyncio.CancelledError:
            self.stats.reason = "stopped"
            raise
        finally:
            for timer in self._timers:
                timer.cancel()
            if self._relogin is not None:
                self._relogin.cancel()
            self._count()
            self.stats.duration = time.time() - self.stats.started
            try:
                await self.aclose()
            finally:
                self._release()
        return self.stats

    def _release(self) -> None:
        """Break the reference cycles of an ended session (its protocols and parsers call
        its bound methods, its timers hold its callbacks, it holds them all), so it is
        freed by reference counting as soon as its owner lets go, with its TLS buffers,
        instead of waiting for a run of the cyclic garbage collector."""
        self._final_resp3 = self._replies.resp3
        self._released = True
        for side in self._sides:
            side.release()
        self._sides.clear()
        self._timers.clear()
        # The parsers hold the session's bound methods and the hooks; nothing reads
        # them once the session has ended (inject() checks _done first).
        del self._commands, self._replies

    def _finish(self, reason: str) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(reason)

    def _count(self) -> None:
        stats, commands, replies = self.stats, self._commands, self._replies
        stats.commands = commands.commands
        stats.refused = commands.refused
        stats.replies = replies.replies
        stats.pushes = replies.pushes

    async def aclose(self) -> None:
        """Close both connections, letting buffered bytes out for at most
        ``close_grace`` seconds. Idempotent."""
        if self._closed:
            return
        self._closed = True
        transports = (self._client_transport, self._up_transport)
        for transport in transports:
            transport.close()
        try:
            if self._sides:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._timeouts.close_grace):
                        await asyncio.gather(*(side.lost for side in self._sides))
            else:
                for writer in (self._client_writer, self._up_writer):
                    with contextlib.suppress(OSError, TimeoutError):
                        async with asyncio.timeout(self._timeouts.close_grace):
                            await writer.wait_closed()
        finally:  # on timeout or cancellation: drop what is still buffered
            for transport in transports:
                transport.abort()

    # -- events from the transports ---------------------------------------------------

    def _client_data(self, data: bytes) -> None:
        if self._closing_reason is not None:
            return
        self.stats.bytes_from_client += len(data)
        assert self._loop is not None
        self._last = self._loop.time()
        self._parse_client(data)

    def _parse_client(self, data: bytes) -> None:
        try:
            self._commands.feed(data)
        except ProtocolError as exc:
            self._local(Local(exc.reply, close=True))
            self._client_done(f"protocol error: {exc.detail}")
            return
        except Exception as exc:  # a bug in a hook or here: end this session only
            logger.exception("proxy session failed on client data")
            self._finish(f"internal error: {exc!r}")
            return
        if len(self._pending) > self._max_pending:
            self._pause(client=True, why=_TOO_MANY_PENDING)
        held = self._commands.held
        if held is not None and self._relogin is None:
            assert self._loop is not None
            self._pause(client=True, why=_RELOGIN)
            self._relogin = self._loop.create_task(self._log_in_again(held))

    async def _log_in_again(self, held: Awaitable[Sequence[bytes] | None]) -> None:
        """After a RESET: write the hooks' AUTH behind it, wait for its reply, then read
        the client again; end the session when that cannot be done."""
        try:
            args = await held
        except Exception as exc:
            logger.warning("cannot log a session in again after RESET: %s", exc)
            self._relogin_failed(str(exc) or type(exc).__name__)
            return
        if args is not None:
            if self._replies.monitor or any(
                type(item) is Special and item.name == "MONITOR" for item in self._pending
            ):
                self._relogin_failed(
                    "RESET after MONITOR ends the session through fleetgate: the agent "
                    "cannot log the connection in again while it streams MONITOR output; "
                    "connect again"
                )
                return
            assert self._loop is not None
            done: asyncio.Future[bool] = self._loop.create_future()

            def answered(ok: bool) -> None:
                if not done.done():
                    done.set_result(ok)

            self._pending.append(Injected(answered))
            self._up_transport.write(encode_command(args))
            if not await done:
                self._relogin_failed(
                    "the server refused the agent's login after RESET, so the session ends"
                )
                return
        self._relogin = None
        self._commands.release()
        self._resume(client=True, why=_RELOGIN)
        self._parse_client(b"")
        if self._closing_reason is not None and not self._pending:
            self._finish(self._closing_reason)

    def _relogin_failed(self, reason: str) -> None:
        self._local(Local(error_reply(f"fleetgate: {reason}"), close=True))
        self._client_done(f"login after RESET failed: {reason}")

    def _upstream_data(self, data: bytes) -> None:
        assert self._loop is not None
        self._last = self._loop.time()
        try:
            self._replies.feed(data)
        except UpstreamProtocolError as exc:
            logger.warning("closing a session: the server's replies did not parse: %s", exc)
            self._finish(f"server protocol error: {exc}")
            return
        except Exception as exc:
            logger.exception("proxy session failed on server data")
            self._finish(f"internal error: {exc!r}")
            return
        if self._paused[True] & _TOO_MANY_PENDING and len(self._pending) <= self._max_pending // 2:
            self._resume(client=True, why=_TOO_MANY_PENDING)
        if self._closing_reason is not None:
            self._check_closing()

    def _eof(self, *, client: bool) -> None:
        if client:
            self._client_done("client closed")
        else:
            self._finish("server closed")

    def _lost(self, *, client: bool) -> None:
        """A side that can take nothing more: end now (a client that left must not have
        anything consumed on its behalf while a reply nobody reads is awaited)."""
        self._finish("client closed" if client else "server closed")

    def _client_done(self, reason: str) -> None:
        """The client will send nothing more (a half-close, or a protocol error): end
        once the replies it is owed are out, at most ``close_grace`` seconds from now,
        and at once rather than wait on a command that may block or in subscribed or
        ``MONITOR`` mode (:mod:`.halfclose`)."""
        if self._closing_reason is not None:
            return
        self._closing_reason = reason
        self._pause(client=True, why=_STOPPED)
        self._check_closing()
        if not self._done_set() and self._loop is not None:
            self._timers.append(
                self._loop.call_later(self._timeouts.close_grace, self._finish, reason)
            )

    def _check_closing(self) -> None:
        reason, pending, replies = self._closing_reason, self._pending, self._replies
        assert reason is not None
        owed = any(type(item) is not Local and type(item) is not Injected for item in pending)
        if (
            not owed
            or self._close_written
            or replies.subscribed
            or replies.monitor
            or first_owed_blocks(pending)
        ):
            self._finish(reason)

    def _done_set(self) -> bool:
        return self._done is not None and self._done.done()

    def _check_idle(self) -> None:
        assert self._loop is not None and self._timeouts.idle is not None
        remaining = self._last + self._timeouts.idle - self._loop.time()
        if remaining <= 0:
            self._finish("idle")
        else:
            self._timers.append(self._loop.call_later(remaining, self._check_idle))

    def _pause(self, *, client: bool, why: int) -> None:
        before = self._paused[client]
        self._paused[client] = before | why
        if not before:
            transport = self._client_transport if client else self._up_transport
            with contextlib.suppress(RuntimeError):
                transport.pause_reading()

    def _resume(self, *, client: bool, why: int) -> None:
        before = self._paused[client]
        after = self._paused[client] = before & ~why
        if before and not after:
            transport = self._client_transport if client else self._up_transport
            if not transport.is_closing():
                transport.resume_reading()

    # -- writing to the client -----------------------------------------------------------

    def _to_client(self, data: bytes | memoryview) -> None:
        self.stats.bytes_to_client += len(data)
        self._client_write(data)

    def _local(self, item: Local) -> None:
        """An engine reply: now if nothing is owed before it, else in its turn."""
        if not self._pending and self._replies.at_boundary:
            self._to_client(item.reply)
            if item.close:
                self._close_reply_written()
        else:
            self._pending.append(item)

    def _close_reply_written(self) -> None:
        self._close_written = True

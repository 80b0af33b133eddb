"""Audit emission that never sits on the command path.

:class:`AuditEmitter` takes events with a non-blocking :meth:`~AuditEmitter.emit` into a
bounded queue; one background task publishes them to the audit stream in small
concurrent batches. While NATS is away, events stay queued and are retried with
backoff (each carries a ``Nats-Msg-Id``, so a retry after a lost acknowledgement is
stored once). When the queue is full, new events are dropped and counted: the count is
published as an ``audit.dropped`` event as soon as delivery works, and
:attr:`AuditEmitter.dropped_total` exposes it as a metric.

:class:`SessionAudit` binds the common fields of one proxy session (user, roles,
database, db user, client address, agent host id, session id) and is what the listener
calls: ``start()``, ``query(args)`` per command, ``add_bytes()``, ``end()`` in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from bus import Bus
from bus.access import Identity
from bus.audit import (
    AuditEvent,
    EventsDropped,
    SessionEnd,
    SessionQuery,
    SessionStart,
    publish_event,
)

logger = logging.getLogger(__name__)

Publish = Callable[[AuditEvent], Awaitable[None]]

MASK: Final = "******"
_SECRET_PREFIXES: Final = (">", "<", "#", "!")
_SECRET_CONFIG: Final = {"REQUIREPASS", "MASTERAUTH", "MASTERUSER"}


@dataclass(frozen=True)
class QueryRedaction:
    """How much of each command goes into ``db.session.query`` events."""

    max_arg_len: int = 256
    """Longer arguments are cut, with ``…(+N bytes)`` appended."""
    max_args: int = 64
    """Further arguments are replaced by one ``…(+N args)``."""
    redact_values: bool = False
    """Keep only the first argument (usually the key); replace the rest by their size."""


def _text(arg: bytes | str) -> str:
    return arg if isinstance(arg, str) else arg.decode("utf-8", "backslashreplace")


def mask_secrets(name: str, args: list[str]) -> list[str]:
    """Hide passwords in AUTH, HELLO ... AUTH, MIGRATE ... AUTH/AUTH2, ACL SETUSER and
    CONFIG SET requirepass/masterauth. ``args`` excludes the command name."""
    out = list(args)
    upper = [a.upper() for a in out]
    if name == "AUTH":
        return [out[0], MASK] if len(out) == 2 else [MASK] * len(out)
    if name == "HELLO" and "AUTH" in upper:
        at = upper.index("AUTH")  # HELLO 3 AUTH <user> <password> [SETNAME name]
        if at + 2 < len(out):
            out[at + 2] = MASK
        else:
            out[at + 1 :] = [MASK] * len(out[at + 1 :])
        return out
    if name == "MIGRATE":
        for i, word in enumerate(upper):
            if word == "AUTH" and i + 1 < len(out):
                out[i + 1] = MASK
            if word == "AUTH2" and i + 2 < len(out):
                out[i + 2] = MASK
        return out
    if name == "ACL" and upper[:1] == ["SETUSER"]:
        return [
            a[0] + MASK if i >= 2 and a.startswith(_SECRET_PREFIXES) else a
            for i, a in enumerate(out)
        ]
    if name == "CONFIG" and upper[:1] == ["SET"]:
        for i in range(1, len(out) - 1, 2):
            if upper[i] in _SECRET_CONFIG:
                out[i + 1] = MASK
    return out


def describe_command(
    args: Sequence[bytes | str], redaction: QueryRedaction = QueryRedaction()
) -> tuple[str, tuple[str, ...]]:
    """``[b"SET", b"k", b"v"]`` -> ``("SET", ("k", "v"))`` with secrets masked and the
    redaction applied."""
    if not args:
        return "", ()
    name = _text(args[0]).upper()
    rest = mask_secrets(name, [_text(a) for a in args[1 : redaction.max_args + 1]])
    extra = len(args) - 1 - redaction.max_args
    cut = redaction.max_arg_len
    rest = [
        f"<{len(args[i + 1])} bytes>"
        if redaction.redact_values and i > 0 and a != MASK
        else a
        if len(a) <= cut
        else f"{a[:cut]}…(+{len(a) - cut} bytes)"
        for i, a in enumerate(rest)
    ]
    if extra > 0:
        rest.append(f"…(+{extra} args)")
    return name, tuple(rest)


class AuditEmitter:
    """A bounded queue of audit events and the task that publishes them."""

    def __init__(
        self,
        publish: Publish,
        *,
        host_id: str = "",
        maxsize: int = 10_000,
        batch: int = 64,
        retry_min: float = 0.1,
        retry_max: float = 5.0,
    ) -> None:
        self._publish = publish
        self.host_id = host_id
        self._queue: asyncio.Queue[AuditEvent] = asyncio.Queue(maxsize)
        self._batch_size = batch
        self._retry = (retry_min, retry_max)
        self._pending: list[AuditEvent] = []
        self._unreported = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self.dropped_total = 0
        """Events lost because the queue was full, since start: a monotonic counter."""
        self.published_total = 0

    @classmethod
    def for_bus(cls, bus: Bus, **kwargs: Any) -> AuditEmitter:
        async def publish(event: AuditEvent) -> None:
            await publish_event(bus, event)

        return cls(publish, **kwargs)

    @property
    def backlog(self) -> int:
        """Events waiting to be published (queued and being retried)."""
        return self._queue.qsize() + len(self._pending)

    def emit(self, event: AuditEvent) -> bool:
        """Queue ``event`` without waiting; False (and counted) when the queue is full."""
        if event.host_id == "" and self.host_id:
            event = event.model_copy(update={"host_id": self.host_id})
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.drop()
            return False
        self._idle.clear()
        return True

    def full(self) -> bool:
        """Whether the next :meth:`emit` would be dropped (callers may skip building it)."""
        return self._queue.full()

    def drop(self) -> None:
        """Count one event lost to a full queue (reported as ``audit.dropped``)."""
        self.dropped_total += 1
        self._unreported += 1

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="audit-emitter")

    async def aclose(self, *, flush_timeout: float = 5.0) -> None:
        """Publish what is queued (up to ``flush_timeout``), then stop the task."""
        if self._task is None:
            return
        await self.flush(flush_timeout)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self.backlog:
            logger.warning("audit: %d events not published at shutdown", self.backlog)

    async def flush(self, wait: float) -> bool:
        """Wait up to ``wait`` seconds until everything queued is published; False if not."""
        try:
            async with asyncio.timeout(wait):
                while self.backlog or self._unreported:
                    self._idle.clear()
                    await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def __aenter__(self) -> AuditEmitter:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def run(self) -> None:
        """Publish forever; cancel to stop."""
        delay = self._retry[0]
        failing = False
        while True:
            if not self._pending:
                if self._queue.empty() and not self._unreported:
                    self._idle.set()
                    self._pending.append(await self._queue.get())
                while len(self._pending) < self._batch_size and not self._queue.empty():
                    self._pending.append(self._queue.get_nowait())
            self._report_drops()
            results = await asyncio.gather(
                *(self._publish(e) for e in self._pending), return_exceptions=True
            )
            failed = [e for e, r in zip(self._pending, results, strict=True) if r is not None]
            errors = [r for r in results if r is not None]
            self.published_total += len(self._pending) - len(failed)
            self._pending = failed
            if failed:
                if not failing:
                    logger.warning(
                        "audit: cannot publish (%s); holding %d events and retrying",
                        errors[0],
                        self.backlog,
                    )
                failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry[1])
            else:
                if failing:
                    logger.info("audit: publishing again")
                failing, delay = False, self._retry[0]

    def _report_drops(self) -> None:
        if not self._unreported:
            return
        count, self._unreported = self._unreported, 0
        for i, event in enumerate(self._pending):
            if isinstance(event, EventsDropped) and event.host_id == self.host_id:
                count += event.dropped
                self._pending[i] = event.model_copy(update={"dropped": count})
                return
        self._pending.append(
            EventsDropped(
                host_id=self.host_id,
                dropped=count,
                success=False,
                reason=f"audit queue full: {count} events dropped",
            )
        )
        logger.error("audit: queue full, %d events dropped", count)

    # -- sessions -------------------------------------------------------------------------

    def session(
        self,
        identity: Identity,
        *,
        database: str,
        db_user: str,
        client_addr: str,
        session_id: str | None = None,
        redaction: QueryRedaction = QueryRedaction(),
    ) -> SessionAudit:
        return SessionAudit(
            self,
            common={
                "user": identity.user,
                "roles": identity.roles,
                "database": database,
                "db_user": db_user,
                "client_addr": client_addr,
                "host_id": self.host_id,
                "session_id": session_id or uuid.uuid4().hex,
            },
            redaction=redaction,
        )


class SessionAudit:
    """The audit trail of one proxy session. Every method is synchronous and cheap."""

    def __init__(
        self, emitter: AuditEmitter, *, common: dict[str, Any], redaction: QueryRedaction
    ) -> None:
        self._emitter = emitter
        self.common = common
        self.redaction = redaction
        self.started = time.monotonic()
        self.commands = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._ended = False

    @property
    def session_id(self) -> str:
        return str(self.common["session_id"])

    def start(self, *, success: bool = True, reason: str = "") -> None:
        self._emitter.emit(SessionStart(**self.common, success=success, reason=reason))

    def query(self, args: Sequence[bytes | str], *, success: bool = True, reason: str = "") -> None:
        """One command; ``success=False`` with ``reason`` when it was refused."""
        self.commands += 1
        if self._emitter.full():  # it would be dropped: count it without building it
            self._emitter.drop()
            return
        name, rest = describe_command(args, self.redaction)
        self._emitter.emit(
            SessionQuery(**self.common, command=name, args=rest, success=success, reason=reason)
        )

    def add_bytes(self, to_db: int = 0, to_client: int = 0) -> None:
        self.bytes_in += to_db
        self.bytes_out += to_client

    def end(self, *, reason: str = "") -> None:
        """Emit ``db.session.end`` once (safe to call from several ``finally`` blocks)."""
        if self._ended:
            return
        self._ended = True
        self._emitter.emit(
            SessionEnd(
                **self.common,
                reason=reason,
                duration=round(time.monotonic() - self.started, 6),
                commands=self.commands,
                bytes_in=self.bytes_in,
                bytes_out=self.bytes_out,
            )
        )

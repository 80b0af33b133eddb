"""Audit emission that never sits on the command path.

:class:`AuditEmitter` takes events with a non-blocking :meth:`~AuditEmitter.emit` into a
bounded queue; one background task publishes them to the audit stream, many in flight
at once. While NATS is away, events stay queued and are retried with backoff (each
carries a ``Nats-Msg-Id``, so a retry after a lost acknowledgement is stored once). When
the queue is full, new events are dropped and counted: the count is published as an
``audit.dropped`` event as soon as delivery works, and :attr:`AuditEmitter.dropped_total`
exposes it as a metric.

:class:`SessionAudit` binds the common fields of one proxy session (user, roles,
database, db user, client address, agent host id, session id) and is what the listener
calls: ``start()``, ``query(args)`` per command, ``add_bytes()``, ``end()`` in ``finally``.
``query()`` describes the command (secrets masked, redaction and truncation applied),
encodes it to JSON bytes and appends them to the session's buffer; the buffer goes out
as one ``db.session.queries`` batch when it holds :attr:`BatchLimits.commands` commands
or :attr:`BatchLimits.bytes` bytes, on the emitter's timer (every
:attr:`BatchLimits.interval`), and at ``end()``, which puts ``db.session.end`` in the
same message when commands are still buffered then (a session's end costs no message of
its own). A command that finds the queue full is counted as dropped without being
described.
``allowed(args)`` is ``query(args)`` for an allowed command as sent, the agent's command
path: the same record, without the general description when nothing is to be masked,
cut or redacted (about 0.75 us per GET or SET with the hooks, against 1.6 us).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from bus import Bus
from bus.access import Identity
from bus.audit import (
    AuditEvent,
    EventsDropped,
    Outgoing,
    QueryBatch,
    SessionEnd,
    SessionStart,
    Spooled,
    encode_query,
    publish_event,
    spooled,
)
from bus.link import connected
from dbservice.access.spool import AuditSpool

logger = logging.getLogger(__name__)

Publish = Callable[[Outgoing], Awaitable[None]]

MASK: Final = "******"
_OPTION_MAX: Final = 32
"""Option and subcommand names masking compares are shorter than this: of a longer
argument only this many bytes are read, and it is no option."""
_NAME_MAX: Final = 64
"""Command names longer than this (no real one is) are cut like any argument, and not
remembered in :data:`_NAMES`."""
_SECRET_CONFIG: Final = frozenset(
    {
        b"REQUIREPASS",
        b"MASTERAUTH",
        b"PRIMARYAUTH",
        b"MASTERUSER",
        b"PRIMARYUSER",
        b"TLS-KEY-FILE-PASS",
        b"TLS-CLIENT-KEY-FILE-PASS",
    }
)
"""The server's sensitive settings (``SENSITIVE_CONFIG`` in valkey's config.c, names and
aliases), whose values ``CONFIG SET`` carries."""
_SENTINEL_SECRETS: Final = frozenset({b"AUTH-PASS", b"SENTINEL-PASS"})
_RULE_SECRET: Final = re.compile(r"(?:^|[\s(])[<>#!]")
"""Where a password (``>pw``, ``<pw``) or hash (``#h``, ``!h``) starts in an ACL rule."""


@dataclass(frozen=True)
class QueryRedaction:
    """How much of each command goes into ``db.session.query`` events."""

    max_arg_len: int = 256
    """Longer arguments are cut to this many bytes (never inside a UTF-8 character), with
    ``…(+N bytes)`` appended; only the bytes kept are ever decoded."""
    max_args: int = 64
    """Further arguments are replaced by one ``…(+N args)``."""
    redact_values: bool = False
    """Keep only the first argument (usually the key); replace the rest by their size."""


def _word(arg: bytes) -> bytes:
    """``arg`` as the server compares an option or command name: ``strcasecmp`` on a C
    string, so up to its first NUL (``AUTH\\x00x`` is ``AUTH``) and in ASCII upper case.
    Only the first :data:`_OPTION_MAX` bytes are read."""
    return arg[:_OPTION_MAX].split(b"\0", 1)[0].upper()


def _text(arg: bytes | str) -> str:
    return arg if isinstance(arg, str) else arg.decode("utf-8", "backslashreplace")


def _raw(arg: bytes | str) -> bytes:
    return arg if isinstance(arg, bytes) else arg.encode("utf-8", "backslashreplace")


_UTF8_LENGTH: Final = (0,) * 12 + (2, 2, 3, 4)
"""Bytes of a UTF-8 character by the high four bits of its first byte."""


def _cut(arg: bytes | str, cut: int) -> str:
    """The text of at most ``cut`` bytes of ``arg`` (backed off to the start of a UTF-8
    character cut in two), with ``…(+N bytes)`` when bytes were left out. Only the bytes
    kept are decoded, so the cost does not grow with the argument."""
    if isinstance(arg, str):  # the agent's own notes: short
        return arg if len(arg) <= cut else f"{arg[:cut]}…(+{len(arg) - cut} bytes)"
    size = len(arg)
    if size <= cut:
        return arg.decode("utf-8", "backslashreplace")
    end = cut
    start = end - 1
    while start > end - 4 and start > 0 and arg[start] & 0xC0 == 0x80:
        start -= 1
    if start >= 0 and end > 0:
        lead = arg[start]
        need = _UTF8_LENGTH[lead >> 4] if 0xC2 <= lead <= 0xF4 else 0
        if need and start + need > end:
            end = start
    return f"{arg[:end].decode('utf-8', 'backslashreplace')}…(+{size - end} bytes)"


def secret_arguments(name: bytes, args: Sequence[bytes]) -> dict[int, int]:
    """Which of ``args`` (the arguments after the command name, as sent) carry a secret:
    index -> how many leading bytes stay visible (0: the whole argument is masked; an
    ACL rule keeps its ``>``/``<``/``#``/``!``). ``name`` is :func:`_word` of the
    command name. Option names are compared as the server compares them (any case, up to
    a NUL), and wherever they stand: a misplaced option still keeps its secret out."""
    n = len(args)
    out: dict[int, int] = {}
    if name == b"AUTH":
        return {1: 0} if n == 2 else dict.fromkeys(range(n), 0)
    if name == b"HELLO":  # HELLO 3 AUTH <user> <password> [AUTH <user> <password>]...
        for i in range(n):
            if _word(args[i]) == b"AUTH":
                out.update({i + 2: 0} if i + 2 < n else dict.fromkeys(range(i + 1, n), 0))
    elif name == b"MIGRATE":  # ... [AUTH <password> | AUTH2 <user> <password>]
        for i in range(n):
            word = _word(args[i])
            if word == b"AUTH" and i + 1 < n:
                out[i + 1] = 0
            elif word == b"AUTH2" and i + 1 < n:
                out[min(i + 2, n - 1)] = 0
    elif name == b"ACL" and n and _word(args[0]) == b"SETUSER":
        for i in range(2, n):  # ACL SETUSER <user> <rule>...
            out[i] = 1
    elif name == b"CONFIG" and n and _word(args[0]) == b"SET":
        for i in range(1, n - 1):  # CONFIG SET <name> <value> [<name> <value>]...
            if _word(args[i]) in _SECRET_CONFIG:
                out[i + 1] = 0
    elif name == b"SENTINEL":  # SENTINEL SET m auth-pass <pw>, SENTINEL CONFIG SET ...
        for i in range(n - 1):
            if _word(args[i]) in _SENTINEL_SECRETS:
                out[i + 1] = 0
    return out


def _masked_rule(arg: bytes, cut: int) -> str | None:
    """An ACL rule with its password or hash masked, or None when it holds none (in the
    bytes the audit keeps: what follows is not recorded anyway)."""
    text = _cut(arg, cut)
    found = _RULE_SECRET.search(text)
    if found is None:
        return None
    return text[: found.end()] + MASK


_MASKED: Final = frozenset({b"AUTH", b"HELLO", b"MIGRATE", b"ACL", b"CONFIG", b"SENTINEL"})
"""The commands :func:`secret_arguments` may mask (as :func:`_word` of their name)."""
_NAMES: dict[bytes | str, str] = {}
"""Command names as sent -> upper case, for the first few thousand short spellings."""
_PLAIN: dict[bytes | str, str] = {}
"""The same for names of commands that carry no secret: what :meth:`SessionAudit.allowed`
may record without looking for one."""
_dumps = orjson.dumps


def _name(head: bytes | str) -> str:
    """The command name for the record (upper case), remembered when short."""
    name = _cut(head, _NAME_MAX).upper()
    if len(head) <= _NAME_MAX and len(_NAMES) < 4096:
        _NAMES[head] = name
        if _word(_raw(head)) not in _MASKED:
            _PLAIN[head] = name
    return name


def describe_command(
    args: Sequence[bytes | str], redaction: QueryRedaction = QueryRedaction()
) -> tuple[str, tuple[str, ...]]:
    """``[b"SET", b"k", b"v"]`` -> ``("SET", ("k", "v"))`` with secrets masked and the
    redaction applied. Only the bytes kept are read: the cost does not grow with the
    size of an argument."""
    if not args:
        return "", ()
    head = args[0]
    name = _NAMES.get(head)
    if name is None:
        name = _name(head)
    cut = redaction.max_arg_len
    kept = args[1 : redaction.max_args + 1]
    if (
        head in _PLAIN
        and not redaction.redact_values
        and len(args) <= redaction.max_args + 1
        and all(len(a) <= cut for a in kept)
    ):  # the common case: nothing to mask, redact or cut off
        return name, tuple([_text(a) for a in kept])
    word = _word(_raw(head))
    secrets = secret_arguments(word, [_raw(a) for a in kept]) if word in _MASKED else {}
    rest: list[str] = []
    for i, arg in enumerate(kept):
        visible = secrets.get(i)
        if visible is None:
            rest.append(
                f"<{len(arg)} bytes>" if redaction.redact_values and i > 0 else _cut(arg, cut)
            )
        elif visible == 0:
            rest.append(MASK)
        elif (masked := _masked_rule(_raw(arg), cut)) is not None:
            rest.append(masked)
        else:  # an ACL rule without a password
            rest.append(
                f"<{len(arg)} bytes>" if redaction.redact_values and i > 0 else _cut(arg, cut)
            )
    extra = len(args) - 1 - redaction.max_args
    if extra > 0:
        rest.append(f"…(+{extra} args)")
    return name, tuple(rest)


@dataclass(frozen=True)
class BatchLimits:
    """When a session's buffered commands go out as one ``db.session.queries`` message."""

    commands: int = 1024
    """At this many commands. Each message costs the agent about 0.1 ms of CPU (publish
    and acknowledgement, measured with nats-py), so at pipeline 16 a batch of 256 still
    added about half a microsecond per command."""
    bytes: int = 256 * 1024
    """At this many bytes of encoded commands: a batch stays well under NATS's default
    1 MiB message limit."""
    interval: float = 0.2
    """At most this many seconds after a command came (one timer per emitter)."""


class NotConnected(Exception):
    """The bus is not connected: nothing was published."""


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):g} MiB"


class AuditEmitter:
    """A bounded queue of audit events and the task that publishes them."""

    def __init__(
        self,
        publish: Publish,
        *,
        host_id: str = "",
        maxsize: int = 100_000,
        batch: int = 64,
        limits: BatchLimits = BatchLimits(),
        retry_min: float = 0.1,
        retry_max: float = 5.0,
        spool: AuditSpool | None = None,
        online: Callable[[], bool] = lambda: True,
    ) -> None:
        self._publish = publish
        self._online = online
        """Whether the bus is connected now: while it is not, events go straight to the
        spool (when there is one) instead of waiting in memory for a publish to fail."""
        self.spool = spool
        """Where events wait while the bus does not take them (None: in memory only,
        dropped and counted when the queue is full)."""
        self._spooling = spool is not None and len(spool) > 0
        """Whether new events go to the spool, behind the ones waiting there (from the
        first failed publish until the spool is empty again). Then the memory queue is
        empty; ``_pending`` may still hold older events, published first."""
        self._failing = False
        self.host_id = host_id
        self.limits = limits
        self._maxsize = maxsize
        """Events (a batch counts its commands) queued or being retried, at most: a
        burst of pipelined commands queues faster than acknowledgements come back, and a
        queued command is its JSON (about 100 bytes with the object's header)."""
        self._queue: deque[Outgoing] = deque()
        self._queued = 0
        """Events in ``_queue``."""
        self._wake = asyncio.Event()
        self._in_flight = batch
        self._retry = (retry_min, retry_max)
        self._pending: list[Outgoing] = []
        self._pending_events = 0
        self._held = 0
        """``_queued + _pending_events``, kept for the per-command check."""
        self._unreported = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._buffered: dict[SessionAudit, None] = {}
        """Sessions with buffered commands, oldest first."""
        self._buffering = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.dropped_total = 0
        """Events lost because the queue was full, since start: a monotonic counter."""
        self.published_total = 0
        """Events published (a batch counts its commands)."""

    @classmethod
    def for_bus(cls, bus: Bus, **kwargs: Any) -> AuditEmitter:
        async def publish(event: Outgoing) -> None:
            await publish_event(bus, event)

        return cls(publish, online=lambda: connected(bus), **kwargs)

    @property
    def backlog(self) -> int:
        """Events waiting to be published (queued, spooled and being retried; a batch
        counts its commands), not counting commands still in sessions' buffers."""
        return self._held + (self.spool.pending_events if self.spool is not None else 0)

    @property
    def spooling(self) -> bool:
        """Whether events are kept on disk now, waiting for the bus."""
        return self._spooling

    def emit(self, event: AuditEvent) -> bool:
        """Queue ``event`` without waiting; False (and counted) when the queue is full."""
        if event.host_id == "" and self.host_id:
            event = event.model_copy(update={"host_id": self.host_id})
        return self._put(event, 1)

    def _put(self, item: AuditEvent | QueryBatch, events: int) -> bool:
        if self.spool is not None and (
            self._spooling or self._held + events > self._maxsize or not self._online()
        ):
            if self.spool.full() and not isinstance(item, (SessionEnd, QueryBatch)):
                # What still comes closes sessions that are open; anything else (a
                # refused session) is counted, and its session was refused.
                self.drop(events)
                return False
            self._to_spool(item)
            return True
        if self._held + events > self._maxsize:
            self.drop(events)
            return False
        self._queue.append(item)
        self._queued += events
        self._held += events
        self._idle.clear()
        self._wake.set()
        return True

    def full(self) -> bool:
        """Whether the next :meth:`emit` would be dropped (checked for every command);
        with a spool, whether it holds its ``max_bytes``."""
        if self.spool is not None:
            return self.spool.full()
        return self._held >= self._maxsize

    def full_reason(self) -> str:
        """Why new sessions and commands are refused while :meth:`full` (with a spool)."""
        spool = self.spool
        size = spool.max_bytes if spool is not None else 0
        return (
            f"the agent's audit spool is full ({_mib(size)}, listener.audit.spool_max_bytes): "
            "it cannot reach NATS to deliver the audit events it keeps, so it refuses new "
            "sessions and commands rather than lose their audit"
        )

    # -- the spool ----------------------------------------------------------------------

    def _to_spool(self, item: AuditEvent | QueryBatch) -> None:
        spool = self.spool
        assert spool is not None
        if not self._spooling:
            self._start_spooling()
        was_full = spool.full()
        spool.append((spooled(item),))
        if spool.full() and not was_full:
            logger.error(
                "audit: the spool %s is full (%d events, %d bytes): new sessions and commands "
                "are refused until NATS takes events again",
                spool.directory,
                spool.pending_events,
                spool.pending_bytes,
            )
        self._idle.clear()
        self._wake.set()

    def _start_spooling(self) -> None:
        """From now on events go to the spool: first what the memory queue holds."""
        spool = self.spool
        assert spool is not None
        self._spooling = True
        queue = self._queue
        spool.append([spooled(item) for item in queue if not isinstance(item, Spooled)])
        queue.clear()
        self._held -= self._queued
        self._queued = 0
        logger.warning(
            "audit: keeping events in the spool %s until NATS takes them (%d waiting; at most %s)",
            spool.directory,
            spool.pending_events,
            _mib(spool.max_bytes),
        )

    def _keep_in_spool(self) -> int:
        """At the stop: what is still in memory goes to the spool, in order; how many
        events the spool holds then."""
        spool = self.spool
        assert spool is not None
        older = [spooled(e) for e in self._pending if not isinstance(e, Spooled)]
        spool.prepend(older)
        spool.append([spooled(e) for e in self._queue if not isinstance(e, Spooled)])
        if self._unreported:
            spool.append((spooled(self._dropped_event(self._unreported)),))
            self._unreported = 0
        self._pending, self._pending_events = [], 0
        self._queue.clear()
        self._queued = self._held = 0
        spool.sync()
        spool.close()
        return spool.pending_events

    async def _sync_loop(self) -> None:
        """``fsync`` the spool about once a second while it grows."""
        spool = self.spool
        assert spool is not None
        while True:
            await asyncio.sleep(1.0)
            if spool.dirty:
                try:
                    spool.sync()
                except OSError as exc:
                    logger.error("audit: cannot sync the spool %s (%s)", spool.directory, exc)

    def drop(self, events: int = 1) -> None:
        """Count events lost to a full queue (reported as ``audit.dropped``)."""
        self.dropped_total += events
        self._unreported += events
        self._wake.set()

    # -- batches of commands ------------------------------------------------------------

    def buffering_in(self, session: SessionAudit) -> None:
        """``session`` holds buffered commands now (:meth:`flush_sessions` flushes it)."""
        self._buffered[session] = None
        self._buffering.set()

    def emit_queries(
        self,
        session: SessionAudit,
        first_seq: int,
        queries: list[bytes],
        end: SessionEnd | None = None,
    ) -> None:
        """Queue a session's buffered commands (and its end, when it ended) as one batch
        (or drop and count them)."""
        self._buffered.pop(session, None)
        batch = QueryBatch(session.common, first_seq, queries, end=end)
        self._put(batch, len(batch))

    def flush_sessions(self) -> None:
        """Queue every session's buffered commands now."""
        for session in list(self._buffered):
            session.flush()
        self._buffering.clear()

    async def _tick(self) -> None:
        """Every buffered command goes out at most ``limits.interval`` after it came."""
        while True:
            await self._buffering.wait()
            await asyncio.sleep(self.limits.interval)
            self.flush_sessions()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="audit-emitter")

    async def aclose(self, *, flush_timeout: float = 5.0) -> None:
        """Publish what is queued (up to ``flush_timeout``; not waiting when the bus is
        failing and there is a spool), then stop the task; with a spool, what is left
        is kept in it for the next start."""
        if self._task is None:
            if self.spool is not None:
                self.flush_sessions()
                self._keep_in_spool()
            return
        await self.flush(0 if self.spool is not None and self._failing else flush_timeout)
        task, self._task = self._task, None
        task.cancel()
        # wait() rather than awaiting the task: a cancellation of *our* caller must not
        # be taken for the emitter's own.
        await asyncio.wait([task])
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("audit: the emitter had failed", exc_info=error)
        if self.spool is not None:
            kept = self._keep_in_spool()
            if kept:
                logger.warning(
                    "audit: %d events not published yet are kept in the spool %s; they are "
                    "published when the agent next runs and reaches NATS",
                    kept,
                    self.spool.directory,
                )
        elif self.backlog:
            logger.warning("audit: %d events not published at shutdown", self.backlog)

    async def flush(self, wait: float) -> bool:
        """Queue sessions' buffered commands, then wait up to ``wait`` seconds until
        everything queued is published; False if not."""
        self.flush_sessions()
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
        """Publish forever (and flush sessions' buffers on time); cancel to stop."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._tick(), name="audit-batch-timer")
            group.create_task(self._publish_loop(), name="audit-publisher")
            if self.spool is not None:
                group.create_task(self._sync_loop(), name="audit-spool-sync")

    async def _publish_loop(self) -> None:
        delay = self._retry[0]
        queue = self._queue
        while True:
            from_spool = False
            if not self._pending:
                while not queue and not self._unreported and not self._spooling:
                    self._idle.set()
                    self._wake.clear()
                    await self._wake.wait()
                if self._spooling and self.spool is not None:
                    self._pending = list(self.spool.peek(self._in_flight))
                    from_spool = bool(self._pending)
                    if not from_spool:
                        self._spooling = False
                while len(self._pending) < self._in_flight and queue:
                    item = queue.popleft()
                    events = len(item) if isinstance(item, QueryBatch) else 1
                    self._queued -= events
                    self._pending_events += events
                    self._pending.append(item)
            self._report_drops()
            results: list[BaseException | None]
            if self.spool is not None and not self._online():
                # No connection: to the spool now (or left there), not after each publish
                # waited for its timeout in the client's reconnect buffer.
                results = [NotConnected("not connected to NATS")] * len(self._pending)
            else:
                results = await asyncio.gather(
                    *(self._publish_one(e) for e in self._pending), return_exceptions=True
                )
            errors = [r for r in results if r is not None]
            if from_spool:
                failed = self._acknowledge_spooled(results)
            else:
                failed = self._acknowledge(results)
            if failed:
                if not self._failing:
                    logger.warning(
                        "audit: cannot publish (%s); holding %d events and retrying",
                        errors[0],
                        self.backlog,
                    )
                self._failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry[1])
            else:
                if self._failing:
                    logger.info("audit: publishing again")
                self._failing, delay = False, self._retry[0]

    async def _publish_one(self, item: Outgoing) -> None:
        if isinstance(item, Spooled) and not item.subject:
            return  # an unreadable spool line (logged): nothing to publish
        await self._publish(item)

    def _acknowledge(self, results: list[BaseException | None]) -> bool:
        """After publishing from memory: count what was stored, keep what failed (in the
        spool, when there is one); whether anything failed."""
        failed = [e for e, r in zip(self._pending, results, strict=True) if r is not None]
        left = sum(len(e) if isinstance(e, (QueryBatch, Spooled)) else 1 for e in failed)
        self.published_total += self._pending_events - left
        self._held -= self._pending_events - left
        self._pending, self._pending_events = failed, left
        if failed and self.spool is not None:
            # The failed ones are older than anything spooled: they go first.
            self.spool.prepend([spooled(e) for e in failed if not isinstance(e, Spooled)])
            self._held -= left
            self._pending, self._pending_events = [], 0
            if not self._spooling:
                self._start_spooling()
        return bool(failed)

    def _acknowledge_spooled(self, results: list[BaseException | None]) -> bool:
        """After publishing from the spool: remove the messages stored, up to the first
        that failed (those after it are published again: their ids make JetStream store
        them once); whether anything failed."""
        spool = self.spool
        assert spool is not None
        stored = next((i for i, r in enumerate(results) if r is not None), len(results))
        self.published_total += sum(
            e.events if isinstance(e, Spooled) else 1 for e in self._pending[:stored]
        )
        spool.ack(stored)
        failed = stored < len(results)
        self._pending, self._pending_events = [], 0
        if not len(spool):
            self._spooling = False
            logger.info("audit: the spool %s is delivered", spool.directory)
        return failed

    def _dropped_event(self, count: int) -> EventsDropped:
        what = (
            f"audit spool full: {count} events not recorded (their sessions and commands "
            "were refused)"
            if self.spool is not None
            else f"audit queue full: {count} events dropped"
        )
        return EventsDropped(host_id=self.host_id, dropped=count, success=False, reason=what)

    def _report_drops(self) -> None:
        if not self._unreported:
            return
        count, self._unreported = self._unreported, 0
        if self.spool is not None:
            self._to_spool(self._dropped_event(count))
            logger.error("audit: spool full, %d events not recorded", count)
            return
        for i, event in enumerate(self._pending):
            if isinstance(event, EventsDropped) and event.host_id == self.host_id:
                count += event.dropped
                self._pending[i] = event.model_copy(update={"dropped": count})
                return
        self._pending.append(self._dropped_event(count))
        self._pending_events += 1
        self._held += 1
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
        common: dict[str, Any] = {
            "user": identity.user,
            "roles": identity.roles,
            "database": database,
            "db_user": db_user,
            "client_addr": client_addr,
            "host_id": self.host_id,
            "session_id": session_id or uuid.uuid4().hex,
        }
        if identity.aws_arn:  # only then: every other session's messages stay as they were
            common["principal"] = identity.aws_arn
        return SessionAudit(self, common=common, redaction=redaction)


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
        self._buffer: list[bytes] = []
        """Buffered commands, each already described and encoded (bytes are invisible to
        the garbage collector; a buffer of tuples and lists made it a tenth of the
        agent's CPU)."""
        self._buffer_bytes = 0
        self._max_commands = emitter.limits.commands
        self._max_bytes = emitter.limits.bytes
        self._flushed = 0
        """Commands already handed to the emitter (the next batch's first is this + 1)."""
        self._plain_argc = 0 if redaction.redact_values else redaction.max_args + 1
        """Commands of at most this many words (name included) may take the short way
        in :meth:`allowed` (0: none, every value is redacted)."""
        self._plain_len = redaction.max_arg_len

    @property
    def session_id(self) -> str:
        return str(self.common["session_id"])

    def full_reason(self) -> str:
        """Why a command is refused when :meth:`query` answered False."""
        return self._emitter.full_reason()

    def start(self, *, success: bool = True, reason: str = "") -> None:
        self._emitter.emit(SessionStart(**self.common, success=success, reason=reason))

    def query(self, args: Sequence[bytes | str], *, success: bool = True, reason: str = "") -> bool:
        """One command; ``success=False`` with ``reason`` when it was refused. False
        when it could not be recorded and must be refused (the emitter's spool is full;
        without a spool, a full queue drops and counts it, and the answer is True)."""
        self.commands += 1
        emitter = self._emitter
        if emitter.full():  # dropped: counted, not described
            self.flush()  # (the numbering of the next batch starts after this one)
            self._flushed += 1
            emitter.drop()
            return emitter.spool is None
        name, shown = describe_command(args, self.redaction)
        self._add(encode_query(time.time(), name, shown, success, reason))
        return True

    def allowed(self, args: Sequence[bytes]) -> bool:
        """``query(args)`` for an allowed command as the client sent it: the same event,
        the short way when nothing is to be masked, cut or redacted and every argument
        is UTF-8 (the command path of every proxied command). Sizes are checked before
        anything is decoded, so a large argument costs no more than a small one. False
        as :meth:`query`: the command must be refused."""
        emitter = self._emitter
        name = _PLAIN.get(args[0])
        argc = len(args)
        if name is None or argc > self._plain_argc or emitter.full():
            return self.query(args)
        cut = self._plain_len
        try:  # GET k, SET k v unrolled: a comprehension is a call of its own
            if argc == 3:
                key, value = args[1], args[2]
                if len(key) > cut or len(value) > cut:
                    return self.query(args)
                text = [key.decode(), value.decode()]
            elif argc == 2:
                key = args[1]
                if len(key) > cut:
                    return self.query(args)
                text = [key.decode()]
            else:
                if any(len(a) > cut for a in args[1:]):
                    return self.query(args)
                text = [a.decode() for a in args[1:]]
        except UnicodeDecodeError:
            return self.query(args)
        self.commands += 1
        # _add inlined: a call fewer on every proxied command.
        item = _dumps({"time": time.time(), "command": name, "args": text})
        buffer = self._buffer
        buffer.append(item)
        self._buffer_bytes += len(item)
        if len(buffer) == 1:
            emitter.buffering_in(self)
        if len(buffer) >= self._max_commands or self._buffer_bytes >= self._max_bytes:
            self.flush()
        return True

    def _add(self, item: bytes) -> None:
        emitter = self._emitter
        buffer = self._buffer
        buffer.append(item)
        self._buffer_bytes += len(item)
        if len(buffer) == 1:
            emitter.buffering_in(self)
        if len(buffer) >= self._max_commands or self._buffer_bytes >= self._max_bytes:
            self.flush()

    def flush(self, *, end: SessionEnd | None = None) -> None:
        """Hand the buffered commands (and ``end`` when the session ends) to the emitter
        as one batch."""
        queries = self._buffer
        if not queries:
            if end is not None:
                self._emitter.emit(end)
            return
        self._buffer, self._buffer_bytes = [], 0
        first = self._flushed + 1
        self._flushed += len(queries)
        self._emitter.emit_queries(self, first, queries, end)

    def add_bytes(self, to_db: int = 0, to_client: int = 0) -> None:
        self.bytes_in += to_db
        self.bytes_out += to_client

    def end(self, *, reason: str = "") -> None:
        """Emit the buffered commands, then ``db.session.end``, once (safe to call from
        several ``finally`` blocks)."""
        if self._ended:
            return
        self._ended = True
        event = SessionEnd(
            **self.common,
            reason=reason,
            duration=round(time.monotonic() - self.started, 6),
            commands=self.commands,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
        )
        if self._buffer:  # one message: the last commands (and the start) and the end
            self.flush(end=event)
            return
        self.flush()
        self._emitter.emit(event)

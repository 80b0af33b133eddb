"""A KV watch that never loses or duplicates state: snapshot, ``synced``, then changes.

nats-py's ``kv.watch`` delivers the last value of every key, then a ``None`` marker,
then live updates. :class:`KvWatch` turns that into :class:`Event` objects and adds
what a long-running reader needs:

* after a reconnect (``resync()``) or a broken watch it opens a new one, and at the new
  snapshot's end emits only the difference to what it already reported: upserts for new
  or changed keys, deletes for keys that vanished while it was away, then ``synced``;
* it drops duplicates (a revision it already reported), so readers may apply events
  blindly;
* it checks that its consumer still exists while nothing arrives: a consumer lives on
  one NATS server, and when that server dies nothing tells the client (nats-py notices
  a gap only when a message arrives); a watch whose consumer is gone opens again;
* an unreadable record is logged and treated as absent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import nats.js.errors
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from bus.errors import RegistryError
from fleetgate.aio import cancel_and_wait, cancellation_kept, finished
from fleetgate.backoff import backoff_delay

logger = logging.getLogger(__name__)


def describe(exc: BaseException) -> str:
    """An exception as one short phrase, even when its message is empty."""
    return str(exc) or type(exc).__name__


T = TypeVar("T")

_RESYNC = object()
_STOP = object()
_BACKOFF = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
_DEFERRED_SYNC_WAIT = 2.0
"""Longest wait for snapshot entries the server sent before nats-py's end marker."""
LIVENESS_INTERVAL = 2.0
"""How often a watch that received nothing checks that its consumer still exists."""
_LIVENESS_FAILURES = 2
"""Consecutive unanswered checks after which the watch opens again."""
CONSUMER_INACTIVE = 5.0
"""Seconds without interest after which the server removes a watch's consumer.
nats-py's default is five minutes and its stop does not delete the consumer, so each
one-shot read (a snapshot: ``db ls``, a sweep, a listing) would keep one on the server
that long, and a bucket stops answering at nats-server's 1,000 consumers. A live watch
always has interest; one whose consumer went during a long disconnect is reopened (its
liveness check, or the resync after a reconnect)."""


@dataclass(frozen=True)
class Event(Generic[T]):
    """One change seen by a watch."""

    kind: Literal["upsert", "deleted", "synced"]
    key: str = ""
    value: T | None = None
    revision: int = 0


class KvWatch(Generic[T]):
    """Iterate once; stop with :meth:`stop`; :meth:`resync` forces a fresh snapshot."""

    def __init__(
        self,
        *,
        open_bucket: Callable[[], Awaitable[KeyValue]],
        keys: str,
        decode: Callable[[str, bytes], T | None],
        retry_open: bool = True,
    ) -> None:
        self._open_bucket = open_bucket
        self._keys = keys
        self._decode = decode
        self._retry_open = retry_open
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._known: dict[str, int] = {}
        self._watcher: Any = None
        self._pump: asyncio.Task[None] | None = None
        self._liveness: asyncio.Task[None] | None = None
        self._last_entry = 0.0
        self._stopped = False
        self.resyncs = 0

    def resync(self) -> None:
        """Start over with a new snapshot (called by the bus after a reconnect)."""
        self._queue.put_nowait(_RESYNC)

    async def stop(self) -> None:
        """End the iteration and release the server-side consumer."""
        self._stopped = True
        self._queue.put_nowait(_STOP)
        await self._close_watcher()

    async def _close_watcher(self) -> None:
        """Stop the liveness check, the pump and nats-py's watcher, each to its end (their
        errors were reported where they happened). A cancellation of the caller meanwhile
        is raised once all three are done: an interrupted close would leave the pump and
        nats-py's heartbeat task running for the connection's life."""
        liveness, self._liveness = self._liveness, None
        pump, self._pump = self._pump, None
        watcher, self._watcher = self._watcher, None
        steps: list[Awaitable[object]] = [cancel_and_wait(t) for t in (liveness, pump) if t]
        if watcher is not None:
            # within 2 s: a lost connection does not hold the caller
            steps.append(finished(asyncio.ensure_future(watcher.stop()), 2))
        interrupted = False
        for step in steps:
            try:
                await step
            except asyncio.CancelledError:  # each step waited for its part to end
                interrupted = True
        if interrupted:
            raise asyncio.CancelledError

    async def _open(self) -> None:
        with cancellation_kept():  # nats-py may lose a cancellation (Python 3.11)
            kv = await self._open_bucket()
            # Interrupted half-way, nats-py's watch leaves its subscription and heartbeat
            # task behind: let it finish, and keep what it made for stop() to close.
            opening = asyncio.ensure_future(
                kv.watch(self._keys, inactive_threshold=CONSUMER_INACTIVE)
            )
            try:
                await asyncio.shield(opening)
            finally:
                try:
                    await finished(opening)  # the caller's cancellation is raised after
                finally:
                    if not opening.cancelled() and opening.exception() is None:
                        self._watcher = opening.result()
        self._pump = asyncio.create_task(self._pump_from(self._watcher), name="kv-watch-pump")
        self._last_entry = time.monotonic()
        self._liveness = asyncio.create_task(
            self._check_alive(self._watcher), name="kv-watch-liveness"
        )

    async def _pump_from(self, watcher: Any) -> None:
        try:
            async for entry in watcher:
                self._last_entry = time.monotonic()
                self._queue.put_nowait(entry)
        except Exception as exc:  # the watch broke: make the reader reopen it
            self._queue.put_nowait(exc)

    def __aiter__(self) -> AsyncIterator[Event[T]]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event[T]]:
        attempt = 0
        while not self._stopped:
            try:
                await self._open()
            except Exception as exc:
                if not self._retry_open:  # a one-shot read: say why, do not wait forever
                    await self._close_watcher()
                    if isinstance(exc, RegistryError):
                        raise
                    raise RegistryError(
                        f"cannot read {self._keys!r} from the registry ({describe(exc)}): "
                        "is JetStream up, and may this NATS user read the bucket?"
                    ) from exc
                delay = backoff_delay(_BACKOFF, attempt)
                attempt += 1
                logger.warning(
                    "cannot open watch on %s (%s); retrying in %.1fs",
                    self._keys,
                    describe(exc),
                    delay,
                )
                await self._close_watcher()
                await asyncio.sleep(delay)
                continue
            snapshot: dict[str, tuple[int, T]] | None = {}
            seen_last = False  # an entry with nothing pending after it: the snapshot's end
            deferred = False  # the end marker came before entries the server had sent
            while True:
                if deferred:
                    try:
                        async with asyncio.timeout(_DEFERRED_SYNC_WAIT):
                            item = await self._queue.get()
                    except TimeoutError:
                        item = None
                        seen_last = True
                else:
                    item = await self._queue.get()
                if item is _STOP:
                    return
                if item is _RESYNC or isinstance(item, Exception):
                    if isinstance(item, Exception):
                        logger.warning("watch on %s broke (%s); resyncing", self._keys, item)
                    break
                if item is None:  # end of the initial snapshot, says nats-py
                    if snapshot is not None:
                        if not seen_last and await self._server_delivered() > 0:
                            # nats-py decides "nothing pending" from consumer info, which
                            # does not count messages already sent to us but not yet
                            # handed over: wait for the entry that ends the snapshot.
                            deferred = True
                            continue
                        for event in self._diff(snapshot):
                            yield event
                        snapshot, deferred = None, False
                        attempt = 0
                    continue
                if snapshot is not None:
                    self._collect(snapshot, item)
                    if (item.delta or 0) == 0:
                        seen_last = True
                        if deferred:
                            for event in self._diff(snapshot):
                                yield event
                            snapshot, deferred = None, False
                            attempt = 0
                    continue
                live = self._live(item)
                if live is not None:
                    yield live
            self.resyncs += 1
            await self._close_watcher()
            self._drain()

    async def _check_alive(self, watcher: Any) -> None:
        """While nothing arrives, ask every :data:`LIVENESS_INTERVAL` seconds whether the
        consumer still exists; gone, or unanswered twice in a row: open the watch again
        (its snapshot reports what was missed; revisions already reported are dropped)."""
        sub = getattr(watcher, "_sub", None)  # nats-py's KeyWatcher keeps it there
        if sub is None:
            return
        unanswered = 0
        while True:
            await asyncio.sleep(LIVENESS_INTERVAL)
            if time.monotonic() - self._last_entry < LIVENESS_INTERVAL:
                unanswered = 0
                continue
            try:
                async with asyncio.timeout(LIVENESS_INTERVAL):
                    await sub.consumer_info()
            except nats.js.errors.NotFoundError:
                reason = "its consumer is gone"
            except Exception as exc:  # no answer: its server may be down
                unanswered += 1
                if unanswered < _LIVENESS_FAILURES:
                    continue
                reason = f"its consumer does not answer ({describe(exc)})"
            else:
                unanswered = 0
                continue
            logger.warning("watch on %s: %s; opening it again", self._keys, reason)
            self._queue.put_nowait(_RESYNC)
            return

    async def _server_delivered(self) -> int:
        """How many messages the server has sent this watch's consumer (0 when unknown)."""
        sub = getattr(self._watcher, "_sub", None)  # nats-py's KeyWatcher keeps it there
        if sub is None:
            return 0
        try:
            info = await sub.consumer_info()
        except Exception:  # no answer: trust nats-py's marker as before
            return 0
        return int(info.delivered.consumer_seq or 0) if info.delivered else 0

    def _drain(self) -> None:
        while not self._queue.empty():
            if self._queue.get_nowait() is _STOP:
                self._stopped = True

    def _collect(self, snapshot: dict[str, tuple[int, T]], entry: KeyValue.Entry) -> None:
        if entry.operation in (KV_DEL, KV_PURGE):
            snapshot.pop(entry.key, None)
            return
        value = self._decode(entry.key, entry.value or b"")
        if value is None:
            snapshot.pop(entry.key, None)
        else:
            snapshot[entry.key] = (entry.revision or 0, value)

    def _diff(self, snapshot: dict[str, tuple[int, T]]) -> list[Event[T]]:
        events: list[Event[T]] = []
        for key in [k for k in self._known if k not in snapshot]:
            del self._known[key]
            events.append(Event("deleted", key))
        for key, (revision, value) in snapshot.items():
            if self._known.get(key) != revision:
                self._known[key] = revision
                events.append(Event("upsert", key, value, revision))
        events.append(Event("synced"))
        return events

    def _live(self, entry: KeyValue.Entry) -> Event[T] | None:
        revision = entry.revision or 0
        if entry.operation in (KV_DEL, KV_PURGE):
            if self._known.pop(entry.key, None) is None:
                return None
            return Event("deleted", entry.key, revision=revision)
        if revision <= self._known.get(entry.key, 0):
            return None  # already reported
        value = self._decode(entry.key, entry.value or b"")
        if value is None:
            if self._known.pop(entry.key, None) is None:
                return None
            return Event("deleted", entry.key, revision=revision)
        self._known[entry.key] = revision
        return Event("upsert", entry.key, value, revision)

"""Which discovery replica polls which fetcher: one lease per fetcher in the bus.

Discovery may run as several replicas (in one region or several) for high
availability. Each fetcher (matcher x type x region, named by its status key) has one
lease record in :data:`~bus.subjects.DISCOVERY_LEASES_BUCKET`, keyed like its status
record, and only the replica holding it polls that fetcher and writes what it owns.

* **Take.** A lease that does not exist (or was released) is created with
  compare-and-set: of several replicas racing, exactly one wins.
* **Renew.** The holder rewrites its record every ``period / 4`` with compare-and-set on
  the revision it last wrote. A failed compare-and-set means another replica took it:
  the lease is lost at once.
* **Take over.** Every replica watches the bucket and notes, by its own clock
  (:func:`lease_clock`), when it first saw each revision. A revision unchanged for the
  holder's ``period`` (the period written in the record) means the holder stopped
  renewing: the watcher takes it over with compare-and-set on that revision. No wall
  clocks are compared, so clock skew between hosts or regions does not matter; only
  clock *rates* do.
* **Fencing.** A holder counts its lease valid until ``period`` after it *sent* its last
  successful renewal (the server applied it later, and a taker saw it later still, so
  the taker cannot take over before then), minus a margin of ``period / 10``. Writes are
  made only while the lease is valid: :meth:`Leases.confirm` renews right before a
  write batch, :meth:`Leases.holds` is checked before each write. A process paused
  between that check and its write (a stop signal, a long pause of the host) is not
  stopped by this: the registry writes are therefore compare-and-set on the revision
  the poll read (see :mod:`discovery.poller`), so a paused holder can never overwrite or
  delete what another replica wrote after it read.
* **Release.** On a clean stop a replica deletes its leases (compare-and-set), so the
  others take over at once instead of after a period.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import datetime

from bus import Bus, subjects
from bus import leases as cas
from bus.client import FAILURES
from bus.schemas import DiscoveryLease, utcnow
from bus.specs import DISCOVERY_LEASES
from fleetgate.durations import format_duration

logger = logging.getLogger(__name__)

RENEWALS_PER_PERIOD = 4
"""A holder renews this many times per period: three renewals may fail before it loses
the lease to silence."""

FENCE_MARGIN = 0.1
"""Fraction of the period before its end at which a holder stops writing."""


def lease_clock() -> float:
    """Seconds on a clock that keeps counting while the host is suspended (Linux's
    CLOCK_BOOTTIME; monotonic elsewhere): a holder whose machine slept must not think
    its lease still runs."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


def replica_id() -> str:
    """This process's identity among discovery replicas: ``<host>-<pid>-<random>`` (the
    random part tells a restarted process with a reused pid from its predecessor)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class _Held:
    revision: int
    valid_until: float
    """:func:`lease_clock` time until which no other replica can have taken the lease."""
    next_renewal: float
    """:func:`lease_clock` time of the next renewal (sooner after a failed one)."""
    acquired: datetime


@dataclass
class _Seen:
    revision: int
    since: float
    """:func:`lease_clock` time this replica first saw ``revision``."""
    holder: str
    period: float


class Leases:
    """This replica's leases on the fetchers named ``wanted`` (status keys), kept by a
    background task between :meth:`start` and :meth:`stop`."""

    def __init__(
        self,
        bus: Bus,
        *,
        group: str,
        period: float,
        wanted: Iterable[str],
        replica: str | None = None,
    ) -> None:
        self.bus = bus
        self.group = group
        self.period = period
        self.replica = replica or replica_id()
        self.wanted = set(wanted)
        self.renew_every = period / RENEWALS_PER_PERIOD
        self.margin = period * FENCE_MARGIN
        self.on_acquired: Callable[[set[str]], None] | None = None
        """Called with the names of leases taken after :meth:`start`'s first round."""
        self._held: dict[str, _Held] = {}
        self._seen: dict[str, _Seen] = {}
        self._names: dict[str, str] = {}  # KV key -> status key
        self._changed = asyncio.Event()
        self._synced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._failing = False
        self._stopping = False
        self._retry_at: dict[str, float] = {}
        """:func:`lease_clock` time before which a failed take is not tried again."""
        self._retry = min(1.0, self.renew_every / 2)
        self.config = hashlib.sha256("\n".join(sorted(self.wanted)).encode()).hexdigest()[:10]
        """Digest of the fetchers wanted, written in each lease (see DiscoveryLease)."""
        self._other_configs: set[str] = set()

    # -- names ------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        key = subjects.fetcher_status_key(self.group, name)
        self._names[key] = name
        return key

    @property
    def _prefix(self) -> str:
        return f"{subjects.kv_token(self.group or '_')}.>"

    # -- what callers ask -------------------------------------------------------------

    def holds(self, name: str) -> bool:
        """Whether this replica holds ``name``'s lease and may still write for it."""
        held = self._held.get(self._key(name))
        return held is not None and lease_clock() < held.valid_until - self.margin

    def held(self) -> set[str]:
        """Names of every lease this replica may write for now."""
        return {self._names[k] for k in list(self._held) if self.holds(self._names[k])}

    def holder_of(self, name: str) -> str | None:
        """The replica this one last saw holding ``name`` (None: nobody)."""
        key = self._key(name)
        if key in self._held:
            return self.replica
        seen = self._seen.get(key)
        return seen.holder if seen is not None else None

    # -- life cycle -------------------------------------------------------------------

    async def start(self, *, keep: bool = True) -> set[str]:
        """Read the leases, take every free wanted one, and (with ``keep``) keep renewing
        and taking over in the background. Returns the names taken."""
        await self.bus.provision(DISCOVERY_LEASES)
        watch = asyncio.create_task(self._watch(), name="discovery-lease-watch")
        self._tasks.append(watch)
        synced = asyncio.create_task(self._synced.wait())
        await asyncio.wait([watch, synced], return_when=asyncio.FIRST_COMPLETED)
        if not synced.done():
            synced.cancel()
            await self.stop(release=False)
            watch.result()  # raises why the watch could not start
        taken = await self._acquire_round()
        if keep:
            self._tasks.append(asyncio.create_task(self._keep(), name="discovery-leases"))
        return taken

    async def stop(self, *, release: bool = True) -> None:
        """Stop renewing; with ``release`` delete the leases held so that the other
        replicas take over at once."""
        # A cancellation that lands inside a NATS request may be turned into an error by
        # nats-py: the loop also ends by this flag at its next turn.
        self._stopping = True
        self._changed.set()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if release:
            await self.release(self._names[k] for k in list(self._held))

    async def release(self, names: Iterable[str]) -> None:
        """Give up the leases ``names`` (those held), deleting them by compare-and-set."""
        for name in list(names):
            key = self._key(name)
            held = self._held.pop(key, None)
            if held is None:
                continue
            try:
                await cas.delete(self.bus, _bucket(), key, last=held.revision)
            except FAILURES as exc:
                logger.warning("could not release the lease of fetcher %s: %s", name, exc)

    async def confirm(self, names: Collection[str]) -> set[str]:
        """Renew the leases ``names`` now (right before writing for them): the names
        still held, each valid for a full period from now."""
        keys = [self._key(n) for n in names if self._key(n) in self._held]
        await asyncio.gather(*(self._renew(k) for k in keys))
        return {n for n in names if self.holds(n)}

    async def adopt(self, names: Collection[str]) -> set[str]:
        """Take the leases ``names`` now if they are free or their holder stopped
        renewing (fetchers no longer in the config, whose resources are to be deleted);
        the names taken. They are renewed while held and not taken again once released."""
        names = sorted(names)
        done = await asyncio.gather(*(self._try_take(self._key(n)) for n in names))
        return {n for n, ok in zip(names, done, strict=True) if ok and self.holds(n)}

    # -- the background ---------------------------------------------------------------

    async def _watch(self) -> None:
        async with contextlib.aclosing(
            self.bus.watch(_bucket(), DiscoveryLease, keys=self._prefix)
        ) as events:
            async for event in events:
                if event.kind == "synced":
                    self._synced.set()
                elif event.kind == "deleted":
                    self._seen.pop(event.key, None)
                    self._lost(event.key, "it was released or deleted")
                elif event.value is not None:
                    seen = self._seen.get(event.key)
                    if seen is None or seen.revision != event.revision:
                        self._seen[event.key] = _Seen(
                            event.revision,
                            lease_clock(),
                            event.value.holder,
                            event.value.period,
                        )
                    if event.value.holder != self.replica:
                        self._lost(event.key, f"replica {event.value.holder} took it")
                        self._check_config(event.value)
                self._changed.set()

    def _check_config(self, lease: DiscoveryLease) -> None:
        if not lease.config or lease.config == self.config:
            return
        if lease.holder not in self._other_configs:
            self._other_configs.add(lease.holder)
            logger.warning(
                "replica %s of discovery group %r runs another config (fetchers %s, ours "
                "%s): expected only during a rolling change of the config; services with "
                "different matchers need their own discovery_group",
                lease.holder,
                self.group,
                lease.config,
                self.config,
            )

    def _lost(self, key: str, why: str) -> None:
        if self._held.pop(key, None) is not None:
            logger.warning(
                "lost the lease of fetcher %s (%s): no longer polling it",
                self._names.get(key, key),
                why,
            )

    async def _keep(self) -> None:
        while not self._stopping:
            self._changed.clear()
            now = lease_clock()
            due = [k for k, h in self._held.items() if now >= h.next_renewal]
            if due:
                await asyncio.gather(*(self._renew(k) for k in due))
            for key, held in list(self._held.items()):  # renewals failed for too long
                if lease_clock() >= held.valid_until - self.margin:
                    self._held.pop(key, None)
                    logger.warning(
                        "lost the lease of fetcher %s: not renewed for %s (is NATS "
                        "reachable?); no longer polling it",
                        self._names.get(key, key),
                        format_duration(self.period),
                    )
            taken = await self._acquire_round()
            if self._stopping:
                return
            if taken and self.on_acquired is not None:
                self.on_acquired(taken)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._next_wake()):
                    await self._changed.wait()

    def _next_wake(self) -> float:
        now = lease_clock()
        times = [h.next_renewal for h in self._held.values()]
        for name in self.wanted:
            key = self._key(name)
            seen = self._seen.get(key)
            if key not in self._held and seen is not None:
                times.append(max(seen.since + seen.period, self._retry_at.get(key, 0.0)))
        return max(0.01, min(times, default=now + self.renew_every) - now)

    async def _acquire_round(self) -> set[str]:
        # concurrently: with NATS slow to answer, one try per lease in a row would hold
        # up the renewals of the leases held
        names = sorted(n for n in self.wanted if self._key(n) not in self._held)
        done = await asyncio.gather(*(self._try_take(self._key(n)) for n in names))
        taken = {name for name, ok in zip(names, done, strict=True) if ok}
        if taken:
            logger.info(
                "replica %s now polls %d of %d fetchers (took %s)",
                self.replica,
                len(self._held),
                len(self.wanted),
                ", ".join(sorted(taken)),
            )
        return taken

    def _record(self, acquired: datetime | None = None) -> DiscoveryLease:
        now = utcnow()
        return DiscoveryLease(
            holder=self.replica,
            period=self.period,
            acquired=acquired or now,
            renewed=now,
            config=self.config,
        )

    async def _try_take(self, key: str) -> bool:
        """Create the lease, or take it over from a holder silent for its period."""
        if key in self._held:
            return True
        seen = self._seen.get(key)
        now = lease_clock()
        if seen is not None and now < seen.since + seen.period:
            return False
        if now < self._retry_at.get(key, 0.0):
            return False
        record = self._record()
        sent = lease_clock()
        try:
            if seen is None:
                revision = await cas.create(self.bus, _bucket(), key, record)
            else:
                revision = await cas.update(self.bus, _bucket(), key, record, last=seen.revision)
        except FAILURES as exc:
            self._failed(f"cannot take the lease of fetcher {self._names.get(key, key)}", exc)
            self._retry_at[key] = lease_clock() + self._retry
            return False
        self._failing = False
        if revision is None:  # another replica was faster; the watch tells us who
            self._retry_at[key] = lease_clock() + self._retry
            return False
        if seen is not None:
            logger.warning(
                "took over fetcher %s from replica %s: its lease was not renewed for %s",
                self._names.get(key, key),
                seen.holder,
                format_duration(seen.period),
            )
        self._held[key] = _Held(
            revision, sent + self.period, sent + self.renew_every, record.acquired
        )
        return True

    async def _renew(self, key: str) -> None:
        held = self._held.get(key)
        if held is None:
            return
        record = self._record(held.acquired)
        sent = lease_clock()
        try:
            revision = await cas.update(self.bus, _bucket(), key, record, last=held.revision)
        except FAILURES as exc:
            self._failed(f"cannot renew the lease of fetcher {self._names.get(key, key)}", exc)
            held.next_renewal = lease_clock() + self._retry
            return
        self._failing = False
        if self._held.get(key) is not held:
            return  # lost while the renewal was in flight
        if revision is None:
            self._lost(key, "another replica wrote it")
            return
        held.revision, held.valid_until = revision, sent + self.period
        held.next_renewal = sent + self.renew_every

    def _failed(self, what: str, exc: Exception) -> None:
        if not self._failing:  # once per outage, not per lease and try
            logger.warning("%s: %s", what, exc)
        self._failing = True


def _bucket() -> str:
    return subjects.DISCOVERY_LEASES_BUCKET

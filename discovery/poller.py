"""One poll: run every fetcher (bounded), reconcile, write what changed, record status.

With :class:`~discovery.lease.Leases` (discovery running as replicas) a poll runs only
the fetchers whose lease this replica holds, touches only their resources, and writes
by compare-and-set on the revisions it read at its start: renewed leases right before
the writes, a lease check before each write, and the revision check at the server
together make sure a replica that lost a lease (or was paused past it) never overwrites
or deletes what another replica wrote since (see :mod:`discovery.lease`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field

from bus import Bus, subjects
from bus import leases as cas
from bus.leases import Versioned
from bus.schemas import DatabaseResource, FetcherStatus, utcnow
from discovery.aws.session import AwsSession
from discovery.convert import Warnings
from discovery.fetcher import RegionCache, fetch
from discovery.lease import Leases
from discovery.matchers import FetcherKey, expand, status_key_of
from discovery.metrics import DiscoveryMetrics
from discovery.reconcile import Plan, reconcile
from discovery.results import FetchResult
from discovery.settings import DiscoveryService

logger = logging.getLogger(__name__)

WRITE_CONCURRENCY = 32


@dataclass
class PollReport:
    ok: bool
    seconds: float
    results: list[FetchResult]
    plan: Plan
    aws_calls: int
    status_writes: int = 0
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """Fetchers not polled: another replica holds their lease."""
    refused: list[str] = field(default_factory=list)
    """Writes not made: the lease was lost, or the entry changed since this poll read it."""
    written: int = 0
    """Registry entries created or updated."""
    deleted: int = 0
    """Registry entries deleted."""

    @property
    def registry_writes(self) -> int:
        return len(self.plan.puts) + len(self.plan.deletes)


def _status_content(status: FetcherStatus) -> dict[str, object]:
    return status.model_dump(exclude={"last_attempt", "last_success"})


class Poller:
    """Owns no tasks; ``poll_once`` is the whole cycle and is safe to call repeatedly."""

    def __init__(
        self,
        *,
        settings: DiscoveryService,
        bus: Bus,
        session: AwsSession,
        leases: Leases | None = None,
        metrics: DiscoveryMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else DiscoveryMetrics()
        self.metrics.aws_calls(lambda: dict(session.outcomes))
        self.last: PollReport | None = None
        """The last poll's report (``/readyz``), None before the first one ended."""
        self.bus = bus
        self.session = session
        self.leases = leases
        """None: this poller alone writes its group (polls every fetcher)."""
        self.fetchers = expand(settings.aws)
        self._lock = asyncio.Lock()
        self.warnings = Warnings()
        """Warnings about clusters and tags already given: each once per poller (the
        discovery process has one), not once per poll."""

    @property
    def replica(self) -> str:
        return self.leases.replica if self.leases is not None else ""

    async def poll_once(self, only: Collection[str] | None = None) -> PollReport:
        """Poll every fetcher this replica holds (or, with ``only``, those of them named
        there, by status key); one poll at a time."""
        async with self._lock:
            return await self._poll(only)

    async def _poll(self, only: Collection[str] | None) -> PollReport:
        started = time.monotonic()
        calls_before = self.session.total_calls
        versions = await self._registry()
        current = {name: v.record for name, v in versions.items()}
        fetchers, skipped = self.fetchers, []
        scope: set[str] | None = None
        adopted: set[str] = set()
        if self.leases is not None:
            held = self.leases.held()
            fetchers = [k for k in self.fetchers if k.status_key in held]
            skipped = [
                f"{k.status_key} (polled by {self.leases.holder_of(k.status_key) or 'nobody yet'})"
                for k in self.fetchers
                if k.status_key not in held
            ]
            if only is not None:
                fetchers = [k for k in fetchers if k.status_key in only]
            else:
                adopted = await self._adopt_orphans(current)
            scope = {k.status_key for k in fetchers} | adopted
        try:
            return await self._run(started, calls_before, versions, fetchers, scope, skipped)
        finally:
            if adopted and self.leases is not None:
                await self.leases.release(adopted)

    async def _run(
        self,
        started: float,
        calls_before: int,
        versions: dict[str, Versioned[DatabaseResource]],
        fetchers: list[FetcherKey],
        scope: set[str] | None,
        skipped: list[str],
    ) -> PollReport:
        current = {name: v.record for name, v in versions.items()}
        limit = asyncio.Semaphore(self.settings.fetcher_concurrency)
        cache = RegionCache()

        async def run(key: FetcherKey) -> FetchResult:
            async with limit:
                began = time.monotonic()
                try:
                    return await fetch_one(key)
                finally:
                    self.metrics.poll_duration.labels(key.status_key).observe(
                        time.monotonic() - began
                    )

        async def fetch_one(key: FetcherKey) -> FetchResult:
            return await fetch(
                key,
                session=self.session,
                group=self.settings.discovery_group,
                cache=cache,
                api_concurrency=self.settings.api_concurrency,
                warnings=self.warnings,
            )

        try:
            results = list(await asyncio.gather(*(run(k) for k in fetchers)))
        finally:
            cache.close()
        plan = reconcile(current, results, group=self.settings.discovery_group, scope=scope)
        for conflict in plan.conflicts:
            logger.warning("not written: %s", conflict)
        refused: list[str] = []
        done = await self._apply(plan, versions, scope, refused)
        status_writes = await self._record(results, refused)
        failures = [
            f"{r.key.type} {r.key.region} (matcher {r.key.matcher_index}): {r.state}: {r.error}"
            for r in results
            if r.state != "ok"
        ]
        by_error: dict[str, list[str]] = {}
        for r in results:
            if r.state != "ok":
                by_error.setdefault(r.error, []).append(f"{r.key.type}/{r.key.region}")
        for error, where in by_error.items():
            logger.warning("%d fetcher(s) not ok (%s): %s", len(where), ", ".join(where), error)
        report = PollReport(
            ok=not failures,
            seconds=time.monotonic() - started,
            results=results,
            plan=plan,
            aws_calls=self.session.total_calls - calls_before,
            status_writes=status_writes,
            written=done["written"],
            deleted=done["deleted"],
            failures=failures,
            skipped=skipped,
            refused=refused,
        )
        self._count(report)
        if refused:
            logger.warning("%d writes not made: %s", len(refused), "; ".join(refused))
        logger.info(
            "poll done in %.2fs: %d fetchers (%d not ok), %d clusters seen, %d created or "
            "updated, %d deleted, %d AWS calls",
            report.seconds,
            len(results),
            len(failures),
            sum(r.clusters_seen for r in results),
            len(plan.puts),
            len(plan.deletes),
            report.aws_calls,
        )
        return report

    def _count(self, report: PollReport) -> None:
        m, now = self.metrics, time.time()
        for r in report.results:
            m.polls.labels(r.key.status_key, r.state).inc()
            if r.state == "ok":
                m.last_success.labels(r.key.status_key).set(now)
            m.resources.labels("carried").inc(len(r.carried))
        m.resources.labels("written").inc(report.written)
        m.resources.labels("deleted").inc(report.deleted)
        self.last = report

    async def _registry(self) -> dict[str, Versioned[DatabaseResource]]:
        found = await cas.snapshot(self.bus, subjects.DATABASES_BUCKET, DatabaseResource)
        return {v.record.name: v for v in found.values()}

    async def _adopt_orphans(self, current: dict[str, DatabaseResource]) -> set[str]:
        """Take the leases of fetchers no longer in the config that still own resources
        (free, or their holder stopped renewing), so that their resources are deleted
        by exactly one replica, and never while a replica whose config still has that
        fetcher (during a rolling change of the config) holds its lease."""
        assert self.leases is not None
        configured = {k.status_key for k in self.fetchers}
        orphans = {
            status_key_of(r.origin.fetcher_id)
            for r in current.values()
            if r.origin is not None and r.origin.group == self.settings.discovery_group
        } - configured
        return await self.leases.adopt(sorted(orphans)) if orphans else set()

    def _may_write(self, fetcher_id: str, scope: Collection[str] | None) -> bool:
        if self.leases is None or scope is None:
            return True
        return self.leases.holds(status_key_of(fetcher_id))

    async def _apply(
        self,
        plan: Plan,
        versions: dict[str, Versioned[DatabaseResource]],
        scope: Collection[str] | None,
        refused: list[str],
    ) -> dict[str, int]:
        """Write the plan, each entry by compare-and-set on the revision this poll read:
        created only if still absent, updated or deleted only if nobody wrote it since.
        Returns the entries ``written`` and ``deleted``."""
        if self.leases is not None and scope is not None and (plan.puts or plan.deletes):
            confirmed = await self.leases.confirm(scope)
            lost = set(scope) - confirmed
            if lost:
                logger.warning(
                    "lost the lease of %s before writing: not writing for it", ", ".join(lost)
                )
        limit = asyncio.Semaphore(WRITE_CONCURRENCY)
        done_counts = {"written": 0, "deleted": 0}

        def owner(name: str, res: DatabaseResource | None) -> str:
            found = res or versions[name].record
            return found.origin.fetcher_id if found.origin is not None else ""

        async def put(res: DatabaseResource) -> None:
            async with limit:
                if not self._may_write(owner(res.name, res), scope):
                    refused.append(f"{res.name}: this replica no longer holds its fetcher's lease")
                    return
                key = subjects.database_key(res.name)
                previous = versions.get(res.name)
                if previous is None:
                    done = await cas.create(self.bus, subjects.DATABASES_BUCKET, key, res)
                else:
                    done = await cas.update(
                        self.bus, subjects.DATABASES_BUCKET, key, res, last=previous.revision
                    )
                if done is None:
                    refused.append(
                        f"{res.name}: written by someone else since this poll read it"
                        if previous is not None
                        else f"{res.name}: created by someone else since this poll read the "
                        "registry, or there but unreadable (see the warning about it)"
                    )
                    return
                done_counts["written"] += 1
                logger.info("enrolled %s (%s)", res.name, res.spec.uri)

        async def delete(name: str) -> None:
            async with limit:
                if not self._may_write(owner(name, None), scope):
                    refused.append(f"{name}: this replica no longer holds its fetcher's lease")
                    return
                key = subjects.database_key(name)
                last = versions[name].revision
                if not await cas.delete(self.bus, subjects.DATABASES_BUCKET, key, last=last):
                    refused.append(f"{name}: written by someone else since this poll read it")
                    return
                done_counts["deleted"] += 1
                logger.info("removed %s: no longer listed by AWS or by the config", name)

        await asyncio.gather(*(put(r) for r in plan.puts), *(delete(n) for n in plan.deletes))
        return done_counts

    async def _record(self, results: list[FetchResult], refused: list[str]) -> int:
        """Write a fetcher's status only when it changed (an unchanged poll writes none),
        by compare-and-set on the record read now (another replica may have written it)."""
        group = self.settings.discovery_group
        found = await cas.snapshot(
            self.bus,
            subjects.DISCOVERY_STATUS_BUCKET,
            FetcherStatus,
            keys=f"{subjects.kv_token(group or '_')}.>",
        )
        now = utcnow()
        writes = 0
        for r in results:
            key = subjects.fetcher_status_key(group, r.key.status_key)
            known = found.get(key)
            previous = known.record if known is not None else None
            status = FetcherStatus(
                group=group,
                fetcher=r.key.status_key,
                fetcher_id=r.fetcher_id or "",
                matcher=r.key.matcher_index,
                type=r.key.type,
                region=r.key.region,
                account_id=r.account_id or "",
                assume_role_arn=r.key.matcher.assume_role_arn,
                state=r.state,
                error=r.error,
                clusters_seen=r.clusters_seen,
                databases=len(r.resources),
                last_attempt=now,
                last_success=now
                if r.state == "ok"
                else (previous.last_success if previous else None),
                replica=self.replica,
            )
            if previous is not None and _status_content(previous) == _status_content(status):
                continue
            if self.leases is not None and not self.leases.holds(r.key.status_key):
                refused.append(f"status of {r.key.status_key}: lease lost")
                continue
            if known is None:
                done = await cas.create(self.bus, subjects.DISCOVERY_STATUS_BUCKET, key, status)
            else:
                done = await cas.update(
                    self.bus, subjects.DISCOVERY_STATUS_BUCKET, key, status, last=known.revision
                )
            if done is None:
                refused.append(f"status of {r.key.status_key}: written by someone else")
                continue
            writes += 1
        return writes

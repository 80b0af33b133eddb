"""One poll: run every fetcher (bounded), reconcile, write what changed, record status."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

from bus import Bus, subjects
from bus.schemas import DatabaseResource, FetcherStatus, utcnow
from discovery.aws.session import AwsSession
from discovery.convert import Warnings
from discovery.fetcher import RegionCache, fetch
from discovery.matchers import FetcherKey, expand
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

    @property
    def registry_writes(self) -> int:
        return len(self.plan.puts) + len(self.plan.deletes)


def _status_content(status: FetcherStatus) -> dict[str, object]:
    return status.model_dump(exclude={"last_attempt", "last_success"})


class Poller:
    """Owns no tasks; ``poll_once`` is the whole cycle and is safe to call repeatedly."""

    def __init__(self, *, settings: DiscoveryService, bus: Bus, session: AwsSession) -> None:
        self.settings = settings
        self.bus = bus
        self.session = session
        self.fetchers = expand(settings.aws)
        self._statuses: dict[str, FetcherStatus] | None = None
        self.warnings = Warnings()
        """Warnings about clusters and tags already given: each once per poller (the
        discovery process has one), not once per poll."""

    async def poll_once(self) -> PollReport:
        started = time.monotonic()
        calls_before = self.session.total_calls
        current = await self._registry()
        limit = asyncio.Semaphore(self.settings.fetcher_concurrency)
        cache = RegionCache()

        async def run(key: FetcherKey) -> FetchResult:
            async with limit:
                return await fetch(
                    key,
                    session=self.session,
                    group=self.settings.discovery_group,
                    cache=cache,
                    api_concurrency=self.settings.api_concurrency,
                    warnings=self.warnings,
                )

        try:
            results = list(await asyncio.gather(*(run(k) for k in self.fetchers)))
        finally:
            cache.close()
        plan = reconcile(current, results, group=self.settings.discovery_group)
        for conflict in plan.conflicts:
            logger.warning("not written: %s", conflict)
        await self._apply(plan)
        status_writes = await self._record(results)
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
            failures=failures,
        )
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

    async def _registry(self) -> dict[str, DatabaseResource]:
        found = await self.bus.snapshot(subjects.DATABASES_BUCKET, DatabaseResource)
        return {r.name: r for r in found.values()}

    async def _apply(self, plan: Plan) -> None:
        limit = asyncio.Semaphore(WRITE_CONCURRENCY)

        async def bounded(write: Awaitable[object]) -> None:
            async with limit:
                await write

        await asyncio.gather(
            *(bounded(self.bus.put_resource(r)) for r in plan.puts),
            *(bounded(self.bus.delete_resource(n)) for n in plan.deletes),
        )
        for res in plan.puts:
            logger.info("enrolled %s (%s)", res.name, res.spec.uri)
        for name in plan.deletes:
            logger.info("removed %s: no longer listed by AWS or by the config", name)

    async def _record(self, results: list[FetchResult]) -> int:
        """Write a fetcher's status only when it changed (an unchanged poll writes none)."""
        if self._statuses is None:
            found = await self.bus.snapshot(subjects.DISCOVERY_STATUS_BUCKET, FetcherStatus)
            self._statuses = {s.fetcher: s for s in found.values()}
        now = utcnow()
        writes = 0
        for r in results:
            previous = self._statuses.get(r.key.status_key)
            status = FetcherStatus(
                group=self.settings.discovery_group,
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
            )
            if previous is not None and _status_content(previous) == _status_content(status):
                continue
            await self.bus.put_fetcher_status(status)
            self._statuses[r.key.status_key] = status
            writes += 1
        return writes

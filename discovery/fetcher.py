"""One fetcher: the MemoryDB clusters of one matcher in one region and account."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from bus import labels
from discovery.aws.errors import FetchError, map_error
from discovery.aws.memorydb import AioMemoryDB, MemoryDBApi, MemoryDBUser
from discovery.aws.session import AwsSession
from discovery.convert import Context, Warnings, convert, iam_users_of, usable
from discovery.matchers import FetcherKey, role_account
from discovery.results import FetchResult

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RegionCache:
    """Per-poll answers shared by every fetcher of one region and account (called once)."""

    def __init__(self) -> None:
        self._tasks: dict[tuple[str, str, str], asyncio.Future[Any]] = {}

    async def once(
        self, kind: str, region: str, account: str, call: Callable[[], Awaitable[T]]
    ) -> T:
        key = (kind, region, account)
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(call())
            self._tasks[key] = task
        result: T = await asyncio.shield(task)
        return result

    def close(self) -> None:
        for task in self._tasks.values():
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # mark retrieved


async def fetch(
    key: FetcherKey,
    *,
    session: AwsSession,
    group: str,
    cache: RegionCache,
    api_concurrency: int,
    warnings: Warnings,
) -> FetchResult:
    """Run one fetcher; never raises for AWS errors (they become a failed result).
    Warnings about what AWS holds are logged once per ``warnings`` (the poller's)."""
    role, external_id = key.role
    account = role_account(role) if role else None
    result = FetchResult(key, account, key.fetcher_id(account) if account else None)
    try:
        if result.account_id is None:
            result.account_id = await session.caller_account(key.region)
            result.fetcher_id = key.fetcher_id(result.account_id)
        creds = await session.credentials(role, external_id, key.region)
        async with session.client("memorydb", key.region, creds) as client:
            api = AioMemoryDB(client, session, key.region)
            await _collect(
                result,
                api,
                cache=cache,
                group=group,
                api_concurrency=api_concurrency,
                warnings=warnings,
            )
    except FetchError as exc:
        result.state, result.error = "failed", str(exc)
    except Exception as exc:  # unexpected: still never a reason to delete anything
        result.state, result.error = "failed", str(map_error(exc, "fetch"))
        logger.exception("fetcher %s %s failed unexpectedly", key.type, key.region)
    if result.state == "failed":
        result.resources, result.carried = [], set()
    return result


async def _collect(
    result: FetchResult,
    api: MemoryDBApi,
    *,
    cache: RegionCache,
    group: str,
    api_concurrency: int,
    warnings: Warnings,
) -> None:
    key, account = result.key, result.account_id or ""
    clusters = await api.describe_clusters()
    result.clusters_seen = len(clusters)
    kept = []
    for cluster in clusters:
        ok, reason = usable(cluster, warnings=warnings)
        if ok:
            kept.append(cluster)
        else:
            logger.debug("skipping %s", reason)
    if not kept:
        return
    problems: list[str] = []

    vpcs: dict[str, str] | None
    try:
        vpcs = await cache.once("subnets", key.region, account, api.describe_subnet_groups)
    except FetchError as exc:
        vpcs = None
        problems.append(f"vpc-id unknown ({exc})")
    users: list[MemoryDBUser] | None
    try:
        users = await cache.once("users", key.region, account, api.describe_users)
    except FetchError as exc:
        users = None
        problems.append(f"IAM users unknown ({exc})")

    limit = asyncio.Semaphore(api_concurrency)

    async def tags_of(arn: str) -> dict[str, str] | FetchError:
        async with limit:
            try:
                return await api.list_tags(arn)
            except FetchError as exc:
                return exc

    all_tags = await asyncio.gather(*(tags_of(c["ARN"]) for c in kept))
    role, external_id = key.role
    ctx = Context(group, result.fetcher_id or "", role, external_id)
    tag_failures = 0
    for cluster, tags in zip(kept, all_tags, strict=True):
        arn = cluster["ARN"]
        if isinstance(tags, FetchError):
            tag_failures += 1
            result.carried.add(arn)
            if tag_failures == 1:
                problems.append(f"tags unknown ({tags})")
            continue
        vpc = vpcs.get(cluster.get("SubnetGroupName", "")) if vpcs is not None else None
        try:
            resource = convert(
                cluster,
                tags=tags,
                vpc_id=vpc,
                iam_users=iam_users_of(cluster.get("ACLName", ""), users),
                ctx=ctx,
                warnings=warnings,
            )
        except (KeyError, ValueError) as exc:
            logger.warning("cannot convert MemoryDB cluster %s: %s", arn, exc)
            continue
        if vpcs is None or users is None:
            result.carried.add(arn)
        if labels.matches(key.matcher.tags, resource.metadata.labels):
            result.resources.append(resource)
    if problems:
        result.state = "partial"
        if tag_failures > 1:
            problems.append(f"ListTags failed for {tag_failures} clusters")
        result.error = "; ".join(problems)

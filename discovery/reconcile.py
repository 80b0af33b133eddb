"""What to write: the registry now + this poll's fetch results -> puts and deletes. Pure.

The rules that keep a fleet safe:

* only resources of our discovery group are ever touched, and a name held by anything
  else is never overwritten;
* a failed fetcher changes nothing it owns (last known good);
* a cluster a fetcher could only partly read keeps its last known resource;
* a resource is written only when its content changed;
* a resource whose fetcher no longer exists in the config (a matcher was edited or
  removed) is deleted, but only when every fetcher's identity is known this poll.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from bus.schemas import DatabaseResource
from discovery.matchers import status_key_of
from discovery.results import FetchResult


@dataclass
class Plan:
    puts: list[DatabaseResource] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    """Human-readable reasons for resources we chose not to write."""


def _arn(resource: DatabaseResource) -> str:
    aws = resource.spec.aws
    return aws.memorydb.arn if aws and aws.memorydb else ""


def reconcile(
    current: Mapping[str, DatabaseResource],
    results: Iterable[FetchResult],
    *,
    group: str,
    scope: Collection[str] | None = None,
) -> Plan:
    plan = Plan()
    results = list(results)
    ours = {n: r for n, r in current.items() if r.origin is not None and r.origin.group == group}
    owned = {
        n: r
        for n, r in ours.items()
        if scope is None or (r.origin is not None and status_key_of(r.origin.fetcher_id) in scope)
    }
    by_fetcher: dict[str, dict[str, DatabaseResource]] = {}
    for name, res in owned.items():
        assert res.origin is not None
        by_fetcher.setdefault(res.origin.fetcher_id, {})[name] = res

    succeeded = {r.fetcher_id for r in results if r.state != "failed" and r.fetcher_id}
    failed = {r.fetcher_id for r in results if r.state == "failed" and r.fetcher_id}
    all_known = all(r.fetcher_id for r in results)

    frozen: set[str] = set()  # names that must stay exactly as they are
    for fid in failed:
        frozen |= by_fetcher.get(fid, {}).keys()
    by_key = {r.key.status_key: r for r in results}
    if scope is not None:  # a failed fetcher's account may be unknown: freeze its key
        for name, res in owned.items():
            assert res.origin is not None
            result = by_key.get(status_key_of(res.origin.fetcher_id))
            if result is not None and result.state == "failed":
                frozen.add(name)

    desired: dict[str, DatabaseResource] = {}
    for result in results:
        if result.state == "failed" or not result.fetcher_id:
            continue
        previous = {_arn(r): r for r in by_fetcher.get(result.fetcher_id, {}).values()}
        for arn in result.carried:
            if arn in previous:
                frozen.add(previous[arn].name)
        for res in result.resources:
            arn = _arn(res)
            if arn in result.carried and arn in previous:
                continue
            other = desired.get(res.name)
            if other is not None:
                if _arn(other) != arn:
                    plan.conflicts.append(
                        f"{res.name}: both {_arn(other)} and {arn} want this name; kept the first"
                    )
                continue
            desired[res.name] = res

    for name, res in sorted(desired.items()):
        if name in frozen:
            continue
        existing = current.get(name)
        if existing is not None and name not in owned:
            if name in ours:
                plan.conflicts.append(
                    f"{name}: the name is already used by another fetcher of this discovery "
                    "group, which another replica polls; rename the cluster with the "
                    "FleetgateDatabaseName tag"
                )
                continue
            plan.conflicts.append(
                f"{name}: the name is already used by a resource this discovery group does "
                f"not own; rename the cluster with the FleetgateDatabaseName tag"
            )
            continue
        if existing != res:
            plan.puts.append(res)

    for name, res in sorted(owned.items()):
        if name in desired or name in frozen:
            continue
        assert res.origin is not None
        fid = res.origin.fetcher_id
        if scope is not None:
            # in the scope and not frozen: its fetcher succeeded (the account may have
            # changed) or is gone from the config
            plan.deletes.append(name)
        elif fid in succeeded or (fid not in failed and all_known):
            plan.deletes.append(name)
    return plan

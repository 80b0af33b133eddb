"""A MemoryDB cluster (as DescribeClusters returns it) -> a database resource. Pure.

Naming, labels and the usable-cluster filter follow what operators of the best-known
system already select on, with one deliberate difference: computed labels win over AWS
tags with the same key, so a tag named ``region`` cannot move a database.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bus import labels as L
from bus.schemas import (
    AWSSpec,
    DatabaseResource,
    DatabaseSpec,
    DiscoveryOrigin,
    MemoryDBSpec,
    Metadata,
)

logger = logging.getLogger(__name__)

NAME_TAG = "FleetgateDatabaseName"
"""AWS tag whose value, when set, is the database's name (no suffix added)."""

USABLE_STATUSES = frozenset({"available", "modifying", "snapshotting", "active", "updating"})
UNUSABLE_STATUSES = frozenset({"creating", "deleting", "create-failed", "failed"})

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,126}[a-z0-9])?$")
_FRAGMENT = re.compile(r"^[a-z0-9-]+$")


class Warnings:
    """Warnings already given, so each is logged once in its owner's lifetime (the
    discovery process's :class:`~discovery.poller.Poller` holds one: a tag that stays
    invalid is named once, not on every poll)."""

    def __init__(self) -> None:
        self._given: set[tuple[str, str]] = set()

    def once(self, key: tuple[str, str], message: str, *args: object) -> None:
        """Log a warning the first time ``key`` is seen by this object."""
        if key not in self._given:
            self._given.add(key)
            logger.warning(message, *args)


def is_valid_name(name: str) -> bool:
    """Lower-case letters, digits and '-', starting and ending with a letter or digit."""
    return bool(_NAME.match(name))


def sanitize(part: str) -> str:
    """Lower-case, spaces to '-', repeated '-' collapsed, trimmed."""
    text = re.sub(r"\s+", "-", part.strip().lower())
    return re.sub(r"-{2,}", "-", text).strip("-")


def _contains_run(name: str, part: str) -> bool:
    """Whether ``part``'s '-'-separated words appear, in order and together, in ``name``."""
    words, run = name.split("-"), part.split("-")
    return any(words[i : i + len(run)] == run for i in range(len(words) - len(run) + 1))


def discovered_name(cluster_name: str, region: str, account_id: str) -> str:
    """``<cluster>-memorydb-<region>-<account>``, skipping parts already in the name."""
    name = sanitize(cluster_name)
    for raw in ("memorydb", region, account_id):
        part = sanitize(raw)
        if not part or _contains_run(name, part) or not _FRAGMENT.match(part):
            continue
        name = f"{name}-{part}"
    return name


def parse_arn(arn: str) -> tuple[str, str]:
    """(region, account) of a MemoryDB ARN; ValueError when it is not one."""
    parts = arn.split(":")
    if len(parts) < 6 or parts[0] != "arn" or parts[2] != "memorydb" or not parts[4]:
        raise ValueError(f"not a MemoryDB ARN: {arn!r}")
    return parts[3], parts[4]


def usable(cluster: Mapping[str, Any], *, warnings: Warnings) -> tuple[bool, str]:
    """Whether to enrol a cluster: TLS on and a usable status. Returns (ok, reason)."""
    name = cluster.get("Name", "?")
    if not cluster.get("TLSEnabled", False):
        return False, f"cluster {name}: TLS (in-transit encryption) is off"
    status = str(cluster.get("Status", "")).lower()
    if status in UNUSABLE_STATUSES:
        return False, f"cluster {name}: status {status}"
    if status not in USABLE_STATUSES:
        warnings.once(("status", status), "assuming MemoryDB status %r is usable", status)
    if not (cluster.get("ClusterEndpoint") or {}).get("Address"):
        return False, f"cluster {name}: no cluster endpoint yet"
    return True, ""


@dataclass(frozen=True)
class Context:
    """What a fetcher knows besides the cluster itself."""

    group: str
    fetcher_id: str
    assume_role_arn: str | None = None
    external_id: str | None = None


def iam_users_of(acl_name: str, users: Sequence[Any] | None) -> tuple[str, ...] | None:
    """Names of IAM-authenticated users in ``acl_name``; None when users are unknown."""
    if users is None:
        return None
    return tuple(sorted(u.name for u in users if u.auth_type == "iam" and acl_name in u.acl_names))


def build_labels(
    cluster: Mapping[str, Any],
    region: str,
    account_id: str,
    vpc_id: str | None,
    tags: Mapping[str, str],
    group: str,
    *,
    warnings: Warnings,
) -> dict[str, str]:
    """AWS tags with valid keys, then the computed labels on top."""
    arn = str(cluster.get("ARN", ""))
    out: dict[str, str] = {}
    for key, value in tags.items():
        if L.is_valid_label_key(key):
            out[key] = value
        else:
            warnings.once((arn, key), "skipping AWS tag %r of %s: not a valid label key", key, arn)
    computed = {
        L.LABEL_ACCOUNT_ID: account_id,
        L.LABEL_REGION: region,
        L.LABEL_ENGINE: str(cluster.get("Engine") or "redis"),
        L.LABEL_ENGINE_VERSION: str(cluster.get("EngineVersion", "")),
        L.LABEL_ENDPOINT_TYPE: "cluster",
        L.LABEL_CLOUD: "AWS",
        L.LABEL_ORIGIN: "cloud",
        L.LABEL_DISCOVERY_TYPE: "memorydb",
        L.LABEL_DISCOVERED_NAME: str(cluster.get("Name", "")),
    }
    if vpc_id:
        computed[L.LABEL_VPC_ID] = vpc_id
    if group:
        computed[L.LABEL_DISCOVERY_GROUP] = group
    for key, value in computed.items():
        if key in out and out[key] != value:
            warnings.once(
                (arn, key), "AWS tag %r of %s is overridden by the computed label", key, arn
            )
        out[key] = value
    return out


def convert(
    cluster: Mapping[str, Any],
    *,
    tags: Mapping[str, str],
    vpc_id: str | None,
    iam_users: tuple[str, ...] | None,
    ctx: Context,
    warnings: Warnings,
) -> DatabaseResource:
    """The database resource for one usable cluster."""
    arn = str(cluster["ARN"])
    region, account_id = parse_arn(arn)
    cluster_name = str(cluster["Name"])
    name = discovered_name(cluster_name, region, account_id)
    override = tags.get(NAME_TAG)
    if override is not None:
        if is_valid_name(override):
            name = override
        else:
            warnings.once(
                (arn, NAME_TAG),
                "tag %s=%r of %s is not a valid database name (lower-case letters, "
                "digits and '-'); using %r",
                NAME_TAG,
                override,
                arn,
                name,
            )
    endpoint = cluster["ClusterEndpoint"]
    acl_name = str(cluster.get("ACLName", ""))
    return DatabaseResource(
        metadata=Metadata(
            name=name,
            description=f"MemoryDB cluster in {region}",
            labels=build_labels(
                cluster, region, account_id, vpc_id, tags, ctx.group, warnings=warnings
            ),
        ),
        spec=DatabaseSpec(
            protocol="redis",
            uri=f"{endpoint['Address']}:{endpoint.get('Port', 6379)}",
            aws=AWSSpec(
                region=region,
                account_id=account_id,
                assume_role_arn=ctx.assume_role_arn,
                external_id=ctx.external_id,
                memorydb=MemoryDBSpec(
                    cluster_name=cluster_name,
                    acl_name=acl_name,
                    tls_enabled=bool(cluster.get("TLSEnabled", False)),
                    endpoint_type="cluster",
                    arn=arn,
                    engine=str(cluster.get("Engine") or "redis"),
                    engine_version=str(cluster.get("EngineVersion", "")),
                    iam_users=iam_users,
                ),
            ),
        ),
        origin=DiscoveryOrigin(group=ctx.group, fetcher_id=ctx.fetcher_id),
    )

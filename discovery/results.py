"""What a fetcher hands to the reconciler: a plain record, so that the reconciler stays
pure (no AWS client in its imports)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from bus.schemas import DatabaseResource
from discovery.matchers import FetcherKey


@dataclass
class FetchResult:
    """What one fetcher saw. ``carried``: cluster ARNs whose last known resource stays as it
    is, because part of what describes them (tags, VPC, users) could not be read."""

    key: FetcherKey
    account_id: str | None
    fetcher_id: str | None
    state: Literal["ok", "partial", "failed"] = "ok"
    error: str = ""
    resources: list[DatabaseResource] = field(default_factory=list)
    carried: set[str] = field(default_factory=set)
    clusters_seen: int = 0

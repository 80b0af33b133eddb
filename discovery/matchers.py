"""Expanding matchers into fetchers: one per (matcher, type, region, account)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from discovery.settings import AwsMatcher


def matcher_digest(matcher: AwsMatcher) -> str:
    """A short, stable id of what a matcher selects (not of its position in the file)."""
    canonical = json.dumps(
        {
            "types": sorted(matcher.types),
            "tags": {k: sorted([v] if isinstance(v, str) else v) for k, v in matcher.tags.items()},
            "role": matcher.assume_role_arn or "",
            "external_id": matcher.external_id or "",
        },
        sort_keys=True,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def role_account(arn: str) -> str:
    """The account id of a role ARN."""
    return arn.split(":")[4]


@dataclass(frozen=True)
class FetcherKey:
    """One fetcher: a matcher, one type, one region, one account."""

    matcher_index: int
    matcher: AwsMatcher
    type: str
    region: str

    @property
    def role(self) -> tuple[str | None, str | None]:
        return self.matcher.assume_role_arn, self.matcher.external_id

    @property
    def status_key(self) -> str:
        """Names the fetcher's status record; known even when the account is not."""
        return f"{self.type}.{self.region}.{matcher_digest(self.matcher)}"

    def fetcher_id(self, account_id: str) -> str:
        """Owner id written into each resource: which fetcher, in which account."""
        return f"{self.type}.{self.region}.{account_id}.{matcher_digest(self.matcher)}"


def status_key_of(fetcher_id: str) -> str:
    """The status key (and lease name) of the fetcher that wrote ``fetcher_id``:
    ``<type>.<region>.<account>.<digest>`` -> ``<type>.<region>.<digest>``. An id of
    another shape is its own key, so whatever wrote it is still one fetcher."""
    parts = fetcher_id.split(".")
    if len(parts) != 4 or not all(parts):
        return fetcher_id
    kind, region, _account, digest = parts
    return f"{kind}.{region}.{digest}"


def expand(matchers: list[AwsMatcher]) -> list[FetcherKey]:
    """Every fetcher the matchers ask for, in config order."""
    return [
        FetcherKey(index, matcher, kind, region)
        for index, matcher in enumerate(matchers)
        for kind in matcher.types
        for region in matcher.regions
    ]

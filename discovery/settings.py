"""The discovery service's config file, validated with errors that name the field."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bus.labels import check_selector
from bus.settings import NatsSettings
from fleetgate.addresses import HostPort
from fleetgate.config import JetStreamSettings, check_external_id, check_role_arn
from fleetgate.durations import Duration

_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d+$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _match_all() -> dict[str, str | list[str]]:
    return {"*": "*"}


class AwsMatcher(Strict):
    """Which AWS databases to enrol: types x regions, filtered by labels."""

    types: list[Literal["memorydb"]] = Field(min_length=1)
    regions: list[str] = Field(min_length=1)
    tags: dict[str, str | list[str]] = Field(default_factory=_match_all)
    """Selector over all labels (AWS tags and computed ones). Default: every cluster."""
    assume_role_arn: str | None = None
    external_id: str | None = None

    @field_validator("regions")
    @classmethod
    def _regions(cls, regions: list[str]) -> list[str]:
        for region in regions:
            if not _REGION.match(region):
                raise ValueError(f"{region!r} is not an AWS region name (example: us-east-1)")
        if len(set(regions)) != len(regions):
            raise ValueError("a region is listed twice")
        return regions

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        if not tags:
            raise ValueError(
                "an empty selector matches nothing; use {'*': '*'} to enrol every cluster"
            )
        check_selector(tags)
        return tags

    @field_validator("assume_role_arn")
    @classmethod
    def _role(cls, arn: str | None) -> str | None:
        return check_role_arn(arn)

    @model_validator(mode="after")
    def _external_id_needs_role(self) -> AwsMatcher:
        check_external_id(self.assume_role_arn, self.external_id)
        return self


class LeaseSettings(Strict):
    """Discovery replicas: one polls each fetcher at a time, holding its lease."""

    period: Duration = 30.0
    """A holder renews every quarter of it; when a holder stops (killed, cut off from
    NATS), another replica takes its fetchers over one period after its last renewal."""

    @field_validator("period")
    @classmethod
    def _period(cls, seconds: float) -> float:
        if not 1 <= seconds <= 3600:
            raise ValueError("lease period must be between 1s and 1h")
        return seconds


class DiscoveryService(Strict):
    discovery_group: str = ""
    """Resources are owned per group: two discovery services with different groups never
    touch each other's resources."""
    poll_interval: Duration = 300.0
    poll_jitter: float = Field(default=0.1, ge=0, le=0.5)
    """Each interval is stretched by up to this fraction, at random."""
    fetcher_concurrency: int = Field(default=8, ge=1, le=64)
    """Fetchers (matcher x type x region x account) running at once."""
    api_concurrency: int = Field(default=16, ge=1, le=128)
    """AWS calls in flight at once per fetcher (ListTags fan-out)."""
    lease: LeaseSettings = LeaseSettings()
    """Several replicas may run with the same config; a single one holds every lease."""
    aws: list[AwsMatcher] = Field(min_length=1)
    diag_addr: HostPort | None = None
    """``host:port`` of the diagnostics listener (``/metrics``, ``/healthz``, ``/readyz``;
    docs/operations.md); off when unset."""

    @field_validator("poll_interval")
    @classmethod
    def _interval(cls, seconds: float) -> float:
        if seconds < 1:
            raise ValueError("poll_interval must be at least 1s")
        return seconds

    @field_validator("discovery_group")
    @classmethod
    def _group(cls, group: str) -> str:
        if group and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", group):
            raise ValueError("use letters, digits, '.', '_' and '-' (at most 63)")
        return group


class DiscoveryConfig(Strict):
    nats: NatsSettings = NatsSettings()
    jetstream: JetStreamSettings | None = None
    """Replicas and placement of the buckets discovery creates (see deploy/discovery.yaml)."""
    discovery_service: DiscoveryService

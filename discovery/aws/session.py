"""Credentials and clients: the standard chain, plus assume-role per matcher.

Clients come from one aiobotocore session, so the standard chain applies (environment,
shared files with AWS_PROFILE, web identity, instance metadata) and ``AWS_ENDPOINT_URL``
is honoured by botocore itself. Assumed-role credentials are cached and re-assumed five
minutes before they expire.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session

from discovery.aws.errors import (
    NO_CREDENTIALS_HELP,
    FetchError,
    NoCredentials,
    map_error,
    outcome_of,
)

logger = logging.getLogger(__name__)

REFRESH_MARGIN = 300.0
ROLE_SESSION_NAME = "fleetgate-discovery"


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None
    expires_at: float | None = None  # monotonic clock; None = managed by the chain


class AwsSession:
    """Builds region clients with the right credentials; counts every AWS call made."""

    def __init__(
        self,
        *,
        max_attempts: int = 4,
        connect_timeout: float = 5.0,
        read_timeout: float = 20.0,
        max_pool: int = 32,
    ) -> None:
        self.session: AioSession = get_session()
        self.config = AioConfig(
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max_pool,
        )
        self._assumed: dict[tuple[str, str | None], Credentials] = {}
        self._lock = asyncio.Lock()
        self._caller_account: str | None = None
        self.calls: dict[str, int] = {}
        self.outcomes: dict[tuple[str, str], int] = {}
        """(operation, outcome) -> calls; outcome: ok, throttled, forbidden, failed."""

    def count(self, operation: str, outcome: str = "ok") -> None:
        self.calls[operation] = self.calls.get(operation, 0) + 1
        key = (operation, outcome)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1

    def failed(self, operation: str, error: FetchError) -> FetchError:
        """Count a call of ``operation`` that failed with ``error``; returns it."""
        self.count(operation, outcome_of(error))
        return error

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    async def _base_credentials(self) -> None:
        creds = await self.session.get_credentials()
        if creds is None:
            raise NoCredentials(NO_CREDENTIALS_HELP)

    @asynccontextmanager
    async def client(
        self, service: str, region: str, creds: Credentials | None = None
    ) -> AsyncIterator[Any]:
        """An aiobotocore client; ``creds`` None means the standard chain."""
        kwargs: dict[str, Any] = {"region_name": region, "config": self.config}
        if creds is None:
            await self._base_credentials()
        else:
            kwargs.update(
                aws_access_key_id=creds.access_key,
                aws_secret_access_key=creds.secret_key,
                aws_session_token=creds.token,
            )
        async with self.session.create_client(service, **kwargs) as client:
            yield client

    async def credentials(
        self, role_arn: str | None, external_id: str | None, region: str
    ) -> Credentials | None:
        """Credentials for a matcher: None (the chain) or assumed-role ones, cached."""
        if role_arn is None:
            return None
        key = (role_arn, external_id)
        async with self._lock:
            cached = self._assumed.get(key)
            if (
                cached
                and cached.expires_at
                and cached.expires_at - time.monotonic() > REFRESH_MARGIN
            ):
                return cached
            params: dict[str, Any] = {
                "RoleArn": role_arn,
                "RoleSessionName": ROLE_SESSION_NAME,
                "DurationSeconds": 3600,
            }
            if external_id:
                params["ExternalId"] = external_id
            try:
                async with self.client("sts", region) as sts:
                    reply = await sts.assume_role(**params)
            except Exception as exc:
                raise self.failed(
                    "sts:AssumeRole", map_error(exc, f"AssumeRole {role_arn}")
                ) from exc
            self.count("sts:AssumeRole")
            c = reply["Credentials"]
            lifetime = c["Expiration"].timestamp() - time.time()
            fresh = Credentials(
                c["AccessKeyId"],
                c["SecretAccessKey"],
                c["SessionToken"],
                time.monotonic() + max(lifetime, 0),
            )
            self._assumed[key] = fresh
            logger.info("assumed role %s (valid %.0f min)", role_arn, lifetime / 60)
            return fresh

    async def caller_account(self, region: str) -> str:
        """The account of the chain's credentials (sts:GetCallerIdentity, once)."""
        async with self._lock:
            return await self._identity(region)

    async def _identity(self, region: str) -> str:
        if self._caller_account is None:
            try:
                async with self.client("sts", region) as sts:
                    reply = await sts.get_caller_identity()
            except Exception as exc:
                raise self.failed(
                    "sts:GetCallerIdentity", map_error(exc, "GetCallerIdentity")
                ) from exc
            self.count("sts:GetCallerIdentity")
            self._caller_account = str(reply["Account"])
        return self._caller_account

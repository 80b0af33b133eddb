"""The only MemoryDB caller: paginated to the end, every error mapped at the seam."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from discovery.aws.errors import map_error
from discovery.aws.session import AwsSession


@dataclass(frozen=True)
class MemoryDBUser:
    name: str
    auth_type: str
    acl_names: tuple[str, ...]


class MemoryDBApi(Protocol):
    """What a fetcher needs from MemoryDB in one region and account."""

    async def describe_clusters(self) -> list[dict[str, Any]]: ...
    async def describe_subnet_groups(self) -> dict[str, str]: ...
    async def describe_users(self) -> list[MemoryDBUser]: ...
    async def list_tags(self, arn: str) -> dict[str, str]: ...


class AioMemoryDB:
    """:class:`MemoryDBApi` over an open aiobotocore ``memorydb`` client."""

    def __init__(self, client: Any, session: AwsSession, region: str) -> None:
        self._client = client
        self._session = session
        self.region = region

    async def _pages(self, operation: str, key: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        try:
            paginator = self._client.get_paginator(operation)
            async for page in paginator.paginate():
                self._session.count(f"memorydb:{operation}")
                out.extend(page.get(key, []))
        except Exception as exc:
            name = "".join(part.title() for part in operation.split("_"))
            error = map_error(exc, f"{name} in {self.region}")
            raise self._session.failed(f"memorydb:{operation}", error) from exc
        return out

    async def describe_clusters(self) -> list[dict[str, Any]]:
        return await self._pages("describe_clusters", "Clusters")

    async def describe_subnet_groups(self) -> dict[str, str]:
        groups = await self._pages("describe_subnet_groups", "SubnetGroups")
        return {g["Name"]: g.get("VpcId", "") for g in groups if g.get("Name")}

    async def describe_users(self) -> list[MemoryDBUser]:
        users = await self._pages("describe_users", "Users")
        return [
            MemoryDBUser(
                name=u.get("Name", ""),
                auth_type=(u.get("Authentication") or {}).get("Type", ""),
                acl_names=tuple(u.get("ACLNames") or ()),
            )
            for u in users
        ]

    async def list_tags(self, arn: str) -> dict[str, str]:
        try:
            reply = await self._client.list_tags(ResourceArn=arn)
        except Exception as exc:
            error = map_error(exc, f"ListTags {arn}")
            raise self._session.failed("memorydb:list_tags", error) from exc
        self._session.count("memorydb:list_tags")
        return {t["Key"]: t.get("Value", "") for t in reply.get("TagList", [])}

"""The AWS calls of managed users: Secrets Manager for the passwords, MemoryDB for the
users, their tags and ACLs. Credentials and clients come from the agent's one
:class:`~dbservice.upstream.iam.IamAuth` (its chain, assumed roles and caches), so
there is no second credential chain.

Errors::

    ManagedError            one line, safe to log (never a password)
    ├── SecretConflict      Secrets Manager refused a version: another agent won the race
    ├── NotOurs             a secret without fleetgate's managed-by tag: never changed
    └── NotFound            the secret or user does not exist

A secret is fleetgate's only when it carries the managed-by tag that CreateSecret puts on
it: :meth:`ManagedAws.put_secret` and :meth:`ManagedAws.delete_secret` look at the tag
first and refuse (:class:`NotOurs`) any other secret, whichever path calls them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import botocore.exceptions

from dbservice.managed.state import MANAGED_BY_TAG
from dbservice.upstream.iam import IamAuth, IamError, Role
from fleetgate import awserrors


class ManagedError(Exception):
    """An AWS call for a managed user failed; ``str()`` is one line without secrets."""


class SecretConflict(ManagedError):
    pass


class NotFound(ManagedError):
    pass


class NotOurs(ManagedError):
    """The secret exists without fleetgate's managed-by tag: it is left as it is."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"secret {name} exists but fleetgate did not create it (no {MANAGED_BY_TAG} "
            "tag): fleetgate never changes or deletes it; delete it yourself, or tag it "
            "if it holds fleetgate's JSON"
        )


_NOT_FOUND = frozenset({"ResourceNotFoundException", "UserNotFoundFault", "ACLNotFoundFault"})


def _error(exc: Exception, what: str) -> ManagedError:
    if isinstance(exc, ManagedError):
        return exc
    if isinstance(exc, IamError):
        return ManagedError(f"{what}: {exc}")
    code, text = awserrors.error_code(exc), awserrors.reason(exc, what)
    if code in _NOT_FOUND:
        return NotFound(text)
    if code == "ResourceExistsException":
        return SecretConflict(text)
    if code in awserrors.DENIED_CODES:
        text += " (the agent's policy: fleetgate configure iam --agent)"
    return ManagedError(text)


@dataclass(frozen=True)
class SecretVersion:
    version_id: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class SecretInfo:
    name: str
    arn: str
    tags: dict[str, str]
    stages: dict[str, tuple[str, ...]]
    """Version id -> staging labels (``AWSCURRENT``, ``AWSPREVIOUS``)."""

    def version_of(self, stage: str) -> str | None:
        for version, labels in self.stages.items():
            if stage in labels:
                return version
        return None


@dataclass(frozen=True)
class MemoryDBUserInfo:
    name: str
    arn: str
    auth_type: str
    password_count: int
    acl_names: tuple[str, ...]


def secret_value(user: str, password: str, user_arn: str) -> str:
    """The SecretString other tools can read: {"username", "password", "user_arn"}."""
    return json.dumps({"username": user, "password": password, "user_arn": user_arn})


class ClientPool:
    """Open AWS clients, kept per (service, region, role chain) and replaced when the
    credentials behind them change, so a rotation does not build a client per call.
    :meth:`aclose` closes them."""

    def __init__(self, auth: IamAuth) -> None:
        self.auth = auth
        self._open: dict[tuple[str, str, tuple[Role, ...]], tuple[Any, Any, Any]] = {}
        self._lock = asyncio.Lock()

    async def client(self, service: str, region: str, roles: tuple[Role, ...]) -> Any:
        creds, _ = await self.auth.credentials(region, roles)
        key = (service, region, roles)
        async with self._lock:
            held = self._open.get(key)
            if held is not None and held[0] == creds:
                return held[1]
            if held is not None:
                await self._close(held)
            stack = contextlib.AsyncExitStack()
            client = await stack.enter_async_context(
                self.auth.session.create_client(
                    service,
                    region_name=region,
                    config=self.auth.config,
                    aws_access_key_id=creds.access_key,
                    aws_secret_access_key=creds.secret_key,
                    aws_session_token=creds.token,
                )
            )
            self._open[key] = (creds, client, stack)
            return client

    @staticmethod
    async def _close(held: tuple[Any, Any, Any]) -> None:
        with contextlib.suppress(Exception):
            await held[2].aclose()

    async def aclose(self) -> None:
        async with self._lock:
            for held in self._open.values():
                await self._close(held)
            self._open.clear()


class ManagedAws:
    """AWS calls for one region and role chain."""

    def __init__(
        self,
        auth: IamAuth,
        region: str,
        roles: tuple[Role, ...] = (),
        *,
        calls: dict[str, int] | None = None,
        pool: ClientPool | None = None,
    ) -> None:
        self.auth = auth
        self.region = region
        self.roles = roles
        self.calls = calls if calls is not None else {}
        """AWS calls made, by operation (shared by whoever passes the same dict)."""
        self.pool = pool

    @contextlib.asynccontextmanager
    async def _client(self, service: str, what: str) -> AsyncIterator[Any]:
        operation = what.split(" ", 1)[0]
        self.calls[operation] = self.calls.get(operation, 0) + 1
        try:
            if self.pool is not None:
                yield await self.pool.client(service, self.region, self.roles)
                return
            creds, _ = await self.auth.credentials(self.region, self.roles)
            async with self.auth.session.create_client(
                service,
                region_name=self.region,
                config=self.auth.config,
                aws_access_key_id=creds.access_key,
                aws_secret_access_key=creds.secret_key,
                aws_session_token=creds.token,
            ) as client:
                yield client
        except IamError as exc:
            raise ManagedError(f"{what}: {exc}") from None
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise _error(exc, what) from None

    # -- MemoryDB ---------------------------------------------------------------------

    async def describe_users(self, user: str | None = None) -> list[MemoryDBUserInfo]:
        """Every user of the region (all pages), or just ``user``."""
        out: list[MemoryDBUserInfo] = []
        async with self._client("memorydb", f"memorydb:DescribeUsers in {self.region}") as c:
            params: dict[str, Any] = {"UserName": user} if user else {}
            while True:
                reply = await c.describe_users(**params)
                for u in reply.get("Users", []):
                    auth = u.get("Authentication", {})
                    out.append(
                        MemoryDBUserInfo(
                            name=str(u.get("Name", "")),
                            arn=str(u.get("ARN", "")),
                            auth_type=str(auth.get("Type", "")),
                            password_count=int(auth.get("PasswordCount") or 0),
                            acl_names=tuple(u.get("ACLNames") or ()),
                        )
                    )
                token = reply.get("NextToken")
                if not token:
                    return out
                params["NextToken"] = token

    async def describe_user(self, user: str) -> MemoryDBUserInfo | None:
        try:
            found = [u for u in await self.describe_users(user) if u.name == user]
        except NotFound:
            return None
        return found[0] if found else None

    async def acl_members(self, acl_name: str) -> set[str]:
        """The user names of ACL ``acl_name`` (DescribeACLs)."""
        async with self._client("memorydb", f"memorydb:DescribeACLs {acl_name}") as c:
            reply = await c.describe_acls(ACLName=acl_name)
        acls = reply.get("ACLs", [])
        return {str(n) for acl in acls for n in acl.get("UserNames", [])}

    async def user_tags(self, user_arn: str) -> dict[str, str]:
        async with self._client("memorydb", f"memorydb:ListTags {user_arn}") as c:
            reply = await c.list_tags(ResourceArn=user_arn)
        return {str(t["Key"]): str(t.get("Value", "")) for t in reply.get("TagList", [])}

    async def set_passwords(self, user: str, passwords: list[str]) -> None:
        """UpdateUser with ``AuthenticationMode = password, Passwords`` (one or two)."""
        if not 1 <= len(passwords) <= 2:
            raise ValueError("MemoryDB keeps one or two passwords per user")
        async with self._client("memorydb", f"memorydb:UpdateUser {user}") as c:
            await c.update_user(
                UserName=user,
                AuthenticationMode={"Type": "password", "Passwords": passwords},
            )

    # -- Secrets Manager -----------------------------------------------------------------

    async def describe_secret(self, name: str) -> SecretInfo | None:
        try:
            async with self._client("secretsmanager", f"secretsmanager:DescribeSecret {name}") as c:
                reply = await c.describe_secret(SecretId=name)
        except NotFound:
            return None
        return SecretInfo(
            name=str(reply.get("Name", name)),
            arn=str(reply.get("ARN", "")),
            tags={str(t["Key"]): str(t.get("Value", "")) for t in reply.get("Tags", [])},
            stages={
                str(v): tuple(labels)
                for v, labels in (reply.get("VersionIdsToStages") or {}).items()
            },
        )

    async def require_ours(self, name: str) -> SecretInfo | None:
        """The secret's description when fleetgate created it (managed-by tag); None
        when there is no such secret; :class:`NotOurs` for a secret without the tag."""
        info = await self.describe_secret(name)
        if info is not None and MANAGED_BY_TAG not in info.tags:
            raise NotOurs(name)
        return info

    async def get_version(self, name: str, stage: str) -> SecretVersion | None:
        """The password at ``stage`` (AWSCURRENT/AWSPREVIOUS); None when no version has it."""
        try:
            async with self._client(
                "secretsmanager", f"secretsmanager:GetSecretValue {name} {stage}"
            ) as c:
                reply = await c.get_secret_value(SecretId=name, VersionStage=stage)
        except NotFound:
            return None
        try:
            password = str(json.loads(reply["SecretString"])["password"])
        except (KeyError, TypeError, ValueError):
            raise ManagedError(
                f"secret {name} ({stage}) is not fleetgate's JSON "
                '{"username", "password", "user_arn"}: fix or delete it'
            ) from None
        return SecretVersion(str(reply["VersionId"]), password)

    async def create_secret(
        self,
        name: str,
        value: str,
        *,
        token: str,
        tags: dict[str, str],
        kms_key_id: str | None,
    ) -> str:
        """CreateSecret; the version id. :class:`SecretConflict` when it exists."""
        params: dict[str, Any] = {
            "Name": name,
            "SecretString": value,
            "ClientRequestToken": token,
            "Description": "MemoryDB user password managed by fleetgate; rotated by its agents",
            "Tags": [{"Key": k, "Value": v} for k, v in sorted(tags.items())],
        }
        if kms_key_id:
            params["KmsKeyId"] = kms_key_id
        async with self._client("secretsmanager", f"secretsmanager:CreateSecret {name}") as c:
            reply = await c.create_secret(**params)
        return str(reply.get("VersionId") or token)

    async def put_secret(self, name: str, value: str, *, token: str) -> str:
        """PutSecretValue (becomes AWSCURRENT); the version id. :class:`SecretConflict`
        when ``token`` already made a version with another value; :class:`NotOurs` for
        a secret without fleetgate's tag, :class:`NotFound` when there is none."""
        if await self.require_ours(name) is None:
            raise NotFound(f"secretsmanager:PutSecretValue {name}: no such secret")
        async with self._client("secretsmanager", f"secretsmanager:PutSecretValue {name}") as c:
            reply = await c.put_secret_value(
                SecretId=name, SecretString=value, ClientRequestToken=token
            )
        return str(reply.get("VersionId") or token)

    async def delete_secret(self, name: str, *, recovery_days: int | None = 7) -> None:
        """DeleteSecret, recoverable for ``recovery_days`` (None: at once). Nothing when
        there is no such secret; :class:`NotOurs` (and nothing deleted) for a secret
        without fleetgate's managed-by tag."""
        if await self.require_ours(name) is None:
            return
        params: dict[str, Any] = {"SecretId": name}
        if recovery_days is None:
            params["ForceDeleteWithoutRecovery"] = True
        else:
            params["RecoveryWindowInDays"] = recovery_days
        try:
            async with self._client("secretsmanager", f"secretsmanager:DeleteSecret {name}") as c:
                await c.delete_secret(**params)
        except NotFound:
            return

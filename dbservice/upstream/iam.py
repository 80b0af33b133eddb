"""MemoryDB IAM login: tokens, "is this user IAM-enabled", and what to say when it fails.

A token is a SigV4 query-presigned ``GET http://<cluster-name>/?Action=connect&User=<user>``
for service ``memorydb`` in the database's region, valid 900 s, with the ``http://``
removed; it is sent as ``AUTH <user> <token>``. Credentials come from the agent's chain
(environment, shared files, web identity, container, instance metadata), then each role
of the chain in turn: the agent's resource matcher role, then the database's
``assume_role_arn``/``external_id`` (role chaining when both are set).

Caches (one :class:`IamAuth` per agent, shared by every session):

* tokens per (cluster, user, region, roles), reused until 5 minutes before they expire
  (and never past the assumed credentials that signed them);
* assumed-role credentials per role chain, renewed 5 minutes before they expire;
* DescribeUsers answers per (region, roles, user) for 5 minutes (the registry's
  ``memorydb.iam_users``, when discovery filled it, is used without any call).

Errors (each message is one line, shown to the user and the audit trail)::

    IamError
    ├── NoCredentials        no valid providers in the chain (and where it looked)
    ├── IamNotEnabled        the user's authentication type is not iam (or engine < 7)
    ├── UserNotInAcl         the user is not in the cluster's ACL
    ├── ConnectDenied        MemoryDB refused the token: memorydb:Connect (policy shown)
    ├── TlsRequired          IAM login needs in-transit encryption on the cluster
    └── AwsUnavailable       STS/MemoryDB API failure (network, throttling, denied)

Sending the token on a connection, and renewing it on a live one, is
:mod:`dbservice.upstream.auth`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import botocore.exceptions
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.auth import SIGV4_TIMESTAMP, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from bus.schemas import DatabaseResource
from dbservice.upstream.policies import connect_policy, partition_of
from fleetgate import awserrors

logger = logging.getLogger(__name__)

TOKEN_LIFETIME: Final = 900
"""Seconds a token is valid (MemoryDB's limit)."""
TOKEN_REUSE: Final = TOKEN_LIFETIME - 300
"""A cached token is used for new connections until 5 minutes before it expires."""
USER_TTL: Final = 300.0
"""Seconds a DescribeUsers answer is trusted."""
CREDENTIALS_MARGIN: Final = 300.0
"""Assumed-role credentials are renewed this long before they expire."""
ROLE_SESSION_NAME: Final = "fleetgate-agent"
ROLE_DURATION: Final = 3600
MIN_ENGINE_MAJOR: Final = 7
NO_PROVIDERS: Final = (
    "no valid providers in chain: looked in the environment (AWS_ACCESS_KEY_ID/"
    "AWS_SECRET_ACCESS_KEY), the shared files (~/.aws/credentials, ~/.aws/config, "
    "AWS_PROFILE), web identity (AWS_WEB_IDENTITY_TOKEN_FILE), container credentials "
    "(AWS_CONTAINER_CREDENTIALS_*) and instance metadata"
)


# -- errors -----------------------------------------------------------------------------


class IamError(Exception):
    """The agent cannot log in by IAM; ``str()`` is one line for the user."""


class NoCredentials(IamError):
    pass


class IamNotEnabled(IamError):
    pass


class UserNotInAcl(IamError):
    pass


class ConnectDenied(IamError):
    pass


class TlsRequired(IamError):
    pass


class AwsUnavailable(IamError):
    pass


def _aws_error(exc: Exception, what: str) -> IamError:
    if isinstance(exc, IamError):
        return exc
    if isinstance(exc, awserrors.NO_CREDENTIALS):
        return NoCredentials(NO_PROVIDERS)
    hint = " (check the agent's IAM policy: fleetgate configure iam --agent)"
    denied = awserrors.error_code(exc) in awserrors.DENIED_CODES
    return AwsUnavailable(awserrors.reason(exc, what) + (hint if denied else ""))


# -- what a database is, for IAM ----------------------------------------------------------


@dataclass(frozen=True)
class Role:
    arn: str
    external_id: str | None = None


@dataclass(frozen=True)
class IamTarget:
    """The MemoryDB facts an IAM login needs, from a registry record."""

    database: str
    cluster: str
    region: str
    account: str
    roles: tuple[Role, ...]
    engine_version: str
    acl_name: str
    tls: bool
    iam_users: tuple[str, ...] | None
    cluster_arn: str

    @classmethod
    def of(cls, resource: DatabaseResource, *, matcher_role: Role | None = None) -> IamTarget:
        """ValueError when the record is not a MemoryDB cluster."""
        aws = resource.spec.aws
        if aws is None or aws.memorydb is None:
            raise ValueError(f"{resource.name} is not a MemoryDB cluster: no IAM login")
        mdb = aws.memorydb
        roles = tuple(
            role
            for role in (
                matcher_role,
                Role(aws.assume_role_arn, aws.external_id) if aws.assume_role_arn else None,
            )
            if role is not None
        )
        partition = partition_of(aws.region)
        cluster_arn = (
            mdb.arn
            or f"arn:{partition}:memorydb:{aws.region}:{aws.account_id}:cluster/{mdb.cluster_name}"
        )
        return cls(
            database=resource.name,
            cluster=mdb.cluster_name,
            region=aws.region,
            account=aws.account_id,
            roles=roles,
            engine_version=mdb.engine_version,
            acl_name=mdb.acl_name,
            tls=mdb.tls_enabled and resource.spec.tls.mode != "disabled",
            iam_users=mdb.iam_users,
            cluster_arn=cluster_arn,
        )

    def user_arn(self, user: str) -> str:
        partition = partition_of(self.region)
        return f"arn:{partition}:memorydb:{self.region}:{self.account}:user/{user}"

    @property
    def engine_supports_iam(self) -> bool:
        """Engine 7 or later; an unknown or unparsable version is assumed to."""
        major = self.engine_version.strip().lstrip("vV").split(".", 1)[0]
        return not major.isdigit() or int(major) >= MIN_ENGINE_MAJOR

    def connect_denied(self, user: str) -> ConnectDenied:
        policy = json.dumps(
            connect_policy(self.cluster_arn, self.user_arn(user)), separators=(",", ":")
        )
        return ConnectDenied(
            f"MemoryDB refused the IAM token for user {user!r} on {self.cluster}: the "
            f"agent's IAM identity needs memorydb:Connect on the cluster and the user "
            f"(IAM changes take a few minutes to apply): {policy}"
        )


@dataclass(frozen=True)
class UserAuth:
    """What DescribeUsers says about one user."""

    name: str
    type: str
    """``iam``, ``password``, ``no-password``, or ``missing`` (no such user)."""
    acl_names: tuple[str, ...] = ()
    status: str = ""


# -- the token itself --------------------------------------------------------------------


class _SignAt(SigV4QueryAuth):  # type: ignore[misc]
    """botocore's query signer with the signing time given instead of read from the clock."""

    def __init__(self, credentials: Any, region: str, expires: int, at: datetime) -> None:
        super().__init__(credentials, "memorydb", region, expires=expires)
        self._at = at

    def add_auth(self, request: AWSRequest) -> None:
        request.context["timestamp"] = self._at.strftime(SIGV4_TIMESTAMP)
        self._modify_request_before_signing(request)
        canonical = self.canonical_request(request)
        signature = self.signature(self.string_to_sign(request, canonical), request)
        self._inject_signature_to_request(request, signature)


def presign_token(
    credentials: ReadOnlyCredentials,
    *,
    cluster: str,
    user: str,
    region: str,
    at: datetime | None = None,
    expires: int = TOKEN_LIFETIME,
) -> str:
    """The IAM auth token for ``user`` on ``cluster`` (host = the cluster name, lower
    case, as MemoryDB signs it), signed at ``at`` (default now)."""
    when = (at or datetime.now(UTC)).astimezone(UTC).replace(tzinfo=None)
    request = AWSRequest(
        method="GET",
        url=f"http://{cluster.lower()}/",
        params={"Action": "connect", "User": user},
    )
    _SignAt(credentials, region, expires, when).add_auth(request)
    url: str = request.prepare().url
    return url.removeprefix("http://")


# -- the shared cache ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Assumed:
    credentials: ReadOnlyCredentials
    expires_at: float  # wall clock


@dataclass(frozen=True)
class _Token:
    token: str
    reuse_until: float


class IamAuth:
    """Tokens and DescribeUsers answers for every session of one agent."""

    def __init__(
        self,
        *,
        session: AioSession | None = None,
        clock: Callable[[], float] = time.time,
        token_reuse: float = TOKEN_REUSE,
        user_ttl: float = USER_TTL,
    ) -> None:
        self.session = session or get_session()
        self.clock = clock
        self.token_reuse = token_reuse
        self.user_ttl = user_ttl
        self.config = AioConfig(
            retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=10
        )
        self.calls: dict[str, int] = {}
        """AWS calls made, by operation (``sts:AssumeRole``, ``memorydb:DescribeUsers``)."""
        self.tokens_signed = 0
        self._assumed: dict[tuple[Role, ...], _Assumed] = {}
        self._tokens: dict[tuple[str, str, str, tuple[Role, ...]], _Token] = {}
        self._users: dict[tuple[str, tuple[Role, ...], str], tuple[float, UserAuth]] = {}
        self._locks: dict[object, asyncio.Lock] = {}

    def _count(self, operation: str) -> None:
        self.calls[operation] = self.calls.get(operation, 0) + 1

    def _lock(self, key: object) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    # credentials ----------------------------------------------------------------------

    async def _chain(self) -> ReadOnlyCredentials:
        try:
            found = await self.session.get_credentials()
            frozen = await found.get_frozen_credentials() if found is not None else None
        except Exception as exc:
            raise _aws_error(exc, "reading AWS credentials") from exc
        if frozen is None or not frozen.access_key:
            raise NoCredentials(NO_PROVIDERS)
        return frozen

    async def credentials(self, region: str, roles: tuple[Role, ...]) -> tuple[Any, float | None]:
        """(credentials, wall-clock expiry or None for the chain's own) for ``roles``,
        each role assumed with the previous one's credentials."""
        if not roles:
            return await self._chain(), None
        async with self._lock(("creds", roles)):
            cached = self._assumed.get(roles)
            if cached is not None and cached.expires_at - self.clock() > CREDENTIALS_MARGIN:
                return cached.credentials, cached.expires_at
            outer, _ = await self.credentials(region, roles[:-1])
            role = roles[-1]
            params: dict[str, Any] = {
                "RoleArn": role.arn,
                "RoleSessionName": ROLE_SESSION_NAME,
                "DurationSeconds": ROLE_DURATION,
            }
            if role.external_id:
                params["ExternalId"] = role.external_id
            try:
                async with self._client("sts", region, outer) as sts:
                    self._count("sts:AssumeRole")
                    reply = await sts.assume_role(**params)
            except Exception as exc:
                raise _aws_error(exc, f"AssumeRole {role.arn}") from exc
            c = reply["Credentials"]
            fresh = _Assumed(
                ReadOnlyCredentials(c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"]),
                c["Expiration"].timestamp(),
            )
            self._assumed[roles] = fresh
            logger.info("assumed role %s for MemoryDB IAM login", role.arn)
            return fresh.credentials, fresh.expires_at

    def _client(self, service: str, region: str, creds: ReadOnlyCredentials) -> Any:
        return self.session.create_client(
            service,
            region_name=region,
            config=self.config,
            aws_access_key_id=creds.access_key,
            aws_secret_access_key=creds.secret_key,
            aws_session_token=creds.token,
        )

    # tokens ---------------------------------------------------------------------------

    async def token(self, target: IamTarget, user: str) -> str:
        """A token for ``user``: the cached one while it has 5 minutes left, else new."""
        key = (target.cluster.lower(), user, target.region, target.roles)
        cached = self._tokens.get(key)
        if cached is not None and self.clock() < cached.reuse_until:
            return cached.token
        async with self._lock(("token", key)):
            cached = self._tokens.get(key)
            now = self.clock()
            if cached is not None and now < cached.reuse_until:
                return cached.token
            creds, expires_at = await self.credentials(target.region, target.roles)
            token = presign_token(
                creds,
                cluster=target.cluster,
                user=user,
                region=target.region,
                at=datetime.fromtimestamp(now, UTC),
            )
            self.tokens_signed += 1
            reuse_until = now + self.token_reuse
            if expires_at is not None:
                reuse_until = min(reuse_until, expires_at - CREDENTIALS_MARGIN)
            self._tokens[key] = _Token(token, reuse_until)
            return token

    # users ----------------------------------------------------------------------------

    async def describe_user(self, target: IamTarget, user: str, *, fresh: bool = False) -> UserAuth:
        """DescribeUsers for ``user`` (cached ``user_ttl`` seconds unless ``fresh``)."""
        key = (target.region, target.roles, user)
        cached = self._users.get(key)
        if not fresh and cached is not None and self.clock() < cached[0]:
            return cached[1]
        async with self._lock(("user", key)):
            cached = self._users.get(key)
            if not fresh and cached is not None and self.clock() < cached[0]:
                return cached[1]
            creds, _ = await self.credentials(target.region, target.roles)
            try:
                async with self._client("memorydb", target.region, creds) as memorydb:
                    self._count("memorydb:DescribeUsers")
                    reply = await memorydb.describe_users(UserName=user)
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "UserNotFoundFault":
                    raise _aws_error(exc, f"DescribeUsers {user} in {target.region}") from exc
                reply = {"Users": []}
            except Exception as exc:
                raise _aws_error(exc, f"DescribeUsers {user} in {target.region}") from exc
            found = [u for u in reply.get("Users", []) if u.get("Name") == user]
            if found:
                u = found[0]
                answer = UserAuth(
                    name=user,
                    type=str(u.get("Authentication", {}).get("Type", "")),
                    acl_names=tuple(u.get("ACLNames", ())),
                    status=str(u.get("Status", "")),
                )
            else:
                answer = UserAuth(name=user, type="missing")
            self._users[key] = (self.clock() + self.user_ttl, answer)
            return answer

    async def is_iam_user(self, target: IamTarget, user: str) -> bool:
        """Log in as ``user`` by IAM token? Engine 7+ and authentication type ``iam``
        (the registry's list when discovery filled it, else DescribeUsers, cached). An
        AWS failure is logged (once per cache period) and answers False, so password
        users keep working while the agent's policy is being fixed."""
        if not target.engine_supports_iam:
            return False
        if target.iam_users is not None:
            return user in target.iam_users
        try:
            return (await self.describe_user(target, user)).type == "iam"
        except IamError as exc:
            key = (target.region, target.roles, user)
            self._users[key] = (self.clock() + self.user_ttl, UserAuth(user, "unknown"))
            logger.warning(
                "cannot tell whether MemoryDB user %s of %s uses IAM (%s); treating it as a "
                "password user for %.0fs",
                user,
                target.database,
                exc,
                self.user_ttl,
            )
            return False

    async def check_login(self, target: IamTarget, user: str) -> None:
        """Before sending a token: TLS on, and (when DescribeUsers knows) the user in the
        cluster's ACL. Raises :class:`TlsRequired` / :class:`UserNotInAcl`."""
        if not target.tls:
            raise TlsRequired(
                f"IAM login to {target.cluster} needs in-transit encryption (TLS), which is "
                f"off on this cluster (it can only be chosen when a cluster is created): "
                f"give user {user!r} a password instead, or move to a cluster with TLS"
            )
        if target.acl_name and target.iam_users is None:
            try:
                info = await self.describe_user(target, user)
            except IamError:
                return  # is_iam_user already warned; MemoryDB has the last word
            if info.acl_names and target.acl_name not in info.acl_names:
                raise UserNotInAcl(self._not_in_acl(target, user))

    @staticmethod
    def _not_in_acl(target: IamTarget, user: str) -> str:
        return (
            f"MemoryDB user {user!r} is not in ACL {target.acl_name!r} of cluster "
            f"{target.cluster}: add it (aws memorydb update-acl --acl-name "
            f"{target.acl_name} --user-names-to-add {user})"
        )

    async def diagnose(self, target: IamTarget, user: str) -> IamError:
        """Why MemoryDB refused a token (asked after WRONGPASS): the user's state read
        fresh, then the missing ``memorydb:Connect`` as the remaining cause."""
        self.forget(target, user)
        try:
            info = await self.describe_user(target, user, fresh=True)
        except IamError:
            return target.connect_denied(user)
        if info.type == "missing":
            return IamNotEnabled(
                f"MemoryDB has no user {user!r} in {target.region}: create it with "
                f"--authentication-mode Type=iam and add it to ACL {target.acl_name or '?'}"
            )
        if info.type != "iam":
            return IamNotEnabled(self.not_enabled(target, user, info.type))
        if target.acl_name and target.acl_name not in info.acl_names:
            return UserNotInAcl(self._not_in_acl(target, user))
        return target.connect_denied(user)

    @staticmethod
    def not_enabled(target: IamTarget, user: str, kind: str) -> str:
        return (
            f"IAM authentication is not enabled for MemoryDB user {user!r} of "
            f"{target.cluster} (its authentication type is {kind}): set "
            f"--authentication-mode Type=iam on the user, or log in with its password"
        )

    def forget(self, target: IamTarget, user: str) -> None:
        """Drop the cached token and user answer (after a refusal)."""
        self._tokens.pop((target.cluster.lower(), user, target.region, target.roles), None)
        self._users.pop((target.region, target.roles, user), None)

"""Users, roles and the fleet CA certificate in the registry.

Three buckets (names in :mod:`bus.subjects`), split by who may read them:

* ``fleetgate_auth`` holds the CA certificate (key ``ca``), never a private key;
* ``fleetgate_roles`` holds :class:`Role` records, read by agents on every new session so
  a role edit applies to the next connection without a new login;
* ``fleetgate_users`` holds :class:`User` records with password hashes, read only by the
  auth service and admins.

A role as people write it (``fleetgate roles create -f role.yaml``)::

    kind: role
    name: payments-dev
    allow:
      db_labels: {"env": ["dev", "staging"], "team": "payments"}
      db_users: ["app", "{{internal.db_users}}"]
      redis_commands: ["*"]
    deny:
      db_labels: {"pci": "true"}
      redis_commands: ["FLUSHALL", "FLUSHDB", "CONFIG*", "KEYS"]
    options: {max_session_ttl: 8h}
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import Field, field_validator

from bus import subjects
from bus.labels import check_selector
from bus.schemas import SCHEMA_VERSION, Record
from bus.specs import ACCESS_BUCKETS
from fleetgate.durations import Duration

if TYPE_CHECKING:
    from bus.client import Bus

DEFAULT_MAX_SESSION_TTL = 8 * 3600.0
"""A role without ``options.max_session_ttl`` caps certificates at 8 hours."""

DB_USERS_TRAIT = "{{internal.db_users}}"
"""In a role's ``db_users``: expands to the user's own ``--db-users``."""

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
"""Valid user and role names: letters, digits and ``. _ @ -``."""


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(
            f"{kind} name {name!r} is not valid: use letters, digits and . _ @ - "
            "(at most 128, starting with a letter or digit)"
        )
    return name


class RoleConditions(Record):
    """One side (allow or deny) of a role."""

    db_labels: dict[str, str | tuple[str, ...]] = Field(default_factory=dict)
    """Label selector of databases (see :mod:`bus.labels`)."""
    db_users: tuple[str, ...] = ()
    """Database users (globs allowed); ``{{internal.db_users}}`` is the user's own list."""
    redis_commands: tuple[str, ...] | None = None
    """Command-name globs, case-insensitive. In ``allow``, None means every command."""

    @field_validator("redis_commands")
    @classmethod
    def _commands(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for pattern in value or ():
            if not pattern.strip() or any(c.isspace() or c in "|\0" for c in pattern.strip()):
                raise ValueError(
                    f"redis_commands: {pattern!r} is not a command name or glob: rules name "
                    "whole commands (CONFIG, not CONFIG SET; a subcommand cannot be named)"
                )
        return value

    @field_validator("db_labels")
    @classmethod
    def _labels(cls, value: dict[str, str | tuple[str, ...]]) -> dict[str, str | tuple[str, ...]]:
        check_selector(value)
        return value


class RoleOptions(Record):
    max_session_ttl: Duration = DEFAULT_MAX_SESSION_TTL
    """Longest certificate a login may get while holding this role."""

    @field_validator("max_session_ttl")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("max_session_ttl must be longer than zero")
        return value


class Role(Record):
    """What the holders of a role may reach, as which db users, with which commands."""

    kind: Literal["role"] = "role"
    name: str
    description: str = ""
    allow: RoleConditions = RoleConditions()
    deny: RoleConditions = RoleConditions()
    options: RoleOptions = RoleOptions()
    schema_version: int = SCHEMA_VERSION

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name("role", value)


class User(Record):
    """A person or program that may log in (or be signed for with ``auth sign``)."""

    name: str
    roles: tuple[str, ...] = ()
    db_users: tuple[str, ...] = ()
    """The user's own database users, for ``{{internal.db_users}}`` in roles."""
    password_hash: str | None = None
    """argon2id hash (PHC string); None for programs that never log in interactively."""
    totp_secret: str | None = None
    """Base32 secret of an optional TOTP second factor."""
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    schema_version: int = SCHEMA_VERSION

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name("user", value)


def check_arn_pattern(pattern: str) -> str:
    """An AWS rule's ARN glob (``*`` and ``?``), or ValueError saying what is wrong."""
    if not pattern.startswith("arn:") or pattern.count(":") < 5:
        raise ValueError(
            f"{pattern!r} is not an ARN pattern: use e.g. 'arn:aws:iam::123456789012:role/ci-*'"
        )
    if any(c.isspace() for c in pattern) or "[" in pattern or "]" in pattern:
        raise ValueError(f"{pattern!r}: no spaces or [ ] in an ARN pattern (globs are * and ?)")
    return pattern


ACCOUNT_RE = re.compile(r"^[0-9*?]{1,12}$")


class AwsRule(Record):
    """Programs whose AWS identity matches log in as ``name`` (``fleetgate login --aws``)."""

    name: str
    """The fleetgate identity the certificate names."""
    arns: tuple[str, ...]
    """ARN globs matched against the principal ARN (an assumed role's session reads as
    its role, ``arn:aws:iam::ACC:role/NAME``) and against the ARN STS returned."""
    account: str | None = None
    """An account id (or glob) the identity must also be in."""
    roles: tuple[str, ...] = ()
    db_users: tuple[str, ...] = ()
    ttl: Duration | None = None
    """Longest certificate (the roles' caps apply too); None: the roles' cap."""
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    schema_version: int = SCHEMA_VERSION

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name("user", value)

    @field_validator("arns")
    @classmethod
    def _arns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one ARN pattern")
        return tuple(check_arn_pattern(p) for p in value)

    @field_validator("account")
    @classmethod
    def _account(cls, value: str | None) -> str | None:
        if value is not None and not ACCOUNT_RE.fullmatch(value):
            raise ValueError(f"account {value!r}: twelve digits (globs * and ? allowed)")
        return value

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ValueError("ttl must be longer than zero")
        return value


class CACertificate(Record):
    """The fleet CA as published in the registry."""

    pem: str
    """PEM of the CA certificate; may hold several during a CA rotation (all trusted)."""
    fingerprint: str
    """``SHA256:<hex>`` of the first certificate's DER, as ``auth init`` prints it."""
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))


class Identity(Record):
    """Who a certificate speaks for: embedded by the CA, read by agents and clients."""

    user: str
    roles: tuple[str, ...] = ()
    db_users: tuple[str, ...] = ()
    kind: Literal["user", "bot"] = "user"
    """``user`` for an interactive login, ``bot`` for ``auth sign``."""
    expires: datetime | None = None
    """Not stored in the extension: taken from the certificate's notAfter."""
    serial: str = ""
    """The certificate serial number in hex, for audit correlation."""
    aws_arn: str = ""
    """For a login with an AWS identity (``fleetgate login --aws``): the ARN STS
    returned; audit events carry it as ``principal``. Empty otherwise."""


# -- registry access ----------------------------------------------------------------


async def provision_access(bus: Bus) -> None:
    """Create the access buckets that do not exist yet."""
    await bus.provision(*ACCESS_BUCKETS)


async def put_role(bus: Bus, role: Role) -> int:
    return await bus.put(subjects.ROLES_BUCKET, subjects.role_key(role.name), role)


ROLE_READ_WAIT: Final = 3.0
"""How long a role read waits out JetStream not answering (a leaf moving to another hub
server takes about a second): a session or login checked meanwhile is not refused."""


async def get_role(bus: Bus, name: str) -> Role | None:
    return await bus.get(subjects.ROLES_BUCKET, subjects.role_key(name), Role, wait=ROLE_READ_WAIT)


async def get_roles(bus: Bus, names: tuple[str, ...] | list[str]) -> list[Role]:
    """The current definitions of the named roles; unknown names are left out."""
    found = [await get_role(bus, name) for name in names]
    return [role for role in found if role is not None]


async def list_roles(bus: Bus) -> list[Role]:
    found = await bus.snapshot(subjects.ROLES_BUCKET, Role)
    return sorted(found.values(), key=lambda r: r.name)


async def delete_role(bus: Bus, name: str) -> None:
    await bus.delete(subjects.ROLES_BUCKET, subjects.role_key(name))


async def put_user(bus: Bus, user: User) -> int:
    return await bus.put(subjects.USERS_BUCKET, subjects.user_key(user.name), user)


async def get_user(bus: Bus, name: str) -> User | None:
    return await bus.get(subjects.USERS_BUCKET, subjects.user_key(name), User)


async def list_users(bus: Bus) -> list[User]:
    found = await bus.snapshot(subjects.USERS_BUCKET, User)
    return sorted(found.values(), key=lambda u: u.name)


async def delete_user(bus: Bus, name: str) -> None:
    await bus.delete(subjects.USERS_BUCKET, subjects.user_key(name))


async def put_aws_rule(bus: Bus, rule: AwsRule) -> int:
    return await bus.put(subjects.AWS_RULES_BUCKET, subjects.user_key(rule.name), rule)


async def get_aws_rule(bus: Bus, name: str) -> AwsRule | None:
    return await bus.get(subjects.AWS_RULES_BUCKET, subjects.user_key(name), AwsRule)


async def list_aws_rules(bus: Bus) -> list[AwsRule]:
    found = await bus.snapshot(subjects.AWS_RULES_BUCKET, AwsRule)
    return sorted(found.values(), key=lambda r: r.name)


async def delete_aws_rule(bus: Bus, name: str) -> None:
    await bus.delete(subjects.AWS_RULES_BUCKET, subjects.user_key(name))


async def put_ca(bus: Bus, ca: CACertificate) -> int:
    return await bus.put(subjects.AUTH_BUCKET, subjects.CA_KEY, ca)


async def get_ca(bus: Bus) -> CACertificate | None:
    return await bus.get(subjects.AUTH_BUCKET, subjects.CA_KEY, CACertificate)


def role_document(role: Role) -> dict[str, Any]:
    """A role as YAML/JSON people read (durations in seconds)."""
    return role.model_dump(mode="json", exclude={"schema_version"})

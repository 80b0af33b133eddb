"""What admins do on the auth host: create and publish the CA, sign for programs, and
manage users and roles in the registry. The CLI (:mod:`fleetgate.cli.auth`) is a thin
layer over these functions."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bus import Bus
from bus.access import (
    AwsRule,
    CACertificate,
    Identity,
    Role,
    User,
    check_name,
    get_ca,
    get_role,
    get_roles,
    get_user,
    provision_access,
    put_ca,
    put_user,
)
from bus.audit import Login
from dbservice.access.awsid import AwsIdentity, account_matches, arn_matches
from dbservice.access.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CAError,
    CertificateAuthority,
    cert_pem,
    key_pem,
    new_key,
    write_private,
)
from dbservice.access.rbac import session_ttl_cap
from fleetgate.config import ConfigError, explain

ROLE_FIELDS = {"kind", "name", "description", "allow", "deny", "options", "version"}
CONDITION_FIELDS = {"db_labels", "db_users", "redis_commands"}
OPTION_FIELDS = {"max_session_ttl"}


class AdminError(Exception):
    """An admin command cannot do what was asked; the message says what to do."""


@dataclass(frozen=True)
class InitResult:
    ca: CertificateAuthority
    created: bool
    cert_path: Path


async def init_ca(bus: Bus, directory: Path, *, force: bool = False) -> InitResult:
    """Create the CA in ``directory`` (or reuse the one there) and publish its certificate.

    A CA already in the registry with another key is only replaced with ``force``: every
    certificate it issued stops working."""
    exists = (directory / CA_KEY_FILE).exists()
    if exists and not force:
        ca = CertificateAuthority.load(directory)
        created = False
    else:
        ca = CertificateAuthority.create()
        created = True
    await provision_access(bus)
    published = await get_ca(bus)
    if published is not None and published.fingerprint != ca.fingerprint and not force:
        raise AdminError(
            f"the registry already holds another CA ({published.fingerprint}); "
            "pass --force to replace it (every certificate it issued stops working)"
        )
    if created:
        ca.save(directory)
    await put_ca(bus, CACertificate(pem=ca.pem, fingerprint=ca.fingerprint))
    return InitResult(ca, created, directory / CA_CERT_FILE)


def load_ca(directory: Path) -> CertificateAuthority:
    try:
        return CertificateAuthority.load(directory)
    except CAError as exc:
        raise AdminError(str(exc)) from None


@dataclass(frozen=True)
class SignResult:
    identity: Identity
    ttl: float
    capped: bool
    files: tuple[Path, ...]


async def sign_user(
    bus: Bus, ca: CertificateAuthority, user_name: str, ttl: float, out: Path
) -> SignResult:
    """Issue a certificate for a registered user (a program) into ``out``: key.pem (0600),
    cert.pem and ca.pem. The TTL is capped by the user's roles like a login's."""
    user = await get_user(bus, user_name)
    if user is None:
        raise AdminError(f"no user {user_name!r}: add it first with fleetgate users add")
    roles = await get_roles(bus, user.roles)
    cap = session_ttl_cap(roles)
    granted = min(ttl, cap)
    identity = Identity(user=user.name, roles=user.roles, db_users=user.db_users, kind="bot")
    key = new_key()
    cert = ca.issue_client(key.public_key(), identity, granted)
    files = write_identity(out, key_pem(key), cert_pem(cert), ca.pem)
    identity = identity.model_copy(
        update={"expires": cert.not_valid_after_utc, "serial": format(cert.serial_number, "x")}
    )
    return SignResult(identity, granted, granted < ttl, files)


def sign_host(
    ca: CertificateAuthority, hosts: list[str], ttl: float, out: Path
) -> tuple[Path, ...]:
    """A server certificate for agents or the auth service (``--host``)."""
    key = new_key()
    cert = ca.issue_server(key.public_key(), hosts, ttl)
    return write_identity(out, key_pem(key), cert_pem(cert), ca.pem)


def write_identity(out: Path, key: bytes, cert: str, ca: str) -> tuple[Path, ...]:
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(out, 0o700)
    write_private(out / "key.pem", key)
    (out / "cert.pem").write_text(cert)
    (out / "ca.pem").write_text(ca)
    return (out / "key.pem", out / "cert.pem", out / "ca.pem")


def sign_event(result: SignResult, host_id: str) -> Login:
    return Login(
        user=result.identity.user,
        roles=result.identity.roles,
        host_id=host_id,
        method="sign",
        expires=result.identity.expires,
        reason=f"signed for {int(result.ttl)}s",
    )


# -- users and roles ------------------------------------------------------------------


async def add_user(
    bus: Bus,
    name: str,
    roles: list[str],
    db_users: list[str],
    *,
    password_hash: str | None,
    totp_secret: str | None = None,
    replace: bool = False,
) -> User:
    try:
        check_name("user", name)
    except ValueError as exc:
        raise AdminError(str(exc)) from None
    if not replace and await get_user(bus, name) is not None:
        raise AdminError(f"user {name!r} exists already (remove it first, or pass --replace)")
    unknown = [r for r in roles if await get_role(bus, r) is None]
    if unknown:
        raise AdminError(
            f"unknown role(s): {', '.join(unknown)}; create them first with "
            "fleetgate roles create -f role.yaml (see fleetgate roles ls)"
        )
    user = User(
        name=name,
        roles=tuple(roles),
        db_users=tuple(db_users),
        password_hash=password_hash,
        totp_secret=totp_secret,
    )
    await put_user(bus, user)
    return user


def parse_role(data: dict[str, Any], source: str) -> Role:
    """A role from its YAML mapping; ConfigError naming unknown or wrong fields."""
    problems: list[str] = []
    problems += [f"  {k}: unknown field" for k in data if k not in ROLE_FIELDS]
    for side in ("allow", "deny"):
        part = data.get(side)
        if isinstance(part, dict):
            problems += [f"  {side}.{k}: unknown field" for k in part if k not in CONDITION_FIELDS]
    options = data.get("options")
    if isinstance(options, dict):
        problems += [f"  options.{k}: unknown field" for k in options if k not in OPTION_FIELDS]
    if data.get("kind", "role") != "role":
        problems.append(f"  kind: expected 'role', got {data.get('kind')!r}")
    if problems:
        raise ConfigError(f"{source}: invalid role\n" + "\n".join(problems))
    body = {k: v for k, v in data.items() if k != "version"}
    try:
        return Role.model_validate(body)
    except ValidationError as exc:
        raise explain(exc, source) from None


# -- AWS identities (fleetgate login --aws) ---------------------------------------------


@dataclass(frozen=True)
class RuleChoice:
    """The rule an AWS identity logs in with, and the roles its certificate carries."""

    rule: AwsRule
    roles: tuple[str, ...]


def rule_matches(rule: AwsRule, identity: AwsIdentity) -> bool:
    """Whether ``identity`` is admitted by ``rule``: its account (when the rule names one)
    and one of its ARN globs, on the principal ARN or the ARN STS returned."""
    return account_matches(rule.account, identity) and any(
        arn_matches(pattern, identity) for pattern in rule.arns
    )


def choose_aws_rule(
    rules: list[AwsRule], identity: AwsIdentity, role: str | None = None
) -> RuleChoice | str:
    """The rule ``identity`` logs in with (with ``role``: the one rule granting it, and
    only that role), or why there is none, for the program. Several rules matching
    without ``role`` to choose is refused: which identity to issue is the admin's
    decision, never a guess."""
    matching = [r for r in rules if rule_matches(r, identity)]
    who = f"{identity.arn} (account {identity.account})"
    if identity.principal != identity.arn:
        who = f"{identity.arn} (as {identity.principal}, account {identity.account})"
    if not matching:
        return (
            f"no rule admits {who}; an admin adds one with "
            "fleetgate users add-aws NAME --arn PATTERN --roles ..."
        )
    if role is not None:
        granting = [r for r in matching if role in r.roles]
        if not granting:
            names = ", ".join(r.name for r in matching)
            return f"role {role!r} is not granted to {who} (its rules: {names})"
        matching = granting
    if len(matching) > 1:
        names = ", ".join(r.name for r in matching)
        hint = "" if role is not None else " (or pick a role with --role)"
        return f"{who} matches several rules ({names}): an admin must make them distinct{hint}"
    rule = matching[0]
    return RuleChoice(rule, (role,) if role is not None else rule.roles)


async def add_aws_rule(
    bus: Bus,
    name: str,
    arns: list[str],
    roles: list[str],
    *,
    account: str | None = None,
    db_users: list[str] | None = None,
    ttl: float | None = None,
    replace: bool = False,
) -> AwsRule:
    from bus.access import get_aws_rule, put_aws_rule
    from bus.aws_logins import provision_aws_logins

    try:
        rule = AwsRule(
            name=name,
            arns=tuple(arns),
            account=account,
            roles=tuple(roles),
            db_users=tuple(db_users or ()),
            ttl=ttl,
        )
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in error["loc"] if not isinstance(p, int))
        raise AdminError(f"{where}: {error['msg'].removeprefix('Value error, ')}") from None
    await provision_aws_logins(bus)
    if not replace and await get_aws_rule(bus, name) is not None:
        raise AdminError(f"AWS rule {name!r} exists already (remove it first, or pass --replace)")
    unknown = [r for r in roles if await get_role(bus, r) is None]
    if unknown:
        raise AdminError(
            f"unknown role(s): {', '.join(unknown)}; create them first with "
            "fleetgate roles create -f role.yaml (see fleetgate roles ls)"
        )
    await put_aws_rule(bus, rule)
    return rule

"""Agents join with a one-time token: the tokens (:data:`~bus.subjects.JOIN_TOKENS_BUCKET`)
and the agents that joined (:data:`~bus.subjects.AGENTS_BUCKET`).

A token is ``<id>.<secret>``: the id (64 random bits, hex) is the record's key and is
shown by ``tokens ls``; the secret (192 random bits) is printed once by ``tokens add``
and never stored: the record keeps HMAC-SHA256 of the secret keyed by the id. A token
is spent by compare-and-set on its record (:mod:`bus.leases`), so of two joins racing
with one token exactly one wins. Spent tokens stay (marked spent): removing one
(``tokens rm``) revokes the agents that joined with it, as ``agents rm`` revokes one.

An AWS allow rule (``method: aws``, :class:`AwsAllow`) is a record of the same bucket
with no secret: it admits every agent whose AWS identity (a signed
``sts:GetCallerIdentity``) matches it, until it expires (if it has a ``--ttl``) or is
removed; removing it revokes every agent that joined by it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
import secrets
from datetime import datetime, timedelta
from typing import Literal

from bus import leases, specs, subjects
from bus.client import Bus
from bus.schemas import Record, utcnow

TOKENS = specs.JOIN_TOKENS
AGENTS = specs.AGENTS

TOKEN_ID_BYTES = 8
TOKEN_SECRET_BYTES = 24
_TOKEN = re.compile(r"^([0-9a-f]{16})\.([A-Za-z0-9_-]{20,64})$")


_ALLOW_KEY = re.compile(r"(?:^|,)\s*(account|arn)\s*=")
_ALLOW_ACCOUNT = re.compile(r"^[0-9*?]{1,12}$")
_ALLOW_ARN = re.compile(
    r"^arn:(?P<partition>aws[a-z-]*|\*):(?P<service>iam|sts|\*)::(?P<account>[0-9*?]+):"
    r"(?P<resource>[!-~]+)$"
)


class AwsAllow(Record):
    """Who an AWS allow rule admits: an account (glob, optional) and an ARN glob
    (``*``, ``?``), matched against the principal ARN or the ARN STS returned."""

    account: str | None = None
    arn: str

    def text(self) -> str:
        return (f"account={self.account}," if self.account else "") + f"arn={self.arn}"


def parse_allow(text: str) -> AwsAllow:
    """``account=ACCOUNT,arn=ARN`` (``account`` optional); ValueError saying what is wrong."""
    example = "expected account=123456789012,arn=arn:aws:sts::123456789012:assumed-role/ROLE/*"
    starts = list(_ALLOW_KEY.finditer(text))
    if not starts or starts[0].start() != 0 or not text.strip():
        raise ValueError(f"{text!r}: {example}")
    found: dict[str, str] = {}
    for i, start in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        key, value = start.group(1), text[start.end() : end].strip()
        if key in found:
            raise ValueError(f"{text!r}: {key} is given twice")
        if not value:
            raise ValueError(f"{text!r}: {key} is empty; {example}")
        found[key] = value
    if "arn" not in found:
        raise ValueError(f"{text!r}: arn is missing; {example}")
    account = found.get("account")
    if account is not None and not _ALLOW_ACCOUNT.fullmatch(account):
        raise ValueError(f"account {account!r}: expected a 12-digit AWS account id")
    arn = _ALLOW_ARN.fullmatch(found["arn"])
    if arn is None:
        raise ValueError(
            f"arn {found['arn']!r}: expected arn:aws:iam::ACCOUNT:role/NAME or "
            "arn:aws:sts::ACCOUNT:assumed-role/NAME/SESSION (globs * and ? allowed)"
        )
    if (
        account is not None
        and arn["account"].isdigit()
        and not fnmatch.fnmatchcase(arn["account"], account)
    ):
        raise ValueError(
            f"account {account} and the account {arn['account']} in the arn differ: the rule "
            "would never match"
        )
    return AwsAllow(account=account, arn=found["arn"])


class JoinToken(Record):
    """A join token as stored: never its secret."""

    id: str
    type: Literal["agent"] = "agent"
    method: str = "token"
    hash: str = ""
    """HMAC-SHA256 of the secret, keyed by the id (hex); empty for an AWS allow rule."""
    allow: AwsAllow | None = None
    """Method ``aws``: who it admits."""
    labels: dict[str, str] = {}
    """Given to every agent that joins with it."""
    created: datetime
    expires: datetime | None = None
    """None: never (an AWS allow rule without ``--ttl``)."""
    creator: str = ""
    spent: datetime | None = None
    spent_by: str = ""
    """The host_id of the agent that spent it."""

    def state(self, now: datetime | None = None) -> str:
        """``spent``, ``expired`` or ``valid`` (an AWS allow rule is never spent)."""
        if self.expires is None:
            return "valid"
        if self.spent is not None:
            return "spent"
        return "expired" if self.expires <= (now or utcnow()) else "valid"


class JoinedAgent(Record):
    """An agent that joined: what its certificate is, so only it can renew."""

    host_id: str
    hostname: str
    addr: str
    labels: dict[str, str] = {}
    token_id: str = ""
    """The token or AWS allow rule it joined by (removing that revokes the agent)."""
    method: str = "token"
    serial: str
    """Its current certificate's serial (hex)."""
    previous_serial: str = ""
    """The one before: a renewal whose answer was lost may be asked again with it."""
    expires: datetime
    joined_at: datetime
    renewed_at: datetime | None = None


def token_hash(token_id: str, secret: str) -> str:
    return hmac.new(token_id.encode(), secret.encode(), hashlib.sha256).hexdigest()


def parse_token(text: str) -> tuple[str, str]:
    """``(id, secret)`` of a token's text; ValueError saying what is wrong."""
    match = _TOKEN.match(text.strip())
    if match is None:
        raise ValueError("not a join token (expected ID.SECRET as fleetgate tokens add printed it)")
    return match.group(1), match.group(2)


def new_token(
    *, ttl: float, labels: dict[str, str], creator: str, method: str = "token"
) -> tuple[str, JoinToken]:
    """A fresh token's text (show it once) and its record."""
    token_id = secrets.token_hex(TOKEN_ID_BYTES)
    secret = secrets.token_urlsafe(TOKEN_SECRET_BYTES)
    now = utcnow()
    record = JoinToken(
        id=token_id,
        method=method,
        hash=token_hash(token_id, secret),
        labels=labels,
        created=now,
        expires=now + timedelta(seconds=ttl),
        creator=creator,
    )
    return f"{token_id}.{secret}", record


def new_aws_rule(
    *, allow: AwsAllow, ttl: float | None, labels: dict[str, str], creator: str
) -> JoinToken:
    """An AWS allow rule's record (no secret: it admits by the identity STS returns)."""
    now = utcnow()
    return JoinToken(
        id=secrets.token_hex(TOKEN_ID_BYTES),
        method="aws",
        allow=allow,
        labels=labels,
        created=now,
        expires=now + timedelta(seconds=ttl) if ttl else None,
        creator=creator,
    )


def matches(record: JoinToken, secret: str) -> bool:
    if not record.hash:
        return False
    return hmac.compare_digest(record.hash, token_hash(record.id, secret))


async def add_token(bus: Bus, record: JoinToken) -> None:
    key = subjects.join_token_key(record.id)
    if await leases.create(bus, TOKENS.name, key, record) is None:
        raise ValueError(f"token id {record.id} exists already")


async def get_token(bus: Bus, token_id: str) -> leases.Versioned[JoinToken] | None:
    return await leases.read(bus, TOKENS.name, subjects.join_token_key(token_id), JoinToken)


async def spend_token(bus: Bus, found: leases.Versioned[JoinToken], host_id: str) -> bool:
    """Mark the token spent by ``host_id``; False when another join spent (or changed) it
    since it was read."""
    record = found.record.model_copy(update={"spent": utcnow(), "spent_by": host_id})
    key = subjects.join_token_key(record.id)
    return await leases.update(bus, TOKENS.name, key, record, last=found.revision) is not None


async def list_tokens(bus: Bus) -> list[JoinToken]:
    found = await leases.snapshot(bus, TOKENS.name, JoinToken)
    return sorted((v.record for v in found.values()), key=lambda t: t.created)


async def delete_token(bus: Bus, token_id: str) -> bool:
    """Remove a token; False when there was none."""
    if await get_token(bus, token_id) is None:
        return False
    await bus.delete(TOKENS.name, subjects.join_token_key(token_id))
    return True


async def get_agent(bus: Bus, host_id: str) -> leases.Versioned[JoinedAgent] | None:
    return await leases.read(bus, AGENTS.name, subjects.agent_key(host_id), JoinedAgent)


async def put_agent(bus: Bus, agent: JoinedAgent) -> None:
    await bus.put(AGENTS.name, subjects.agent_key(agent.host_id), agent)


async def update_agent(bus: Bus, agent: JoinedAgent, *, last: int) -> bool:
    """Write ``agent`` only if its record is still at ``last`` (not removed or renewed
    by another request meanwhile)."""
    key = subjects.agent_key(agent.host_id)
    return await leases.update(bus, AGENTS.name, key, agent, last=last) is not None


async def list_agents(bus: Bus) -> list[JoinedAgent]:
    found = await leases.snapshot(bus, AGENTS.name, JoinedAgent)
    return sorted((v.record for v in found.values()), key=lambda a: (a.hostname, a.host_id))


async def delete_agent(bus: Bus, host_id: str) -> bool:
    """Revoke an agent (it can no longer renew); False when there was none."""
    if await get_agent(bus, host_id) is None:
        return False
    await bus.delete(AGENTS.name, subjects.agent_key(host_id))
    return True


def agent_state(agent: JoinedAgent, now: datetime | None = None) -> Literal["valid", "expired"]:
    return "expired" if agent.expires <= (now or utcnow()) else "valid"

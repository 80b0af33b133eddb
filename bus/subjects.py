"""Every subject, KV bucket and stream name of the bus, in one place.

Buckets are split by who may write them, so NATS permissions can say exactly that
(see deploy/nats/nats-server.conf):

| bucket / stream            | written by        | read by                        |
|----------------------------|-------------------|--------------------------------|
| ``fleetgate_databases``    | discovery only    | agents, ``db ls``, auth service |
| ``fleetgate_discovery``    | discovery only    | operators (fetcher status)     |
| ``fleetgate_discovery_leases`` | discovery only | discovery replicas, operators  |
| ``fleetgate_db_servers``   | agents only       | ``db ls``, clients, auth       |
| ``fleetgate_auth``         | ``auth init``     | agents, auth service, clients  |
| ``fleetgate_roles``        | admins (``roles``) | agents, auth service          |
| ``fleetgate_users``        | admins (``users``) | auth service only (hashes)    |
| ``fleetgate_leases``       | agents only       | agents, ``managed`` commands   |
| ``fleetgate_totp``         | auth service only | auth service only              |
| ``fleetgate_login_failures`` | auth service only | auth service only            |
| ``fleetgate_join_tokens``  | admins, auth svc  | auth service, admins           |
| ``fleetgate_agents``       | auth service, admins (rm) | auth service, admins   |
| ``FLEETGATE_AUDIT`` stream | agents, auth svc  | auditors (``audit tail``)      |
"""

from __future__ import annotations

import re
from typing import Final

DATABASES_BUCKET: Final = "fleetgate_databases"
"""Database resources, keyed by database name. Written only by discovery."""

DISCOVERY_STATUS_BUCKET: Final = "fleetgate_discovery"
"""One status record per discovery fetcher, keyed by :func:`fetcher_status_key`."""

DISCOVERY_LEASES_BUCKET: Final = "fleetgate_discovery_leases"
"""Which discovery replica polls each fetcher: one lease per fetcher, keyed like its
status record (:func:`fetcher_status_key`), taken and renewed by compare-and-set."""

DB_SERVERS_BUCKET: Final = "fleetgate_db_servers"
"""Agent heartbeats, one per (database, agent), keyed by :func:`db_server_key`."""

AUTH_BUCKET: Final = "fleetgate_auth"
"""The fleet CA certificate (key :data:`CA_KEY`); never a private key. Written by ``auth init``."""

CA_KEY: Final = "ca"
"""Key of the CA certificate record in :data:`AUTH_BUCKET`."""

ROLES_BUCKET: Final = "fleetgate_roles"
"""Roles, keyed by role name. Written by admins; read by agents on every new session."""

USERS_BUCKET: Final = "fleetgate_users"
"""Users with their password hashes, keyed by user name. Read only by the auth service."""

LEASES_BUCKET: Final = "fleetgate_leases"
"""Managed MemoryDB users: one record per user (versions, rotation lease, in-use state;
never a password), keyed by :func:`managed_user_key`. Written only by agents."""

TOTP_BUCKET: Final = "fleetgate_totp"
"""The last one-time-code step accepted per user, keyed by :func:`totp_key`: shared by
every auth service instance so a code works once across all of them. Written and read
only by the auth service."""

LOGIN_FAILURES_BUCKET: Final = "fleetgate_login_failures"
"""Each user name's recent failed logins, keyed by :func:`login_failures_key`: shared by
every auth service instance so the per-user limit counts failures at all of them.
Written and read only by the auth service."""

AWS_RULES_BUCKET: Final = "fleetgate_aws_rules"
"""Which AWS identities log in as which fleetgate identity (``fleetgate users add-aws``),
keyed by the identity's name. Written by admins; read only by the auth service."""

AWS_SIGNATURES_BUCKET: Final = "fleetgate_aws_signatures"
"""Signatures of the signed GetCallerIdentity requests already used to log in, keyed by
the signature: shared by every auth service instance so a signed request works once.
Written and read only by the auth service."""

JOIN_TOKENS_BUCKET: Final = "fleetgate_join_tokens"
"""One-time join tokens (only a keyed hash of each secret), keyed by token id. Written by
admins (``tokens add``/``rm``) and by the auth service (spending one)."""

AGENTS_BUCKET: Final = "fleetgate_agents"
"""Agents that joined, keyed by host_id: their certificate's serial and expiry. Written by
the auth service (join, renew) and admins (``agents rm``: revoke)."""

AUDIT_STREAM: Final = "FLEETGATE_AUDIT"
"""JetStream stream of audit events, on subjects ``fleetgate.audit.<event type>.<host>``
(and ``fleetgate.audit.<event type>`` from older writers): :func:`audit_subject`."""

AUDIT_SUBJECT_PREFIX: Final = "fleetgate.audit"

ALL_BUCKETS: Final = (
    DATABASES_BUCKET,
    DISCOVERY_STATUS_BUCKET,
    DB_SERVERS_BUCKET,
    AUTH_BUCKET,
    ROLES_BUCKET,
    USERS_BUCKET,
)

_KEY_UNSAFE = re.compile(r"[^-/_a-zA-Z0-9]")


def kv_token(text: str) -> str:
    """Make ``text`` safe as one dot-free part of a KV key (``=XX`` escapes, reversible)."""
    return _KEY_UNSAFE.sub(lambda m: f"={ord(m.group()):02X}", text)


def database_key(name: str) -> str:
    """KV key of a database resource."""
    return kv_token(name)


def fetcher_status_key(group: str, fetcher_id: str) -> str:
    """KV key of one fetcher's status record: ``<group>.<fetcher id>``."""
    return f"{kv_token(group or '_')}.{kv_token(fetcher_id)}"


def db_server_key(database: str, host_id: str) -> str:
    """KV key of one agent's heartbeat for one database: ``<database>.<host_id>``."""
    return f"{kv_token(database)}.{kv_token(host_id)}"


def db_servers_of(database: str) -> str:
    """KV key filter matching every heartbeat for ``database``."""
    return f"{kv_token(database)}.*"


def kv_subject(bucket: str, key: str) -> str:
    """The JetStream subject behind a KV key (for writes with per-message headers)."""
    return f"$KV.{bucket}.{key}"


def managed_user_key(region: str, account: str, user: str) -> str:
    """KV key of a managed MemoryDB user's record: ``<region>.<account>.<user>``."""
    return f"{kv_token(region)}.{kv_token(account)}.{kv_token(user)}"


def user_key(name: str) -> str:
    """KV key of a user record."""
    return kv_token(name)


def totp_key(user: str) -> str:
    """KV key of a user's last accepted one-time-code step."""
    return kv_token(user)


def login_failures_key(user: str) -> str:
    """KV key of a user name's recent failed logins."""
    return kv_token(user)


def join_token_key(token_id: str) -> str:
    """KV key of a join token's record."""
    return kv_token(token_id)


def agent_key(host_id: str) -> str:
    """KV key of a joined agent's record."""
    return kv_token(host_id)


def role_key(name: str) -> str:
    """KV key of a role record."""
    return kv_token(name)


def audit_subject(event_type: str, host_id: str | None = None) -> str:
    """Subject of one audit event type. With the publisher's ``host_id`` (what every
    writer sends since agents got their own NATS rights), the host is the last token:
    ``auth.login`` from ``h1`` -> ``fleetgate.audit.auth.login.h1``, so NATS permissions
    can let an agent publish only as itself (``fleetgate.audit.*.*.<host_id>``).
    Without it, the subject of older writers: ``fleetgate.audit.auth.login``."""
    if host_id is None:
        return f"{AUDIT_SUBJECT_PREFIX}.{event_type}"
    return f"{AUDIT_SUBJECT_PREFIX}.{event_type}.{audit_host_token(host_id)}"


def audit_host_token(host_id: str) -> str:
    """The subject token naming a publisher (``_`` when it has no host_id)."""
    return kv_token(host_id) if host_id else "_"


def audit_publisher(subject: str, event_type: str) -> str | None:
    """The host token of an event's subject (the identity NATS permissions vouch for),
    ``""`` for the subject of older writers (no host token), None when the subject is
    not one of ``event_type`` at all."""
    base = audit_subject(event_type)
    if subject == base:
        return ""
    head, _, token = subject.rpartition(".")
    return token if head == base and token else None


def audit_filter(event_type: str | None = None, *, exact: bool = True) -> str:
    """Subject filter, in the form of :func:`audit_subject` without a host: one event
    type, every type under a prefix (``db.session``, with ``exact=False``), or every
    event when ``event_type`` is None. :func:`audit_wire_filters` turns it into what a
    consumer filters on."""
    if not event_type:
        return f"{AUDIT_SUBJECT_PREFIX}.>"
    return audit_subject(event_type) if exact else f"{AUDIT_SUBJECT_PREFIX}.{event_type}.>"


def audit_wire_filters(logical: str) -> list[str]:
    """The stream subjects behind an :func:`audit_filter`: an exact type is stored on
    ``<type>.<host>`` and, from older writers, on ``<type>`` (token counts differ, so
    the two never overlap, as NATS requires of one consumer's filters); a filter
    ending in ``>`` already covers both."""
    if logical.endswith(">"):
        return [logical]
    return [f"{logical}.*", logical]


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether ``subject`` matches the NATS subject filter ``pattern`` (``*`` is one
    token, a final ``>`` one or more)."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)

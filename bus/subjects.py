"""Every subject, KV bucket and stream name of the bus, in one place.

Buckets are split by who may write them, so NATS permissions can say exactly that
(see deploy/nats/nats-server.conf):

| bucket / stream            | written by        | read by                        |
|----------------------------|-------------------|--------------------------------|
| ``fleetgate_databases``    | discovery only    | agents, ``db ls``, auth service |
| ``fleetgate_discovery``    | discovery only    | operators (fetcher status)     |
| ``fleetgate_db_servers``   | agents only       | ``db ls``, clients, auth       |
"""

from __future__ import annotations

import re
from typing import Final

DATABASES_BUCKET: Final = "fleetgate_databases"
"""Database resources, keyed by database name. Written only by discovery."""

DISCOVERY_STATUS_BUCKET: Final = "fleetgate_discovery"
"""One status record per discovery fetcher, keyed by :func:`fetcher_status_key`."""

DB_SERVERS_BUCKET: Final = "fleetgate_db_servers"
"""Agent heartbeats, one per (database, agent), keyed by :func:`db_server_key`."""

ALL_BUCKETS: Final = (DATABASES_BUCKET, DISCOVERY_STATUS_BUCKET, DB_SERVERS_BUCKET)

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

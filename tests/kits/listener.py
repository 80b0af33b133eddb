"""Helpers for the agent listener tests: a fleet CA and roles in a real registry, client
identities issued by it, agent configs with a listener, redis-py over mutual TLS with the
route preamble, a raw RESP session, and the audit trail read back from the stream."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aredis
import redis.exceptions
from redis.asyncio.connection import SSLConnection

from bus import Bus
from bus.access import Identity, Role, put_role
from bus.audit import AuditEvent, SessionQuery, SessionStart, ensure_audit_stream, read_events
from dbservice.access.ca import CertificateAuthority, cert_pem, key_pem, new_key
from dbservice.auth.admin import init_ca, sign_host, write_identity
from dbservice.route import encode_route, open_route
from sandbox.ports import free_port
from sandbox.valkeynode import ValkeyNode
from tests.kits.agent import agent_config, wait_until

APP_PASSWORD = "apppass"
ADMIN_PASSWORD = "adminpass"
ROLES: dict[str, dict[str, Any]] = {
    "dev": {
        "allow": {"db_labels": {"env": "dev"}, "db_users": ["app"]},
        "deny": {"redis_commands": ["FLUSHALL", "FLUSHDB"]},
    },
    "no-pci": {"deny": {"db_labels": {"pci": "true"}}},
    "cache": {"allow": {"db_labels": {"env": "standin"}, "db_users": ["default"]}},
}


async def add_acl_users(node: ValkeyNode) -> None:
    """``app`` and ``admin`` with passwords, as a real deployment has them."""
    for user, password in (("app", APP_PASSWORD), ("admin", ADMIN_PASSWORD)):
        await node.command("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")


async def put_roles(bus: Bus, **overrides: dict[str, Any]) -> None:
    for name, body in {**ROLES, **overrides}.items():
        await put_role(bus, Role.model_validate({"name": name, **body}))


@dataclass
class Fleet:
    """A fleet CA published to a real registry, and the agent's server certificate."""

    bus: Bus
    ca: CertificateAuthority
    tmp: Path
    nats_url: str

    def identity(
        self,
        user: str,
        roles: Sequence[str],
        *,
        ttl: float = 3600,
        ca: CertificateAuthority | None = None,
    ) -> Path:
        """A client certificate in ``tmp/ids/<user>-<n>`` (cert.pem, key.pem, ca.pem)."""
        key = new_key()
        cert = (ca or self.ca).issue_client(
            key.public_key(), Identity(user=user, roles=tuple(roles)), ttl
        )
        base = self.tmp / "ids"
        base.mkdir(exist_ok=True)
        out = base / f"{user}-{len(list(base.iterdir()))}"
        write_identity(out, key_pem(key), cert_pem(cert), self.ca.pem)
        return out

    def agent(self, name: str, databases: list[dict[str, Any]], **service: Any) -> dict[str, Any]:
        """An agent config serving ``databases`` with a listener on a free port."""
        server = self.tmp / f"{name}-tls"
        if not (server / "cert.pem").exists():
            sign_host(self.ca, ["127.0.0.1"], 3600, server)
        return agent_config(
            self.tmp,
            name,
            listen_addr=f"127.0.0.1:{free_port()}",
            listener={"cert_file": str(server / "cert.pem"), "key_file": str(server / "key.pem")},
            databases=databases,
            **service,
        )


async def make_fleet(bus: Bus, tmp: Path, nats_url: str) -> Fleet:
    result = await init_ca(bus, tmp / "ca")
    await ensure_audit_stream(bus)
    await put_roles(bus)
    return Fleet(bus, result.ca, tmp, nats_url)


def static_db(name: str, port: int, **labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "uri": f"127.0.0.1:{port}",
        "static_labels": labels,
        "tls": {"mode": "disabled"},
    }


def client_context(identity: Path | None, ca_pem: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca_pem)
    if identity is not None:
        context.load_cert_chain(identity / "cert.pem", identity / "key.pem")
    return context


class RoutedConnection(SSLConnection):
    """redis-py over mutual TLS to an agent: sends the route preamble before the usual
    connection setup (AUTH/HELLO, CLIENT SETINFO)."""

    def __init__(self, *, database: str, db_user: str, **kwargs: Any) -> None:
        self.route = encode_route(database, db_user)
        super().__init__(**kwargs)

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        writer, reader = self._writer, self._reader
        assert writer is not None and reader is not None
        writer.write(self.route)
        await writer.drain()
        line = await reader.readline()
        if line != b"+OK\r\n":
            raise redis.exceptions.ConnectionError(line.decode().strip())
        await super().on_connect_check_health(check_health)


def client(port: int, identity: Path, database: str, db_user: str, **kwargs: Any) -> aredis.Redis:
    """redis-py to the agent on ``port`` as ``identity`` (``username``/``password`` and
    ``protocol`` go to redis-py)."""
    pool = aredis.ConnectionPool(
        connection_class=RoutedConnection,
        host="127.0.0.1",
        port=port,
        ssl_certfile=str(identity / "cert.pem"),
        ssl_keyfile=str(identity / "key.pem"),
        ssl_ca_certs=str(identity / "ca.pem"),
        database=database,
        db_user=db_user,
        socket_timeout=5,
        **kwargs,
    )
    return aredis.Redis.from_pool(pool)


def cmd(*args: str | bytes) -> bytes:
    parts = [a if isinstance(a, bytes) else a.encode() for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class RawSession:
    """A routed connection speaking raw RESP, for byte-exact answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(
        cls, port: int, identity: Path | None, ca_pem: str, database: str, db_user: str
    ) -> RawSession:
        """RouteRefused when the agent refuses the route (ssl/OS errors for TLS)."""
        async with asyncio.timeout(10):
            streams = await open_route(
                "127.0.0.1",
                port,
                ssl_context=client_context(identity, ca_pem),
                database=database,
                db_user=db_user,
            )
        return cls(*streams)

    async def call(self, *args: str | bytes) -> bytes:
        """Send one command; its first reply line (simple replies) or bulk body."""
        self.writer.write(cmd(*args))
        return await self.reply()

    async def reply(self) -> bytes:
        async with asyncio.timeout(5):
            line = (await self.reader.readline()).rstrip(b"\r\n")
            if line.startswith(b"$") and line != b"$-1":
                return (await self.reader.readexactly(int(line[1:]) + 2))[:-2]
            return line

    def close(self) -> None:
        self.writer.transport.abort()


async def audit_events(bus: Bus) -> list[AuditEvent]:
    return [e async for e in read_events(bus, idle=0.2)]


async def wait_events(bus: Bus, count: int, what: str, **fields: Any) -> list[AuditEvent]:
    """At least ``count`` events whose attributes equal ``fields`` (deadline 10 s)."""
    found: list[AuditEvent] = []

    async def check() -> bool:
        nonlocal found
        found = [
            e
            for e in await audit_events(bus)
            if all(getattr(e, k, None) == v for k, v in fields.items())
        ]
        return len(found) >= count

    await wait_until(check, 10, what)
    return found


async def use_as_dev_app(r: aredis.Redis, key: str) -> None:
    """What role ``dev`` lets db user ``app`` do, and what it denies: SET and GET of
    ``key``, ``ACL WHOAMI`` is app, FLUSHALL refused with the role's reason."""
    assert await r.set(key, "hello")
    assert await r.get(key) == b"hello"
    assert await r.acl_whoami() in ("app", b"app")
    with pytest.raises(redis.exceptions.NoPermissionError) as denied:
        await r.flushall()
    assert str(denied.value) == "role dev denies the command FLUSHALL"


async def assert_dev_sessions_audited(bus: Bus, keys: Sequence[str]) -> None:
    """alice's sessions of :func:`use_as_dev_app`, one per key, in the audit trail: each
    started as allowed by role dev on dev-cache as app, and each key's SET recorded."""
    starts = await wait_events(bus, len(keys), "session starts", type="db.session.start")
    assert all(isinstance(e, SessionStart) and e.success for e in starts)
    assert {(e.user, e.database, e.db_user, e.reason) for e in starts} == {
        ("alice", "dev-cache", "app", "allowed by role dev")
    }
    queries = await wait_events(bus, len(keys), "queries", type="db.session.query", command="SET")
    assert {q.args for q in queries if isinstance(q, SessionQuery)} == {
        (key, "hello") for key in keys
    }

"""Real parts for the ``db connect`` tests: the login service on loopback HTTPS, a logged-in
home, and a small test agent (mutual TLS, the route preamble, the real role check, a
relay to a real valkey-server) announced through heartbeats on the bus."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from bus import Bus, DatabaseResource, DatabaseSpec, Metadata, TargetHealth
from bus.access import Role, User, get_roles, put_role, put_user
from bus.audit import ensure_audit_stream
from bus.servers import DbServerHeartbeat, HealthStatus
from client.login import login
from dbservice.access.audit import AuditEmitter
from dbservice.access.ca import (
    CertificateAuthority,
    CertificateRejected,
    cert_pem,
    identity_from_ssl,
    key_pem,
    mtls_server_context,
    new_key,
)
from dbservice.access.rbac import check_db_access
from dbservice.auth.admin import init_ca
from dbservice.auth.passwords import hash_password
from dbservice.auth.service import AuthConfig, RunningService, start_service
from dbservice.engine.proxy import PassThroughHooks, ProxySession
from dbservice.route import EOF_COMMAND, ROUTE_OK, RouteError, encode_refusal, read_route
from tests.kits.common import subprocess_env

PASSWORD = "correct horse battery"
OLD_AGENT_REFUSAL = (
    "route preamble: unknown or repeated option b'HALFCLOSE' (NODE and PORT are known)"
)
"""What an agent from before the route option ``HALFCLOSE`` answers a route with it."""
READY = re.compile(r"listening on 127\.0\.0\.1:(\d+) for (\S+) as (\S+); connect with: ")


def resource(name: str, **labels: str) -> DatabaseResource:
    return DatabaseResource(
        metadata=Metadata(name=name, description=f"{name} database", labels=labels),
        spec=DatabaseSpec(uri=f"{name}.example:6379"),
    )


@dataclass
class StandInAgent:
    """An mTLS listener that reads the route, checks it with the registry's roles
    and proxies to ``upstream_port`` with the single-node engine (pass-through hooks,
    the tunnel's half-close word when the route offers it). What the real agent's
    listener does, minus the login and audit."""

    bus: Bus
    ca: CertificateAuthority
    directory: Path
    databases: dict[str, DatabaseResource]
    upstream_port: int
    host_id: str = "agent-1"
    server: asyncio.Server | None = None
    port: int = 0
    routes: list[tuple[str, str, str]] = field(default_factory=list)
    """(user, database, db_user) of every accepted route."""
    shards: tuple[str, ...] = ()
    """Names ``--node`` may give (any other is refused, as the agent does)."""
    half_close: bool = True
    """Whether it knows the route option ``HALFCLOSE``; False: it refuses a route with
    it as an agent from before the option does."""
    half_closes: list[bool] = field(default_factory=list)
    """Whether each accepted route came with ``HALFCLOSE``."""
    refused: list[str] = field(default_factory=list)
    """The reason of every route it refused."""

    async def start(self) -> StandInAgent:
        self.directory.mkdir(parents=True, exist_ok=True)
        key = new_key()
        cert = self.ca.issue_server(key.public_key(), ["127.0.0.1"], 3600)
        (self.directory / "cert.pem").write_text(cert_pem(cert))
        (self.directory / "key.pem").write_bytes(key_pem(key))
        context = mtls_server_context(
            self.ca.pem, self.directory / "cert.pem", self.directory / "key.pem"
        )
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=context)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def announce(
        self, name: str, *, status: HealthStatus = "healthy", addr: str | None = None
    ) -> None:
        await self.bus.put_db_server(
            DbServerHeartbeat(
                host_id=self.host_id,
                hostname=self.host_id,
                version="test",
                addr=addr or f"127.0.0.1:{self.port}",
                database=self.databases[name],
                target_health=TargetHealth(status=status),
            ),
            ttl=60,
        )

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            try:
                identity = identity_from_ssl(ssl_object, [self.ca.cert])
                async with asyncio.timeout(5):
                    route = await read_route(reader)
            except (CertificateRejected, RouteError) as exc:
                self.refused.append(str(exc))
                writer.write(encode_refusal(str(exc)))
                return
            if route.half_close and not self.half_close:  # an agent's words from before it
                self.refused.append(OLD_AGENT_REFUSAL)
                writer.write(encode_refusal(OLD_AGENT_REFUSAL))
                return
            resource = self.databases.get(route.database)
            if resource is None:
                writer.write(encode_refusal(f"this agent does not serve {route.database}"))
                return
            roles = await get_roles(self.bus, identity.roles)
            decision = check_db_access(
                roles, identity.db_users, resource.metadata.labels, route.db_user,
                database=route.database,
            )  # fmt: skip
            if not decision:
                writer.write(encode_refusal(decision.reason))
                return
            if route.node and route.node not in self.shards:
                known = ", ".join(self.shards)
                refusal = f"{route.database} has no shard or node {route.node!r}; shards: {known}"
                writer.write(encode_refusal(refusal))
                return
            self.routes.append((identity.user, route.database, route.db_user))
            self.half_closes.append(route.half_close)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            writer.write(ROUTE_OK)
            await writer.drain()
            eof = EOF_COMMAND.decode() if route.half_close else None
            await ProxySession(
                (reader, writer), (up_reader, up_writer), hooks=PassThroughHooks(), eof_command=eof
            ).run()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(OSError):
                await writer.drain()
            writer.close()


@dataclass
class World:
    """The auth service and a logged-in home for alice (role dev: env=dev as app)."""

    bus: Bus
    ca: CertificateAuthority
    service: RunningService
    audit: AuditEmitter
    tmp: Path
    nats_url: str

    @property
    def home(self) -> Path:
        return self.tmp / "home"

    @property
    def auth(self) -> str:
        return f"127.0.0.1:{self.service.port}"

    async def login(
        self, user: str = "alice", *, home: Path | None = None, ttl: float | None = None
    ) -> None:
        ca_file = str(self.tmp / "ca" / "ca.crt")
        await asyncio.wait_for(
            login(self.auth, user, PASSWORD, ca_file=ca_file, home=home or self.home, ttl=ttl), 10
        )

    def env(self, **extra: str) -> dict[str, str]:
        base = {"FLEETGATE_HOME": str(self.home), "FLEETGATE_NATS_URL": self.nats_url}
        return subprocess_env(**(base | extra))

    async def fleetgate(
        self, *args: str, stdin: str = "", home: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the command in a thread: this loop serves the auth service and agents."""
        env = self.env(FLEETGATE_HOME=str(home)) if home else self.env()
        return await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "fleetgate", *args],
            input=stdin, capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip


@contextlib.asynccontextmanager
async def world(bus: Bus, tmp: Path, nats_url: str, **settings: object) -> AsyncIterator[World]:
    """``settings``: more of the auth service's config (e.g. ``aws={...}``)."""
    result = await init_ca(bus, tmp / "ca")
    await ensure_audit_stream(bus)
    await put_role(bus, Role.model_validate(
        {"name": "dev", "allow": {"db_labels": {"env": "dev"}, "db_users": ["app"]}}
    ))  # fmt: skip
    await put_user(bus, User(name="alice", roles=("dev",), password_hash=hash_password(PASSWORD)))
    config = AuthConfig.model_validate(
        {"listen": "127.0.0.1:0", "ca_dir": str(tmp / "ca"), "host_id": "auth-1", **settings}
    )
    emitter = AuditEmitter.for_bus(bus, host_id="auth-1")
    emitter.start()
    service = await start_service(config, bus=bus, ca=result.ca, audit=emitter)
    try:
        yield World(bus, result.ca, service, emitter, tmp, nats_url)
    finally:
        await service.close()
        await emitter.aclose()


class Tunnel:
    """``fleetgate db connect ... --no-exec`` as a process; ``port`` once it is ready.
    Start it with ``await Tunnel.start(...)`` (the constructor blocks until ready)."""

    @classmethod
    async def start(cls, w: World, name: str, db_user: str, *extra: str) -> Tunnel:
        return await asyncio.to_thread(cls, w, name, db_user, *extra)

    async def stop(self) -> int:
        return await asyncio.to_thread(self.close)

    def __init__(self, w: World, name: str, db_user: str, *extra: str) -> None:
        self.stdout = self.stderr = ""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleetgate", "db", "connect", name, "--db-user", db_user,
             "--no-exec", *extra],
            env=w.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.line = self.proc.stdout.readline()
        if "json" in extra:  # --format json: one object, parsed as ``ready``
            try:
                self.ready = json.loads(line)
            except ValueError:
                self.close()
                raise AssertionError(f"db connect did not start: {line!r} {self.stderr}") from None
            self.port = int(self.ready["port"])
            return
        found = READY.match(line)
        if found is None:
            self.close()
            raise AssertionError(f"db connect did not start: {line!r} {self.stderr}")
        self.port = int(found[1])

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.stdout, self.stderr = self.proc.communicate()
        return self.proc.returncode

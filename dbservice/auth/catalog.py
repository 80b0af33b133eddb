"""What the auth service tells logged-in people: the databases their roles reach and the
agents serving them, so laptops never need NATS.

Both endpoints need the caller's fleet certificate (the one ``fleetgate login`` got),
presented as the TLS client certificate; without one they answer 401.

* ``GET /v1/databases`` -> ``{"user", "databases": [{"name", "description", "labels",
  "health": {"healthy", "agents"}, "spec"}]}``: the databases some role of the caller
  reaches by label (:func:`dbservice.access.rbac.can_reach`, db users aside), registry databases
  and static ones agents announce. ``spec`` is the database's spec (protocol, uri, tls
  without CA bundles, aws).
* ``GET /v1/databases/{name}/servers`` -> ``{"database", "servers": [{"host_id",
  "hostname", "version", "addr", "target_health", "expires"}]}``, healthy first, then
  unknown, then unhealthy.
  404 for a database the caller may not reach, with the same answer as for one that does
  not exist, so names do not leak. With ``?db_user=U``, 403 ``{"error"}`` when no role
  allows that db user there (what an agent would refuse; ``db connect`` asks before it
  listens).

Roles are read fresh on every request (a role edit shows at once). The list of databases
and heartbeats is read from NATS at most every :data:`CACHE_SECONDS`, shared by requests.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Sequence
from typing import Any, Final

from aiohttp import web
from cryptography import x509

from bus import Bus, DatabaseResource, RegistryError, subjects
from bus.access import Identity, Role, get_roles
from bus.servers import DbServerHeartbeat, health_rank
from dbservice.access.ca import CertificateRejected, identity_from_ssl
from dbservice.access.rbac import can_reach, check_db_access

CACHE_SECONDS: Final = 2.0
NEED_CERT: Final = "this needs your fleetgate certificate: log in first (fleetgate login)"


def health_counts(servers: Sequence[DbServerHeartbeat]) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for server in servers:
        healthy, total = out.get(server.name, (0, 0))
        out[server.name] = (healthy + (server.target_health.status == "healthy"), total + 1)
    return out


def database_json(resource: DatabaseResource, health: tuple[int, int] | None) -> dict[str, Any]:
    healthy, agents = health or (0, 0)
    return {
        "name": resource.name,
        "description": resource.metadata.description,
        "labels": dict(sorted(resource.metadata.labels.items())),
        "health": {"healthy": healthy, "agents": agents},
        "spec": resource.spec.model_dump(
            mode="json", exclude_none=True, exclude={"tls": {"ca_cert"}}
        ),
    }


def server_json(server: DbServerHeartbeat) -> dict[str, Any]:
    return {
        "host_id": server.host_id,
        "hostname": server.hostname,
        "version": server.version,
        "addr": server.addr,
        "target_health": server.target_health.model_dump(mode="json", exclude_none=True),
        "expires": server.expires.isoformat() if server.expires else None,
    }


class Catalog:
    """The handlers, over a bus and the CA certificates that client certificates must
    chain to."""

    def __init__(self, *, bus: Bus, trusted: Sequence[x509.Certificate]) -> None:
        self.bus = bus
        self.trusted = list(trusted)
        self._lock = asyncio.Lock()
        self._cached: tuple[list[DatabaseResource], list[DbServerHeartbeat]] | None = None
        self._cached_at = 0.0

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/databases", self.databases)
        app.router.add_get("/v1/databases/{name}/servers", self.servers)

    # -- who is asking ----------------------------------------------------------------

    def identity(self, request: web.Request) -> Identity:
        """The caller's verified identity; HTTP 401 when there is none."""
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        if not isinstance(ssl_object, ssl.SSLObject):
            raise _error(web.HTTPUnauthorized, NEED_CERT)
        try:
            return identity_from_ssl(ssl_object, self.trusted)
        except CertificateRejected as exc:
            message = NEED_CERT if "no client certificate" in str(exc) else str(exc)
            raise _error(web.HTTPUnauthorized, message) from None

    # -- what there is ------------------------------------------------------------------

    async def registry(self) -> tuple[list[DatabaseResource], list[DbServerHeartbeat]]:
        """Registry databases plus static ones agents announce, and every heartbeat;
        read at most every CACHE_SECONDS."""
        async with self._lock:
            if self._cached is not None and time.monotonic() - self._cached_at < CACHE_SECONDS:
                return self._cached
            try:
                resources = await self.bus.list_resources(create=False)
            except RegistryError:
                resources = []
            try:
                servers = await self.bus.list_db_servers(create=False)
            except RegistryError:
                servers = []
            known = {r.name for r in resources}
            for server in servers:
                if server.name not in known:
                    known.add(server.name)
                    resources.append(server.database)
            resources.sort(key=lambda r: r.name)
            self._cached, self._cached_at = (resources, servers), time.monotonic()
            return self._cached

    async def _roles(self, identity: Identity) -> list[Role]:
        return await get_roles(self.bus, identity.roles)

    # -- handlers -------------------------------------------------------------------------

    async def databases(self, request: web.Request) -> web.Response:
        identity = self.identity(request)
        roles = await self._roles(identity)
        resources, servers = await self.registry()
        health = health_counts(servers)
        shown = [r for r in resources if can_reach(roles, r.metadata.labels)]
        return web.json_response(
            {
                "user": identity.user,
                "databases": [database_json(r, health.get(r.name)) for r in shown],
            }
        )

    async def servers(self, request: web.Request) -> web.Response:
        identity = self.identity(request)
        name = request.match_info["name"]
        roles = await self._roles(identity)
        try:
            await self.bus.bucket(subjects.DATABASES_BUCKET, create=False)  # read, never create
            resource = await self.bus.get_resource(name)
        except RegistryError:
            resource = None
        try:
            found = await self.bus.list_db_servers(name, create=False)
        except RegistryError:
            found = []
        labels = resource.metadata.labels if resource else None
        if labels is None and found:
            labels = found[0].database.metadata.labels  # a static database
        if labels is None or not can_reach(roles, labels):
            raise _error(
                web.HTTPNotFound,
                f"no database {name!r} that you may reach (see fleetgate db ls)",
            )
        db_user = request.query.get("db_user", "")
        if db_user:
            decision = check_db_access(roles, identity.db_users, labels, db_user, database=name)
            if not decision:
                raise _error(web.HTTPForbidden, decision.reason)
        found.sort(key=health_rank)
        return web.json_response({"database": name, "servers": [server_json(s) for s in found]})


def _error(kind: type[web.HTTPException], message: str) -> web.HTTPException:
    return kind(text=json.dumps({"error": message}), content_type="application/json")

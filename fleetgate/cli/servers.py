"""``fleetgate db servers NAME``: the agents serving a database, healthiest first; and
the per-database health counts ``db ls`` shows.

Logged in, it asks the auth service, as ``db ls`` does: only databases the caller's
roles reach are answered (another gets the same "no database you may reach" as one that
does not exist). Without a login, or with ``--nats URL`` (operators), it reads the
heartbeats in NATS directly, which needs a NATS user that may read them (``reader``,
``operator``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

from bus import Bus, DbServerHeartbeat, RegistryError
from bus.servers import health_rank
from bus.settings import NatsConnection, resolve_nats
from client import people
from fleetgate import aio
from fleetgate.cli.errors import UsageError
from fleetgate.cli.tables import print_table


def register(actions: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    servers = actions.add_parser("servers", help="list the agents serving a database")
    servers.add_argument("name", metavar="NAME", help="database name (as in 'fleetgate db ls')")
    servers.add_argument(
        "--format",
        default="text",
        choices=["text", "json"],
        help="json: a list of objects, one per agent and database (default text: a table)",
    )
    servers.add_argument(
        "--nats",
        help="read NATS at this URL (operators), even when logged in "
        "(default without a login: FLEETGATE_NATS_SERVERS, FLEETGATE_NATS_URL or "
        "nats://127.0.0.1:4222; docs/nats-client.md)",
    )
    common(servers)
    servers.set_defaults(handler=_servers)


def _servers(args: argparse.Namespace) -> int:
    try:
        ident = None if args.nats else people.load_identity()
    except people.AccessError as exc:
        raise UsageError(str(exc)) from None
    rows: list[dict[str, Any]]
    if ident is not None:  # a person: only what their roles reach, from the auth service
        try:
            agents = aio.run(people.fetch_servers(ident, args.name))
        except people.AccessError as exc:
            raise UsageError(f"{exc} (operators: --nats URL reads the registry directly)") from None
        rows = [agent_json(a, args.name) for a in agents]  # healthiest first already
    else:
        found = aio.run(list_servers(resolve_nats(args.nats), args.name))
        found.sort(key=health_rank)
        rows = [server_json(s) for s in found]
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_servers(rows)
    if not rows:
        print(f"(no agent serves {args.name})", file=sys.stderr)
    return 0


async def list_servers(url: str | NatsConnection, name: str | None) -> list[DbServerHeartbeat]:
    async with await Bus.connect(url, name="fleetgate-cli") as bus:
        return await read_servers(bus, name)


async def read_servers(bus: Bus, name: str | None) -> list[DbServerHeartbeat]:
    """Live heartbeats (of one database, or all); none when no agent ever ran."""
    try:
        return await bus.list_db_servers(name, create=False)
    except RegistryError:
        return []


def server_json(server: DbServerHeartbeat) -> dict[str, Any]:
    health = server.target_health
    return {
        "host_id": server.host_id,
        "hostname": server.hostname,
        "version": server.version,
        "addr": server.addr,
        "database": server.name,
        "labels": dict(sorted(server.database.metadata.labels.items())),
        "aws": (
            server.database.spec.aws.model_dump(mode="json", exclude_none=True)
            if server.database.spec.aws
            else None
        ),
        "target_health": health.model_dump(mode="json", exclude_none=True),
        "expires": server.expires.isoformat() if server.expires else None,
        "cert_expires": server.cert_expires.isoformat() if server.cert_expires else None,
        "cert_error": server.cert_error,
    }


def agent_json(agent: people.AgentAddress, database: str) -> dict[str, Any]:
    """An agent as the auth service lists it, in :func:`server_json`'s shape (labels
    and AWS details of the database are in ``db ls``)."""
    return {
        "host_id": agent.host_id,
        "hostname": agent.hostname,
        "version": agent.version,
        "addr": agent.addr,
        "database": database,
        "target_health": agent.health.model_dump(mode="json", exclude_none=True),
        "expires": agent.expires,
    }


def print_servers(servers: list[dict[str, Any]]) -> None:
    rows = [("HOSTNAME", "HOST ID", "ADDRESS", "HEALTH", "VERSION", "MESSAGE")]
    for s in servers:
        health = s["target_health"]
        message = str(health.get("message", ""))
        if health.get("status") != "healthy" and health.get("error"):
            message = f"{message}: {health['error']}"
        if s.get("cert_error"):
            message += (
                f"{'; ' if message else ''}certificate renewal failing (expires "
                f"{s.get('cert_expires')}): {s['cert_error']}"
            )
        status = str(health.get("status", ""))
        rows.append((s["hostname"], s["host_id"], s["addr"], status, s["version"], message))
    print_table(rows)


def health_counts(servers: Iterable[DbServerHeartbeat]) -> dict[str, tuple[int, int]]:
    """Per database: (healthy agents, agents)."""
    out: dict[str, tuple[int, int]] = {}
    for server in servers:
        healthy, total = out.get(server.name, (0, 0))
        out[server.name] = (healthy + (server.target_health.status == "healthy"), total + 1)
    return out


def health_cell(counts: tuple[int, int] | None) -> str:
    """``2/3`` (healthy agents / agents), ``0/0`` when no agent serves it."""
    healthy, total = counts or (0, 0)
    return f"{healthy}/{total}"

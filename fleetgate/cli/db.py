"""``fleetgate db ...``: what people run to see and reach databases."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from bus import Bus, DatabaseResource, RegistryError, parse_label_filter
from bus.labels import matches
from bus.settings import NatsConnection, resolve_nats
from client import connect, direct, people
from fleetgate import aio
from fleetgate.cli import auth as auth_cli
from fleetgate.cli import servers as servers_cli
from fleetgate.cli import tables
from fleetgate.cli.errors import UsageError

HIDDEN_LABEL_PREFIX = "fleetgate.dev/"
T = TypeVar("T")


def register(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    group = sub.add_parser("db", help="list and reach databases")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = actions.add_parser(
        "ls",
        help="list databases: those your roles reach when logged in, else all (from NATS)",
    )
    ls.add_argument(
        "--labels", default="", help="only databases whose labels match, e.g. env=prod,region=us-*"
    )
    ls.add_argument("--format", default="text", choices=["text", "json"])
    ls.add_argument(
        "--nats",
        help="read NATS at this URL (operators), even when logged in "
        "(default without a login: FLEETGATE_NATS_SERVERS, FLEETGATE_NATS_URL or "
        "nats://127.0.0.1:4222; docs/nats-client.md)",
    )
    common(ls)
    ls.set_defaults(handler=_ls)
    auth_cli.register_logout(actions, common)
    servers_cli.register(actions, common)
    connect.register(actions, common)
    direct.register(actions, common)


def _ls(args: argparse.Namespace) -> int:
    try:
        selector = parse_label_filter(args.labels) if args.labels else None
    except ValueError as exc:
        raise UsageError(f"--labels: {exc}") from None
    ident = None if args.nats else _logged_in()
    if ident is not None:  # a person: ask the auth service what their roles reach
        resources, health = _people_run(people.fetch_databases(ident))
    else:
        resources, health = aio.run(_list(resolve_nats(args.nats)))
    if selector is not None:
        resources = [r for r in resources if matches(selector, r.metadata.labels)]
    if args.format == "json":
        json.dump([as_json(r, health.get(r.name)) for r in resources], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_table(resources, health)
    return 0


def _logged_in() -> people.ClientIdentity | None:
    try:
        return people.load_identity()
    except people.AccessError as exc:
        raise UsageError(str(exc)) from None


def _people_run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return aio.run(coro)
    except people.RegistryDown as exc:
        raise UsageError(str(exc)) from None
    except people.AccessError as exc:
        raise UsageError(f"{exc} (operators: --nats URL reads the registry directly)") from None


async def _list(
    url: str | NatsConnection,
) -> tuple[list[DatabaseResource], dict[str, tuple[int, int]]]:
    """Registry databases plus static ones that agents serve, and per database
    (healthy agents, agents)."""
    async with await Bus.connect(url, name="fleetgate-cli") as bus:
        try:
            resources = await bus.list_resources(create=False)
        except RegistryError as exc:
            print(f"fleetgate: note: {exc}", file=sys.stderr)
            resources = []
        servers = await servers_cli.read_servers(bus, None)
    known = {r.name for r in resources}
    for server in servers:
        if server.name not in known:  # static: only agents know it
            known.add(server.name)
            resources.append(server.database)
    resources.sort(key=lambda r: r.name)
    return resources, servers_cli.health_counts(servers)


def as_json(resource: DatabaseResource, health: tuple[int, int] | None = None) -> dict[str, Any]:
    spec = resource.spec
    healthy, agents = health or (0, 0)
    return {
        "name": resource.name,
        "description": resource.metadata.description,
        "protocol": spec.protocol,
        "uri": spec.uri,
        "labels": dict(sorted(resource.metadata.labels.items())),
        "aws": spec.aws.model_dump(mode="json") if spec.aws else None,
        "tls": spec.tls.model_dump(mode="json", exclude_none=True, exclude={"ca_cert"}),
        "health": {"healthy": healthy, "agents": agents},
    }


def shown_labels(labels: dict[str, str]) -> str:
    return ", ".join(
        f"{k}={v}" for k, v in sorted(labels.items()) if not k.startswith(HIDDEN_LABEL_PREFIX)
    )


def print_table(
    resources: list[DatabaseResource], health: dict[str, tuple[int, int]] | None = None
) -> None:
    """NAME, DESCRIPTION, HEALTH (healthy agents / agents) and LABELS."""
    health = health or {}
    rows = [("NAME", "DESCRIPTION", "HEALTH", "LABELS")]
    rows += [
        (
            r.name,
            r.metadata.description,
            servers_cli.health_cell(health.get(r.name)),
            shown_labels(r.metadata.labels),
        )
        for r in resources
    ]
    tables.print_table(rows)
    if not resources:
        print("(no databases)", file=sys.stderr)

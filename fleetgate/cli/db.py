"""``fleetgate db ...``: what people run to see and reach databases."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from bus import Bus, DatabaseResource, RegistryError, parse_label_filter
from bus import labels as labels_mod
from bus.labels import matches
from bus.settings import NatsConnection, resolve_nats
from client import connect, direct, people
from fleetgate import aio
from fleetgate.cli import auth as auth_cli
from fleetgate.cli import servers as servers_cli
from fleetgate.cli import tables
from fleetgate.cli.errors import UsageError

HIDDEN_LABEL_PREFIX = "fleetgate.dev/"
DEFAULT_WIDTH = 100
"""Columns ``db ls`` fits when standard output is no terminal and COLUMNS is unset."""
DESCRIPTION_WIDTH = 30
LABELS_WIDTH = 20
"""When a table must be cut: room kept for the description and for the labels."""
FIRST_LABELS = ("env", "environment")
"""Shown before every other label: what people pick a database by."""
LATE_LABELS = (
    labels_mod.LABEL_REGION,
    labels_mod.LABEL_ENGINE,
    labels_mod.LABEL_ACCOUNT_ID,
    labels_mod.LABEL_ENGINE_VERSION,
    labels_mod.LABEL_ENDPOINT_TYPE,
    labels_mod.LABEL_VPC_ID,
)
"""Labels discovery computes, shown after people's own tags, most telling first."""
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
    ls.add_argument(
        "--format",
        default="text",
        choices=["text", "json"],
        help="json: a list of objects with name, description, protocol, uri, labels, aws, "
        "tls and health, every label included (default text: a table)",
    )
    ls.add_argument(
        "--wide",
        action="store_true",
        help="show every label and the whole description; by default the table fits the "
        "terminal (COLUMNS, else 100 columns when not a terminal): the most useful labels "
        "first, then '+N more'",
    )
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
        print_table(resources, health, width=None if args.wide else terminal_width())
    return 0


def terminal_width() -> int:
    """Columns of the terminal: COLUMNS when set, else the terminal's, else 100."""
    return max(40, shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns)


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


def _label_rank(key: str) -> tuple[int, int, str]:
    if key in FIRST_LABELS:
        return (0, FIRST_LABELS.index(key), key)
    if key in LATE_LABELS:
        return (2, LATE_LABELS.index(key), key)
    return (1, 0, key)


def label_pairs(labels: dict[str, str]) -> list[str]:
    """``key=value`` of every shown label, the most useful first: env, then people's
    own tags by name, then the labels discovery computes (region, engine, ...)."""
    keys = sorted((k for k in labels if not k.startswith(HIDDEN_LABEL_PREFIX)), key=_label_rank)
    return [f"{k}={labels[k]}" for k in keys]


def shown_labels(labels: dict[str, str]) -> str:
    return ", ".join(label_pairs(labels))


def clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, ending in ``...`` when cut."""
    if len(text) <= width:
        return text
    return text[: max(0, width - 3)] + "..." if width >= 3 else text[:width]


def fit_labels(pairs: list[str], width: int) -> str:
    """As many whole labels as fit ``width``, then ``+N more`` for the rest; when not
    even one fits with that count, the first cut with ``...``."""
    for shown in range(len(pairs), 0, -1):
        rest = len(pairs) - shown
        text = ", ".join(pairs[:shown] + ([f"+{rest} more"] if rest else []))
        if len(text) <= width:
            return text
    if not pairs:
        return ""
    return clip(", ".join(pairs), max(3, width))  # not even one whole: cut the first


def print_table(
    resources: list[DatabaseResource],
    health: dict[str, tuple[int, int]] | None = None,
    *,
    width: int | None = None,
) -> None:
    """NAME, DESCRIPTION, HEALTH (healthy agents / agents) and LABELS. With ``width``,
    the lines fit it: descriptions are cut with ``...`` and labels beyond the room are
    counted (``+N more``); names are never cut (``db connect`` needs them)."""
    health = health or {}
    header = ("NAME", "DESCRIPTION", "HEALTH", "LABELS")
    names = [r.name for r in resources]
    descriptions = [r.metadata.description for r in resources]
    cells = [servers_cli.health_cell(health.get(r.name)) for r in resources]
    pairs = [label_pairs(r.metadata.labels) for r in resources]
    labels = [", ".join(p) for p in pairs]
    if width is not None and resources:
        name_w = max(len(n) for n in [header[0], *names])
        health_w = max(len(c) for c in [header[2], *cells])
        room = width - name_w - health_w - 6  # three gaps of two spaces
        desc_max = max(len(d) for d in [header[1], *descriptions])
        labels_max = max(len(x) for x in [header[3], *labels])
        if desc_max + 2 + labels_max > room:
            # up to DESCRIPTION_WIDTH for the description while labels keep LABELS_WIDTH
            spare = max(room - 2 - labels_max, min(DESCRIPTION_WIDTH, room - 2 - LABELS_WIDTH))
            desc_w = min(desc_max, max(len(header[1]), spare))
            labels_w = max(len(header[3]), room - 2 - desc_w)
            descriptions = [clip(d, desc_w) for d in descriptions]
            labels = [fit_labels(p, labels_w) for p in pairs]
    rows = [header, *zip(names, descriptions, cells, labels, strict=True)]
    tables.print_table(rows)
    if not resources:
        print("(no databases)", file=sys.stderr)

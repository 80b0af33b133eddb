"""``fleetgate db ...``: what people run to see and reach databases."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from bus import Bus, DatabaseResource, RegistryError, parse_label_filter
from bus.labels import matches
from dbservice.auth import cli as auth_cli
from fleetgate import aio
from fleetgate.cli import UsageError
from fleetgate.config import resolve_nats_url

HIDDEN_LABEL_PREFIX = "fleetgate.dev/"


def register(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    group = sub.add_parser("db", help="list and reach databases")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = actions.add_parser("ls", help="list databases in the registry")
    ls.add_argument(
        "--labels", default="", help="only databases whose labels match, e.g. env=prod,region=us-*"
    )
    ls.add_argument("--format", default="text", choices=["text", "json"])
    ls.add_argument(
        "--nats", help="NATS URL (default: FLEETGATE_NATS_URL or nats://127.0.0.1:4222)"
    )
    common(ls)
    ls.set_defaults(handler=_ls)
    auth_cli.register_logout(actions, common)


def _ls(args: argparse.Namespace) -> int:
    try:
        selector = parse_label_filter(args.labels) if args.labels else None
    except ValueError as exc:
        raise UsageError(f"--labels: {exc}") from None
    resources = aio.run(_list(resolve_nats_url(args.nats)))
    if selector is not None:
        resources = [r for r in resources if matches(selector, r.metadata.labels)]
    if args.format == "json":
        json.dump([as_json(r) for r in resources], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_table(resources)
    return 0


async def _list(url: str) -> list[DatabaseResource]:
    async with await Bus.connect(url, name="fleetgate-cli") as bus:
        try:
            return await bus.list_resources(create=False)
        except RegistryError as exc:
            print(f"fleetgate: note: {exc}", file=sys.stderr)
            return []


def as_json(resource: DatabaseResource) -> dict[str, Any]:
    spec = resource.spec
    return {
        "name": resource.name,
        "description": resource.metadata.description,
        "protocol": spec.protocol,
        "uri": spec.uri,
        "labels": dict(sorted(resource.metadata.labels.items())),
        "aws": spec.aws.model_dump(mode="json") if spec.aws else None,
        "tls": spec.tls.model_dump(mode="json", exclude_none=True),
    }


def shown_labels(labels: dict[str, str]) -> str:
    return ", ".join(
        f"{k}={v}" for k, v in sorted(labels.items()) if not k.startswith(HIDDEN_LABEL_PREFIX)
    )


def print_table(resources: list[DatabaseResource]) -> None:
    rows = [("NAME", "DESCRIPTION", "LABELS")]
    rows += [(r.name, r.metadata.description, shown_labels(r.metadata.labels)) for r in resources]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    for row in rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}".rstrip())
    if not resources:
        print("(no databases)", file=sys.stderr)

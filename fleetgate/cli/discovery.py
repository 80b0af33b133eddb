"""``fleetgate discovery run -c FILE [--once]`` and ``fleetgate discovery status``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

from bus.settings import NATS_HELP, resolve_nats
from fleetgate import aio
from fleetgate.cli.tables import print_table
from fleetgate.config import load_model, read_yaml


def register(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    group = sub.add_parser("discovery", help="find MemoryDB clusters in AWS and enrol them")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    run = actions.add_parser("run", help="poll AWS and keep the registry in step")
    run.add_argument("-c", "--config", required=True, help="discovery YAML config file")
    run.add_argument(
        "--once",
        action="store_true",
        help="poll once and exit (0 only if every fetcher polled succeeded; fetchers "
        "another running replica holds are left to it)",
    )
    run.add_argument(
        "--nats",
        help="NATS server URL(s), comma-separated, over FLEETGATE_NATS_SERVERS (or "
        "FLEETGATE_NATS_URL) over the config file's nats section (docs/nats-client.md)",
    )
    common(run)
    run.set_defaults(handler=_run)
    status = actions.add_parser(
        "status", help="each fetcher's last poll and the replica that polls it"
    )
    status.add_argument(
        "--format",
        default="text",
        choices=["text", "json"],
        help="json: a list of objects, one per fetcher (default text: a table)",
    )
    status.add_argument("--nats", help=NATS_HELP)
    common(status)
    status.set_defaults(handler=_status)


def _run(args: argparse.Namespace) -> int:
    from discovery.app import run_discovery
    from discovery.settings import DiscoveryConfig

    config = load_model(DiscoveryConfig, read_yaml(args.config), args.config)
    url = resolve_nats(args.nats, config.nats)
    return aio.run(run_discovery(config, nats_url=url, once=args.once))


def _status(args: argparse.Namespace) -> int:
    from bus import Bus, BusError, subjects
    from bus import leases as cas
    from bus.schemas import DiscoveryLease, FetcherStatus, utcnow

    async def read() -> tuple[list[FetcherStatus], dict[str, str], str]:
        url = resolve_nats(args.nats)
        async with await Bus.connect(url, name="fleetgate-discovery-status") as bus:
            found = await bus.snapshot(
                subjects.DISCOVERY_STATUS_BUCKET, FetcherStatus, create=False
            )
            try:
                held = await cas.snapshot(
                    bus, subjects.DISCOVERY_LEASES_BUCKET, DiscoveryLease, create=False
                )
            except BusError as exc:  # no replica has run yet, or we may not read it
                return list(found.values()), {}, str(exc)
            holders = {key: v.record.holder for key, v in held.items()}
            return list(found.values()), holders, ""

    statuses, holders, unknown = aio.run(read())
    now = utcnow()
    rows = []
    for s in sorted(statuses, key=lambda s: (s.group, s.fetcher)):
        key = subjects.fetcher_status_key(s.group, s.fetcher)
        rows.append(
            {
                "group": s.group,
                "fetcher": s.fetcher,
                "account_id": s.account_id,
                "state": s.state,
                "error": s.error,
                "databases": s.databases,
                "polled_by": s.replica,
                "lease_holder": holders.get(key) if not unknown else None,
                "last_attempt": s.last_attempt.isoformat(),
                "last_success": s.last_success.isoformat() if s.last_success else None,
            }
        )
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("(no fetcher has been polled yet)", file=sys.stderr)
        return 0
    table = [("FETCHER", "STATE", "DATABASES", "LEASE HOLDER", "LAST SUCCESS", "ERROR")]
    for s in sorted(statuses, key=lambda s: (s.group, s.fetcher)):
        holder = holders.get(subjects.fetcher_status_key(s.group, s.fetcher))
        table.append(
            (
                f"{s.group}/{s.fetcher}" if s.group else s.fetcher,
                s.state,
                str(s.databases),
                "?" if unknown else (holder or "none (not polled)"),
                _ago(now, s.last_success),
                s.error,
            )
        )
    print_table(table)
    if unknown:
        print(f"lease holders unknown: {unknown}", file=sys.stderr)
    return 0


def _ago(now: datetime, then: datetime | None) -> str:
    if then is None:
        return "never"
    seconds = max(0.0, (now - then).total_seconds())
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"

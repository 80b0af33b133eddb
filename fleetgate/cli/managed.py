"""``fleetgate managed ls`` and ``fleetgate managed cleanup``: the managed MemoryDB users
the agents keep, and deleting the secrets of those no agent uses any more.

Both read the records in the bus (``fleetgate_leases``) and the agents' heartbeats;
``cleanup`` uses this machine's AWS credentials (and the role chain each record names)
to delete secrets. Neither ever shows a password.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from bus import Bus, leases, subjects
from bus.settings import NATS_HELP, resolve_nats
from fleetgate import aio
from fleetgate.cli.output import add_format, print_json
from fleetgate.cli.tables import print_table
from fleetgate.durations import parse_duration


def register(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    group = sub.add_parser("managed", help="managed MemoryDB users (rotated passwords)")
    actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = actions.add_parser("ls", help="managed users, their state and last rotation")
    ls.add_argument(
        "--format",
        default="text",
        choices=["text", "json"],
        help="json: a list of objects, one per row (default text: a table)",
    )
    cleanup = actions.add_parser(
        "cleanup",
        help="delete the secrets of managed users no agent serves any more",
        description="Delete the Secrets Manager secret (and the bus record) of each managed "
        "user that no live agent serves and that has been idle for the grace period.",
    )
    cleanup.add_argument(
        "--grace",
        default="24h",
        help="idle this long before deletion (default 24h; 0 for at once)",
    )
    cleanup.add_argument("--user", action="append", help="only this MemoryDB user (repeat)")
    cleanup.add_argument("--dry-run", action="store_true", help="say what would be deleted")
    cleanup.add_argument(
        "--recovery-days",
        type=int,
        default=7,
        help="days a deleted secret stays recoverable (7-30, default 7)",
    )
    cleanup.add_argument(
        "--force-delete", action="store_true", help="delete without a recovery window"
    )
    add_format(
        cleanup,
        "a list of verdicts, one object per managed user: key, user, region, account, "
        "secret, databases and action (in use, waiting, deleted, would delete, kept or "
        "failed: REASON); exit 1 when one failed, as in text",
        text="a line per managed user: user, region, action, secret",
    )
    for parser in (ls, cleanup):
        parser.add_argument("--nats", help=NATS_HELP)
        common(parser)
    ls.set_defaults(handler=_ls)
    cleanup.set_defaults(handler=_cleanup)


def _ago(seconds: float) -> str:
    """``12s ago``, ``4m ago``, ``2h ago``: whole units, as a person reads a table."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def _ls(args: argparse.Namespace) -> int:
    from dbservice.managed.state import ManagedUser

    async def go() -> tuple[dict[str, Any], set[str]]:
        url = resolve_nats(args.nats)
        async with await Bus.connect(url, name="fleetgate-managed") as bus:
            found = await leases.records(bus, subjects.LEASES_BUCKET, ManagedUser)
            serving = {hb.name for hb in await bus.list_db_servers(create=False)}
            return found, serving

    found, serving = aio.run(go())
    now = time.time()
    rows = []
    for key, v in sorted(found.items()):
        r = v.record
        in_use = any(d in serving for d in r.databases)
        rows.append(
            {
                "key": key,
                "user": r.user,
                "region": r.region,
                "account": r.account,
                "secret": r.secret_name,
                "databases": list(r.databases),
                "state": "in use" if in_use else r.phase,
                "rotated_ago": round(now - r.rotated_at, 1) if r.rotated_at else None,
                "holder": r.holder if r.held(now) else "",
            }
        )
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("(no managed users)", file=sys.stderr)
        return 0
    table = [("USER", "REGION", "ACCOUNT", "STATE", "ROTATED", "SECRET")]
    for row in rows:
        ago = row["rotated_ago"]
        rotated = _ago(ago) if ago is not None else "never"
        table.append(
            (row["user"], row["region"], row["account"], row["state"], rotated, row["secret"])
        )
    print_table(table, last_gap=" ")
    return 0


def _cleanup(args: argparse.Namespace) -> int:
    from dbservice.managed.cleanup import sweep
    from dbservice.upstream.iam import IamAuth
    from fleetgate.cli.errors import UsageError

    try:
        grace = parse_duration(args.grace)
    except ValueError as exc:
        raise UsageError(f"--grace {args.grace!r}: {exc}") from None
    if not 7 <= args.recovery_days <= 30:
        raise UsageError("--recovery-days must be from 7 to 30 (Secrets Manager's limits)")

    async def go() -> int:
        url = resolve_nats(args.nats)
        async with await Bus.connect(url, name="fleetgate-managed") as bus:
            verdicts = await sweep(
                bus,
                IamAuth(),
                grace=grace,
                recovery_days=None if args.force_delete else args.recovery_days,
                dry_run=args.dry_run,
                users=set(args.user) if args.user else None,
            )
        failed = sum(v.action.startswith("failed") for v in verdicts)
        if args.format == "json":
            print_json(
                [
                    {
                        "key": v.key,
                        "user": v.record.user,
                        "region": v.record.region,
                        "account": v.record.account,
                        "secret": v.record.secret_name,
                        "databases": list(v.record.databases),
                        "action": v.action,
                    }
                    for v in verdicts
                ]
            )
            return 1 if failed else 0
        for v in verdicts:
            print(
                f"{v.record.user:<20} {v.record.region:<14} {v.action:<12} {v.record.secret_name}"
            )
        if not verdicts:
            print("(no managed users)", file=sys.stderr)
        return 1 if failed else 0

    return aio.run(go())

"""``fleetgate jetstream provision``: create every bucket and the audit stream with their
replicas and placement, or (``--migrate``) give existing ones new replicas or placement.

Processes create what they need themselves (R1, or as their ``jetstream:`` config says)
and refuse an existing bucket that differs from their config; this is the admin's way
to provision a hub cluster up front and to migrate (say from R1 to R3) in place:
JetStream adds the copies while the stream stays available.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from bus import Bus
from bus.audit import ensure_audit_stream
from bus.client import kv_stream_name
from bus.settings import NATS_HELP, NatsConnection, resolve_nats
from bus.specs import SPECS, Replication
from fleetgate import aio
from fleetgate.cli.errors import UsageError
from fleetgate.cli.output import add_format, print_json

Common = Callable[[argparse.ArgumentParser], None]


def register(actions: Any, common: Common) -> None:
    jetstream = actions.add_parser("jetstream", help="provision the bus's buckets and streams")
    sub = jetstream.add_subparsers(dest="action", metavar="ACTION", required=True)
    provision = sub.add_parser(
        "provision",
        help="create every bucket and the audit stream (as the NATS admin user); "
        "--migrate changes the replicas or placement of existing ones",
    )
    provision.add_argument(
        "--replicas", type=int, choices=(1, 3, 5), default=1, help="copies of each (default 1)"
    )
    provision.add_argument("--cluster", help="place them in this cluster (a super-cluster)")
    provision.add_argument(
        "--tag", action="append", default=[], help="place them on servers with this tag"
    )
    provision.add_argument(
        "--migrate",
        action="store_true",
        help="give existing buckets and the audit stream these replicas and placement",
    )
    provision.add_argument("--nats", help="the admin user's NATS servers; " + NATS_HELP)
    add_format(
        provision,
        "a list of objects, one per bucket and the audit stream: name (the bucket, or "
        "audit for the stream), stream (JetStream's name), action (created; kept: it "
        "existed and was left as it is; migrated: --migrate gave it these replicas or "
        "placement) and replication",
        text="a line per bucket and the audit stream",
    )
    common(provision)
    provision.set_defaults(handler=_provision)


def _provision(args: argparse.Namespace) -> int:
    try:
        replication = Replication(args.replicas, args.cluster, tuple(args.tag))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return aio.run(
        provision(resolve_nats(args.nats), replication, migrate=args.migrate, output=args.format)
    )


async def provision(
    url: str | NatsConnection, replication: Replication, *, migrate: bool, output: str = "text"
) -> int:
    """Create (or migrate) every bucket and the audit stream; print one line each (or,
    with ``output`` json, one JSON list at the end)."""
    from bus import subjects

    done: list[dict[str, str]] = []
    async with await Bus.connect(url, name="fleetgate-admin") as bus:
        bus.replication = replication
        streams = [(kv_stream_name(name), name) for name in SPECS]
        streams.append((subjects.AUDIT_STREAM, "audit"))
        for stream, name in streams:
            what = "the audit stream" if stream == subjects.AUDIT_STREAM else f"bucket {name}"
            existed = await bus.stream_exists(stream)
            if migrate and existed and await bus.migrate(stream):
                action = "migrated"
                line = f"{what}: now {replication.describe()}"
            else:
                if stream == subjects.AUDIT_STREAM:
                    await ensure_audit_stream(bus, update=False)
                else:
                    await bus.provision(SPECS[name])
                action = "kept" if existed else "created"
                line = f"{what}: {replication.describe()}"
            if output == "json":
                done.append({"name": name, "stream": stream, "action": action,
                             "replication": replication.describe()})  # fmt: skip
            else:
                print(line)
    if output == "json":
        print_json(done)
    return 0

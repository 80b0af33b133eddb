"""Bus sizing: what each bucket and the audit stream hold per 1,000 databases and per
1,000 sessions a day, measured on a real ``nats-server -js`` with the bus's own records
(docs/deploy.md, "Topology", quotes these figures).

Writes realistic records (a discovered MemoryDB cluster with its labels, an agent's
heartbeat for it, a managed-user record, one session's audit: start, its commands in
batches, end) and reads JetStream's stored bytes per message back from stream info.
Multiply by the replica count for the disk of the whole hub.

    python benchmarks/sizing.py [--databases 1000] [--agents 2] [--commands 50]

The audit stream's write rate at R1 and R3 (the cost of replication) is measured by
benchmarks/fleet_nats.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))  # the repository, when run as a script

from bus import Bus, DatabaseResource, DatabaseSpec, Metadata, leases, subjects  # noqa: E402
from bus.audit import (  # noqa: E402
    QueryBatch,
    SessionEnd,
    SessionStart,
    encode_query,
    ensure_audit_stream,
    publish_event,
)
from bus.client import kv_stream_name  # noqa: E402
from bus.schemas import AWSSpec, DiscoveryOrigin, MemoryDBSpec  # noqa: E402
from bus.server import NatsServer  # noqa: E402
from bus.servers import DbServerHeartbeat  # noqa: E402
from dbservice.managed.state import ManagedUser  # noqa: E402

BATCH = 32
"""Commands per audit batch at most (the agent's emitter sends a session's commands in
batches; a short session's commands go in one)."""


def resource(i: int, *, region: str = "us-east-1", name: str = "") -> DatabaseResource:
    """A discovered MemoryDB cluster with 15 labels (``orders-<i>`` unless ``name``)."""
    account = "123456789012"
    name = name or f"orders-{i:05d}"
    arn = f"arn:aws:memorydb:{region}:{account}:cluster/{name}"
    labels = {
        "env": "prod",
        "team": "payments",
        "service": "orders",
        "cost-center": "cc-1234",
        "account-id": account,
        "region": region,
        "engine": "valkey",
        "engine-version": "7.3",
        "endpoint-type": "cluster",
        "cloud": "AWS",
        "fleetgate.dev/origin": "cloud",
        "fleetgate.dev/discovery-type": "memorydb",
        "fleetgate.dev/discovered-name": name,
        "vpc-id": "vpc-0abc1234def567890",
        "fleetgate.dev/discovery-group": "prod-fleet",
    }
    return DatabaseResource(
        metadata=Metadata(name=name, description=f"MemoryDB cluster {name}", labels=labels),
        spec=DatabaseSpec(
            uri=f"clustercfg.{name}.abc123.memorydb.{region}.amazonaws.com:6379",
            aws=AWSSpec(
                region=region,
                account_id=account,
                memorydb=MemoryDBSpec(
                    cluster_name=name, acl_name="fleetgate-acl", arn=arn, engine="valkey"
                ),
            ),
        ),
        origin=DiscoveryOrigin(group="prod-fleet", fetcher_id=f"memorydb/{region}/0"),
    )


async def stored(bus: Bus, stream: str) -> tuple[int, int]:
    info = await bus.js.stream_info(stream)
    return int(info.state.messages), int(info.state.bytes)


async def measure(databases: int, agents: int, commands: int) -> list[str]:
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "nats") as server:
        async with await Bus.connect(server.url, name="sizing") as bus:
            await bus.provision()
            await bus.provision(leases.LEASES)
            await ensure_audit_stream(bus)
            for i in range(databases):
                await bus.put_resource(resource(i))
                for a in range(agents):
                    beat = DbServerHeartbeat(
                        host_id=f"{a:032x}",
                        hostname=f"agent-use1-{a}",
                        version="0.9.0",
                        addr=f"10.0.{a}.5:6390",
                        database=resource(i),
                    )
                    await bus.put_db_server(beat, ttl=30)
                now = time.time()
                record = ManagedUser(
                    user="app-user",
                    region="us-east-1",
                    account="123456789012",
                    user_arn="arn:aws:memorydb:us-east-1:123456789012:user/app-user",
                    secret_name="fleetgate/memorydb/us-east-1/123456789012/user/app-user",
                    databases=(resource(i).name,),
                    clusters=(resource(i).name,),
                    applied_version="6f9c2a4e-0b1d-4c36-9e0e-5b7a0d1c2e3f",
                    started_at=now,
                    rotated_at=now,
                    next_at=now + 900,
                    holder=f"{0:032x}",
                    held_until=now + 60,
                )
                await leases.create(bus, subjects.LEASES_BUCKET, f"managed.{i}", record)
            sessions = 100
            for s in range(sessions):
                common = {
                    "user": "alice@example.com",
                    "roles": ["dev", "oncall"],
                    "database": f"orders-{s:05d}",
                    "db_user": "app-user",
                    "client_addr": "10.1.2.3:52344",
                    "host_id": f"{0:032x}",
                    "session_id": f"{s:032x}",
                }
                await publish_event(bus, SessionStart(**common))  # type: ignore[arg-type]
                for first in range(0, commands, BATCH):
                    queries = [
                        encode_query(time.time(), "GET", [f"order:{first + n:08d}"])
                        for n in range(min(BATCH, commands - first))
                    ]
                    await publish_event(bus, QueryBatch(common, first + 1, queries))
                end = SessionEnd(
                    **common,  # type: ignore[arg-type]
                    duration=42.0,
                    commands=commands,
                    bytes_in=commands * 40,
                    bytes_out=commands * 300,
                )
                await publish_event(bus, end)

            def row(what: str, msgs: int, size: int, per: float, unit: str) -> str:
                each = size / max(msgs, 1)
                return f"{what:<44} {each:8.0f} B/msg  {per * each / 1e6:9.2f} MB {unit}"

            m, b = await stored(bus, kv_stream_name(subjects.DATABASES_BUCKET))
            lines.append(row("fleetgate_databases (1 per database)", m, b, 1000, "per 1,000 dbs"))
            m, b = await stored(bus, kv_stream_name(subjects.DB_SERVERS_BUCKET))
            lines.append(
                row(
                    f"fleetgate_db_servers ({agents} agents per db)",
                    m,
                    b,
                    1000 * agents,
                    "per 1,000 dbs",
                )
            )
            m, b = await stored(bus, kv_stream_name(subjects.LEASES_BUCKET))
            lines.append(
                row("fleetgate_leases (1 per managed user)", m, b, 1000, "per 1,000 users")
            )
            m, b = await stored(bus, subjects.AUDIT_STREAM)
            per_session = b / sessions
            lines.append(
                f"{'audit, one session of ' + str(commands) + ' commands':<44} "
                f"{per_session:8.0f} B/session ({m // sessions} msgs)  "
                f"{1000 * per_session / 1e6:6.2f} MB per 1,000 sessions a day, "
                f"{90 * 1000 * per_session / 1e9:6.2f} GB kept 90 days"
            )
            m, b = await stored(bus, kv_stream_name(subjects.DB_SERVERS_BUCKET))
            beats_per_s = 1000 * agents / 10
            lines.append(
                f"heartbeat writes: {beats_per_s:.0f}/s per 1,000 databases ({agents} agents "
                f"each, every 10 s): {beats_per_s * b / max(m, 1) / 1e3:.0f} kB/s into the hub"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", type=int, default=1000)
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--commands", type=int, default=50)
    args = parser.parse_args()
    for line in asyncio.run(measure(args.databases, args.agents, args.commands)):
        print(line)


if __name__ == "__main__":
    main()

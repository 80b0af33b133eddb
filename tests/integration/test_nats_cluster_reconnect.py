"""Through a failover between the servers of a NATS cluster, our watches and our
compare-and-set writes keep their guarantees.

Three nats-server processes (routes, JetStream, R3 buckets); clients are given all
three. The server a watching client is connected to is SIGKILLed while a writer keeps
changing the registry and two clients race compare-and-set increments of one record:

* the watch reconnects by itself, reports no (key, revision) twice, never goes back
  in revision, and ends with exactly the bucket's state (nothing lost);
* every compare-and-set write that succeeded is in the record's history, and no two
  writes were based on the same revision (the history counts 1, 2, 3 ... without a
  repeat): a write whose answer was lost in the failover is never applied twice;
* every audit event emitted meanwhile is stored once (the emitter retries, the stream
  drops a retried duplicate by its message id): none lost, none twice;
* the killed server, back, catches up: read through it alone, the registry is the same.

The cluster kit here is private to this file and minimal (a shared one is
tests/kits/natscluster.py, on another branch).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from pydantic import BaseModel

from bus import Bus, leases, subjects
from bus.audit import Login
from bus.client import FAILURES
from bus.schemas import DatabaseResource, DatabaseSpec, Metadata, TLSSettings
from bus.server import NatsServer, wait_port_free
from bus.specs import SPECS
from bus.watch import Event
from dbservice.access.audit import AuditEmitter
from sandbox.ports import free_ports
from tests.kits.agent import wait_until

pytestmark = pytest.mark.timeout(240)

COUNTER_BUCKET = "test_counter"
"""A record compare-and-set like the leases bucket's, kept with its history."""
COUNTER_KEY = "counter"


class Cluster:
    """Three routed nats-servers with JetStream, on fixed loopback ports."""

    def __init__(self, directory: Path) -> None:
        ports = free_ports(6)
        self.client_ports, route_ports = ports[:3], ports[3:]
        self.servers: list[NatsServer] = []
        for i in range(3):
            routes = ", ".join(
                f"nats-route://127.0.0.1:{port}" for j, port in enumerate(route_ports) if j != i
            )
            conf = directory / f"n{i}.conf"
            conf.write_text(
                f"server_name: n{i}\n"
                "cluster {\n"
                "  name: fleet\n"
                f"  listen: 127.0.0.1:{route_ports[i]}\n"
                f"  routes: [{routes}]\n"
                "}\n"
            )
            self.servers.append(
                NatsServer(directory / f"n{i}", port=self.client_ports[i], config_file=conf)
            )

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{port}" for port in self.client_ports]

    def start(self) -> None:
        for server in self.servers:
            server.start(timeout=30)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def index_of(self, bus: Bus) -> int:
        url = bus.nc.connected_url
        assert url is not None and url.port is not None
        return self.client_ports.index(url.port)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@contextlib.asynccontextmanager
async def connected(servers: list[str], name: str) -> AsyncIterator[Bus]:
    async with await Bus.connect(",".join(servers), name=name, request_timeout=4) as bus:
        yield bus


async def create_r3_buckets(bus: Bus) -> None:
    """The registry and the counter's bucket with three replicas, once JetStream's
    cluster has a leader."""

    async def created() -> bool:
        try:
            for name, history in (
                (subjects.DATABASES_BUCKET, SPECS[subjects.DATABASES_BUCKET].history),
                (COUNTER_BUCKET, 64),
            ):
                await bus.js.create_key_value(
                    config=KeyValueConfig(
                        bucket=name, history=history, replicas=3, storage=StorageType.FILE
                    )
                )
            await bus.js.add_stream(
                StreamConfig(
                    name=subjects.AUDIT_STREAM,
                    subjects=[subjects.audit_filter()],
                    storage=StorageType.FILE,
                    num_replicas=3,
                    duplicate_window=120.0,
                )
            )
        except Exception:
            return False
        return True

    await wait_until(created, 60, "JetStream cluster ready for R3 buckets")


def resource(name: str, generation: int) -> DatabaseResource:
    return DatabaseResource(
        metadata=Metadata(name=name, labels={"generation": str(generation)}),
        spec=DatabaseSpec(uri=f"10.0.0.{generation % 250}:6379", tls=TLSSettings(mode="disabled")),
    )


RETRIES: list[float] = []
"""When a call failed and was retried (time.monotonic()), for the figures."""


async def retried(what: str, call: Any, limit: float = 60) -> Any:
    """``call()`` until it succeeds (a failover makes some calls time out)."""
    deadline = asyncio.get_running_loop().time() + limit
    while True:
        try:
            return await call()
        except FAILURES:
            RETRIES.append(time.monotonic())
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{what} kept failing for {limit}s") from None
            await asyncio.sleep(0.2)


class Counter(BaseModel):
    value: int
    writer: str


async def increment(bus: Bus, writer: str, successes: list[tuple[str, int, int]]) -> None:
    """One compare-and-set increment of the shared counter, retried until it is ours."""
    while True:
        try:
            found = await leases.read(bus, COUNTER_BUCKET, COUNTER_KEY, Counter)
            assert found is not None
            value = found.record.value + 1
            revision = await leases.update(
                bus, COUNTER_BUCKET, COUNTER_KEY, Counter(value=value, writer=writer),
                last=found.revision,
            )  # fmt: skip
        except FAILURES:
            await asyncio.sleep(0.1)
            continue
        if revision is not None:
            successes.append((writer, value, revision))
            return


async def test_watches_and_compare_and_set_through_a_failover(cluster: Cluster) -> None:
    async with connected(cluster.urls, "admin") as admin:
        await create_r3_buckets(admin)
        await retried(
            "the counter's creation",
            lambda: leases.create(
                admin, COUNTER_BUCKET, COUNTER_KEY, Counter(value=0, writer="init")
            ),
        )

    # The watcher is given its own server first; the writers the others.
    order = [cluster.urls[0], cluster.urls[1], cluster.urls[2]]
    async with (
        connected(order, "watcher") as watcher,
        connected(order[1:] + order[:1], "writer") as writer,
        connected(order[2:] + order[:2], "racer") as racer,
    ):
        events: list[Event[DatabaseResource]] = []

        async def watch() -> None:
            async with contextlib.aclosing(watcher.watch_resources()) as stream:
                async for event in stream:
                    events.append(event)

        watching = asyncio.create_task(watch())
        await wait_until(lambda: any(e.kind == "synced" for e in events), 30, "first sync")

        expected: dict[str, int] = {}  # name -> generation last written
        successes: list[tuple[str, int, int]] = []

        async def write(generations: range) -> None:
            for generation in generations:
                name = f"db-{generation % 7}"
                record = resource(name, generation)
                await retried(f"write {generation}", partial(writer.put_resource, record))
                expected[name] = generation
                await asyncio.sleep(0.05)  # spread the writes over the failover
                if generation % 5 == 4:
                    gone = f"db-{(generation + 3) % 7}"
                    await retried(f"delete {gone}", partial(writer.delete_resource, gone))
                    expected.pop(gone, None)

        async def race(bus: Bus, who: str, count: int) -> None:
            for _ in range(count):
                await increment(bus, who, successes)

        emitted: list[str] = []

        async def audit(emitter: AuditEmitter, count: int) -> None:
            for i in range(count):
                event = Login(user=f"user-{i}")
                assert emitter.emit(event)
                emitted.append(event.id)
                await asyncio.sleep(0.03)

        await write(range(0, 20))
        victim = cluster.index_of(watcher)
        # The victim also leads every stream: the failover elects new leaders too.
        for stream in (
            f"KV_{subjects.DATABASES_BUCKET}",
            f"KV_{COUNTER_BUCKET}",
            subjects.AUDIT_STREAM,
        ):
            await lead_from(writer, stream, f"n{victim}")
        emitter = AuditEmitter.for_bus(watcher, host_id="agent-1")
        emitter.start()
        work = asyncio.gather(
            write(range(20, 60)),
            race(writer, "writer", 15),
            race(racer, "racer", 15),
            audit(emitter, 100),
        )
        await asyncio.sleep(0.3)
        killed = time.monotonic()
        cluster.servers[victim].kill()
        await work
        assert await emitter.flush(60), "audit events still unpublished"
        await emitter.aclose()
        print(
            f"failover: {len(RETRIES)} calls retried, the last "
            f"{max(RETRIES, default=killed) - killed:.2f}s after the kill; "
            f"{watcher.reconnects} reconnect(s) of the watcher, {len(successes)} increments"
        )
        await wait_until(lambda: watcher.reconnects >= 1, 30, "the watcher's reconnect")
        assert cluster.index_of(watcher) != victim

        # -- the watch: nothing lost, nothing twice, never backwards ------------------------
        async def caught_up() -> bool:
            return state(events) == {name: str(g) for name, g in expected.items()}

        await wait_until(caught_up, 60, "the watch to show every write")
        seen: set[tuple[str, int]] = set()
        last: dict[str, int] = {}
        for event in events:
            if event.kind != "upsert":
                continue
            assert (event.key, event.revision) not in seen, f"{event.key}@{event.revision} twice"
            seen.add((event.key, event.revision))
            assert event.revision > last.get(event.key, 0), f"{event.key} went backwards"
            last[event.key] = event.revision
        in_bucket = await retried("a snapshot", writer.list_resources)
        assert {r.name: r.metadata.labels["generation"] for r in in_bucket} == state(events)

        # -- compare-and-set: every success applied once, no two from one revision -------
        history = await retried("the counter's history", lambda: counter_history(writer))
        assert [value for value, _ in history] == list(range(0, len(history)))
        assert len(successes) == 30
        applied = {(value, who) for value, who in history}
        for who, value, _ in successes:
            assert (value, who) in applied
        # a lost answer may let a write land that its writer then retried as another
        # increment: the count is still exact, each value taken once
        assert history[-1][0] >= 30

        # -- audit: every event stored once ---------------------------------------------
        stored = await retried("the audit stream", lambda: audit_ids(writer))
        assert emitter.dropped_total == 0
        assert sorted(stored) == sorted(emitted), (
            f"{len(set(emitted) - set(stored))} lost, {len(stored) - len(set(stored))} twice"
        )

        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching

    # -- the killed server, back, catches up ----------------------------------------------
    wait_port_free("127.0.0.1", cluster.client_ports[victim])
    cluster.servers[victim].start(timeout=30)
    async with connected([cluster.urls[victim]], "late reader") as late:

        async def same() -> bool:
            try:
                found = await late.list_resources()
            except FAILURES:
                return False
            return {r.name: r.metadata.labels["generation"] for r in found} == {
                name: str(g) for name, g in expected.items()
            }

        await wait_until(same, 60, "the restarted server to catch up")


async def lead_from(bus: Bus, stream: str, server: str) -> None:
    """Make ``server`` the leader of ``stream`` (step the leader down until it is)."""
    for _ in range(30):
        info = await retried("stream info", partial(bus.js.stream_info, stream))
        if info.cluster is not None and info.cluster.leader == server:
            return
        with contextlib.suppress(*FAILURES):
            await bus.nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"", timeout=4)
        await asyncio.sleep(0.5)
    raise AssertionError(f"{server} never became the leader of {stream}")


def state(events: list[Event[DatabaseResource]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for event in events:
        if event.kind == "upsert" and event.value is not None:
            out[event.key] = event.value.metadata.labels["generation"]
        elif event.kind == "deleted":
            out.pop(event.key, None)
    return out


async def audit_ids(bus: Bus) -> list[str]:
    info = await bus.js.stream_info(subjects.AUDIT_STREAM)
    ids = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        message = await bus.js.get_msg(subjects.AUDIT_STREAM, seq)
        body = json.loads(message.data or b"{}")
        if body.get("type") == "auth.login":
            ids.append(str(body["id"]))
    return ids


async def counter_history(bus: Bus) -> list[tuple[int, str]]:
    kv = await bus.bucket(COUNTER_BUCKET)
    entries = await kv.history(COUNTER_KEY)
    out = []
    for entry in entries:
        body = json.loads(entry.value or b"{}")
        out.append((int(body["value"]), str(body["writer"])))
    return out

"""The topology of deploy/nats with real servers: a hub cluster of 3 (hub.conf) and a leaf
node per region (leaf.conf). A region's agents and discovery use the hub's JetStream
through their leaf (KV reads, direct gets, watches, compare-and-set, audit), and what
crosses a leaf link is limited by the link's own credentials."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import nats.errors
import pytest
from pydantic import BaseModel

from bus import Bus, DatabaseResource, DatabaseSpec, Metadata, RegistryError, leases, subjects
from bus.access import User
from bus.audit import SessionStart, ensure_audit_stream, publish_event, read_events
from bus.callout import serve_callout
from bus.client import FAILURES
from bus.servers import DbServerHeartbeat
from bus.specs import ACCESS_BUCKETS, DB_SERVERS, Replication
from dbservice.auth.natsrights import AgentAuthorizer, nats_credentials_for
from dbservice.auth.service import callout_answer
from tests.kits.common import CALLOUT_SEED
from tests.kits.natscluster import NatsTopology

Connect = Callable[[str], Awaitable[Bus]]


def db(name: str) -> DatabaseResource:
    return DatabaseResource(metadata=Metadata(name=name), spec=DatabaseSpec(uri=f"{name}:6379"))


class Lease(BaseModel):
    holder: str
    round: int


@pytest.fixture
def topo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsTopology]:
    topology = NatsTopology(tmp_path / "nats", leaf_admin=True)
    topology.trust(monkeypatch)
    with topology:
        yield topology


@pytest.fixture
async def opened() -> AsyncIterator[list[Bus]]:
    buses: list[Bus] = []
    yield buses
    for bus in buses:
        await bus.close()


async def connect(opened: list[Bus], url: str, user: str) -> Bus:
    bus = await Bus.connect(url, name=user, request_timeout=2.0)
    opened.append(bus)
    return bus


def test_the_hub_and_its_leaves_come_up_from_the_deploy_configs(topo: NatsTopology) -> None:
    for hub in topo.hub_nodes:
        others = {other.name for other in topo.hub_nodes if other is not hub}
        assert others <= hub.route_peers()
        _, jsz = hub.monitor("/jsz")
        assert jsz["meta_cluster"]["cluster_size"] == 3
        _, varz = hub.monitor("/varz")
        assert varz["tls_required"] and varz["cluster"]["tls_required"]
        assert varz["leaf"]["tls_required"]
    linked = [link["name"] for hub in topo.hub_nodes for link in hub.leaf_links()]
    assert sorted(linked) == ["leaf-eu-west-1", "leaf-us-east-1"]
    for leaf in topo.leaf_nodes.values():
        _, varz = leaf.monitor("/varz")
        assert varz["tls_required"]
        assert not varz.get("jetstream", {}).get("config")  # no JetStream of its own
        # the hub's leaf password never shows in a log line
        assert not [line for line in leaf.server._log if "pw-leaf" in line]


async def test_a_region_uses_the_hub_s_jetstream_through_its_leaf(
    topo: NatsTopology, opened: list[Bus]
) -> None:
    admin = await connect(opened, topo.hub_urls("admin"), "admin")
    await admin.provision()
    await ensure_audit_stream(admin)
    discovery = await connect(opened, topo.leaf_url("eu-west-1", "discovery"), "discovery")
    agent = await connect(opened, topo.leaf_url("us-east-1", "agent"), "agent")

    # a watch behind one leaf sees a write made behind another
    events = agent.watch_resources()
    async with contextlib.aclosing(events):
        first = await anext(events)
        assert first.kind == "synced"
        await discovery.put_resource(db("orders"))
        seen = await asyncio.wait_for(anext(events), 10)
        assert (seen.kind, seen.key) == ("upsert", subjects.database_key("orders"))
    # a direct get, both ways
    assert (await agent.get_resource("orders")) == db("orders")
    assert (await discovery.get_resource("orders")) == db("orders")

    # heartbeats with their own TTL
    beat = DbServerHeartbeat(
        host_id="h1", hostname="agent-1", version="1", addr="10.0.0.1:6390", database=db("orders")
    )
    await agent.put_db_server(beat, ttl=30)
    assert [hb.host_id for hb in await admin.list_db_servers("orders")] == ["h1"]

    # compare-and-set: one winner
    await agent.provision(leases.LEASES)
    bucket, key = subjects.LEASES_BUCKET, "rotation.orders"
    rev = await leases.create(agent, bucket, key, Lease(holder="a", round=1))
    assert rev is not None
    assert await leases.create(agent, bucket, key, Lease(holder="b", round=1)) is None
    assert await leases.update(agent, bucket, key, Lease(holder="a", round=2), last=rev)
    assert await leases.update(agent, bucket, key, Lease(holder="b", round=2), last=rev) is None

    # audit events published behind a leaf land in the hub's stream
    await ensure_audit_stream(agent, update=False)
    event = SessionStart(user="alice", database="orders", host_id="h1")
    await publish_event(agent, event)
    auditor = await connect(opened, topo.hub_urls("auditor"), "auditor")
    got = [e.id async for e in read_events(auditor)]
    assert got == [event.id]


async def test_what_crosses_a_leaf_link_is_limited_by_its_credentials(
    topo: NatsTopology, opened: list[Bus]
) -> None:
    """A region's leaf with an all-powerful local admin: in the hub, that admin may do
    only what the leaf link may (the region's agents and discovery), never read users."""
    hub_admin = await connect(opened, topo.hub_urls("admin"), "admin")
    await hub_admin.provision(*ACCESS_BUCKETS)
    await hub_admin.put(subjects.USERS_BUCKET, "alice", User(name="alice", roles=("dev",)))
    assert await hub_admin.get(subjects.USERS_BUCKET, "alice", User) is not None

    await hub_admin.provision(DB_SERVERS)
    leaf_admin = await connect(opened, topo.leaf_url("us-east-1", "admin"), "admin")
    with pytest.raises(RegistryError):
        await leaf_admin.get(subjects.USERS_BUCKET, "alice", User)
    mallory = User(name="mallory", roles=("admin",))
    with pytest.raises(RegistryError):
        await leaf_admin.put(subjects.USERS_BUCKET, "mallory", mallory)
    # fire and forget: what an agent may write lands, a user record does not
    beat = DbServerHeartbeat(
        host_id="h9", hostname="agent-9", version="1", addr="10.0.0.9:6390", database=db("x")
    )
    key = subjects.db_server_key("x", "h9")
    await leaf_admin.nc.publish(
        subjects.kv_subject(subjects.DB_SERVERS_BUCKET, key), beat.model_dump_json().encode()
    )
    await leaf_admin.nc.publish(
        subjects.kv_subject(subjects.USERS_BUCKET, "mallory"), mallory.model_dump_json().encode()
    )
    await leaf_admin.nc.flush()
    for _ in range(100):
        if await hub_admin.get(subjects.DB_SERVERS_BUCKET, key, DbServerHeartbeat):
            break
        await asyncio.sleep(0.05)
    assert await hub_admin.get(subjects.DB_SERVERS_BUCKET, key, DbServerHeartbeat) == beat
    assert await hub_admin.get(subjects.USERS_BUCKET, "mallory", User) is None


async def test_a_password_in_the_url_logs_in_to_the_servers_the_cluster_announces(
    topo: NatsTopology, opened: list[Bus], caplog: pytest.LogCaptureFixture
) -> None:
    """Given one hub server's URL with the password inside, the client learns the
    others from the cluster (their URLs carry no password). When that server dies, the
    reconnect to another one logs in with the same user: no Authorization Violation."""
    first = topo.hub_nodes[0]
    bus = await connect(opened, first.url("admin"), "admin")
    bus.replication = Replication(3)
    await bus.provision()
    before = DatabaseResource(metadata=Metadata(name="before"), spec=DatabaseSpec(uri="b:6379"))
    await bus.put_resource(before)
    topo.kill(first)

    async def retried(call: Callable[[], Awaitable[object]]) -> object:
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            try:
                return await call()
            except (RegistryError, *FAILURES):
                assert asyncio.get_running_loop().time() < deadline, "no answer in 30s"
                await asyncio.sleep(0.2)

    after = DatabaseResource(metadata=Metadata(name="after"), spec=DatabaseSpec(uri="a:6379"))
    await retried(lambda: bus.put_resource(after))
    assert await retried(lambda: bus.get_resource("before")) == before
    assert bus.nc.connected_url is not None and bus.nc.connected_url.port != first.client_port
    assert "Authorization Violation" not in caplog.text


async def test_an_agent_behind_a_leaf_is_admitted_by_the_auth_service_at_the_hub(
    topo: NatsTopology, opened: list[Bus]
) -> None:
    """A leaf's auth callout crosses the leaf link to the auth service connected to the
    hub; the agent gets its own rights there (its heartbeats only), as on one server."""
    admin = await connect(opened, topo.hub_urls("admin"), "admin")
    await admin.provision()
    await admin.bucket(subjects.DB_SERVERS_BUCKET)
    await ensure_audit_stream(admin)
    auth = await connect(opened, topo.hub_urls("auth"), "auth")
    await serve_callout(auth, callout_answer(AgentAuthorizer(CALLOUT_SEED)))

    host_a, host_b = "leaf-agent-a", "leaf-agent-b"
    creds = nats_credentials_for(host_a, CALLOUT_SEED)
    port = topo.leaf_nodes["us-east-1"].client_port
    url = f"nats://{creds.user}:{creds.password}@127.0.0.1:{port}"
    agent = await connect(opened, url, creds.user)

    def beat(host_id: str) -> DbServerHeartbeat:
        return DbServerHeartbeat(
            host_id=host_id, hostname=host_id, version="t", addr="a:1", database=db("orders")
        )

    await agent.put_db_server(beat(host_a), ttl=60)
    await publish_event(agent, SessionStart(user="alice", host_id=host_a))
    assert [s.host_id for s in await agent.list_db_servers("orders")] == [host_a]
    with pytest.raises((RegistryError, nats.errors.TimeoutError)):
        await agent.put_db_server(beat(host_b), ttl=60)
    with pytest.raises(Exception):  # noqa: B017 - refused publish: no ack ever comes
        await publish_event(agent, SessionStart(user="mallory", host_id=host_b), ack_wait=1.0)
    assert [s.host_id for s in await admin.list_db_servers("orders")] == [host_a]
    assert [(e.user, e.identity) async for e in read_events(admin)] == [("alice", "checked")]

"""End to end in cluster mode: a person -> the agent (mutual TLS, route, roles, audit)
-> a 3-shard MemoryDB stand-in. The agent logs in on every shard connection (IAM token
or the client's own AUTH), the client sees one server, and ``--node`` reaches one shard."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.exceptions

from bus import Bus
from bus.schemas import AWSSpec, DatabaseResource, DatabaseSpec, MemoryDBSpec, Metadata, TLSSettings
from bus.server import NatsServer
from dbservice.engine.cluster.slots import key_slot
from dbservice.route import RouteRefused, open_route
from sandbox.aws import ACL_MEMBERS, MotoServer
from sandbox.iamfront import IamFront, MemoryDBLogin
from sandbox.memorydb import MemoryDBStandin, StandinConfig
from tests.kits import seed as seed
from tests.kits.agent import running_agent
from tests.kits.listener import (
    RawSession,
    client,
    client_context,
    make_fleet,
    put_roles,
    wait_events,
)

pytestmark = pytest.mark.timeout(120)

REGION = "us-east-1"
ACCOUNT = "123456789012"
CLUSTER = "carts-prod"
ACL = "carts-acl"
CFG_NAME = f"clustercfg.{CLUSTER}.abc123.memorydb.{REGION}.amazonaws.com"
BOB_PASSWORD = "bob-password-0123456789"


@pytest.fixture
async def standin(
    tmp_path: Path, aws: MotoServer
) -> AsyncIterator[tuple[MemoryDBStandin, MemoryDBLogin]]:
    seed.cluster(REGION, CLUSTER, acl=ACL, engine_version="7.1")
    memorydb = seed.client("memorydb", REGION)
    for name, mode in (
        ("alice", {"Type": "iam"}),
        ("bob", {"Type": "password", "Passwords": [BOB_PASSWORD]}),
    ):
        memorydb.create_user(UserName=name, AuthenticationMode=mode, AccessString="on ~* +@all")
        ACL_MEMBERS.setdefault((ACCOUNT, REGION, name), set()).add(ACL)
    login = MemoryDBLogin(cluster=CLUSTER, region=REGION)
    login.set_password("bob", BOB_PASSWORD)
    config = StandinConfig(
        dir=tmp_path / "db",
        shards=3,
        extra_dns_names=[CFG_NAME],
        front_factory=IamFront.factory(login),
    )
    async with MemoryDBStandin(config) as db:
        await login.sync_from_aws(db.nodes)
        yield db, login


def record(ca_pem: str) -> DatabaseResource:
    return DatabaseResource(
        metadata=Metadata(name="carts", labels={"env": "cluster"}),
        spec=DatabaseSpec(
            uri=f"{CFG_NAME}:6379",
            tls=TLSSettings(mode="verify-full", ca_cert=ca_pem),
            aws=AWSSpec(
                region=REGION,
                account_id=ACCOUNT,
                memorydb=MemoryDBSpec(cluster_name=CLUSTER, acl_name=ACL, engine_version="7.1"),
            ),
        ),
    )


async def test_person_reaches_every_shard_through_the_agent(
    bus: Bus,
    nats_server: NatsServer,
    tmp_path: Path,
    standin: tuple[MemoryDBStandin, MemoryDBLogin],
) -> None:
    db, login = standin
    fleet = await make_fleet(bus, tmp_path, nats_server.url)
    await put_roles(
        bus,
        carts={
            "allow": {"db_labels": {"env": "cluster"}, "db_users": ["alice", "bob"]},
            "deny": {"redis_commands": ["FLUSHALL"]},
        },
    )
    await bus.put_resource(record(db.ca_pem.decode()))
    host, port = db.endpoint
    config = fleet.agent(
        "agent-1",
        [],
        resources=[{"labels": {"env": "cluster"}}],
        host_aliases={f"{CFG_NAME}:6379": f"{host}:{port}"},
    )
    erin = fleet.identity("erin", ["carts"])
    keys = [f"cart:{i}" for i in range(30)]
    assert len({key_slot(k.encode()) * 3 // 16384 for k in keys}) == 3  # all three shards
    async with running_agent(config, nats_server.url) as agent:
        assert agent.listener is not None
        listen = agent.listener.port
        for protocol in (2, 3):
            r = client(listen, erin, "carts", "alice", protocol=protocol)
            async with r:
                assert await r.mset({k: k for k in keys})
                assert await r.mget(keys) == [k.encode() for k in keys]
                assert await r.dbsize() == 30
                assert len([k async for k in r.scan_iter(count=7)]) == 30
                assert await r.acl_whoami() in ("alice", b"alice")
                with pytest.raises(redis.exceptions.ResponseError, match="FLUSHALL"):
                    await r.flushall()
        # the IAM login ran on each shard connection: seed (a primary) + two others,
        # per session; one token for alice in all
        assert login.accepted == 6
        auth = agent.listener.login.auth  # type: ignore[attr-defined]
        assert auth.tokens_signed == 1
        # a password user's own AUTH reaches every shard connection it opens later
        r = client(listen, erin, "carts", "bob", username="bob", password=BOB_PASSWORD)
        async with r:
            assert await r.acl_whoami() in ("bob", b"bob")
            assert await r.delete(*keys) == 30
            assert await r.dbsize() == 0
        r = client(listen, erin, "carts", "bob", username="bob", password="wrong")
        with pytest.raises(redis.exceptions.AuthenticationError):
            await r.ping()
        await r.aclose()
        refused = await wait_events(
            bus, 2, "refused FLUSHALL audited", type="db.session.query", success=False
        )
        assert {getattr(e, "command", "") for e in refused} == {"FLUSHALL"}
        queries = await wait_events(bus, 30, "queries audited", type="db.session.query")
        assert {"MSET", "MGET", "DBSIZE", "SCAN"} <= {getattr(e, "command", "") for e in queries}

        # --node: one shard, unrouted
        ca = fleet.ca.pem
        session = await RawSession.open(listen, erin, ca, "carts", "alice")
        shards_text = await session.call("CLUSTER", "SHARDS")
        session.close()
        assert shards_text  # the engine's one-node view
        async with asyncio.timeout(10):
            reader, writer = await open_route(
                "127.0.0.1", listen, ssl_context=client_context(erin, ca), database="carts",
                db_user="alice", node=f"{db.node_fronts[1][0]}:{db.node_fronts[1][1]}",
            )  # fmt: skip
        raw = RawSession(reader, writer)
        info = (await raw.call("INFO", "server")).decode()
        assert f"tcp_port:{db.nodes[1].port}" in info  # that node's own INFO
        nodes = (await raw.call("CLUSTER", "NODES")).decode()
        assert nodes.count("master") == 3  # the real cluster, not the one-node view
        foreign = next(k for k in keys if key_slot(k.encode()) < 5461)
        assert (await raw.call("GET", foreign)).startswith(b"-MOVED")
        raw.close()
        with pytest.raises(RouteRefused, match="no shard or node 'nope'"):
            async with asyncio.timeout(10):
                await open_route(
                    "127.0.0.1", listen, ssl_context=client_context(erin, ca),
                    database="carts", db_user="alice", node="nope",
                )  # fmt: skip

"""End to end in cluster mode: a person -> the agent (mutual TLS, route, roles, audit)
-> a 3-shard MemoryDB stand-in. The agent logs in on every shard connection (IAM token
or the client's own AUTH), the client sees one server, and ``--node`` reaches one shard."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.exceptions

from bus import Bus
from bus.schemas import AWSSpec, DatabaseResource, DatabaseSpec, MemoryDBSpec, Metadata, TLSSettings
from bus.server import NatsServer
from dbservice.engine.cluster.slots import key_slot
from dbservice.route import RouteRefused, open_route
from sandbox.aws import MotoServer
from sandbox.iamfront import MemoryDBLogin
from sandbox.memorydb import MemoryDBStandin
from tests.kits.agent import running_agent, wait_until
from tests.kits.listener import (
    RawSession,
    client,
    client_context,
    cmd,
    make_fleet,
    put_roles,
    wait_events,
)
from tests.kits.memorydb import BOB_PASSWORD, config_endpoint, iam_cluster

pytestmark = pytest.mark.timeout(120)

REGION = "us-east-1"
ACCOUNT = "123456789012"
CLUSTER = "carts-prod"
ACL = "carts-acl"
CFG_NAME = config_endpoint(CLUSTER)


@pytest.fixture
async def standin(
    tmp_path: Path, aws: MotoServer
) -> AsyncIterator[tuple[MemoryDBStandin, MemoryDBLogin]]:
    async with iam_cluster(tmp_path / "db", cluster=CLUSTER, acl=ACL, shards=3) as served:
        yield served


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


@contextlib.asynccontextmanager
async def cluster_agent(
    bus: Bus, nats_server: NatsServer, tmp_path: Path, db: MemoryDBStandin, *deny: str
) -> AsyncIterator[tuple[int, Path, str]]:
    """An agent serving the stand-in as ``carts`` (cluster engine) to role ``carts``,
    which denies ``deny``; yields (listener port, a client identity, the fleet CA)."""
    fleet = await make_fleet(bus, tmp_path, nats_server.url)
    await put_roles(
        bus,
        carts={
            "allow": {"db_labels": {"env": "cluster"}, "db_users": ["alice", "bob"]},
            "deny": {"redis_commands": list(deny)},
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
    async with running_agent(config, nats_server.url) as agent:
        assert agent.listener is not None
        yield agent.listener.port, fleet.identity("erin", ["carts"]), fleet.ca.pem


async def test_a_command_refused_inside_multi_aborts_the_transaction(
    bus: Bus,
    nats_server: NatsServer,
    tmp_path: Path,
    standin: tuple[MemoryDBStandin, MemoryDBLogin],
) -> None:
    """DEL denied: refused when queued, and as on the server EXEC then answers EXECABORT
    and nothing of the transaction runs; DISCARD still works; redis-py sees the abort."""
    db, _ = standin
    async with cluster_agent(bus, nats_server, tmp_path, db, "FLUSHALL", "DEL") as (
        listen,
        erin,
        ca,
    ):
        s = await RawSession.open(listen, erin, ca, "carts", "alice")
        try:
            for end, answer in (
                ("EXEC", b"-EXECABORT Transaction discarded because of previous errors."),
                ("DISCARD", b"+OK"),
            ):
                assert await s.call("MULTI") == b"+OK"
                assert await s.call("SET", "tx:a", "1") == b"+QUEUED"
                assert (await s.call("DEL", "tx:a")).startswith(b"-NOPERM ")
                assert await s.call(end) == answer
                assert await s.call("GET", "tx:a") == b"$-1"
            assert await s.call("MULTI") == b"+OK"
            assert await s.call("SET", "tx:a", "2") == b"+QUEUED"
            assert await s.call("EXEC") == b"*1"
            assert await s.reply() == b"+OK"
            assert await s.call("GET", "tx:a") == b"2"
        finally:
            s.close()
        async with client(listen, erin, "carts", "alice") as r:
            pipe = r.pipeline(transaction=True)
            pipe.set("tx:b", 1)
            pipe.delete("tx:b")
            with pytest.raises(redis.exceptions.NoPermissionError) as info:
                await pipe.execute()
            # redis-py raises the queued command's error once EXEC answered EXECABORT
            assert isinstance(info.value.__context__, redis.exceptions.ExecAbortError)
            assert await r.get("tx:b") is None


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_a_client_that_left_over_tls_consumes_nothing(
    bus: Bus,
    nats_server: NatsServer,
    tmp_path: Path,
    standin: tuple[MemoryDBStandin, MemoryDBLogin],
    how: str,
) -> None:
    """Straight to the listener over mutual TLS (no tunnel): a client that closes while
    its BLPOP waits takes nothing; the element pushed after it left stays in the list."""
    db, _ = standin
    queue = b"q:tls"
    shard = db.nodes[await db.owner_of_slot(key_slot(queue))]
    async with cluster_agent(bus, nats_server, tmp_path, db) as (listen, erin, ca):
        a = await RawSession.open(listen, erin, ca, "carts", "alice")
        a.writer.write(cmd("BLPOP", queue, b"0"))

        async def blocked() -> bool:
            info = await shard.command("INFO", "clients")
            assert isinstance(info, bytes)
            return b"blocked_clients:0\r\n" not in info

        await wait_until(blocked, 10, "the BLPOP waits on the server")
        if how == "close":  # close_notify, then FIN
            a.writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await a.writer.wait_closed()
        else:
            a.close()
        await asyncio.sleep(0.2)
        b = await RawSession.open(listen, erin, ca, "carts", "alice")
        try:
            assert await b.call("LPUSH", queue, b"job") == b":1"
        finally:
            b.close()
        await asyncio.sleep(2)
        assert await shard.command("LLEN", queue) == 1

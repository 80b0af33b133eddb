"""End to end: a person → the agent (mutual TLS, route, roles) → the MemoryDB stand-in,
where the agent logs in as an IAM user with its own token and the person sends no
password; a password user still brings its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import pytest
import redis.exceptions

from bus import Bus
from bus.schemas import (
    AWSSpec,
    DatabaseResource,
    DatabaseSpec,
    MemoryDBSpec,
    Metadata,
    TLSSettings,
)
from bus.server import NatsServer
from dbservice.access.ca import CertificateAuthority
from dbservice.agent.config import AgentConfig
from dbservice.auth.admin import sign_host
from dbservice.route import RouteRefused
from dbservice.upstream.iam import IamTarget, Role
from sandbox.aws import MotoServer, assumed_roles
from sandbox.iamfront import MemoryDBLogin
from sandbox.memorydb import MemoryDBStandin
from tests.kits import seed as seed
from tests.kits.agent import agent_config, running_agent
from tests.kits.listener import RawSession, client, cmd, make_fleet, put_roles
from tests.kits.memorydb import BOB_PASSWORD, config_endpoint, iam_cluster

pytestmark = pytest.mark.timeout(90)

REGION = "us-east-1"
ACCOUNT = "123456789012"
CLUSTER = "orders-prod"
ACL = "orders-acl"
CFG_NAME = config_endpoint(CLUSTER)


@pytest.fixture
async def standin(
    tmp_path: Path, aws: MotoServer
) -> AsyncIterator[tuple[MemoryDBStandin, MemoryDBLogin]]:
    async with iam_cluster(tmp_path / "db", cluster=CLUSTER, acl=ACL) as served:
        yield served


def record(
    ca_pem: str,
    *,
    endpoint: Literal["cluster", "node"] = "cluster",
    role: str | None = None,
    external_id: str | None = None,
) -> DatabaseResource:
    return DatabaseResource(
        metadata=Metadata(name="orders", labels={"env": "iam"}),
        spec=DatabaseSpec(
            uri=f"{CFG_NAME}:6379",
            tls=TLSSettings(mode="verify-full", ca_cert=ca_pem),
            aws=AWSSpec(
                region=REGION,
                account_id=ACCOUNT,
                assume_role_arn=role,
                external_id=external_id,
                memorydb=MemoryDBSpec(
                    cluster_name=CLUSTER, acl_name=ACL, engine_version="7.1", endpoint_type=endpoint
                ),
            ),
        ),
    )


async def test_person_reaches_memorydb_as_an_iam_user(
    bus: Bus,
    nats_server: NatsServer,
    tmp_path: Path,
    standin: tuple[MemoryDBStandin, MemoryDBLogin],
) -> None:
    db, login = standin
    fleet = await make_fleet(bus, tmp_path, nats_server.url)
    await put_roles(
        bus, orders={"allow": {"db_labels": {"env": "iam"}, "db_users": ["alice", "bob", "carol"]}}
    )
    await bus.put_resource(record(db.ca_pem.decode()))
    host, port = db.endpoint
    config = fleet.agent(
        "agent-1",
        [],
        resources=[{"labels": {"env": "iam"}}],
        host_aliases={f"{CFG_NAME}:6379": f"{host}:{port}"},
    )
    dana = fleet.identity("dana", ["orders"])
    async with running_agent(config, nats_server.url) as agent:
        assert agent.listener is not None
        listen = agent.listener.port
        for protocol in (2, 3):
            # no password anywhere on the person's side
            r = client(listen, dana, "orders", "alice", protocol=protocol)
            async with r:
                assert await r.set("iam", "works")
                assert await r.get("iam") == b"works"
                assert await r.acl_whoami() in ("alice", b"alice")
        # a client that insists on AUTH as alice gets +OK; its password goes nowhere
        r = client(listen, dana, "orders", "alice", username="alice", password="anything")
        async with r:
            assert await r.acl_whoami() in ("alice", b"alice")
        # a password user brings its own password, checked by the database
        r = client(listen, dana, "orders", "bob", username="bob", password=BOB_PASSWORD)
        async with r:
            assert await r.acl_whoami() in ("bob", b"bob")
        r = client(listen, dana, "orders", "bob", username="bob", password="wrong")
        with pytest.raises(redis.exceptions.AuthenticationError):
            await r.ping()
        await r.aclose()
        # one DescribeUsers per user, one token for alice, however many sessions
        assert login.accepted == 3
        auth = agent.listener.login.auth  # type: ignore[attr-defined]
        assert auth.calls == {"memorydb:DescribeUsers": 2}
        assert auth.tokens_signed == 1
        # memorydb:Connect missing: the person is told, with the policy to add
        login.allow_connect = lambda key, user: False
        with pytest.raises(RouteRefused) as info:
            session = await RawSession.open(listen, dana, fleet.ca.pem, "orders", "alice")
            session.close()
        assert "memorydb:Connect" in info.value.reason
        assert f"arn:aws:memorydb:{REGION}:{ACCOUNT}:user/alice" in info.value.reason
        # counted by kind (docs/operations.md)
        metrics = agent.metrics.registry
        failures = "fleetgate_agent_upstream_failures_total"
        assert metrics.get_sample_value(failures, {"kind": "iam"}) == 1
        assert metrics.get_sample_value(failures, {"kind": "connect"}) == 0
        assert metrics.get_sample_value("fleetgate_agent_iam_tokens_signed_total") == 1


@pytest.mark.parametrize("endpoint", ["cluster", "node"])
async def test_iam_session_is_reauthenticated_while_the_client_works(
    bus: Bus,
    nats_server: NatsServer,
    tmp_path: Path,
    standin: tuple[MemoryDBStandin, MemoryDBLogin],
    endpoint: Literal["cluster", "node"],
) -> None:
    """listener.iam_reauth 1s: the agent sends a fresh AUTH on the live connection(s)
    every second (the stand-in's front checks each token), between the client's
    pipelines, and the client sees none of it. ``cluster``: the cluster engine (every
    shard connection renewed); ``node``: the proxy engine."""
    db, login = standin
    fleet = await make_fleet(bus, tmp_path, nats_server.url)
    await put_roles(bus, orders={"allow": {"db_labels": {"env": "iam"}, "db_users": ["alice"]}})
    await bus.put_resource(record(db.ca_pem.decode(), endpoint=endpoint))
    host, port = db.endpoint
    config = fleet.agent(
        "agent-1",
        [],
        resources=[{"labels": {"env": "iam"}}],
        host_aliases={f"{CFG_NAME}:6379": f"{host}:{port}"},
    )
    config["db_service"]["listener"]["iam_reauth"] = "1s"
    dana = fleet.identity("dana", ["orders"])
    loop = asyncio.get_running_loop()
    async with running_agent(config, nats_server.url) as agent:
        assert agent.listener is not None
        for protocol in (2, 3):
            r = client(agent.listener.port, dana, "orders", "alice", protocol=protocol)
            async with r:
                assert await r.ping()
                logged_in = login.accepted
                deadline = loop.time() + 20
                rounds = 0
                while login.accepted < logged_in + 3:
                    assert loop.time() < deadline, "no renewed AUTH reached the stand-in"
                    pipe = r.pipeline(transaction=False)
                    for i in range(100):
                        pipe.set(f"{{r}}{i}", f"{rounds}-{i}")
                        pipe.get(f"{{r}}{i}")
                    results = await pipe.execute()
                    assert results[0::2] == [True] * 100
                    assert results[1::2] == [f"{rounds}-{i}".encode() for i in range(100)]
                    assert await r.acl_whoami() in ("alice", b"alice")
                    rounds += 1
                    await asyncio.sleep(0.05)
        assert login.refusals == []
        auth = agent.listener.login.auth  # type: ignore[attr-defined]
        assert auth.tokens_signed == 1  # renewals reuse the cached token while valid


def test_iam_reauth_beyond_the_cut_off_is_a_config_error(tmp_path: Path) -> None:
    fleet_ca = CertificateAuthority.create()
    sign_host(fleet_ca, ["127.0.0.1"], 3600, tmp_path / "tls")
    listener = {
        "cert_file": str(tmp_path / "tls" / "cert.pem"),
        "key_file": str(tmp_path / "tls" / "key.pem"),
    }
    serve = {"resources": [{"labels": {"env": "iam"}}]}
    good = AgentConfig.model_validate(
        agent_config(tmp_path, "a", listener={**listener, "iam_reauth": "5m"}, **serve)
    ).db_service.listener
    assert good is not None and good.iam_reauth == 300
    for bad in ("12h", "0.5"):
        with pytest.raises(ValueError) as info:
            AgentConfig.model_validate(
                agent_config(tmp_path, "a", listener={**listener, "iam_reauth": bad}, **serve)
            )
        assert "db_service.listener.iam_reauth" in str(info.value)
        assert "under 12h" in str(info.value)


async def test_database_role_is_chained_after_the_matcher_role(
    bus: Bus,
    nats_server: NatsServer,
    tmp_path: Path,
    standin: tuple[MemoryDBStandin, MemoryDBLogin],
) -> None:
    """The agent's matcher role is assumed first, then the database's own
    assume_role_arn/external_id from the registry with those credentials; the token is
    signed by the database's role."""
    db, login = standin
    matcher_role = f"arn:aws:iam::{ACCOUNT}:role/agent-matcher-chain"
    db_role = f"arn:aws:iam::{ACCOUNT}:role/orders-db-chain"
    fleet = await make_fleet(bus, tmp_path, nats_server.url)
    await put_roles(bus, orders={"allow": {"db_labels": {"env": "iam"}, "db_users": ["alice"]}})
    resource = record(db.ca_pem.decode(), role=db_role, external_id="ext-db")
    await bus.put_resource(resource)
    host, port = db.endpoint
    config = fleet.agent(
        "agent-1",
        [],
        resources=[
            {
                "labels": {"env": "iam"},
                "aws": {"assume_role_arn": matcher_role, "external_id": "ext-m"},
            }
        ],
        host_aliases={f"{CFG_NAME}:6379": f"{host}:{port}"},
    )
    dana = fleet.identity("dana", ["orders"])
    async with running_agent(config, nats_server.url) as agent:
        assert agent.listener is not None
        r = client(agent.listener.port, dana, "orders", "alice")
        async with r:
            assert await r.set("chained", "yes")
            assert await r.acl_whoami() in ("alice", b"alice")
        auth = agent.listener.login.auth  # type: ignore[attr-defined]
        assert auth.calls["sts:AssumeRole"] == 2
        assert auth.tokens_signed == 1
        # the cached token is the one the session used: signed with the database role's key
        chain = IamTarget.of(resource, matcher_role=Role(matcher_role, "ext-m"))
        token = await auth.token(chain, "alice")
        assert auth.tokens_signed == 1
    assert login.accepted >= 1 and login.refusals == []
    assumed = {r.access_key_id: r for r in assumed_roles() if r.role_arn in (matcher_role, db_role)}
    assert sorted((r.role_arn, r.external_id) for r in assumed.values()) == [
        (matcher_role, "ext-m"),
        (db_role, "ext-db"),
    ]
    key_id = token.split("X-Amz-Credential=", 1)[1].split("%2F", 1)[0]
    assert assumed[key_id].role_arn == db_role


@pytest.mark.parametrize("endpoint", ["cluster", "node"])
async def test_reset_keeps_an_iam_session_its_db_user(
    bus: Bus,
    nats_server: NatsServer,
    tmp_path: Path,
    standin: tuple[MemoryDBStandin, MemoryDBLogin],
    endpoint: Literal["cluster", "node"],
) -> None:
    """RESET makes a connection ``default``; the agent logs it in again with a token
    before anything pipelined behind the RESET runs, in both engines. So neither
    ``HELLO 2 AUTH alice anything`` after it nor ``HELLO 2 "AUTH\\x00" bob <pw>`` makes the
    session anybody else, and it keeps working (``cluster``: every shard connection)."""
    db, login = standin
    fleet = await make_fleet(bus, tmp_path, nats_server.url)
    await put_roles(bus, orders={"allow": {"db_labels": {"env": "iam"}, "db_users": ["alice"]}})
    await bus.put_resource(record(db.ca_pem.decode(), endpoint=endpoint))
    host, port = db.endpoint
    config = fleet.agent(
        "agent-1",
        [],
        resources=[{"labels": {"env": "iam"}}],
        host_aliases={f"{CFG_NAME}:6379": f"{host}:{port}"},
    )
    dana = fleet.identity("dana", ["orders"])
    async with running_agent(config, nats_server.url) as agent:
        assert agent.listener is not None
        s = await RawSession.open(agent.listener.port, dana, fleet.ca.pem, "orders", "alice")
        try:
            keys = [f"{{k{i}}}" for i in range(8)]  # over the shards
            for key in keys:
                assert await s.call("SET", key, "v") == b"+OK"
            logged_in = login.accepted
            assert await s.call("RESET") == b"+RESET"
            assert login.accepted > logged_in  # a fresh IAM AUTH reached the database
            hello = cmd("HELLO", "2", "AUTH", "alice", "anything")
            s.writer.write(hello + cmd("ACL", "WHOAMI"))
            assert (await s.reply()).startswith(b"*")
            while (line := await s.reply()) != b"alice":  # the rest of HELLO's map
                assert not line.startswith(b"-"), line
            refused = await s.call("HELLO", "2", b"AUTH\x00", "bob", BOB_PASSWORD)
            assert refused.startswith(b"-ERR this session is db user 'alice'")
            # pipelined behind a RESET: already logged in again when they run
            s.writer.write(cmd("RESET") + b"".join(cmd("GET", key) for key in keys))
            assert await s.reply() == b"+RESET"
            assert [await s.reply() for _ in keys] == [b"v"] * len(keys)
            assert await s.call("ACL", "WHOAMI") == b"alice"
        finally:
            s.close()
        assert login.refusals == []

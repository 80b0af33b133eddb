"""End to end: a person → the agent (mutual TLS, route, roles) → the MemoryDB stand-in,
where the agent logs in as an IAM user with its own token and the person sends no
password; a password user still brings its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

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
from dbservice.route import RouteRefused
from sandbox.aws import ACL_MEMBERS, MotoServer
from sandbox.iamfront import IamFront, MemoryDBLogin
from sandbox.memorydb import MemoryDBStandin, StandinConfig
from tests import seed
from tests.agentkit import running_agent
from tests.listenerkit import RawSession, client, make_fleet, put_roles

pytestmark = pytest.mark.timeout(90)

REGION = "us-east-1"
ACCOUNT = "123456789012"
CLUSTER = "orders-prod"
ACL = "orders-acl"
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
        dir=tmp_path / "db", extra_dns_names=[CFG_NAME], front_factory=IamFront.factory(login)
    )
    async with MemoryDBStandin(config) as db:
        await login.sync_from_aws(db.nodes)
        yield db, login


def record(ca_pem: str) -> DatabaseResource:
    return DatabaseResource(
        metadata=Metadata(name="orders", labels={"env": "iam"}),
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

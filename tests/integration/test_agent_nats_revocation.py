"""The auth callout as ``fleetgate auth run`` wires it (:class:`AgentRights` reading the
agents bucket), against nats-server running deploy/nats/nats-server.conf: a removed
agent, or one whose join token was removed, is refused from its next connection on; an
agent whose join token had labels writes only the managed-user records of the databases
they select."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import nats
import nats.aio.client
import pytest

from bus import Bus, joins, leases, subjects
from bus.callout import serve_callout
from bus.errors import RegistryError
from bus.joins import JoinedAgent
from bus.schemas import AWSSpec, DatabaseResource, DatabaseSpec, MemoryDBSpec, Metadata, utcnow
from bus.server import NatsServer
from dbservice.auth.agentrights import AgentRights
from dbservice.auth.natsrights import AgentAuthorizer, nats_credentials_for
from dbservice.auth.service import callout_answer
from tests.kits.common import CALLOUT_SEED
from tests.kits.join import nats_login, secured_nats

HOST_A = "0b6c2b7e-0000-4000-8000-0000000000a1"
HOST_B = "0b6c2b7e-0000-4000-8000-0000000000b2"


@pytest.fixture
def secured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    yield from secured_nats(tmp_path, monkeypatch)


@pytest.fixture
async def admin(secured: NatsServer) -> AsyncIterator[Bus]:
    bus = await Bus.connect(f"nats://admin:pw-admin@127.0.0.1:{secured.port}", name="admin")
    await bus.provision(joins.TOKENS, joins.AGENTS)
    await bus.bucket(subjects.LEASES_BUCKET)
    yield bus
    await bus.close()


@pytest.fixture
async def auth(secured: NatsServer, admin: Bus) -> AsyncIterator[AgentRights]:
    """The callout responder as ``fleetgate auth run`` starts it (over the auth user)."""
    bus = await Bus.connect(
        f"nats://auth:pw-auth@127.0.0.1:{secured.port}", name="auth", request_timeout=1.0
    )
    rights = AgentRights(bus, registry_ttl=0)
    authorizer = AgentAuthorizer(CALLOUT_SEED, revoked=rights.revoked, leases=rights.leases)
    sub = await serve_callout(bus, callout_answer(authorizer, rights))
    yield rights
    await sub.unsubscribe()
    await bus.close()


async def joined(admin: Bus, host_id: str, labels: dict[str, str] | None = None) -> str:
    """An agent that joined with a token of ``labels``: the token's id."""
    _, token = joins.new_token(ttl=600, labels=labels or {}, creator="test")
    await joins.add_token(admin, token)
    now = utcnow()
    await joins.put_agent(
        admin,
        JoinedAgent(
            host_id=host_id, hostname=host_id[-2:], addr="10.0.0.1:6380",
            labels=token.labels, token_id=token.id, serial="1",
            expires=now + timedelta(hours=1), joined_at=now,
        ),
    )  # fmt: skip
    return token.id


def url(server: NatsServer, host_id: str) -> str:
    creds = nats_credentials_for(host_id, CALLOUT_SEED)
    return f"nats://{creds.user}:{creds.password}@127.0.0.1:{server.port}"


async def test_a_removed_agent_is_refused_from_its_next_connection(
    secured: NatsServer, admin: Bus, auth: AgentRights, caplog: pytest.LogCaptureFixture
) -> None:
    # never joined: its derived password alone does not admit it
    assert "authorization" in (await nats_login(url(secured, HOST_A))).lower()
    await joined(admin, HOST_A)
    token_b = await joined(admin, HOST_B)
    # an open connection of A, as the running agent has
    running = await nats.connect(url(secured, HOST_A), allow_reconnect=False)
    try:
        assert await nats_login(url(secured, HOST_A)) == "ok"
        assert await nats_login(url(secured, HOST_B)) == "ok"
        assert await joins.delete_agent(admin, HOST_A)  # fleetgate agents rm
        assert "authorization" in (await nats_login(url(secured, HOST_A))).lower()
        assert running.is_connected  # until its user JWT expires (nats_callout.ttl)
        assert await nats_login(url(secured, HOST_B)) == "ok"
        assert await joins.delete_token(admin, token_b)  # fleetgate tokens rm
        assert "authorization" in (await nats_login(url(secured, HOST_B))).lower()
    finally:
        await running.close()
    assert "not a joined agent" in caplog.text
    assert f"its join token {token_b} was removed" in caplog.text


def memorydb(name: str, region: str, account: str, **labels: str) -> DatabaseResource:
    aws = AWSSpec(region=region, account_id=account, memorydb=MemoryDBSpec(cluster_name=name))
    return DatabaseResource(
        metadata=Metadata(name=name, labels=labels), spec=DatabaseSpec(uri=f"{name}:6379", aws=aws)
    )


async def test_an_agent_whose_token_had_labels_writes_only_their_databases_leases(
    secured: NatsServer, admin: Bus, auth: AgentRights
) -> None:
    await admin.put_resource(memorydb("pay", "us-east-1", "111111111111", team="pay"))
    await admin.put_resource(memorydb("ops", "eu-west-1", "222222222222", team="ops"))
    await joined(admin, HOST_A, {"team": "pay"})
    await joined(admin, HOST_B)  # no labels: every database's, as before
    mine = subjects.managed_user_key("us-east-1", "111111111111", "svc")
    other = subjects.managed_user_key("eu-west-1", "222222222222", "svc")
    a = await Bus.connect(url(secured, HOST_A), name="agent-a", request_timeout=1.0)
    b = await Bus.connect(url(secured, HOST_B), name="agent-b", request_timeout=1.0)
    try:
        record = memorydb("lease", "us-east-1", "111111111111")
        assert await leases.create(a, subjects.LEASES_BUCKET, mine, record) is not None
        with pytest.raises(RegistryError, match="may this NATS user do that"):
            await leases.create(a, subjects.LEASES_BUCKET, other, record)
        assert await leases.create(b, subjects.LEASES_BUCKET, other, record) is not None
    finally:
        await a.close()
        await b.close()

"""Agents join with their AWS identity (``join: {method: aws}``): moto's STS (its real
HTTP server), a real auth service over HTTPS, real NATS, a real valkey-server behind the
agent, a redis-py client over mutual TLS verifying the agent against the fleet CA."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Any

import botocore.session
import pytest

from bus import Bus, joins
from bus.aws_logins import provision_aws_logins
from bus.schemas import utcnow
from bus.server import NatsServer
from dbservice.access.audit import AuditEmitter
from dbservice.access.awsid import sign_identity_request
from dbservice.agent.app import Agent
from dbservice.agent.config import AgentConfig
from dbservice.agent.join import JoinRefused
from dbservice.auth.service import AuthConfig, RunningService, start_service
from fleetgate.config import ConfigError
from sandbox.aws import MotoServer
from sandbox.ports import free_port
from sandbox.valkeynode import ValkeyNode
from tests.integration.test_agent_join import post_join, served_certificate
from tests.kits.agent import agent_config, running_agent, wait_until
from tests.kits.common import boto
from tests.kits.listener import (
    APP_PASSWORD,
    Fleet,
    RawSession,
    client,
    make_fleet,
    static_db,
    wait_events,
)

pytestmark = pytest.mark.timeout(120)
ACC = "123456789012"
SERVER_ID = "fleetgate-test-auth"
RULE = joins.AwsAllow(account=ACC, arn=f"arn:aws:sts::{ACC}:assumed-role/fleetgate-agent/*")


@pytest.fixture
async def fleet(bus: Bus, tmp_path: Any, nats_server: NatsServer) -> Fleet:
    return await make_fleet(bus, tmp_path, nats_server.url)


@pytest.fixture
def cert_ttl() -> str:
    return "1h"


async def start_auth(
    fleet: Fleet, aws: MotoServer | None, cert_ttl: str = "1h"
) -> tuple[RunningService, AuditEmitter]:
    settings: dict[str, Any] = {
        "listen": "127.0.0.1:0", "ca_dir": str(fleet.tmp / "ca"), "host_id": "auth-1",
        "join": {"cert_ttl": cert_ttl}, "rate_limit": {"per_address": 20, "window": "1m"},
    }  # fmt: skip
    if aws is not None:
        settings["aws"] = {"server_id": SERVER_ID, "sts_endpoints": [aws.url]}
        await provision_aws_logins(fleet.bus)
    await fleet.bus.provision(joins.TOKENS, joins.AGENTS)
    emitter = AuditEmitter.for_bus(fleet.bus, host_id="auth-1")
    emitter.start()
    config = AuthConfig.model_validate(settings)
    return await start_service(config, bus=fleet.bus, ca=fleet.ca, audit=emitter), emitter


@pytest.fixture
async def auth(fleet: Fleet, aws: MotoServer, cert_ttl: str) -> AsyncIterator[RunningService]:
    service, emitter = await start_auth(fleet, aws, cert_ttl)
    try:
        yield service
    finally:
        await service.close()
        await emitter.aclose()


def assume(monkeypatch: pytest.MonkeyPatch, role: str, session: str = "i-0abc") -> str:
    """This process's AWS credentials become those of an assumed role (as an instance
    profile gives them); its session ARN."""
    sts: Any = boto("sts")
    creds = sts.assume_role(RoleArn=f"arn:aws:iam::{ACC}:role/{role}", RoleSessionName=session)
    c = creds["Credentials"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", c["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", c["SecretAccessKey"])
    monkeypatch.setenv("AWS_SESSION_TOKEN", c["SessionToken"])
    return f"arn:aws:sts::{ACC}:assumed-role/{role}/{session}"


async def add_rule(bus: Bus, allow: joins.AwsAllow = RULE, **labels: str) -> joins.JoinToken:
    record = joins.new_aws_rule(allow=allow, ttl=None, labels=labels, creator="tests")
    await joins.add_token(bus, record)
    return record


def aws_agent(
    fleet: Fleet, auth: RunningService, valkey: ValkeyNode, name: str = "agent-1"
) -> dict[str, Any]:
    return agent_config(
        fleet.tmp,
        name,
        listen_addr=f"127.0.0.1:{free_port()}",
        listener={},
        join={
            "auth": f"127.0.0.1:{auth.port}",
            "method": "aws",
            "ca_file": str(fleet.tmp / "ca" / "ca.crt"),
        },
        databases=[static_db("dev-cache", valkey.port, env="dev")],
    )


def proof() -> dict[str, Any]:
    return sign_identity_request(botocore.session.Session(), SERVER_ID)


async def test_an_agent_joins_with_its_aws_identity_serves_and_is_revoked_with_its_rule(
    fleet: Fleet,
    auth: RunningService,
    valkey: ValkeyNode,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rule = await add_rule(fleet.bus, team="payments")
    arn = assume(monkeypatch, "fleetgate-agent")
    config = aws_agent(fleet, auth, valkey)
    alice = fleet.identity("alice", ["dev"])
    async with running_agent(config, fleet.nats_url) as agent:
        assert agent.listener is not None and agent.identity is not None
        assert agent.renewer is not None
        r = client(agent.listener.port, alice, "dev-cache", "app", username="app",
                   password=APP_PASSWORD, ssl_check_hostname=True)  # fmt: skip
        async with r:
            assert await r.set("joined", "by-aws")
            assert await r.get("joined") == b"by-aws"
        found = await joins.get_agent(fleet.bus, agent.identity.host_id)
        assert found is not None
        assert (found.record.method, found.record.token_id) == ("aws", rule.id)
        assert found.record.labels == {"team": "payments"}
        # the audit names the AWS principal that joined
        joined = await wait_events(fleet.bus, 1, "the join", type="auth.login", method="join-aws")
        assert joined[0].principal == arn and joined[0].success
        # the rule is not spent: it admits the next agent too
        stored = await joins.get_token(fleet.bus, rule.id)
        assert stored is not None and stored.record.state() == "valid"
        await agent.renewer.renew()  # renewal as for a token join
        assert await joins.delete_token(fleet.bus, rule.id)
        with pytest.raises(JoinRefused, match=rf"AWS join rule {rule.id} of agent .* removed"):
            await agent.renewer.renew()


async def test_an_unmatched_identity_a_replay_and_a_disabled_service_are_refused(
    fleet: Fleet,
    auth: RunningService,
    valkey: ValkeyNode,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await add_rule(fleet.bus)
    arn = assume(monkeypatch, "someone-else")
    status, answer = await post_join(auth, fleet, method="aws", proof=proof())
    assert status == 403, answer
    assert f"AWS identity {arn} (account {ACC}) matches no agent join rule" in answer["error"]
    refused = await wait_events(fleet.bus, 1, "the refusal", type="auth.login", principal=arn)
    assert not refused[0].success and "matches no agent join rule" in refused[0].reason
    # the agent's own start says the same, as a config error, without a traceback
    agent = Agent(
        AgentConfig.model_validate(aws_agent(fleet, auth, valkey)), nats_url=fleet.nats_url
    )
    with pytest.raises(ConfigError, match=r"refused: AWS identity .*someone-else.* matches no"):
        await agent.run(asyncio.Event())
    # a matching identity: one use per signature; two signed in one second both work
    assume(monkeypatch, "fleetgate-agent")
    signed, other = proof(), proof()
    assert signed["headers"]["Authorization"] != other["headers"]["Authorization"]
    for each in (signed, other):
        status, answer = await post_join(auth, fleet, method="aws", proof=each)
        assert status == 200, answer
    status, answer = await post_join(auth, fleet, method="aws", proof=signed)
    assert status == 401 and "used before" in answer["error"], answer
    # no proof, a forged one
    status, answer = await post_join(auth, fleet, method="aws")
    assert status == 400 and answer["error"].startswith("proof:"), answer
    forged = dict(signed, headers={**signed["headers"], "X-Fleetgate-Server-Id": "other"})
    status, answer = await post_join(auth, fleet, method="aws", proof=forged)
    assert status == 401 and "signed for another service" in answer["error"], answer
    # an aws rule's id is no token
    rule = await add_rule(fleet.bus)
    status, answer = await post_join(auth, fleet, token=f"{rule.id}." + "x" * 32)
    assert status == 401 and "unknown join token" in answer["error"], answer


async def test_a_service_without_aws_settings_refuses_aws_joins_saying_so(
    fleet: Fleet, aws: MotoServer
) -> None:
    service, emitter = await start_auth(fleet, None)
    try:
        status, answer = await post_join(service, fleet, method="aws", proof={})
        assert status == 403 and "does not accept AWS identities" in answer["error"]
    finally:
        await service.close()
        await emitter.aclose()


@pytest.mark.parametrize("cert_ttl", ["8s"])
async def test_a_revoked_agents_sessions_end_at_its_certificates_expiry(
    fleet: Fleet,
    auth: RunningService,
    valkey: ValkeyNode,
    monkeypatch: pytest.MonkeyPatch,
    cert_ttl: str,
) -> None:
    rule = await add_rule(fleet.bus)
    assume(monkeypatch, "fleetgate-agent")
    config = aws_agent(fleet, auth, valkey)
    alice = fleet.identity("alice", ["dev"])
    async with running_agent(config, fleet.nats_url) as agent:
        assert agent.listener is not None and agent.renewer is not None
        port = agent.listener.port
        served = await served_certificate(port, fleet, alice)
        # tokens rm of its rule: the agent cannot renew
        assert await joins.delete_token(fleet.bus, rule.id)
        session = await RawSession.open(port, alice, fleet.ca.pem, "dev-cache", "app")
        assert await session.call("AUTH", "app", APP_PASSWORD) == b"+OK"
        assert await session.call("PING") == b"+PONG"
        renewer = agent.renewer
        await wait_until(lambda: "was removed" in renewer.status.error, 15, "a failed renewal")
        # still served until the expiry ...
        assert await session.call("PING") == b"+PONG"
        # ... and closed by the agent at that moment
        async with asyncio.timeout(15):
            assert await session.reader.read() == b""
        closed = utcnow()
        session.close()
        assert closed >= served.not_valid_after_utc
        assert (closed - served.not_valid_after_utc).total_seconds() < 3
        # new connections are closed before TLS: no handshake with an expired certificate
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            await RawSession.open(port, alice, fleet.ca.pem, "dev-cache", "app")
        ended = await wait_events(fleet.bus, 1, "the session's end", type="db.session.end")
        assert "certificate" in ended[0].reason and "expired at" in ended[0].reason
        refused = await wait_events(
            fleet.bus, 1, "the refused connection", type="db.session.start", success=False
        )
        assert any("own certificate" in e.reason for e in refused)


def test_the_agent_config_refuses_a_token_file_with_method_aws(tmp_path: Any) -> None:
    token = tmp_path / "token"
    token.write_text("x")
    join = {"auth": "auth.internal:3025", "method": "aws", "token_file": str(token)}
    with pytest.raises(ValueError, match="token_file is for method token; method aws joins"):
        AgentConfig.model_validate(agent_config(tmp_path, "a", join=join, listener={}))

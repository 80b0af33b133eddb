"""The real commands as processes, with moto's STS: ``auth run`` with ``aws:`` settings,
``tokens add --method aws``, an ``agent run`` with moto credentials of an assumed role
that joins with ``method: aws`` and serves a client; an agent with another role is
refused at start, saying why; ``tokens rm`` of the rule: the agent cannot renew, and its
session ends at its certificate's expiry."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from bus.server import NatsServer
from sandbox.aws import MotoServer
from sandbox.valkeynode import ValkeyNode
from tests.kits.common import assumed_role_env, subprocess_env
from tests.kits.join import JoinFleet
from tests.kits.listener import APP_PASSWORD, RawSession

pytestmark = pytest.mark.timeout(180)
ACC = "123456789012"


@pytest.mark.slow
async def test_an_agent_process_joins_with_its_aws_identity_until_its_rule_is_removed(
    nats_server: NatsServer, tmp_path: Path, valkey: ValkeyNode, aws: MotoServer
) -> None:
    env = subprocess_env(FLEETGATE_NATS_URL=nats_server.url, FLEETGATE_HOME=str(tmp_path / "h"))
    with JoinFleet(tmp_path, env) as fleet:
        allow = f"account={ACC},arn=arn:aws:sts::{ACC}:assumed-role/fleetgate-agent/*"
        added = fleet.run(
            "tokens", "add", "--type", "agent", "--method", "aws", "--allow", allow,
            "--labels", "team=pay",
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        rule_id = added.stdout.splitlines()[0]
        await fleet.start_auth(
            cert_ttl="20s",
            extra=f"aws: {{server_id: fleetgate-e2e, sts_endpoints: ['{aws.url}']}}\n",
        )
        config, agent_port = fleet.agent_config("agent-1", valkey.port, method="aws")
        await fleet.start_agent(
            "agent-1",
            config,
            agent_port,
            env={**env, **assumed_role_env("fleetgate-agent", "i-0abc", ACC)},
        )
        alice = fleet.identity()
        ca_pem = (alice / "ca.pem").read_text()
        session = await RawSession.open(agent_port, alice, ca_pem, "dev-cache", "app")
        assert await session.call("AUTH", "app", APP_PASSWORD) == b"+OK"
        assert await session.call("PING") == b"+PONG"
        listed = fleet.run("agents", "ls", "--format", "json")
        [joined] = json.loads(listed.stdout)
        assert (joined["method"], joined["token_id"]) == ("aws", rule_id)
        assert joined["labels"] == {"team": "pay"}
        # another role matches no rule: that agent stops at start, saying why
        second, _ = fleet.agent_config("agent-2", valkey.port, method="aws")
        refused = await fleet.run_async(
            "agent",
            "run",
            "-c",
            str(second),
            env={**env, **assumed_role_env("web-server", "i-0def", ACC)},
        )
        assert refused.returncode == 2, refused.stderr
        assert (
            "assumed-role/web-server/i-0def (account 123456789012) matches no agent join rule"
            in (refused.stderr)
        )
        assert "Traceback" not in refused.stderr
        # the rule removed: the agent cannot renew, and its session ends at the expiry
        removed = fleet.run("tokens", "rm", rule_id)
        assert removed.returncode == 0 and f"removed AWS join rule {rule_id}" in removed.stdout
        async with asyncio.timeout(40):
            assert await session.reader.read() == b""
        session.close()
        log = fleet.log("agent-1")
        assert f"the AWS join rule {rule_id}" in log and "was removed" in log
        assert "ending the 1 open client sessions" in log
    assert fleet.returncodes == [0, 0]

"""The real commands as processes: ``auth run``, ``tokens add``, an ``agent run`` that
joins with the token, a client through it, ``agents ls`` and ``tokens ls``; a second
agent with the same token is refused at start, saying why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bus.server import NatsServer
from sandbox.valkeynode import ValkeyNode
from tests.kits.common import subprocess_env
from tests.kits.join import JoinFleet
from tests.kits.listener import APP_PASSWORD, client

pytestmark = pytest.mark.timeout(120)


@pytest.mark.slow
async def test_an_agent_process_joins_with_a_token_from_the_cli(
    nats_server: NatsServer, tmp_path: Path, valkey: ValkeyNode
) -> None:
    env = subprocess_env(FLEETGATE_NATS_URL=nats_server.url, FLEETGATE_HOME=str(tmp_path / "h"))
    with JoinFleet(tmp_path, env) as fleet:
        added = fleet.run("tokens", "add", "--type", "agent", "--labels", "team=pay")
        assert added.returncode == 0, added.stderr
        token = added.stdout.splitlines()[0]
        await fleet.start_auth()
        config, agent_port = fleet.agent_config("agent-1", valkey.port, token=token)
        await fleet.start_agent("agent-1", config, agent_port)
        # a client verifies the agent against the fleet CA, host name checked
        r = client(agent_port, fleet.identity(), "dev-cache", "app", username="app",
                   password=APP_PASSWORD, ssl_check_hostname=True)  # fmt: skip
        async with r:
            assert await r.ping()
        listed = fleet.run("agents", "ls", "--format", "json")
        [joined] = json.loads(listed.stdout)
        assert joined["hostname"] == "agent-1" and joined["labels"] == {"team": "pay"}
        tokens = fleet.run("tokens", "ls", "--format", "json")
        assert [t["state"] for t in json.loads(tokens.stdout)] == ["spent"]
        # the same token again: the second agent stops at start, saying why
        second, _ = fleet.agent_config("agent-2", valkey.port, token=token)
        refused = await fleet.run_async("agent", "run", "-c", str(second))
        assert refused.returncode == 2, refused.stderr
        assert "already used (by agent " in refused.stderr
        assert "Traceback" not in refused.stderr
    assert fleet.returncodes == [0, 0]

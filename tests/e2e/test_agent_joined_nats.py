"""A joined agent logs in to NATS as itself: ``auth run`` with ``nats_callout`` and
``agent run`` with a join token as processes, against nats-server running
deploy/nats/nats-server.conf. The agent gets its NATS login at join, keeps it in its
data_dir, serves a client with it, cannot write another agent's heartbeat with it, and
after ``agents rm`` that login is refused."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import Iterator
from pathlib import Path

import nats.errors
import pytest

from bus import Bus
from bus.errors import RegistryError
from bus.server import NatsServer
from bus.servers import DbServerHeartbeat
from dbservice.agent.join import NATS_LOGIN_FILE
from sandbox.valkeynode import ValkeyNode
from tests.integration.test_nats_permissions import db
from tests.kits.agent import wait_until
from tests.kits.common import subprocess_env
from tests.kits.join import JoinFleet, callout_seed_file, nats_login, secured_nats
from tests.kits.listener import APP_PASSWORD, client

pytestmark = pytest.mark.timeout(180)
OTHER = "0b6c2b7e-0000-4000-8000-00000000000f"


@pytest.fixture
def secured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    yield from secured_nats(tmp_path, monkeypatch)


@pytest.mark.slow
async def test_a_joined_agent_logs_in_to_nats_as_itself_until_removed(
    secured: NatsServer, tmp_path: Path, valkey: ValkeyNode
) -> None:
    base = f"127.0.0.1:{secured.port}"
    home = str(tmp_path / "h")
    admin = subprocess_env(FLEETGATE_NATS_URL=f"nats://admin:pw-admin@{base}", FLEETGATE_HOME=home)
    with JoinFleet(tmp_path, admin) as fleet:
        added = fleet.run("tokens", "add", "--type", "agent")
        assert added.returncode == 0, added.stderr
        token = added.stdout.splitlines()[0]
        await fleet.start_auth(
            extra=f"nats_callout:\n  issuer_seed_file: {callout_seed_file(tmp_path)}\n",
            env=subprocess_env(FLEETGATE_NATS_URL=f"nats://auth:pw-auth@{base}"),
        )
        # the agent is given the servers only: no NATS user of its own in any setting
        bare = subprocess_env(FLEETGATE_NATS_URL=f"nats://{base}", FLEETGATE_HOME=home)
        config, agent_port = fleet.agent_config("agent-1", valkey.port, token=token)
        agent = await fleet.start_agent("agent-1", config, agent_port, env=bare)

        [joined] = json.loads(fleet.run("agents", "ls", "--format", "json").stdout)
        host_id = joined["host_id"]
        kept = tmp_path / "agent-1" / NATS_LOGIN_FILE
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        creds = json.loads(kept.read_text())
        assert creds["user"] == f"agent-{host_id}"
        own = f"nats://{creds['user']}:{creds['password']}@{base}"

        # it serves a client and heartbeats as itself
        r = client(agent_port, fleet.identity(), "dev-cache", "app", username="app",
                   password=APP_PASSWORD, ssl_check_hostname=True)  # fmt: skip
        async with r:
            assert await r.ping()
        async with await Bus.connect(f"nats://admin:pw-admin@{base}", name="admin") as bus:

            async def beating() -> bool:
                return host_id in {s.host_id for s in await bus.list_db_servers("dev-cache")}

            await wait_until(beating, 30, "the agent's heartbeat")

        # its login writes its own heartbeat, never another agent's
        async with await Bus.connect(own, name="as-agent", request_timeout=1.0) as mine:
            beat = DbServerHeartbeat(host_id=OTHER, hostname="x", version="t", addr="a:1",
                                     database=db("dev-cache"))  # fmt: skip
            with pytest.raises((RegistryError, nats.errors.TimeoutError)):
                await mine.put_db_server(beat, ttl=60)
            await mine.put_db_server(beat.model_copy(update={"host_id": host_id}), ttl=60)

        # removed: its next connection is refused (the open one ends with its JWT)
        removed = fleet.run("agents", "rm", host_id)
        assert removed.returncode == 0, removed.stderr
        assert "authorization" in (await nats_login(own)).lower()
        agent.terminate()
        await asyncio.to_thread(agent.wait, 15)

        # a shared NATS user configured besides the joined login: an error, not a fallback
        shared = subprocess_env(FLEETGATE_NATS_URL=f"nats://agent:pw-agent@{base}")
        again = await fleet.run_async("agent", "run", "-c", str(config), env=shared)
        assert again.returncode == 2, again.stderr
        assert f"logs in to NATS as its own user agent-{host_id}" in again.stderr
        assert "Traceback" not in again.stderr
    assert fleet.returncodes == [0, 0]

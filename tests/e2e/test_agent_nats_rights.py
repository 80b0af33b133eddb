"""``fleetgate auth run`` with ``nats_callout`` as a process, against nats-server running
deploy/nats/nats-server.conf: agents log in as themselves, others are refused."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from bus import Bus, joins
from bus.joins import JoinedAgent
from bus.schemas import utcnow
from bus.server import NatsServer
from dbservice.auth.natsrights import nats_credentials_for
from sandbox.ports import free_port
from tests.e2e.test_access_process import fleetgate, wait_listening
from tests.kits.common import CALLOUT_SEED, stopped_log, subprocess_env
from tests.kits.join import callout_seed_file, nats_login, secured_nats

HOST = "7c1d9e0a-2222-4000-8000-000000000001"


@pytest.fixture
def secured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    yield from secured_nats(tmp_path, monkeypatch)


async def add_joined_agent(url: str, host_id: str) -> None:
    """The record join writes (only joined agents are admitted)."""
    async with await Bus.connect(url, name="admin") as bus:
        await bus.provision(joins.AGENTS)
        now = utcnow()
        agent = JoinedAgent(
            host_id=host_id, hostname="a", addr="10.0.0.1:6380", serial="1",
            expires=now + timedelta(hours=1), joined_at=now,
        )  # fmt: skip
        await joins.put_agent(bus, agent)


@pytest.mark.slow
def test_auth_run_admits_each_agent_as_itself(secured: NatsServer, tmp_path: Path) -> None:
    base = f"127.0.0.1:{secured.port}"
    admin = subprocess_env(FLEETGATE_NATS_URL=f"nats://admin:pw-admin@{base}")
    ca_dir = tmp_path / "ca"
    assert fleetgate(admin, "auth", "init", "--dir", str(ca_dir)).returncode == 0
    asyncio.run(add_joined_agent(f"nats://admin:pw-admin@{base}", HOST))
    seed = callout_seed_file(tmp_path)
    port = free_port()
    config = tmp_path / "auth.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{port}\nca_dir: {ca_dir}\nnats_callout:\n  issuer_seed_file: {seed}\n"
    )
    env = subprocess_env(FLEETGATE_NATS_URL=f"nats://auth:pw-auth@{base}")
    server = subprocess.Popen(
        [sys.executable, "-m", "fleetgate", "auth", "run", "-c", str(config)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_listening(port, server)
        creds = nats_credentials_for(HOST, CALLOUT_SEED)
        assert asyncio.run(nats_login(f"nats://{creds.user}:{creds.password}@{base}")) == "ok"
        refused = asyncio.run(nats_login(f"nats://{creds.user}:guessed@{base}"))
        assert "authorization" in refused.lower()
        assert (
            asyncio.run(nats_login(f"nats://reader:pw-reader@{base}")) == "ok"
        )  # fixed users as before
    finally:
        log = stopped_log(server)
    assert server.returncode == 0, log
    assert f"agent {HOST}: wrong password" in log

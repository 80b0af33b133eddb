"""A joined agent logs in to NATS as itself: ``auth run`` with ``nats_callout`` and
``agent run`` with a join token as processes, against nats-server running
deploy/nats/nats-server.conf. The agent gets its NATS login at join, keeps it in its
data_dir, serves a client with it, cannot write another agent's heartbeat with it, and
after ``agents rm`` that login is refused."""

from __future__ import annotations

import asyncio
import json
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.aio.client
import nats.errors
import pytest

from bus import Bus
from bus.access import Identity
from bus.errors import RegistryError
from bus.server import NatsServer
from bus.servers import DbServerHeartbeat
from dbservice.access.ca import CertificateAuthority, cert_pem, key_pem, new_key
from dbservice.agent.join import NATS_LOGIN_FILE
from dbservice.auth.admin import write_identity
from sandbox.valkeynode import ValkeyNode
from tests.e2e.test_access_process import fleetgate, free_port, wait_listening
from tests.e2e.test_agent_join_process import ROLE, agent_yaml
from tests.integration.test_nats_permissions import db
from tests.kits.agent import wait_until
from tests.kits.common import CALLOUT_SEED, SAMPLE_NATS_CONF, sample_nats_passwords, subprocess_env
from tests.kits.listener import APP_PASSWORD, add_acl_users, client
from tests.kits.proxy import serve_single_node

pytestmark = pytest.mark.timeout(180)
OTHER = "0b6c2b7e-0000-4000-8000-00000000000f"


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyNode]:
    yield from serve_single_node(tmp_path_factory.mktemp("valkey"), setup=add_acl_users)


@pytest.fixture
def secured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    sample_nats_passwords(monkeypatch)
    server = NatsServer(tmp_path / "nats", config_file=SAMPLE_NATS_CONF).start()
    try:
        yield server
    finally:
        server.stop()


async def login(url: str) -> str:
    """ "ok", or why the server refused."""
    nc = nats.aio.client.Client()
    try:
        await nc.connect(url, allow_reconnect=False, max_reconnect_attempts=0)
    except Exception as exc:
        return str(exc) or type(exc).__name__
    finally:
        await nc.close()
    return "ok"


@pytest.mark.slow
async def test_a_joined_agent_logs_in_to_nats_as_itself_until_removed(
    secured: NatsServer, tmp_path: Path, valkey: ValkeyNode
) -> None:
    base = f"127.0.0.1:{secured.port}"
    home = str(tmp_path / "h")
    admin = subprocess_env(FLEETGATE_NATS_URL=f"nats://admin:pw-admin@{base}", FLEETGATE_HOME=home)
    ca_dir = tmp_path / "ca"
    init = fleetgate(admin, "auth", "init", "--dir", str(ca_dir))
    assert init.returncode == 0, init.stderr
    match = re.search(r"SHA256:[0-9a-f]{64}", init.stdout)
    assert match is not None, init.stdout
    (tmp_path / "role.yaml").write_text(ROLE)
    assert fleetgate(admin, "roles", "create", "-f", str(tmp_path / "role.yaml")).returncode == 0
    added = fleetgate(admin, "tokens", "add", "--type", "agent")
    assert added.returncode == 0, added.stderr
    token = added.stdout.splitlines()[0]
    seed = tmp_path / "nats-callout.seed"
    seed.write_bytes(CALLOUT_SEED + b"\n")
    seed.chmod(0o600)
    port = free_port()
    auth_config = tmp_path / "auth.yaml"
    auth_config.write_text(
        f"listen: 127.0.0.1:{port}\nca_dir: {ca_dir}\njoin: {{cert_ttl: 1h}}\n"
        f"nats_callout:\n  issuer_seed_file: {seed}\n"
    )
    procs: list[subprocess.Popen[str]] = []

    def start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleetgate", *args],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(proc)
        return proc

    # the agent is given the servers only: no NATS user of its own in any setting
    bare = subprocess_env(FLEETGATE_NATS_URL=f"nats://{base}", FLEETGATE_HOME=home)
    config = agent_yaml(tmp_path, "agent-1", f"127.0.0.1:{port}", match.group(), token, valkey.port)
    data_dir = tmp_path / "agent-1"
    try:
        server = start(subprocess_env(FLEETGATE_NATS_URL=f"nats://auth:pw-auth@{base}"),
                       "auth", "run", "-c", str(auth_config))  # fmt: skip
        await asyncio.to_thread(wait_listening, port, server)
        agent = start(bare, "agent", "run", "-c", str(config))
        agent_port = int(json.loads(config.read_text())["db_service"]["listen_addr"].split(":")[1])
        await asyncio.to_thread(wait_listening, agent_port, agent, 60)

        [joined] = json.loads(fleetgate(admin, "agents", "ls", "--format", "json").stdout)
        host_id = joined["host_id"]
        kept = data_dir / NATS_LOGIN_FILE
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        creds = json.loads(kept.read_text())
        assert creds["user"] == f"agent-{host_id}"
        own = f"nats://{creds['user']}:{creds['password']}@{base}"

        # it serves a client and heartbeats as itself
        ca = CertificateAuthority.load(ca_dir)
        key = new_key()
        cert = ca.issue_client(key.public_key(), Identity(user="alice", roles=("dev",)), 600)
        alice = tmp_path / "alice"
        write_identity(alice, key_pem(key), cert_pem(cert), ca.pem)
        r = client(agent_port, alice, "dev-cache", "app", username="app",
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
        removed = fleetgate(admin, "agents", "rm", host_id)
        assert removed.returncode == 0, removed.stderr
        assert "authorization" in (await login(own)).lower()
        agent.terminate()
        await asyncio.to_thread(agent.wait, 15)

        # a shared NATS user configured besides the joined login: an error, not a fallback
        shared = subprocess_env(FLEETGATE_NATS_URL=f"nats://agent:pw-agent@{base}")
        again = await asyncio.to_thread(fleetgate, shared, "agent", "run", "-c", str(config))
        assert again.returncode == 2, again.stderr
        assert f"logs in to NATS as its own user agent-{host_id}" in again.stderr
        assert "Traceback" not in again.stderr
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(15)
            finally:
                assert proc.stderr is not None
                proc.stderr.close()
    assert [p.returncode for p in procs] == [0, 0]

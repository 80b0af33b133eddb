"""The real commands as processes: ``auth run``, ``tokens add``, an ``agent run`` that
joins with the token, a client through it, ``agents ls`` and ``tokens ls``; a second
agent with the same token is refused at start, saying why."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus.access import Identity
from bus.server import NatsServer
from dbservice.access.ca import CertificateAuthority, cert_pem, key_pem, new_key
from dbservice.auth.admin import write_identity
from sandbox.valkeynode import ValkeyNode
from tests.e2e.test_access_process import fleetgate, free_port, wait_listening
from tests.kits.common import subprocess_env
from tests.kits.listener import APP_PASSWORD, add_acl_users, client
from tests.kits.proxy import serve_single_node

pytestmark = pytest.mark.timeout(120)
ROLE = "kind: role\nname: dev\nallow: {db_labels: {env: dev}, db_users: [app]}\n"


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyNode]:
    yield from serve_single_node(tmp_path_factory.mktemp("valkey"), setup=add_acl_users)


def agent_yaml(tmp: Path, name: str, auth: str, fingerprint: str, token: str, db: int) -> Path:
    (tmp / f"{name}-token").write_text(token + "\n")
    port = free_port()
    config = {
        "db_service": {
            "hostname": name,
            "data_dir": str(tmp / name),
            "listen_addr": f"127.0.0.1:{port}",
            "listener": {},
            "join": {
                "auth": auth,
                "token_file": str(tmp / f"{name}-token"),
                "ca_fingerprint": fingerprint,
            },
            "databases": [{"name": "dev-cache", "uri": f"127.0.0.1:{db}",
                           "static_labels": {"env": "dev"}, "tls": {"mode": "disabled"}}],
        }
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.slow
async def test_an_agent_process_joins_with_a_token_from_the_cli(
    nats_server: NatsServer, tmp_path: Path, valkey: ValkeyNode
) -> None:
    env = subprocess_env(FLEETGATE_NATS_URL=nats_server.url, FLEETGATE_HOME=str(tmp_path / "h"))
    ca_dir = tmp_path / "ca"
    init = fleetgate(env, "auth", "init", "--dir", str(ca_dir))
    assert init.returncode == 0, init.stderr
    match = re.search(r"SHA256:[0-9a-f]{64}", init.stdout)
    assert match is not None, init.stdout
    (tmp_path / "role.yaml").write_text(ROLE)
    assert fleetgate(env, "roles", "create", "-f", str(tmp_path / "role.yaml")).returncode == 0
    added = fleetgate(env, "tokens", "add", "--type", "agent", "--labels", "team=pay")
    assert added.returncode == 0, added.stderr
    token = added.stdout.splitlines()[0]
    port = free_port()
    auth_config = tmp_path / "auth.yaml"
    auth_config.write_text(f"listen: 127.0.0.1:{port}\nca_dir: {ca_dir}\njoin: {{cert_ttl: 1h}}\n")
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleetgate", *args],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(proc)
        return proc

    try:
        server = start("auth", "run", "-c", str(auth_config))
        await asyncio.to_thread(wait_listening, port, server)
        auth = f"127.0.0.1:{port}"
        config = agent_yaml(tmp_path, "agent-1", auth, match.group(), token, valkey.port)
        agent = start("agent", "run", "-c", str(config))
        agent_port = json.loads(config.read_text())["db_service"]["listen_addr"].split(":")[1]
        await asyncio.to_thread(wait_listening, int(agent_port), agent, 60)
        # a client verifies the agent against the fleet CA, host name checked
        ca = CertificateAuthority.load(ca_dir)
        key = new_key()
        cert = ca.issue_client(key.public_key(), Identity(user="alice", roles=("dev",)), 600)
        alice = tmp_path / "alice"
        write_identity(alice, key_pem(key), cert_pem(cert), ca.pem)
        r = client(int(agent_port), alice, "dev-cache", "app", username="app",
                   password=APP_PASSWORD, ssl_check_hostname=True)  # fmt: skip
        async with r:
            assert await r.ping()
        listed = fleetgate(env, "agents", "ls", "--format", "json")
        [joined] = json.loads(listed.stdout)
        assert joined["hostname"] == "agent-1" and joined["labels"] == {"team": "pay"}
        tokens = fleetgate(env, "tokens", "ls", "--format", "json")
        assert [t["state"] for t in json.loads(tokens.stdout)] == ["spent"]
        # the same token again: the second agent stops at start, saying why
        second = agent_yaml(tmp_path, "agent-2", auth, match.group(), token, valkey.port)
        refused = await asyncio.to_thread(fleetgate, env, "agent", "run", "-c", str(second))
        assert refused.returncode == 2, refused.stderr
        assert "already used (by agent " in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(15)
            finally:
                assert proc.stderr is not None
                proc.stderr.close()
    assert [p.returncode for p in procs] == [0, 0]

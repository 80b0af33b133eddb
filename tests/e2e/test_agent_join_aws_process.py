"""The real commands as processes, with moto's STS: ``auth run`` with ``aws:`` settings,
``tokens add --method aws``, an ``agent run`` with moto credentials of an assumed role
that joins with ``method: aws`` and serves a client; an agent with another role is
refused at start, saying why; ``tokens rm`` of the rule: the agent cannot renew, and its
session ends at its certificate's expiry."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bus.access import Identity
from bus.server import NatsServer
from dbservice.access.ca import CertificateAuthority, cert_pem, key_pem, new_key
from dbservice.auth.admin import write_identity
from sandbox.aws import MotoServer
from sandbox.valkeynode import ValkeyNode
from tests.e2e.test_access_process import fleetgate, free_port, wait_listening
from tests.kits.common import boto, subprocess_env
from tests.kits.listener import APP_PASSWORD, RawSession, add_acl_users
from tests.kits.proxy import serve_single_node

pytestmark = pytest.mark.timeout(180)
ACC = "123456789012"
ROLE = "kind: role\nname: dev\nallow: {db_labels: {env: dev}, db_users: [app]}\n"


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyNode]:
    yield from serve_single_node(tmp_path_factory.mktemp("valkey"), setup=add_acl_users)


def assumed(role: str, session: str) -> dict[str, str]:
    sts: Any = boto("sts")
    creds = sts.assume_role(RoleArn=f"arn:aws:iam::{ACC}:role/{role}", RoleSessionName=session)
    c = creds["Credentials"]
    return {
        "AWS_ACCESS_KEY_ID": c["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": c["SecretAccessKey"],
        "AWS_SESSION_TOKEN": c["SessionToken"],
    }


def agent_yaml(tmp: Path, name: str, auth: str, fingerprint: str, db: int) -> Path:
    config = {
        "db_service": {
            "hostname": name,
            "data_dir": str(tmp / name),
            "listen_addr": f"127.0.0.1:{free_port()}",
            "listener": {},
            "join": {"auth": auth, "method": "aws", "ca_fingerprint": fingerprint},
            "databases": [{"name": "dev-cache", "uri": f"127.0.0.1:{db}",
                           "static_labels": {"env": "dev"}, "tls": {"mode": "disabled"}}],
        }
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.slow
async def test_an_agent_process_joins_with_its_aws_identity_until_its_rule_is_removed(
    nats_server: NatsServer, tmp_path: Path, valkey: ValkeyNode, aws: MotoServer
) -> None:
    env = subprocess_env(FLEETGATE_NATS_URL=nats_server.url, FLEETGATE_HOME=str(tmp_path / "h"))
    ca_dir = tmp_path / "ca"
    init = fleetgate(env, "auth", "init", "--dir", str(ca_dir))
    assert init.returncode == 0, init.stderr
    match = re.search(r"SHA256:[0-9a-f]{64}", init.stdout)
    assert match is not None, init.stdout
    (tmp_path / "role.yaml").write_text(ROLE)
    assert fleetgate(env, "roles", "create", "-f", str(tmp_path / "role.yaml")).returncode == 0
    allow = f"account={ACC},arn=arn:aws:sts::{ACC}:assumed-role/fleetgate-agent/*"
    added = fleetgate(
        env, "tokens", "add", "--type", "agent", "--method", "aws", "--allow", allow,
        "--labels", "team=pay",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    rule_id = added.stdout.splitlines()[0]
    port = free_port()
    auth_config = tmp_path / "auth.yaml"
    auth_config.write_text(
        f"listen: 127.0.0.1:{port}\nca_dir: {ca_dir}\njoin: {{cert_ttl: 20s}}\n"
        f"aws: {{server_id: fleetgate-e2e, sts_endpoints: ['{aws.url}']}}\n"
    )
    procs: list[subprocess.Popen[str]] = []

    def start(name: str, *args: str, **extra: str) -> subprocess.Popen[str]:
        log = (tmp_path / f"{name}.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleetgate", *args],
            env={**env, **extra}, stdout=subprocess.DEVNULL, stderr=log, text=True,
        )  # fmt: skip
        log.close()
        procs.append(proc)
        return proc

    try:
        server = start("auth", "auth", "run", "-c", str(auth_config))
        await asyncio.to_thread(wait_listening, port, server)
        auth = f"127.0.0.1:{port}"
        config = agent_yaml(tmp_path, "agent-1", auth, match.group(), valkey.port)
        agent = start("agent-1", "agent", "run", "-c", str(config),
                      **assumed("fleetgate-agent", "i-0abc"))  # fmt: skip
        agent_port = int(json.loads(config.read_text())["db_service"]["listen_addr"].split(":")[1])
        await asyncio.to_thread(wait_listening, agent_port, agent, 60)
        ca = CertificateAuthority.load(ca_dir)
        key = new_key()
        cert = ca.issue_client(key.public_key(), Identity(user="alice", roles=("dev",)), 600)
        alice = tmp_path / "alice"
        write_identity(alice, key_pem(key), cert_pem(cert), ca.pem)
        session = await RawSession.open(agent_port, alice, ca.pem, "dev-cache", "app")
        assert await session.call("AUTH", "app", APP_PASSWORD) == b"+OK"
        assert await session.call("PING") == b"+PONG"
        listed = fleetgate(env, "agents", "ls", "--format", "json")
        [joined] = json.loads(listed.stdout)
        assert (joined["method"], joined["token_id"]) == ("aws", rule_id)
        assert joined["labels"] == {"team": "pay"}
        # another role matches no rule: that agent stops at start, saying why
        second = agent_yaml(tmp_path, "agent-2", auth, match.group(), valkey.port)
        refused = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "fleetgate", "agent", "run", "-c", str(second)],
            env={**env, **assumed("web-server", "i-0def")}, capture_output=True, text=True,
            timeout=90, check=False,
        )  # fmt: skip
        assert refused.returncode == 2, refused.stderr
        assert (
            "assumed-role/web-server/i-0def (account 123456789012) matches no agent join rule"
            in (refused.stderr)
        )
        assert "Traceback" not in refused.stderr
        # the rule removed: the agent cannot renew, and its session ends at the expiry
        removed = fleetgate(env, "tokens", "rm", rule_id)
        assert removed.returncode == 0 and f"removed AWS join rule {rule_id}" in removed.stdout
        async with asyncio.timeout(40):
            assert await session.reader.read() == b""
        session.close()
        log = (tmp_path / "agent-1.log").read_text()
        assert f"the AWS join rule {rule_id}" in log and "was removed" in log
        assert "ending the 1 open client sessions" in log
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(15)
    assert [p.returncode for p in procs] == [0, 0]

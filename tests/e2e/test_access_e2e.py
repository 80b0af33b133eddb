"""The whole access path with every part real and every process separate: alice logs in
to the auth service, two agents (processes) serve one database, `fleetgate db connect`
tunnels redis-py to them, one agent is killed and the tunnel fails over, and the
sessions are found with `fleetgate audit search`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aredis
import yaml

from bus import Bus
from bus.server import NatsServer
from sandbox.ports import free_port
from sandbox.valkeynode import ValkeyNode
from tests.kits.agent import agent_config, wait_until
from tests.kits.common import subprocess_env
from tests.kits.connect import Tunnel, World, world
from tests.kits.listener import APP_PASSWORD, add_acl_users, static_db
from tests.kits.proxy import start_single_node

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def valkey(tmp_path: Path) -> AsyncIterator[ValkeyNode]:
    node = await start_single_node(tmp_path / "valkey")
    await add_acl_users(node)
    try:
        yield node
    finally:
        await node.stop()


@pytest.fixture
def agents() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.terminate()
        for proc in started:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def start_agent(
    w: World, name: str, valkey: ValkeyNode, agents: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    tls = w.tmp / "agent-tls"
    config = agent_config(
        w.tmp,
        name,
        listen_addr=f"127.0.0.1:{free_port()}",
        listener={"cert_file": str(tls / "cert.pem"), "key_file": str(tls / "key.pem")},
        databases=[static_db("dev-cache", valkey.port, env="dev")],
    )
    path = w.tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    with (w.tmp / f"{name}.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleetgate", "agent", "run", "-c", str(path)],
            env=subprocess_env(FLEETGATE_NATS_URL=w.nats_url),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    agents.append(proc)
    return proc


async def set_and_get(port: int, key: str) -> bytes | None:
    client = aredis.Redis(
        host="127.0.0.1", port=port, username="app", password=APP_PASSWORD, socket_timeout=10
    )
    try:
        await client.set(key, f"value of {key}")
        value: bytes | None = await client.get(key)
        return value
    finally:
        await client.aclose()


async def test_login_two_agents_connect_failover_and_audit(
    bus: Bus,
    tmp_path: Path,
    nats_server: NatsServer,
    valkey: ValkeyNode,
    agents: list[subprocess.Popen[bytes]],
) -> None:
    async with world(bus, tmp_path, nats_server.url) as w:
        await w.login()
        signed = await w.fleetgate(
            "auth", "sign", "--host", "127.0.0.1", "--ttl", "1h",
            "--out", str(tmp_path / "agent-tls"), "--ca-dir", str(tmp_path / "ca"),
        )  # fmt: skip
        assert signed.returncode == 0, signed.stderr
        first = start_agent(w, "agent-a", valkey, agents)
        start_agent(w, "agent-b", valkey, agents)

        async def both_healthy() -> bool:
            servers = await bus.list_db_servers("dev-cache")
            return len(servers) == 2 and all(s.target_health.status == "healthy" for s in servers)

        await wait_until(both_healthy, 30, "two healthy agents serving dev-cache")

        listed = await w.fleetgate("db", "ls", "--format", "json")
        assert listed.returncode == 0, listed.stderr
        (entry,) = json.loads(listed.stdout)
        assert entry["name"] == "dev-cache"

        async def sessions_audited(count: int) -> bool:
            found = await w.fleetgate(
                "audit", "search", "--user", "alice", "--db", "dev-cache",
                "--type", "db.session.start", "--format", "json",
            )  # fmt: skip
            assert found.returncode == 0, found.stderr
            events = [json.loads(line) for line in found.stdout.splitlines()]  # JSON lines
            return sum(1 for e in events if e["success"]) >= count

        tunnel = await Tunnel.start(w, "dev-cache", "app")
        try:
            for n in range(4):
                assert (
                    await set_and_get(tunnel.port, f"before-{n}") == f"value of before-{n}".encode()
                )
            # A SIGKILL loses what an agent has not published yet (by design, up to its
            # batching delay): the crash comes once the first sessions are on record.
            await wait_until(lambda: sessions_audited(4), 20, "4 successful session starts")
            first.kill()  # as a crash: its heartbeat stays until its TTL runs out
            first.wait(10)
            # Every new connection still works: a dead agent is skipped for the next one.
            # Agents of one health tier are tried in random order, so over 12 connections
            # the dead one comes first at least once (all but 1 in 4,096 runs).
            for n in range(12):
                assert (
                    await set_and_get(tunnel.port, f"after-{n}") == f"value of after-{n}".encode()
                )
        finally:
            assert await tunnel.stop() == 0
        assert "agent agent-a at" in tunnel.stderr and "connection refused" in tunnel.stderr

        await wait_until(lambda: sessions_audited(16), 20, "16 successful session starts")
        queries = await w.fleetgate(
            "audit", "search", "--user", "alice", "--type", "db.session.query", "--format", "json"
        )
        events = [json.loads(line) for line in queries.stdout.splitlines()]
        logins = [e for e in events if e.get("command") in ("AUTH", "HELLO")]
        assert logins and all("******" in e["args"] for e in logins), queries.stdout[:2000]
        assert all(APP_PASSWORD not in json.dumps(e) for e in logins)

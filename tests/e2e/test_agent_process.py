"""``fleetgate agent run`` as a real process: clean stop, restart with the same host_id,
a killed agent's heartbeats expiring; and ``db servers`` / ``db ls`` reading them."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from bus import Bus
from bus.server import NatsServer
from sandbox.valkeynode import ValkeyNode
from tests.kits.agent import agent_config, db, health, wait_until
from tests.kits.common import subprocess_env

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def valkey(tmp_path: Path) -> AsyncIterator[ValkeyNode]:
    node = ValkeyNode(index=0, directory=tmp_path / "valkey", client_port=0)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


def start_agent(config_file: Path, url: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fleetgate", "agent", "run", "-c", str(config_file)],
            env=subprocess_env(FLEETGATE_NATS_URL=url),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "fleetgate", *args, "--nats", url],
        capture_output=True,
        text=True,
        timeout=30,
    )


async def exited(proc: subprocess.Popen[bytes], limit: float) -> int:
    await wait_until(lambda: proc.poll() is not None, limit, "agent exit")
    return proc.wait()


async def test_stop_restart_and_kill(
    bus: Bus, nats_server: NatsServer, valkey: ValkeyNode, tmp_path: Path
) -> None:
    url = nats_server.url
    await bus.put_resource(db("orders", f"127.0.0.1:{valkey.port}", env="prod", team="shop"))
    config = agent_config(
        tmp_path,
        "proc",
        resources=[{"labels": {"env": "prod"}}],
        databases=[{"name": "cache-local", "uri": "127.0.0.1:1", "tls": {"mode": "disabled"}}],
        advertise_addr="10.0.1.5:6390",
        heartbeat={"interval": "1s", "ttl": "2s"},
    )
    config_file = tmp_path / "agent.yaml"
    config_file.write_text(yaml.safe_dump(config))
    log = tmp_path / "agent.log"

    async def healthy_orders() -> bool:
        beat = (await health(bus)).get(("proc", "orders"))
        return beat is not None and beat.target_health.status == "healthy"

    proc = start_agent(config_file, url, log)
    try:
        await wait_until(healthy_orders, 20, "orders served and healthy")
        beats = await health(bus)
        host_id = beats[("proc", "orders")].host_id
        assert beats[("proc", "cache-local")].target_health.status == "unhealthy"

        # What people see.
        out = await cli(url, "db", "servers", "orders", "--format", "json")
        assert out.returncode == 0, out.stderr
        (server,) = json.loads(out.stdout)
        assert server["host_id"] == host_id and server["hostname"] == "proc"
        assert server["addr"] == "10.0.1.5:6390" and server["version"]
        assert server["target_health"]["status"] == "healthy"
        assert "message" in server["target_health"]
        text = await cli(url, "db", "servers", "orders")
        assert "proc" in text.stdout and "healthy" in text.stdout
        table = (await cli(url, "db", "ls")).stdout.splitlines()
        assert table[0].split()[:3] == ["NAME", "DESCRIPTION", "HEALTH"]
        rows = {line.split()[0]: line for line in table[1:]}
        assert " 1/1 " in rows["orders"] and " 0/1" in rows["cache-local"]
        listed = json.loads((await cli(url, "db", "ls", "--format", "json")).stdout)
        assert {d["name"]: d["health"] for d in listed} == {
            "cache-local": {"healthy": 0, "agents": 1},
            "orders": {"healthy": 1, "agents": 1},
        }

        # A clean stop deletes the heartbeats and exits 0 within seconds.
        proc.send_signal(signal.SIGTERM)
        assert await exited(proc, 10) == 0
        assert await health(bus) == {}

        # A restart keeps the host_id; SIGINT stops it as cleanly.
        proc = start_agent(config_file, url, log)
        await wait_until(healthy_orders, 20, "served again")
        assert (await health(bus))[("proc", "orders")].host_id == host_id
        proc.send_signal(signal.SIGINT)
        assert await exited(proc, 10) == 0
        assert await health(bus) == {}

        # A killed agent cannot say goodbye: its heartbeats expire with the TTL.
        proc = start_agent(config_file, url, log)
        await wait_until(healthy_orders, 20, "served a third time")
        proc.kill()
        proc.wait()
        killed = time.monotonic()

        async def gone() -> bool:
            return await health(bus) == {}

        await wait_until(gone, 10, "heartbeats of the killed agent to expire")
        assert time.monotonic() - killed < 2 + 5  # TTL, plus the server's expiry sweep
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text()


async def test_agent_cannot_reach_nats_is_one_line(tmp_path: Path) -> None:
    config = agent_config(
        tmp_path,
        "x",
        databases=[{"name": "c", "uri": "127.0.0.1:1", "tls": {"mode": "disabled"}}],
    )
    config["nats"] = {"start_wait": "1s"}  # a service waits for NATS; not this long here
    config_file = tmp_path / "agent.yaml"
    config_file.write_text(yaml.safe_dump(config))
    began = time.monotonic()
    out = await cli("nats://127.0.0.1:1", "agent", "run", "-c", str(config_file))
    assert out.returncode == 1
    assert out.stderr.startswith("fleetgate: error: cannot reach NATS at nats://127.0.0.1:1")
    assert "Traceback" not in out.stderr
    assert time.monotonic() - began < 20


async def test_stop_while_nats_is_down_is_still_quick(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    config = agent_config(
        tmp_path,
        "lonely",
        databases=[{"name": "c", "uri": "127.0.0.1:1", "tls": {"mode": "disabled"}}],
    )
    config_file = tmp_path / "agent.yaml"
    config_file.write_text(yaml.safe_dump(config))
    proc = start_agent(config_file, nats_server.url, tmp_path / "agent.log")
    try:

        async def announced() -> bool:
            return ("lonely", "c") in await health(bus)

        await wait_until(announced, 20, "heartbeat")
        await bus.close()
        nats_server.stop()
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert await exited(proc, 10) == 0  # heartbeats are left to expire
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "expire with their TTL" in (tmp_path / "agent.log").read_text()

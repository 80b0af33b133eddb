"""``fleetgate db env`` / ``db config``: reaching an agent directly, without the tunnel.
Real parts: nats-server, the auth service on loopback HTTPS with a real login, a real
agent (listener with the route in the TLS server name), a real valkey-server, and the
printed redis-cli/valkey-cli line run as printed."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bus import Bus
from bus.server import NatsServer
from client.direct import find_tls_cli
from sandbox.valkeynode import ValkeyNode
from tests.kits.agent import running_agent
from tests.kits.connect import World, resource, world
from tests.kits.listener import APP_PASSWORD, Fleet, static_db

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def w(bus: Bus, tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[World]:
    await bus.put_resource(resource("dev-idle", env="dev"))
    async with world(bus, tmp_path, nats_server.url) as env:
        await env.login()
        yield env


@pytest.fixture
async def agent_port(w: World, valkey: ValkeyNode) -> AsyncIterator[int]:
    """A real agent serving dev-cache (env=dev) and prod-cache (env=prod), listed by the
    auth service."""
    fleet = Fleet(w.bus, w.ca, w.tmp, w.nats_url)
    config = fleet.agent(
        "agent-1",
        [
            static_db("dev-cache", valkey.port, env="dev"),
            static_db("prod-cache", valkey.port, env="prod"),
        ],
    )
    async with running_agent(config, w.nats_url) as running:
        assert running.listener is not None
        for _ in range(100):  # until its heartbeat reaches the auth service
            listed = await w.fleetgate("db", "config", "dev-cache", "--db-user", "app")
            if listed.returncode == 0:
                break
            await asyncio.sleep(0.2)
        yield running.listener.port


async def test_config_and_env_name_what_a_tls_client_needs(w: World, agent_port: int) -> None:
    out = await w.fleetgate("db", "config", "dev-cache", "--db-user", "app", "--format", "json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    identity = w.home / "identity"
    cli = doc.pop("cli")
    redis_py = doc.pop("redis_py")
    assert doc.pop("agent") and cli and redis_py
    assert doc == {
        "database": "dev-cache",
        "db_user": "app",
        "host": "127.0.0.1",
        "port": agent_port,
        "server_name": "app.dev-cache.fleetgate",
        "cert_file": str(identity / "cert.pem"),
        "key_file": str(identity / "key.pem"),
        "ca_file": str(identity / "ca.pem"),
    }
    text = await w.fleetgate("db", "config", "dev-cache", "--db-user", "app")
    assert text.returncode == 0
    assert f"cli:          {cli}\n" in text.stdout
    assert f"redis-py:     {redis_py}\n" in text.stdout
    assert "server name:  app.dev-cache.fleetgate\n" in text.stdout

    env = await w.fleetgate("db", "env", "dev-cache", "--db-user", "app")
    assert env.returncode == 0, env.stderr
    script = env.stdout + '\necho "$FLEETGATE_DB_TLS_SERVER_NAME $FLEETGATE_DB_PORT"'
    shown = await asyncio.to_thread(
        subprocess.run, ["bash", "-c", script], capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert shown.stdout == f"app.dev-cache.fleetgate {agent_port}\n"
    as_json = await w.fleetgate("db", "env", "dev-cache", "--db-user", "app", "--format", "json")
    assert json.loads(as_json.stdout)["FLEETGATE_DB_CA"] == str(identity / "ca.pem")


async def test_the_printed_cli_line_works_as_printed(w: World, agent_port: int) -> None:
    if find_tls_cli() is None:
        pytest.skip("no valkey-cli or redis-cli with TLS on PATH (apt-get install redis-tools)")
    out = await w.fleetgate("db", "config", "dev-cache", "--db-user", "app", "--format", "json")
    line = shlex.split(json.loads(out.stdout)["cli"])
    assert line[-2:] == ["--user", "app"]
    for args, expected in ((["SET", "direct", "yes"], "OK\n"), (["GET", "direct"], "yes\n")):
        ran = await asyncio.to_thread(
            subprocess.run, [*line, *args], capture_output=True, text=True, timeout=20,
            env=os.environ | {"REDISCLI_AUTH": APP_PASSWORD},
        )  # fmt: skip
        assert (ran.returncode, ran.stdout) == (0, expected), ran.stderr


async def test_the_printed_redis_py_line_works_as_printed(w: World, agent_port: int) -> None:
    """redis-py sends the host as the TLS server name (checked against the agent's
    certificate) and names the route in its user name."""
    out = await w.fleetgate("db", "config", "dev-cache", "--db-user", "app", "--format", "json")
    line = json.loads(out.stdout)["redis_py"]
    assert "username='app@dev-cache'" in line and "host='127.0.0.1'" in line
    script = (
        f"{line}\n"
        "print(r.ping(), r.set('direct-py', 'yes'), r.get('direct-py'), r.acl_whoami())\n"
        "r.close()\n"
    )
    ran = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", script], capture_output=True, text=True,
        timeout=30, env=os.environ | {"REDISCLI_AUTH": APP_PASSWORD},
    )  # fmt: skip
    assert (ran.returncode, ran.stdout) == (0, "True True b'yes' app\n"), ran.stderr
    # the wrong password is the server's to refuse, as for any login of app
    ran = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", f"{line}\nr.ping()\n"], capture_output=True,
        text=True, timeout=30, env={k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"},
    )  # fmt: skip
    assert ran.returncode == 1 and "AuthenticationError: invalid username-password" in ran.stderr


async def test_clear_errors(w: World, agent_port: int) -> None:
    nobody = await w.fleetgate("db", "env", "dev-cache", "--db-user", "app", home=w.tmp / "x")
    assert (nobody.returncode, nobody.stderr) == (
        1,
        "fleetgate: error: not logged in: fleetgate login --auth HOST:PORT --user NAME\n",
    )
    hidden = await w.fleetgate("db", "env", "prod-cache", "--db-user", "app")
    assert hidden.returncode == 1
    assert hidden.stderr == (
        "fleetgate: error: no database 'prod-cache' that you may reach (see fleetgate db ls)\n"
    )
    admin = await w.fleetgate("db", "config", "dev-cache", "--db-user", "admin")
    assert admin.returncode == 1
    assert "admin" in admin.stderr and admin.stderr.startswith("fleetgate: error: ")
    idle = await w.fleetgate("db", "config", "dev-idle", "--db-user", "app")
    assert idle.returncode == 1
    assert idle.stderr.startswith("fleetgate: error: no agent serves dev-idle right now")
    odd = await w.fleetgate("db", "env", "dev-cache", "--db-user", "my_user")
    assert odd.returncode == 1
    assert "cannot be named in a TLS server name" in odd.stderr
    assert "use fleetgate db connect" in odd.stderr
    long = await w.fleetgate("db", "env", "x" * 64, "--db-user", "app")
    assert long.returncode == 1 and "at most 63 each" in long.stderr

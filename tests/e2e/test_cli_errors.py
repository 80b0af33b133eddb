"""Errors a person can act on: what the ``fleetgate`` command prints when something
around it fails (a closed pipe, NATS down, a stale login, a refused db user), each run
as a person runs it, against real parts."""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bus import Bus
from bus.server import NatsServer
from client.people import RegistryDown, fetch_databases, fetch_servers, require_identity
from dbservice.engine.cluster.merge import node_id
from sandbox.ports import free_port
from sandbox.valkeynode import ValkeyNode
from tests.kits.common import subprocess_env
from tests.kits.connect import StandInAgent, Tunnel, World, resource, world
from tests.kits.proxy import start_single_node

REPR = re.compile(r"object at 0x|<[a-zA-Z_.]+ ")


def one_line(err: str) -> str:
    """The whole of standard error: one ``fleetgate: error:`` line, no object repr."""
    assert err.startswith("fleetgate: error: ") and err.count("\n") == 1, err
    assert not REPR.search(err), err
    return err


DATABASES = {"dev-cache": resource("dev-cache", env="dev")}


@pytest.fixture
async def w(bus: Bus, tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[World]:
    await bus.put_resource(DATABASES["dev-cache"])
    async with world(bus, tmp_path, nats_server.url) as env:
        await env.login()
        yield env


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyNode]:
    node = asyncio.run(asyncio.wait_for(start_single_node(tmp_path_factory.mktemp("v")), 20))
    try:
        yield node
    finally:
        asyncio.run(node.stop())


@pytest.fixture
async def agent(w: World, valkey: ValkeyNode) -> AsyncIterator[StandInAgent]:
    a = StandInAgent(w.bus, w.ca, w.tmp / "agent-1", DATABASES, valkey.port, shards=("s1",))
    await a.start()
    await a.announce("dev-cache")
    try:
        yield a
    finally:
        await a.stop()


def closed_pipe(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run ``fleetgate ARGS`` with its standard output a pipe nobody reads: the read end
    is closed before the command writes, as ``| head`` does once it has enough."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetgate", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    code = proc.wait(60)
    return subprocess.CompletedProcess(proc.args, code, "", err)


async def test_output_into_a_closed_pipe_ends_quietly(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    for i in range(50):
        await bus.put_resource(resource(f"db-{i:02d}", env="dev"))
    env = subprocess_env(FLEETGATE_HOME=str(tmp_path / "home"))
    for args in (
        ("db", "ls", "--nats", nats_server.url, "--format", "json"),
        ("db", "ls", "--nats", nats_server.url),
    ):
        done = closed_pipe(*args, env=env)
        assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
        assert done.stderr == "", done.stderr
        assert done.returncode == 141, (args, done.returncode)


async def test_a_stale_login_names_the_address_and_how_to_log_in_again(w: World) -> None:
    """The auth service moved (here: stopped) after the login."""
    url = f"https://{w.auth}"
    await w.service.close()
    for args in (("db", "ls"), ("db", "connect", "dev-cache", "--db-user", "app", "--no-exec")):
        done = await w.fleetgate(*args)
        assert done.returncode != 0
        err = one_line(done.stderr)
        assert f"the auth service is unreachable at {url} (connection refused)" in err, err
        assert "fleetgate login --auth HOST:PORT --user alice" in err, err
    moved = f"127.0.0.1:{free_port()}"
    ca_file = str(w.tmp / "ca" / "ca.crt")
    done = await w.fleetgate(
        "login", "--auth", moved, "--user", "alice", "--ca-file", ca_file, "--password-stdin",
        stdin="x\n",
    )  # fmt: skip
    assert done.returncode != 0
    err = one_line(done.stderr)
    assert f"cannot reach the auth service at https://{moved}: connection refused" in err, err


async def test_a_db_user_the_roles_do_not_allow_is_refused_before_anything_starts(
    w: World, agent: StandInAgent
) -> None:
    for extra in ((), ("--no-exec",)):
        done = await w.fleetgate(
            "db", "connect", "dev-cache", "--db-user", "admin", *extra, stdin="PING\n"
        )
        assert done.returncode == 1, done
        assert done.stdout == ""  # no client ran, nothing listened
        err = one_line(done.stderr)
        assert err == "fleetgate: error: none of your roles allows dev-cache as db user 'admin'\n"
    assert agent.routes == []


async def test_errors_while_the_client_runs_exit_non_zero_without_log_lines_in_it(
    w: World, agent: StandInAgent
) -> None:
    """The auth service lists the agent, which then refuses every route: valkey-cli
    prints the refusal and exits 0; db connect exits 1 and shows its log lines after
    the client, without timestamps."""
    agent.databases = {}
    done = await w.fleetgate("db", "connect", "dev-cache", "--db-user", "app", stdin="PING\n")
    assert done.returncode == 1, done
    assert "this agent does not serve dev-cache" in done.stdout
    assert done.stderr == (
        "fleetgate: warning: dev-cache as app refused: this agent does not serve dev-cache\n"
    )


async def test_node_names_are_checked_before_the_client_starts(
    w: World, agent: StandInAgent
) -> None:
    done = await w.fleetgate(
        "db", "connect", "dev-cache", "--db-user", "app", "--node", "nope", stdin="PING\n"
    )
    assert done.returncode == 1, done
    assert done.stdout == ""
    err = one_line(done.stderr)
    assert "dev-cache has no shard or node 'nope'; shards: s1" in err
    ok = await w.fleetgate(
        "db", "connect", "dev-cache", "--db-user", "app", "--node", "s1", stdin="PING\n"
    )
    assert (ok.returncode, ok.stdout) == (0, "PONG\n"), ok.stderr
    # The id a plain db connect shows for the cluster as one node (CLUSTER SHARDS, NODES,
    # SLOTS through it) names the whole database.
    for seen in (node_id("dev-cache"), node_id("dev-cache")[:8]):
        done = await w.fleetgate(
            "db", "connect", "dev-cache", "--db-user", "app", "--node", seen, stdin="PING\n"
        )
        assert (done.returncode, done.stdout) == (0, "PONG\n"), done.stderr
        assert "connecting to the whole cluster" in done.stderr
    assert [r[2] for r in agent.routes] == ["app"] * 4  # the probe, the client; twice


async def test_no_exec_prints_a_command_that_works_as_printed(
    w: World, agent: StandInAgent
) -> None:
    tunnel = await Tunnel.start(w, "dev-cache", "app")
    try:
        assert tunnel.proc.stdout is not None
        command = tunnel.line.split("; connect with: ", 1)[1].strip()
        assert command.endswith(f" -p {tunnel.port}")
        done = await asyncio.to_thread(
            subprocess.run, [*shlex.split(command), "PING"], capture_output=True, text=True,
            env={"PATH": "/usr/bin:/bin"}, timeout=20, check=False,
        )  # fmt: skip
        assert (done.returncode, done.stdout) == (0, "PONG\n"), done.stderr
    finally:
        await tunnel.stop()


async def test_nats_down_is_a_503_and_one_line_saying_sessions_continue(
    w: World, agent: StandInAgent, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    tunnel = await Tunnel.start(w, "dev-cache", "app")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", tunnel.port)
        writer.write(b"PING\r\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"+PONG\r\n"
        nats_server.stop()
        async with asyncio.timeout(10):
            while w.bus.nc.is_connected:  # noqa: ASYNC110 - nats-py's state
                await asyncio.sleep(0.05)
        ident = require_identity(w.home)
        loop = asyncio.get_running_loop()
        for call in (fetch_databases(ident), fetch_servers(ident, "dev-cache", "app")):
            started = loop.time()
            with pytest.raises(RegistryDown):
                await asyncio.wait_for(call, 30)
            assert loop.time() - started < 5  # at once, not after a NATS timeout
        for args in (("db", "ls"), ("db", "connect", "dev-cache", "--db-user", "app")):
            done = await w.fleetgate(*args, stdin="PING\n")
            assert done.returncode != 0 and done.stdout == ""
            err = one_line(done.stderr)
            assert "the registry is unreachable" in err, err
            assert "sessions already established continue" in err, err
        # the session opened before goes on
        writer.write(b"PING\r\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"+PONG\r\n"
        writer.close()
    finally:
        await tunnel.stop()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text

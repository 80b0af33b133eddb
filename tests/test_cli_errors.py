"""Errors a person can act on: what the ``fleetgate`` command prints when something
around it fails (a closed pipe, NATS down, a stale login, a refused db user), each run
as a person runs it, against real parts."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bus import Bus
from bus.server import NatsServer
from tests.conftest import subprocess_env
from tests.connectkit import World, free_port, resource, world

REPR = re.compile(r"object at 0x|<[a-zA-Z_.]+ ")


def one_line(err: str) -> str:
    """The whole of standard error: one ``fleetgate: error:`` line, no object repr."""
    assert err.startswith("fleetgate: error: ") and err.count("\n") == 1, err
    assert not REPR.search(err), err
    return err


@pytest.fixture
async def w(bus: Bus, tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[World]:
    await bus.put_resource(resource("dev-cache", env="dev"))
    async with world(bus, tmp_path, nats_server.url) as env:
        await env.login()
        yield env


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

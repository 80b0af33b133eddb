"""Errors a person can act on: what the ``fleetgate`` command prints when something
around it fails (a closed pipe, NATS down, a stale login, a refused db user), each run
as a person runs it, against real parts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bus import Bus
from bus.server import NatsServer
from tests.conftest import subprocess_env
from tests.connectkit import resource


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

"""``fleetgate sandbox status`` and ``down`` when parts fail: NATS down, a killed
supervisor. The status tests describe a small sandbox in a state file (real nats-server,
a real listening port, the lock held here as a supervisor holds it) instead of starting
a whole one; the ``down`` test starts a real one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus.server import NatsServer
from sandbox.state import Database, Part, SandboxState, held_lock, names_dir
from tests.e2e.test_cli_errors import closed_pipe
from tests.kits.common import subprocess_env

ROOT = Path(__file__).resolve().parents[2]


def fleetgate(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetgate", *args], env=env, capture_output=True, text=True,
        timeout=timeout, check=False, cwd=ROOT,
    )  # fmt: skip


@pytest.fixture
def described(tmp_path: Path) -> Iterator[tuple[Path, NatsServer]]:
    """A sandbox directory whose state names a running nats-server, an agent and
    discovery (this process, an agent port that answers), one database; its lock held."""
    directory = tmp_path / "sandbox"
    nats = NatsServer(directory / "nats").start()
    assert nats.proc is not None
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    me = os.getpid()
    state = SandboxState(
        dir=str(directory), pid=me, state="ready", started_at=time.time(), ready_seconds=1.0,
        parts=[
            Part("nats", "process", nats.proc.pid, nats.url),
            Part("discovery", "process", me),
            Part("agent-1", "process", me, f"127.0.0.1:{port}"),
        ],
        databases=[Database("orders-dev", "orders-dev", "us-east-1", "dev", "orders",
                            "vpc-1", "e:6379", "127.0.0.1:1", "agent-1")],
        env={"FLEETGATE_NATS_URL": nats.url},
    )  # fmt: skip
    try:
        with held_lock(directory):
            state.save()
            yield directory, nats
    finally:
        listener.close()
        nats.stop()


def test_status_json_types_are_consistent(described: tuple[Path, NatsServer]) -> None:
    directory, _ = described
    done = fleetgate("sandbox", "status", "--dir", str(directory), "--format", "json",
                     env=subprocess_env())  # fmt: skip
    doc = json.loads(done.stdout)
    assert isinstance(doc["pid"], int)
    assert all(isinstance(p["pid"], int) for p in doc["parts"]), doc["parts"]


def test_status_with_nats_down_says_so_instead_of_wrong_verdicts(
    described: tuple[Path, NatsServer],
) -> None:
    directory, nats = described
    nats.stop()
    env = subprocess_env()
    done = fleetgate("sandbox", "status", "--dir", str(directory), env=env)
    assert done.returncode == 1
    assert "NATS is down, so the agents' and databases' health cannot be judged" in done.stdout
    assert "DEGRADED: 0/1" not in done.stdout and "no agent" not in done.stdout, done.stdout
    doc = json.loads(
        fleetgate("sandbox", "status", "--dir", str(directory), "--format", "json", env=env).stdout
    )
    health = {p["name"]: p["health"] for p in doc["parts"]}
    assert health["nats"].startswith("DOWN")
    assert health["agent-1"] == health["discovery"] == "UNKNOWN: NATS is down"
    assert doc["databases"][0]["agents"] == "UNKNOWN: NATS is down"
    assert doc["nats_error"] and doc["healthy"] is False
    piped = closed_pipe("sandbox", "status", "--dir", str(directory), env=env)
    assert (piped.returncode, piped.stderr) == (141, "")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.timeout(300)
def test_down_after_the_supervisor_was_killed(tmp_path: Path) -> None:
    """The children stop while NATS still answers (NATS last), so none has to be
    killed; the verdict comes once they are gone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FLEETGATE_"))}
    env["FLEETGATE_HOME"] = str(tmp_path)
    directory = tmp_path / "sandbox"
    up = fleetgate("sandbox", "up", "--detach", "--clusters", "1", "--shards", "1", env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads((directory / "sandbox.json").read_text())
        os.kill(state["pid"], signal.SIGKILL)
        started = time.monotonic()
        down = fleetgate("sandbox", "down", env=env)
        took = time.monotonic() - started
    finally:
        if (directory / "sandbox.json").exists():
            fleetgate("sandbox", "down", env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "killed" not in down.stdout, down.stdout
    assert "left processes" not in down.stderr
    notes = [line for line in down.stdout.splitlines() if line.startswith("note:")]
    assert notes and all(line.endswith("outlived the supervisor; stopped") for line in notes)
    assert down.stdout.splitlines()[-1].endswith(
        f"was not running; cleaned up: no process left, {len(state['ports'])} ports free"
    ), down.stdout
    left = [p for p in state["pids"] if _alive(p) and names_dir(p, directory)]
    assert not left, left
    assert took < 60, took


def test_down_and_env_without_a_sandbox_in_json(tmp_path: Path) -> None:
    """``down --format json`` with no sandbox says so in its object; ``env --format json``
    with none is the same one-line error as in text, with nothing on standard output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FLEETGATE_"))}
    env["FLEETGATE_HOME"] = str(tmp_path)
    down = fleetgate("sandbox", "down", "--format", "json", env=env)
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout) == {
        "dir": str(tmp_path / "sandbox"), "outcome": "no sandbox", "notes": [], "ports": 0,
    }  # fmt: skip
    shown = fleetgate("sandbox", "env", "--format", "json", env=env)
    assert shown.returncode == 2 and shown.stdout == ""
    assert shown.stderr.startswith("fleetgate: error: no sandbox running in ")

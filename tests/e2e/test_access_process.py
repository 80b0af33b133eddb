"""The real commands as processes: ``auth run`` serving, ``login`` and ``status``."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bus.server import NatsServer
from sandbox.ports import free_port
from tests.kits.common import subprocess_env

ROLE = "kind: role\nname: dev\nallow: {db_labels: {env: dev}, db_users: [app]}\n"


def fleetgate(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetgate", *args],
        input=stdin, capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip


def wait_listening(port: int, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"auth run exited: {proc.communicate()[1]}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("auth run did not listen")


def auth_with_alice(nats_server: NatsServer, tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A CA made by ``auth init`` in ``tmp_path/ca``, the role ``dev`` and the user alice
    (password "a long password"), all through the CLI: the environment for further
    ``fleetgate`` calls, and the CA directory."""
    env = subprocess_env(FLEETGATE_NATS_URL=nats_server.url, FLEETGATE_HOME=str(tmp_path / "home"))
    ca_dir = tmp_path / "ca"
    assert fleetgate(env, "auth", "init", "--dir", str(ca_dir)).returncode == 0
    (tmp_path / "role.yaml").write_text(ROLE)
    assert fleetgate(env, "roles", "create", "-f", str(tmp_path / "role.yaml")).returncode == 0
    added = fleetgate(env, "users", "add", "alice", "--roles", "dev", "--password-stdin",
                      stdin="a long password\n")  # fmt: skip
    assert added.returncode == 0, added.stderr
    return env, ca_dir


@pytest.mark.slow
def test_auth_run_login_status(nats_server: NatsServer, tmp_path: Path) -> None:
    env, ca_dir = auth_with_alice(nats_server, tmp_path)
    port = free_port()
    config = tmp_path / "auth.yaml"
    config.write_text(f"listen: 127.0.0.1:{port}\nca_dir: {ca_dir}\n")
    server = subprocess.Popen(
        [sys.executable, "-m", "fleetgate", "auth", "run", "-c", str(config)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_listening(port, server)
        auth = f"127.0.0.1:{port}"
        untrusted = fleetgate(env, "login", "--auth", auth, "--user", "alice", "--password-stdin",
                              stdin="a long password\n")  # fmt: skip
        assert untrusted.returncode == 2 and "--ca-fingerprint" in untrusted.stderr
        bad = fleetgate(env, "login", "--auth", auth, "--user", "alice", "--password-stdin",
                        "--ca-file", str(ca_dir / "ca.crt"), stdin="wrong password\n")  # fmt: skip
        assert bad.returncode == 2
        assert bad.stderr == "fleetgate: error: login failed: invalid user name or password\n"
        ca_file = str(ca_dir / "ca.crt")
        good = fleetgate(env, "login", "--auth", auth, "--user", "alice", "--password-stdin",
                         "--ca-file", ca_file, stdin="a long password\n")  # fmt: skip
        assert good.returncode == 0, good.stderr
        assert good.stdout.startswith("logged in as alice (roles: dev) until ")
        status = fleetgate(env, "status")
        assert status.returncode == 0 and "roles:     dev" in status.stdout
        assert f"https://127.0.0.1:{port}" in status.stdout
        again = fleetgate(env, "login", "--auth", auth, "--user", "alice", "--password-stdin",
                          "--ca-file", ca_file, "--format", "json",
                          stdin="a long password\n")  # fmt: skip
        assert again.returncode == 0, again.stderr
        logged = json.loads(again.stdout)
        assert logged["user"] == "alice" and logged["roles"] == ["dev"]
        assert logged["auth"] == f"https://127.0.0.1:{port}" and logged["ttl"] > 0
        st_json = fleetgate(env, "status", "--format", "json")
        assert st_json.returncode == 0, st_json.stderr
        assert json.loads(st_json.stdout) == {k: v for k, v in logged.items() if k != "ttl"} | {
            "expired": False
        }
        assert fleetgate(env, "db", "logout").returncode == 0
        assert fleetgate(env, "status").returncode == 1
    finally:
        server.terminate()
        server.wait(10)
        assert server.stderr is not None
        server.stderr.close()
    assert server.returncode == 0

"""The services work under the system-call filter their systemd units set (deploy/systemd:
``SystemCallFilter=``, ``RestrictAddressFamilies=``, ``NoNewPrivileges=``), applied as
systemd applies it (tests/kits/syscalls.py): the auth service serves a login, an agent
with two listener processes serves a ``db connect`` session, discovery polls AWS (moto),
and the agent and the auth service stop cleanly on SIGTERM. A unit whose filter took away
a call one of them needs fails here, not on the first host it is installed on."""

from __future__ import annotations

import asyncio
import ctypes.util
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml

from bus import Bus
from bus.server import NatsServer
from sandbox.aws import MotoServer
from sandbox.valkeynode import ValkeyNode
from tests.kits.agent import agent_config, wait_until
from tests.kits.common import subprocess_env
from tests.kits.connect import free_port
from tests.kits.listener import APP_PASSWORD, add_acl_users, static_db
from tests.kits.proxy import start_single_node

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
ROLE = "kind: role\nname: dev\nallow: {db_labels: {env: dev}, db_users: [app]}\n"
PASSWORD = "a long password"

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        shutil.which("systemd-analyze") is None or ctypes.util.find_library("seccomp") is None,
        reason="needs systemd-analyze and libseccomp (Debian: apt-get install systemd)",
    ),
]


def confined(unit: str, *command: str) -> list[str]:
    """``command`` run under ``unit``'s system-call filter."""
    return [sys.executable, "-m", "tests.kits.syscalls", str(UNITS / unit), "--", *command]


def fleetgate_confined(unit: str, *args: str) -> list[str]:
    return confined(unit, sys.executable, "-m", "fleetgate", *args)


@pytest.mark.parametrize(
    "code",
    [
        "import socket; socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)",
        "import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)",
        "import os; os.setpriority(os.PRIO_PROCESS, 0, 5)",  # @resources
        "import os; os.setgroups([])",  # @privileged
    ],
)
def test_the_filter_refuses_what_the_units_take_away(code: str) -> None:
    done = subprocess.run(
        confined("fleetgate-agent.service", sys.executable, "-c", code),
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().endswith("PermissionError: [Errno 1] Operation not permitted")
    allowed = "import socket; socket.socket(socket.AF_INET6).close(); print('ok')"
    done = subprocess.run(
        confined("fleetgate-agent.service", sys.executable, "-c", allowed),
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr


@pytest.fixture
async def valkey(tmp_path: Path) -> AsyncIterator[ValkeyNode]:
    node = await start_single_node(tmp_path / "valkey")
    await add_acl_users(node)
    try:
        yield node
    finally:
        await node.stop()


@pytest.fixture
def services() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(15)


def run(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetgate", *args],
        input=stdin, capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip


async def stopped(proc: subprocess.Popen[bytes], limit: float) -> int:
    proc.send_signal(signal.SIGTERM)
    await wait_until(lambda: proc.poll() is not None, limit, "a graceful stop")
    return proc.wait()


@pytest.mark.slow
async def test_services_run_under_their_units_filters(
    nats_server: NatsServer,
    bus: Bus,
    aws: MotoServer,
    valkey: ValkeyNode,
    tmp_path: Path,
    services: list[subprocess.Popen[bytes]],
) -> None:
    env = subprocess_env(FLEETGATE_NATS_URL=nats_server.url, FLEETGATE_HOME=str(tmp_path / "home"))
    ca = tmp_path / "ca"
    for args, stdin in (
        (("auth", "init", "--dir", str(ca)), ""),
        (("roles", "create", "-f", str(tmp_path / "role.yaml")), ""),
        (("users", "add", "alice", "--roles", "dev", "--password-stdin"), PASSWORD + "\n"),
        (("auth", "sign", "--host", "127.0.0.1", "--out", str(tmp_path / "tls"),
          "--ca-dir", str(ca)), ""),
    ):  # fmt: skip
        (tmp_path / "role.yaml").write_text(ROLE)
        done = await asyncio.to_thread(run, env, *args, stdin=stdin)
        assert done.returncode == 0, done.stderr

    def start(unit: str, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (tmp_path / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                fleetgate_confined(unit, *args), cwd=ROOT, env=env, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        services.append(proc)
        return proc

    auth_port = free_port()
    (tmp_path / "auth.yaml").write_text(f"listen: 127.0.0.1:{auth_port}\nca_dir: {ca}\n")
    auth = start("fleetgate-auth.service", "auth", "auth", "run", "-c", str(tmp_path / "auth.yaml"))
    tls = tmp_path / "tls"
    config = agent_config(
        tmp_path,
        "agent-a",
        listen_addr=f"127.0.0.1:{free_port()}",
        listener={
            "cert_file": str(tls / "cert.pem"), "key_file": str(tls / "key.pem"), "processes": 2
        },
        databases=[static_db("dev-cache", valkey.port, env="dev")],
    )  # fmt: skip
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config))
    agent = start(
        "fleetgate-agent.service", "agent", "agent", "run", "-c", str(tmp_path / "agent.yaml")
    )

    # discovery: one whole poll of AWS (moto), exit 0 only if every fetcher succeeded
    discovery = {
        "discovery_service": {
            "aws": [{"types": ["memorydb"], "regions": ["us-east-1"], "tags": {"*": "*"}}]
        }
    }
    (tmp_path / "discovery.yaml").write_text(yaml.safe_dump(discovery))
    polled = await asyncio.to_thread(
        subprocess.run,
        fleetgate_confined(
            "fleetgate-discovery.service", "discovery", "run", "-c",
            str(tmp_path / "discovery.yaml"), "--once",
        ),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert polled.returncode == 0, polled.stdout + polled.stderr

    async def healthy() -> bool:
        for name, proc in (("agent", agent), ("auth", auth)):
            if proc.poll() is not None:
                log = (tmp_path / f"{name}.log").read_text()
                raise AssertionError(f"{name} exited {proc.returncode}:\n{log[-3000:]}")
        servers = await bus.list_db_servers("dev-cache")
        return len(servers) == 1 and servers[0].target_health.status == "healthy"

    await wait_until(healthy, 60, "the confined agent serving dev-cache")
    for proc in (agent, auth):  # the launcher became the service: filtered, no new privileges
        status = Path(f"/proc/{proc.pid}/status").read_text()  # noqa: ASYNC240
        assert "\nSeccomp:\t2\n" in status and "\nNoNewPrivs:\t1\n" in status
    login = await asyncio.to_thread(
        run, env, "login", "--auth", f"127.0.0.1:{auth_port}", "--user", "alice",
        "--password-stdin", "--ca-file", str(ca / "ca.crt"), stdin=PASSWORD + "\n",
    )  # fmt: skip
    assert login.returncode == 0, login.stderr
    for _ in range(3):  # the kernel spreads sessions over the listener processes
        session = await asyncio.to_thread(
            run, env, "db", "connect", "dev-cache", "--db-user", "app",
            stdin=f"AUTH app {APP_PASSWORD}\nSET greeting hello\nGET greeting\n",
        )  # fmt: skip
        assert (session.returncode, session.stdout) == (0, "OK\nOK\nhello\n"), session.stderr

    assert await stopped(agent, 60) == 0
    assert await stopped(auth, 60) == 0
    logs = "".join((tmp_path / f"{n}.log").read_text() for n in ("agent", "auth"))
    assert "Operation not permitted" not in logs and "Traceback" not in logs, logs
    assert ", 2 listener processes" in logs and "agent stopped" in logs

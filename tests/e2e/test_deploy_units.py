"""The services work inside what their systemd units (deploy/systemd) set up, applied as
systemd applies it (tests/kits/unitrun.py): the system-call filter
(``SystemCallFilter=``, ``RestrictAddressFamilies=``, ``NoNewPrivileges=``), and where
this machine allows mount namespaces also ``ProtectSystem=strict``, ``ProtectHome=``, a
user of their own with no capabilities (``DynamicUser=``) and only their state directory
writable. The auth service serves a login, an agent with two listener processes serves
``db connect`` sessions, discovery polls AWS (moto), and the agent and the auth service
stop cleanly on SIGTERM. A unit that took away something one of them needs fails here,
not on the first host it is installed on."""

from __future__ import annotations

import asyncio
import ctypes.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml

from bus import Bus
from bus.server import NatsServer
from sandbox.aws import MotoServer
from sandbox.ports import free_port
from sandbox.valkeynode import ValkeyNode
from tests.kits.agent import agent_config, wait_until
from tests.kits.common import subprocess_env
from tests.kits.listener import APP_PASSWORD, add_acl_users, static_db
from tests.kits.proxy import start_single_node

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
ROLE = "kind: role\nname: dev\nallow: {db_labels: {env: dev}, db_users: [app]}\n"
PASSWORD = "a long password"
USERS = {"auth": 61184, "agent": 61185, "discovery": 61186}
"""A user of its own per service, from systemd's range for dynamic users."""

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        shutil.which("systemd-analyze") is None or ctypes.util.find_library("seccomp") is None,
        reason="needs systemd-analyze and libseccomp (Debian: apt-get install systemd)",
    ),
]


def _namespaces() -> bool:
    """Whether this process may make a mount namespace and mount in it (root, or a
    container allowed to)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "t", "/mnt"],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    return done.returncode == 0


NAMESPACES = _namespaces()


def confined(
    unit: str, *command: str, uid: int | None = None, writable: tuple[str, ...] = ()
) -> list[str]:
    """``command`` run as ``unit`` runs it: its filter and, with ``uid``, its file system
    and user."""
    launcher = [sys.executable, "-m", "tests.kits.unitrun", str(UNITS / unit)]
    if uid is None:
        return [*launcher, "--", *command]
    return [
        "unshare", "--mount", "--propagation", "private",
        *launcher, "--uid", str(uid), "--writable", *writable, "--", *command,
    ]  # fmt: skip


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
def workdir() -> Iterator[Path]:
    """A directory the services' users may enter (pytest's own are root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="fleetgate-units-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.skipif(not NAMESPACES, reason="needs root and mount namespaces (unshare)")
def test_only_the_state_directory_is_writable(workdir: Path) -> None:
    state = workdir / "state"
    state.mkdir(mode=0o700)
    os.chown(state, USERS["agent"], USERS["agent"])
    code = (
        "import os, sys\n"
        "open(sys.argv[1] + '/written', 'w').close()\n"
        "for path in ('/tmp', '/var/tmp', sys.argv[2], '/home', '/etc'):\n"
        "    try:\n"
        "        open(path + '/fleetgate-write-check', 'w')\n"
        "    except OSError as exc:\n"
        "        print(path, exc.strerror)\n"
        "print(os.getuid(), os.getgroups(), os.listdir('/home'))\n"
    )
    done = subprocess.run(
        confined(
            "fleetgate-agent.service", sys.executable, "-c", code, str(state), str(workdir),
            uid=USERS["agent"], writable=(str(state),),
        ),
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "/tmp Read-only file system\n/var/tmp Read-only file system\n"
        f"{workdir} Read-only file system\n/home Read-only file system\n"
        "/etc Read-only file system\n"
        f"{USERS['agent']} [] []\n"
    )
    assert (state / "written").stat().st_uid == USERS["agent"]


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


def own(path: Path, uid: int) -> None:
    """What systemd does to a StateDirectory= at start: the tree becomes the user's."""
    for where, dirs, files in os.walk(path):
        for name in [where, *(os.path.join(where, n) for n in dirs + files)]:
            os.chown(name, uid, uid)


@pytest.mark.slow
async def test_services_run_as_their_units_run_them(
    nats_server: NatsServer,
    bus: Bus,
    aws: MotoServer,
    valkey: ValkeyNode,
    workdir: Path,
    services: list[subprocess.Popen[bytes]],
) -> None:
    tmp = workdir
    env = subprocess_env(FLEETGATE_NATS_URL=nats_server.url, FLEETGATE_HOME=str(tmp / "home"))
    ca = tmp / "ca"
    (tmp / "role.yaml").write_text(ROLE)
    for args, stdin in (
        (("auth", "init", "--dir", str(ca)), ""),
        (("roles", "create", "-f", str(tmp / "role.yaml")), ""),
        (("users", "add", "alice", "--roles", "dev", "--password-stdin"), PASSWORD + "\n"),
        (("auth", "sign", "--host", "127.0.0.1", "--out", str(tmp / "tls"),
          "--ca-dir", str(ca)), ""),
    ):  # fmt: skip
        done = await asyncio.to_thread(run, env, *args, stdin=stdin)
        assert done.returncode == 0, done.stderr
    # as systemd hands them over: the auth service's StateDirectory= (ca_dir), the agent's
    # (data_dir) and its LoadCredential= copies of the certificate and key
    data_dir = tmp / "agent-data"
    credentials = tmp / "credentials"
    data_dir.mkdir(mode=0o700)
    credentials.mkdir(mode=0o500)
    for name in ("cert.pem", "key.pem"):
        shutil.copy(tmp / "tls" / name, credentials / name)
        (credentials / name).chmod(0o400)
    if NAMESPACES:
        own(ca, USERS["auth"])
        own(data_dir, USERS["agent"])
        own(credentials, USERS["agent"])

    def start(
        unit: str, name: str, *args: str, writable: tuple[str, ...] = ()
    ) -> subprocess.Popen[bytes]:
        uid = USERS[name] if NAMESPACES else None
        command = confined(
            unit, sys.executable, "-m", "fleetgate", *args, uid=uid, writable=writable
        )
        with (tmp / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        services.append(proc)
        return proc

    auth_port = free_port()
    (tmp / "auth.yaml").write_text(f"listen: 127.0.0.1:{auth_port}\nca_dir: {ca}\n")
    auth = start(
        "fleetgate-auth.service", "auth", "auth", "run", "-c", str(tmp / "auth.yaml"),
        writable=(str(ca),),
    )  # fmt: skip
    config = agent_config(
        tmp,
        "agent-a",
        data_dir=str(data_dir),
        listen_addr=f"127.0.0.1:{free_port()}",
        listener={
            "cert_file": str(credentials / "cert.pem"),
            "key_file": str(credentials / "key.pem"),
            "processes": 2,
        },
        databases=[static_db("dev-cache", valkey.port, env="dev")],
    )
    (tmp / "agent.yaml").write_text(yaml.safe_dump(config))
    agent = start(
        "fleetgate-agent.service", "agent", "agent", "run", "-c", str(tmp / "agent.yaml"),
        writable=(str(data_dir),),
    )  # fmt: skip

    # discovery: one whole poll of AWS (moto), exit 0 only if every fetcher succeeded
    discovery = {
        "discovery_service": {
            "aws": [{"types": ["memorydb"], "regions": ["us-east-1"], "tags": {"*": "*"}}]
        }
    }
    (tmp / "discovery.yaml").write_text(yaml.safe_dump(discovery))
    poll = start(
        "fleetgate-discovery.service", "discovery", "discovery", "run", "-c",
        str(tmp / "discovery.yaml"), "--once",
    )  # fmt: skip
    await wait_until(lambda: poll.poll() is not None, 120, "discovery's poll")
    assert poll.returncode == 0, (tmp / "discovery.log").read_text()

    async def healthy() -> bool:
        for name, proc in (("agent", agent), ("auth", auth)):
            if proc.poll() is not None:
                log = (tmp / f"{name}.log").read_text()
                raise AssertionError(f"{name} exited {proc.returncode}:\n{log[-3000:]}")
        servers = await bus.list_db_servers("dev-cache")
        return len(servers) == 1 and servers[0].target_health.status == "healthy"

    await wait_until(healthy, 60, "the agent serving dev-cache")
    for name, proc in (("agent", agent), ("auth", auth)):
        status = Path(f"/proc/{proc.pid}/status").read_text()  # noqa: ASYNC240
        assert "\nSeccomp:\t2\n" in status and "\nNoNewPrivs:\t1\n" in status
        if NAMESPACES:  # its own user, no capabilities
            assert f"\nUid:\t{USERS[name]}\t{USERS[name]}\t" in status, status
            assert "\nCapEff:\t0000000000000000\n" in status, status
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
    logs = "".join((tmp / f"{n}.log").read_text() for n in ("agent", "auth"))
    assert "Operation not permitted" not in logs and "Traceback" not in logs, logs
    assert ", 2 listener processes" in logs and "agent stopped" in logs
    # the state each wrote is in its own directory
    assert (data_dir / "host_uuid").is_file()
    assert (ca / "service" / "cert.pem").is_file()

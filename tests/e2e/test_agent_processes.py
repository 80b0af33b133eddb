"""An agent with several listener processes (``listener.processes``): real
``fleetgate agent run`` processes, nats-server, valkey-server, mutual TLS. The kernel
spreads connections over the processes; every command is audited once; only the agent
process writes heartbeats; a listener process that dies is restarted; SIGTERM (or the
agent process dying) leaves no process behind."""

from __future__ import annotations

import asyncio
import copy
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bus import Bus
from bus.audit import SessionQuery
from bus.server import NatsServer
from dbservice.agent.app import Agent
from dbservice.agent.config import AgentConfig
from dbservice.agent.processes import ListenerProcess, ListenerProcesses
from dbservice.gateway.settings import check_processes
from fleetgate.config import ConfigError, load_model
from sandbox.aws import SandboxAclMembership
from sandbox.iamfront import MemoryDBLogin
from sandbox.memorydb import MemoryDBStandin
from sandbox.ports import free_port
from sandbox.valkeynode import ValkeyNode
from tests.integration.test_managed_agent import (
    agent_running,
    record,
    set_up,
    setup,
    standin,
    state,
)
from tests.kits.agent import agent_config, wait_until
from tests.kits.common import subprocess_env
from tests.kits.listener import Fleet, RawSession, audit_events, client, static_db
from tests.kits.proxy import serve_single_node

READS = {
    "memorydb:DescribeUsers",
    "memorydb:DescribeACLs",
    "memorydb:ListTags",
    "secretsmanager:GetSecretValue",
}
"""The AWS calls a listener process may make for managed users."""

__all__ = ["standin"]  # a fixture, shared with the managed-user tests

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreading"),
]


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyNode]:
    yield from serve_single_node(tmp_path_factory.mktemp("vk"))


# -- helpers -----------------------------------------------------------------------------


def processes_error(value: Any) -> str:
    body = agent_config(
        Path("/tmp"),
        "a",
        listen_addr="127.0.0.1:6390",
        databases=[static_db("x", 6379)],
    )
    body["db_service"]["listener"] = {"processes": value}
    with pytest.raises(ConfigError) as info:
        load_model(AgentConfig, body, "agent.yaml")
    return str(info.value)


class AgentProcess:
    """``fleetgate agent run`` with its log (the listener processes log there too)."""

    def __init__(
        self, config: dict[str, Any], tmp: Path, url: str, *, session: bool = False
    ) -> None:
        self.file = tmp / "agent.yaml"
        self.file.write_text(yaml.safe_dump(config))
        self.log = tmp / "agent.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fleetgate", "agent", "run", "-c", str(self.file)],
                env=subprocess_env(FLEETGATE_NATS_URL=url),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=session,  # a process group, as in a terminal
            )

    def text(self) -> str:
        return self.log.read_text()

    def started(self) -> dict[int, int]:
        """Listener process index -> pid of its latest start."""
        found = re.findall(r"listener process (\d+) started \(pid (\d+)\)", self.text())
        return {int(k): int(pid) for k, pid in found}

    def pids(self) -> list[int]:
        return [self.proc.pid, *self.started().values()]

    async def listening(self, count: int) -> None:
        """Until ``count`` listener processes accept clients (besides the leader)."""

        def ready() -> bool:
            return self.text().count("accepting clients on") >= count + 1

        await wait_until(ready, 20, f"{count} listener processes accepting clients")

    async def stop(self, limit: float = 20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: self.proc.poll() is not None, limit, "agent exit")
        return self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def alive(pid: int) -> bool:
    """Running (a zombie of a process we did not start counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def command_line(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def serving_pid(pids: list[int], client_port: int) -> int | None:
    """Which of ``pids`` holds the agent end of the connection from ``client_port``."""
    inodes: set[str] = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if remote_port == client_port:
            inodes.add(fields[9])
    for pid in pids:
        if socket_inodes(pid) & inodes:
            return pid
    return None


def take_away(path: Path) -> bytes:
    data = path.read_bytes()
    path.unlink()
    return data


def put_back(path: Path, data: bytes) -> None:
    path.write_bytes(data)


async def session(fleet: Fleet, port: int, identity: Path, key: str, pids: list[int]) -> int | None:
    """SET and GET through the agent; which of ``pids`` served the session."""
    raw = await RawSession.open(port, identity, fleet.ca.pem, "cache", "default")
    try:
        assert await raw.call("SET", key, "v") == b"+OK"
        assert await raw.call("GET", key) == b"v"
        return serving_pid(pids, int(raw.writer.get_extra_info("sockname")[1]))
    finally:
        raw.close()


# -- config ------------------------------------------------------------------------------


def test_processes_config() -> None:
    for bad in (0, 65, -1, 1.5, True, "two", "2", None):
        error = processes_error(bad)
        assert "db_service.listener.processes" in error
        assert "whole number from 1 to 64, or auto" in error
    assert check_processes("auto") == min(len(os.sched_getaffinity(0)), 64)
    assert check_processes(4) == 4
    assert check_processes("auto", platform="darwin") == 1
    with pytest.raises(ValueError, match="several listener processes need Linux"):
        check_processes(2, platform="darwin")


# -- end to end ----------------------------------------------------------------------------


async def test_two_processes_share_the_port(
    fleet: Fleet, valkey: ValkeyNode, tmp_path: Path
) -> None:
    config = fleet.agent(
        "multi",
        [static_db("cache", valkey.port, env="standin")],
        heartbeat={"interval": "1s", "ttl": "2s"},
    )
    config["db_service"]["listener"]["processes"] = 2
    port = int(config["db_service"]["listen_addr"].rsplit(":", 1)[1])
    carol = fleet.identity("carol", ["cache"])
    agent = AgentProcess(config, tmp_path, fleet.nats_url)
    try:
        await agent.listening(1)
        first = agent.started()[1]
        command = command_line(first)
        assert b"--listener-process" in command and b"1" in command
        assert not any(b"nats://" in part for part in command)  # it may hold a password

        # The kernel spreads connections over both processes; each session is served
        # by one of them and every command is audited exactly once.
        served: Counter[int | None] = Counter()
        for i in range(40):
            served[await session(fleet, port, carol, f"k{i}", agent.pids())] += 1
        assert served[agent.proc.pid] > 0 and served[first] > 0, served
        assert served[None] == 0

        async def all_audited() -> bool:
            queries = [e for e in await audit_events(fleet.bus) if isinstance(e, SessionQuery)]
            return len(queries) >= 80

        await wait_until(all_audited, 15, "80 commands audited")
        await asyncio.sleep(0.5)  # a duplicate would have arrived by now
        queries = [e for e in await audit_events(fleet.bus) if isinstance(e, SessionQuery)]
        assert len(queries) == 80 and len({q.id for q in queries}) == 80
        by_session: dict[str, list[str]] = {}
        for q in queries:
            by_session.setdefault(q.session_id, []).append(q.command)
        assert len(by_session) == 40
        assert all(commands == ["SET", "GET"] for commands in by_session.values())
        host_ids = {q.host_id for q in queries}
        (beat,) = await fleet.bus.list_db_servers()  # one agent, one heartbeat
        assert host_ids == {beat.host_id}

        # Heartbeats come from the agent process alone: frozen, its heartbeats expire
        # while the listener process runs on.
        os.kill(agent.proc.pid, signal.SIGSTOP)
        try:

            async def expired() -> bool:
                return await fleet.bus.list_db_servers() == []

            await wait_until(expired, 15, "heartbeats to expire")
            assert alive(first)
        finally:
            os.kill(agent.proc.pid, signal.SIGCONT)

        async def announced() -> bool:
            return len(await fleet.bus.list_db_servers()) == 1

        await wait_until(announced, 10, "heartbeat again")

        # A listener process that dies is restarted.
        os.kill(first, signal.SIGKILL)
        await wait_until(lambda: agent.started()[1] != first, 15, "restart of listener 1")
        assert f"listener process 1 ended unexpectedly (pid {first}, killed by SIGKILL)" in (
            agent.text()
        )
        await agent.listening(2)
        second = agent.started()[1]
        served.clear()
        for i in range(20):
            served[await session(fleet, port, carol, f"again{i}", agent.pids())] += 1
        assert served[second] > 0 and served[agent.proc.pid] > 0, served

        # SIGTERM stops every process and leaves none.
        assert await agent.stop() == 0
        await wait_until(lambda: not alive(second), 5, "listener process gone")
        assert not alive(first)
        assert await fleet.bus.list_db_servers() == []
        assert "listener process stopped" in agent.text()
    finally:
        agent.kill()
    assert "Traceback" not in agent.text()


async def test_failures_and_a_dead_agent_leave_no_listener_process(
    fleet: Fleet, valkey: ValkeyNode, tmp_path: Path
) -> None:
    config = fleet.agent("lonely", [static_db("cache", valkey.port, env="standin")])
    config["db_service"]["listener"]["processes"] = 2
    agent = AgentProcess(config, tmp_path, fleet.nats_url)
    try:
        await agent.listening(1)
        first = agent.started()[1]

        # A listener process that cannot start (its certificate files are gone) says
        # why in the agent's log, and the agent keeps trying.
        cert = Path(config["db_service"]["listener"]["cert_file"])
        saved = take_away(cert)
        os.kill(first, signal.SIGKILL)

        def failed_start() -> bool:
            ended = r"listener process 1 ended unexpectedly \(pid \d+, exit status 2\)"
            return re.search(ended, agent.text()) is not None

        await wait_until(failed_start, 20, "a failed start of listener process 1")
        assert "listener process 1: invalid config" in agent.text()
        assert "db_service.listener.cert_file: cannot read" in agent.text()
        put_back(cert, saved)

        # The agent process dies without a word: its listener processes follow it.
        agent.kill()
        await wait_until(
            lambda: not any(alive(pid) for pid in agent.started().values()),
            10,
            "listener processes to exit",
        )
    finally:
        agent.kill()
        for pid in agent.started().values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_ctrl_c_in_a_terminal_stops_all_in_order(
    fleet: Fleet, valkey: ValkeyNode, tmp_path: Path
) -> None:
    config = fleet.agent("terminal", [static_db("cache", valkey.port, env="standin")])
    config["db_service"]["listener"]["processes"] = 2
    agent = AgentProcess(config, tmp_path, fleet.nats_url, session=True)
    try:
        await agent.listening(1)
        os.killpg(agent.proc.pid, signal.SIGINT)  # what Ctrl-C does
        await wait_until(lambda: agent.proc.poll() is not None, 20, "agent exit")
        assert agent.proc.wait() == 0
        assert not any(alive(pid) for pid in agent.started().values())
        assert "listener process stopped" in agent.text()
        assert "killed by" not in agent.text() and "unexpectedly" not in agent.text()
    finally:
        agent.kill()


# -- listener-only mode, in this process: managed and IAM logins -------------------------


async def test_listener_mode_logs_in_managed_and_iam_users_and_changes_nothing(
    bus: Bus,
    nats_server: NatsServer,
    tmp_path: Path,
    standin: tuple[MemoryDBStandin, MemoryDBLogin],
) -> None:
    db, _ = standin
    _, configs, dana = await setup(bus, nats_server, tmp_path, db)
    leader_config = configs[0]
    async with agent_running(leader_config, nats_server.url) as leader:
        await set_up(bus, leader)
        assert leader.identity is not None
        # A listener process of this agent (here on a port of its own: the leader did
        # not bind with SO_REUSEPORT), run in this process.
        body = copy.deepcopy(leader_config)
        body["db_service"]["listen_addr"] = f"127.0.0.1:{free_port()}"
        spec = ListenerProcess(1, leader.identity.host_id, os.getppid(), {})
        child = Agent(
            AgentConfig.model_validate(body),
            nats_url=nats_server.url,
            acl_membership=SandboxAclMembership(),
            listener_process=spec,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(child.run(stop))
        try:
            resource = record("")

            def ready() -> bool:
                return (
                    child.listener is not None
                    and child.managed is not None
                    and child.managed.managed(resource, "app") is not None
                ) or task.done()

            await wait_until(ready, 15, "the listener process knows the managed user")
            assert child.listener is not None and child.managed is not None
            for db_user in ("app", "robot"):  # managed password, IAM token
                async with client(child.listener.port, dana, "orders", db_user) as r:
                    assert await r.set(f"from-{db_user}", "1")
                    assert await r.acl_whoami() in (db_user, db_user.encode())
            # It reads, and never writes: no rotation, no secret or user changed.
            assert child.managed.read_only
            assert set(child.managed.calls) <= READS, child.managed.calls
            assert child.managed.rotator.outcomes == {}
            beats = await bus.list_db_servers()
            assert [(b.name, b.host_id) for b in beats] == [("orders", leader.identity.host_id)]
        finally:
            stop.set()
            assert await asyncio.wait_for(task, 15) == 0
        current = await state(bus)
        assert current is not None and current.phase != "unused"


# -- the leader's side, with stand-in commands ---------------------------------------------


def stand_in(code: str) -> list[str]:
    """A "listener process" running ``code`` (the leader appends --listener-process K)."""
    return [sys.executable, "-c", code]


async def test_stop_escalates_and_a_failing_process_is_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    spec = ListenerProcess(0, "host", os.getpid(), {})
    stubborn = ListenerProcesses(
        2,
        spec=spec,
        argv=stand_in(
            "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "sys.stdin.read(); time.sleep(60)"
        ),
        stop_timeout=0.5,
    )
    stubborn.start()
    await wait_until(lambda: 1 in stubborn.procs, 10, "the process started")
    await asyncio.sleep(0.3)  # past its SIG_IGN
    pid = stubborn.procs[1].pid
    await asyncio.wait_for(stubborn.aclose(), 10)
    assert stubborn.procs[1].returncode == -signal.SIGKILL and not alive(pid)
    assert f"listener process (pid {pid}) did not stop within 0.5s; killing it" in caplog.text

    failing = ListenerProcesses(
        3, spec=spec, argv=stand_in("import sys; sys.exit(3)"), backoff=(0.01, 0.05)
    )
    failing.start()
    await wait_until(lambda: failing.restarts >= 6, 20, "restarts")
    await asyncio.wait_for(failing.aclose(), 10)
    assert "listener process 2 ended unexpectedly (pid" in caplog.text
    assert "exit status 3); restarting in 0.05s" in caplog.text
    assert not any(alive(p.pid) for p in failing.procs.values())

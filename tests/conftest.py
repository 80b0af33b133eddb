"""Real parts for every test: nats-server with JetStream and moto's server as AWS."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bus import Bus
from bus.server import NatsServer
from sandbox.aws import MotoServer
from sandbox.valkeynode import ValkeyNode
from tests.kits.listener import Fleet, add_acl_users, make_fleet
from tests.kits.proxy import serve_single_node

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log

LEAK_GRACE = 2.0
"""Seconds a test's tasks and child processes get to end after its teardown before the
leak check fails the test (they are usually gone at once; the grace is for a process
still being reaped, or a task finishing its last step)."""


# -- leaked tasks and processes --------------------------------------------------------
#
# Every test must leave no asyncio task running (other than its own) when its event loop
# is torn down, and no child process of this pytest process that it started. Processes
# started by fixtures wider than a test (a module's valkey-server) belong to them and
# are left alone. A test that must leave something for a later one says so with
# ``@pytest.mark.leaks("why")``; ``@pytest.mark.leaks("why", tasks_only=True)`` lets
# tasks (a library's own, say) outlive the test but still checks its processes.


def child_pids() -> set[int]:
    """This process's live children (zombies included: a child nobody waited for)."""
    multiprocessing.active_children()  # reaps the finished multiprocessing children
    me = os.getpid()
    out: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()  # after "pid (comm) "
        if len(fields) > 1 and int(fields[1]) == me:
            out.add(int(entry.name))
    return out


def describe_pid(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return f"pid {pid} (gone)"
    return f"pid {pid} [{state}] {command[:200] or '(exited, not waited for)'}"


_WIDER_FIXTURE_PIDS: set[int] = set()
"""Child processes started by fixtures wider than one test (module, session): theirs."""


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: Any) -> Any:
    if fixturedef.scope == "function":
        return (yield)
    before = child_pids()
    try:
        return (yield)
    finally:
        _WIDER_FIXTURE_PIDS.update(child_pids() - before)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails the test when it leaves child processes behind, and (for an async test,
    through :func:`no_leaked_tasks`) asyncio tasks."""
    marker = request.node.get_closest_marker("leaks")
    if marker is not None and not marker.kwargs.get("tasks_only"):
        yield
        return
    if marker is None and inspect.iscoroutinefunction(getattr(request.node, "obj", None)):
        # Requested first, so it is torn down after every fixture of the test.
        request.getfixturevalue("no_leaked_tasks")
    before = child_pids()
    yield
    deadline = time.monotonic() + LEAK_GRACE
    while True:
        left = child_pids() - before - _WIDER_FIXTURE_PIDS
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if left:
        shown = "\n  ".join(describe_pid(pid) for pid in sorted(left))
        for pid in left:  # so they do not disturb the next tests
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        pytest.fail(f"the test left {len(left)} child processes behind:\n  {shown}")


@pytest.fixture
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fails an async test that leaves asyncio tasks running on its loop (see
    :func:`no_leaks`); they are cancelled, so they do not disturb the next test."""
    yield
    own = asyncio.current_task()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LEAK_GRACE
    while True:
        left = [t for t in asyncio.all_tasks() if t is not own and not t.done()]
        if not left or loop.time() > deadline:
            break
        await asyncio.sleep(0.02)
    if not left:
        return
    ours = [t for t in left if not _closed_connections_subscription(t)]  # before they end
    for task in left:
        task.cancel()
    await asyncio.wait(left, timeout=LEAK_GRACE)
    if ours:
        shown = "\n  ".join(sorted(f"{t.get_name()}: {t.get_coro()!r}" for t in ours))
        pytest.fail(f"the test left {len(ours)} asyncio tasks running:\n  {shown}")


def _closed_connections_subscription(task: asyncio.Task[Any]) -> bool:
    """Whether ``task`` is nats-py's message task of a subscription whose connection is
    closed: nats-py's own leftover, not ours. Closing a connection cancels the message
    task of every subscription it holds, but an ordered consumer (a KV watch) that
    resets itself while the connection closes puts its subscription back afterwards
    (nats/js/client.py, ``reset_ordered_consumer``), and its task runs on, waiting for
    messages that cannot come. Our own tasks, and nats-py's tasks of a connection left
    open, still fail the test."""
    coro = task.get_coro()
    if getattr(coro, "__qualname__", "") != "Subscription._wait_for_msgs":
        return False
    frame = getattr(coro, "cr_frame", None)
    sub = frame.f_locals.get("self") if frame is not None else None
    conn = getattr(sub, "_conn", None)
    return bool(getattr(conn, "is_closed", False))


@pytest.fixture(autouse=True)
def fleetgate_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Every test gets its own empty FLEETGATE_HOME (and no FLEETGATE_NATS_* setting),
    so a login or setting of the person running the tests never changes what a test
    sees."""
    home = tmp_path_factory.mktemp("fleetgate-home")
    monkeypatch.setenv("FLEETGATE_HOME", str(home))
    for name in [name for name in os.environ if name.startswith("FLEETGATE_NATS_")]:
        monkeypatch.delenv(name)
    return home


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh ``nats-server -js`` on an ephemeral loopback port with its own store."""
    server = NatsServer(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    """A connected bus client with the registry buckets provisioned."""
    client = await Bus.connect(nats_server.url, name="test")
    await client.provision()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def fleet(bus: Bus, tmp_path: Path, nats_server: NatsServer) -> Fleet:
    """A CA, roles and an agent config factory on this test's NATS (tests.kits.listener)."""
    return await make_fleet(bus, tmp_path, nats_server.url)


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyNode]:
    """One valkey-server for the module, with the ACL users ``app`` and ``admin``
    (a module that needs another defines its own ``valkey``)."""
    yield from serve_single_node(tmp_path_factory.mktemp("valkey"), setup=add_acl_users)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MotoServer:
    """moto with no resources, and this process's AWS environment pointed at it."""
    moto_server.reset()
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for key, value in moto_server.environ().items():
        monkeypatch.setenv(key, value)
    return moto_server

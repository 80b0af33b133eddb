"""Structured shutdown: root tasks in one TaskGroup per process (a root that fails or
returns stops the process, with its name in one line), the stop waits for every task,
and the listener waits for every client session, also one slow to end."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from bus import Bus
from bus.server import NatsServer
from dbservice.agent import app
from dbservice.agent.app import Agent
from dbservice.agent.config import AgentConfig
from dbservice.engine.login import ClientCredentials
from dbservice.gateway.listener import FleetTrust
from fleetgate.config import ConfigError
from fleetgate.supervise import RootTasks
from tests.kits.agent import running_agent, wait_until
from tests.kits.listener import APP_PASSWORD, RawSession, add_acl_users, make_fleet, static_db
from tests.kits.proxy import serve_single_node

pytestmark = pytest.mark.timeout(60)


async def forever(ended: list[str], name: str) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        ended.append(name)


# -- RootTasks ----------------------------------------------------------------------------


async def test_a_root_that_returns_stops_the_others(caplog: pytest.LogCaptureFixture) -> None:
    ended: list[str] = []

    async def quits() -> None:
        await asyncio.sleep(0.01)

    async with RootTasks(asyncio.Event()) as roots:
        roots.start("watch", forever(ended, "watch"))
        roots.start("quitter", quits())
    assert roots.failed == ["quitter"]
    assert ended == ["watch"]
    assert all(task.done() for task in roots.tasks.values())
    assert "quitter ended, although it should run until stopped; stopping" in caplog.text


async def test_a_root_failure_is_one_line_or_a_traceback_for_a_bug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails(exc: Exception) -> None:
        raise exc

    for exc, traceback in ((OSError("port gone"), False), (KeyError("bug"), True)):
        caplog.clear()
        ended: list[str] = []
        async with RootTasks(expected=(OSError,)) as roots:
            roots.start("other", forever(ended, "other"))
            roots.start("loop", fails(exc))
        assert roots.failed == ["loop"] and ended == ["other"]
        (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert record.getMessage().startswith("loop failed")
        assert (record.exc_info is not None) is traceback


async def test_the_stop_event_ends_every_root_without_a_failure() -> None:
    stop = asyncio.Event()
    ended: list[str] = []
    async with RootTasks(stop) as roots:
        roots.start("a", forever(ended, "a"))
        roots.start("b", forever(ended, "b"))
        roots.start("once", asyncio.sleep(0), on_return="done")
        asyncio.get_running_loop().call_later(0.05, stop.set)
    assert roots.failed == [] and sorted(ended) == ["a", "b"]


async def test_an_error_in_the_body_is_raised_as_it_is() -> None:
    ended: list[str] = []
    with pytest.raises(ConfigError, match="bad"):
        async with RootTasks(asyncio.Event()) as roots:
            roots.start("a", forever(ended, "a"))
            await asyncio.sleep(0)
            raise ConfigError("bad")
    assert ended == ["a"]


async def test_a_cancellation_of_the_process_is_not_swallowed() -> None:
    ended: list[str] = []
    started = asyncio.Event()

    async def process() -> None:
        async with RootTasks(asyncio.Event()) as roots:
            roots.start("a", forever(ended, "a"))
            started.set()

    task = asyncio.create_task(process())
    await started.wait()
    task.cancel()
    await asyncio.wait([task])
    assert task.cancelled() and ended == ["a"]


# -- the agent ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valkey_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    for node in serve_single_node(tmp_path_factory.mktemp("valkey"), setup=add_acl_users):
        yield node.port


async def test_a_failing_helper_stops_the_agent_with_its_name(
    bus: Bus,
    nats_server: NatsServer,
    tmp_path: Path,
    valkey_port: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The fleet CA watch used to be a bare task: had it failed, the agent would have
    gone on with a CA it no longer followed, and nobody would have known."""
    fleet = await make_fleet(bus, tmp_path, nats_server.url)
    config = fleet.agent("agent-1", [static_db("dev-cache", valkey_port, env="dev")])
    follow = FleetTrust.follow

    async def follow_then_fail(self: FleetTrust, bus: Bus) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await follow(self, bus)
        raise RuntimeError("the CA watch broke")

    monkeypatch.setattr(FleetTrust, "follow", follow_then_fail)
    agent = Agent(AgentConfig.model_validate(config), nats_url=nats_server.url)
    assert await asyncio.wait_for(agent.run(asyncio.Event()), 20) == 1
    assert "fleet-ca-watch failed; stopping" in caplog.text
    assert "agent stopped: fleet-ca-watch failed" in caplog.text
    assert await bus.list_db_servers() == []  # the stop still deleted the heartbeats


class SlowToStop(ClientCredentials):
    """A login whose re-authentication loop takes ``linger`` seconds to end once
    cancelled, whatever else is cancelled meanwhile."""

    def __init__(self, linger: float, ended: asyncio.Event) -> None:
        self.linger = linger
        self.ended = ended

    def keep_alive(
        self, session: object, *, every: float, retry: float
    ) -> Coroutine[Any, Any, None]:
        return self._loop()

    async def _loop(self) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            loop = asyncio.get_running_loop()
            until = loop.time() + self.linger
            while loop.time() < until:
                try:
                    await asyncio.sleep(until - loop.time())
                except asyncio.CancelledError:
                    continue
            self.ended.set()


async def test_the_stop_waits_for_a_session_slow_to_end(
    bus: Bus,
    nats_server: NatsServer,
    tmp_path: Path,
    valkey_port: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The listener gave sessions 2 s after the stop and then forgot them, still running."""
    fleet = await make_fleet(bus, tmp_path, nats_server.url)
    config = fleet.agent("agent-1", [static_db("dev-cache", valkey_port, env="dev")])
    alice = fleet.identity("alice", ["dev"])
    ended = asyncio.Event()
    monkeypatch.setattr(app, "IamLogins", lambda *a, **k: lambda resource: SlowToStop(3.0, ended))
    session: RawSession | None = None
    try:
        async with running_agent(config, nats_server.url) as agent:
            listener = agent.listener
            assert listener is not None
            session = await RawSession.open(listener.port, alice, fleet.ca.pem, "dev-cache", "app")
            assert await session.call("AUTH", "app", APP_PASSWORD) == b"+OK"
            await wait_until(lambda: listener.established == 1, 5, "the session")
            sessions = set(listener.sessions)
    finally:
        if session is not None:
            session.close()
    assert ended.is_set()
    assert all(task.done() for task in sessions)
    assert "1 client sessions did not end within 2s of the stop" in caplog.text

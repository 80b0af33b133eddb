"""A closed session is freed by reference counting, at once: the agent's memory stays flat
when sessions come and go, without waiting for Python's cyclic garbage collector (whose
full collections stall the event loop). Real parts: nats-server, valkey-server, the agent's
listener over mutual TLS with the route preamble."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from bus import Bus
from bus.server import NatsServer
from dbservice.access.audit import SessionAudit
from dbservice.engine.cluster.session import ClusterSession
from dbservice.engine.proxy import ProxySession
from dbservice.gateway.hooks import AgentHooks
from sandbox.memorydb import StandinConfig, ThreadedStandin
from sandbox.valkeynode import ValkeyNode
from tests.kits.agent import running_agent, wait_until
from tests.kits.cluster import ClusterProxy
from tests.kits.listener import Fleet, RawSession, make_fleet, static_db
from tests.kits.proxy import serve_single_node

pytestmark = pytest.mark.timeout(90)

SESSIONS = 30
WATCHED = (ProxySession, AgentHooks, SessionAudit)


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyNode]:
    yield from serve_single_node(tmp_path_factory.mktemp("vk"))


def live() -> dict[str, int]:
    """Objects of the watched session types still alive (the collector is off: an object
    found here is kept by a reference or by a cycle only a collection would break)."""
    counts = dict.fromkeys((t.__name__ for t in WATCHED), 0)
    for obj in gc.get_objects():
        if isinstance(obj, WATCHED):
            counts[type(obj).__name__] += 1
    return counts


def _alive(kind: type) -> int:
    return sum(isinstance(o, kind) for o in gc.get_objects())


def holders(kind: type) -> list[str]:
    """What refers to the surviving objects of ``kind``, for the failure message."""
    out: list[str] = []
    for obj in gc.get_objects():
        if isinstance(obj, kind):
            for ref in gc.get_referrers(obj):
                if ref is not out:
                    out.append(type(ref).__qualname__ + ": " + repr(ref)[:120])
    return out[:20]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_closed_sessions_are_freed_without_the_cyclic_collector(
    nats_server: NatsServer, valkey: ValkeyNode, tmp_path: Path, loop: str
) -> None:
    """On both loops: the agent runs on uvloop, whose transports hold their protocols
    in C."""
    run = uvloop.run if loop == "uvloop" else asyncio.run
    run(asyncio.wait_for(_open_and_close(nats_server.url, valkey, tmp_path), 60))


async def _open_and_close(nats_url: str, valkey: ValkeyNode, tmp: Path) -> None:
    bus = await Bus.connect(nats_url, name="test")
    try:
        await bus.provision()
        fleet = await make_fleet(bus, tmp, nats_url)
        await _sessions(fleet, valkey)
    finally:
        await bus.close()


async def _sessions(fleet: Fleet, valkey: ValkeyNode) -> None:
    config = fleet.agent("agent-1", [static_db("cache", valkey.port, env="standin")])
    carol = fleet.identity("carol", ["cache"])
    async with running_agent(config, fleet.nats_url) as running:
        listener = running.listener
        assert listener is not None
        # One session first, so what is built once (TLS contexts, caches) exists.
        first = await RawSession.open(listener.port, carol, fleet.ca.pem, "cache", "default")
        assert await first.call("PING") == b"+PONG"
        first.writer.close()
        await wait_until(lambda: not listener.sessions, 10, "the first session's end")
        gc.collect()
        gc.disable()
        try:
            assert live() == dict.fromkeys((t.__name__ for t in WATCHED), 0)
            for _ in range(2):
                sessions = [
                    await RawSession.open(listener.port, carol, fleet.ca.pem, "cache", "default")
                    for _ in range(SESSIONS)
                ]
                for session in sessions:
                    assert await session.call("PING") == b"+PONG"
                assert live()["ProxySession"] == SESSIONS
                for session in sessions:  # an orderly close (TLS close_notify, then FIN)
                    session.writer.close()
                del sessions, session
                await wait_until(lambda: not listener.sessions, 10, "the sessions' end")
                await asyncio.sleep(0)  # the sessions' done callbacks
                left = live()
                assert left == dict.fromkeys(left, 0), (left, holders(ProxySession))
        finally:
            gc.enable()


def test_closed_cluster_sessions_are_freed_without_the_cyclic_collector(tmp_path: Path) -> None:
    """The cluster engine (MemoryDB in cluster mode): a session with its shard links,
    reader, writer and idle tasks is freed at close as well."""
    config = StandinConfig(dir=tmp_path / "cluster", shards=2)
    with ThreadedStandin(config) as standin, ClusterProxy(standin) as proxy:
        with proxy.client() as first:  # what is built once (topology, command table)
            assert first.set("warm", "1")
        assert len(proxy.finished(1)) == 1
        gc.collect()
        gc.disable()
        try:
            for round_ in range(2):
                clients = [proxy.client() for _ in range(SESSIONS)]
                for i, client in enumerate(clients):  # keys on both shards, and a PING
                    assert client.set(f"k{i}", i) and client.ping()
                for client in clients:
                    client.close()
                del clients, client
                assert len(proxy.finished(1 + SESSIONS * (round_ + 1))) == 1 + SESSIONS * (
                    round_ + 1
                )
                # The engine's thread counts a session finished just before it lets go
                # of it: wait for that. The collector stays off, so a session kept by a
                # cycle is never freed and the wait ends at its deadline.
                deadline = time.monotonic() + 10
                while (left := _alive(ClusterSession)) and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert left == 0, holders(ClusterSession)
        finally:
            gc.enable()

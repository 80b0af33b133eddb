"""The listener's limits before authentication: connections that send nothing, or stop
in the middle of their TLS handshake, neither count toward ``max_connections`` nor keep
clients out, and are closed after ``handshake_timeout``. Real agent, real TLS, raw
sockets from several loopback addresses (Linux routes all of 127/8 to lo)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterator

import pytest

from dbservice.gateway.listener import Handshakes, address_key
from dbservice.route import RouteRefused
from sandbox.valkeynode import ValkeyNode
from tests.kits.agent import running_agent, wait_until
from tests.kits.listener import (
    APP_PASSWORD,
    Fleet,
    RawSession,
    static_db,
)

pytestmark = pytest.mark.timeout(90)

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def half_client_hello() -> bytes:
    """The first half of a real TLS ClientHello: the handshake has begun, and stalls."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    return hello[: len(hello) // 2]


async def dial(port: int, source: str) -> Streams:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def closed(streams: Streams, limit: float) -> bool:
    """The agent closed the connection (EOF or reset) within ``limit`` seconds."""
    try:
        async with asyncio.timeout(limit):
            return await streams[0].read() == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


@pytest.fixture
def abort_all() -> Iterator[list[Streams]]:
    opened: list[Streams] = []
    yield opened
    for _, writer in opened:
        writer.transport.abort()


async def test_idle_and_stalled_connections_do_not_keep_clients_out(
    fleet: Fleet,
    valkey: ValkeyNode,
    abort_all: list[Streams],
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = fleet.agent("agent-1", [static_db("dev-cache", valkey.port, env="dev")])
    config["db_service"]["listener"] |= {
        "handshake_timeout": "6s",
        "max_handshakes": 8,
        "max_handshakes_per_address": 4,
        "max_connections": 20,
    }
    alice = fleet.identity("alice", ["dev"])
    caplog.set_level(logging.INFO, logger="dbservice.gateway.listener")
    async with running_agent(config, fleet.nats_url) as agent:
        listener = agent.listener
        assert listener is not None
        port = listener.port
        # 5 addresses x 10 connections that send nothing, 2 x 4 stalled in the TLS handshake
        idle = [await dial(port, f"127.0.0.{i}") for i in range(2, 7) for _ in range(10)]
        stalled = [await dial(port, f"127.0.0.{i}") for i in (7, 8) for _ in range(4)]
        abort_all.extend(idle + stalled)
        hello = half_client_hello()
        for _, writer in stalled:
            writer.write(hello)
        await wait_until(lambda: listener.limited.total >= 5 * 6, 10, "refusals counted")
        # per address: the first 4 of each address were taken, the 6 others closed at once
        assert [await closed(s, 2) for s in idle[4:10]] == [True] * 6
        assert len(listener.handshakes) == 8  # the limit, apart from max_connections
        assert listener.established == 0

        # clients still get in, more of them than max_handshakes, while those stay open
        sessions = []
        try:
            for _ in range(10):
                session = await RawSession.open(port, alice, fleet.ca.pem, "dev-cache", "app")
                sessions.append(session)
                assert await session.call("AUTH", "app", APP_PASSWORD) == b"+OK"
                assert await session.call("PING") == b"+PONG"
            assert listener.established == 10
            assert len(listener.handshakes) <= 8  # each made room once; 7 idle left
        finally:
            for session in sessions:
                session.close()

        # the stalled ones still counted are closed after handshake_timeout
        assert all([await closed(s, 15) for s in idle + stalled])
        await wait_until(lambda: len(listener.handshakes) == 0, 5, "no handshake counted")
        await wait_until(lambda: listener.established == 0, 5, "sessions ended")
        assert listener.limited.total >= 50 + 8 - 8  # refused, made room for, or timed out
    lines = [r.getMessage() for r in caplog.records if "refused or closed" in r.getMessage()]
    assert 1 <= len(lines) <= 3, lines  # one line per interval, not one per connection
    assert "over listener.max_handshakes_per_address" in "".join(lines)
    assert "listener.max_handshakes 8" in "".join(lines)


async def test_max_connections_counts_sessions_and_refuses_with_a_reason(
    fleet: Fleet, valkey: ValkeyNode, abort_all: list[Streams]
) -> None:
    config = fleet.agent("agent-1", [static_db("dev-cache", valkey.port, env="dev")])
    config["db_service"]["listener"] |= {"max_connections": 2}
    alice = fleet.identity("alice", ["dev"])
    async with running_agent(config, fleet.nats_url) as agent:
        assert agent.listener is not None
        port = agent.listener.port
        abort_all.extend([await dial(port, "127.0.0.2") for _ in range(5)])  # not counted
        first = await RawSession.open(port, alice, fleet.ca.pem, "dev-cache", "app")
        second = await RawSession.open(port, alice, fleet.ca.pem, "dev-cache", "app")
        try:
            with pytest.raises(RouteRefused) as info:
                await RawSession.open(port, alice, fleet.ca.pem, "dev-cache", "app")
            assert "listener.max_connections" in info.value.reason
        finally:
            first.close()
            second.close()
        await wait_until(lambda: agent.listener.established == 0, 5, "sessions ended")
        third = await RawSession.open(port, alice, fleet.ca.pem, "dev-cache", "app")
        assert await third.call("AUTH", "app", APP_PASSWORD) == b"+OK"
        third.close()


def test_address_keys_and_the_oldest_handshake_makes_room() -> None:
    assert address_key("10.0.0.7") == "10.0.0.7"
    assert address_key("::ffff:10.0.0.7") == "10.0.0.7"
    assert address_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"

    async def run() -> None:
        handshakes = Handshakes(limit=2, per_address=2)
        tasks = [asyncio.create_task(asyncio.sleep(10)) for _ in range(3)]
        assert handshakes.add(tasks[0], "a") is None
        assert handshakes.add(tasks[1], "a") is None
        assert handshakes.address_full("a") and not handshakes.address_full("b")
        assert handshakes.add(tasks[2], "b") is tasks[0]  # the oldest goes
        assert len(handshakes) == 2 and not handshakes.address_full("a")
        handshakes.discard(tasks[0])  # idempotent
        handshakes.discard(tasks[1])
        handshakes.discard(tasks[2])
        assert len(handshakes) == 0
        for task in tasks:
            task.cancel()

    asyncio.run(run())

"""valkey-glide (its asyncio GlideClient, standalone mode) through the proxy engine
against a real valkey-server: commands, batches (pipeline and transaction), RESP3 (glide's
default) and RESP2, and pub/sub pushes."""

from __future__ import annotations

import asyncio

import pytest
from glide import (
    Batch,
    GlideClient,
    GlideClientConfiguration,
    NodeAddress,
    ProtocolVersion,
)

from tests.kits import proxy as proxykit
from tests.kits.proxy import ThreadedProxy

node, proxy = proxykit.node, proxykit.proxy  # the kit's fixtures, used by name

pytestmark = pytest.mark.timeout(60)


def config(
    proxy: ThreadedProxy,
    protocol: ProtocolVersion,
    subscriptions: GlideClientConfiguration.PubSubSubscriptions | None = None,
) -> GlideClientConfiguration:
    return GlideClientConfiguration(
        [NodeAddress("127.0.0.1", proxy.port)],
        protocol=protocol,
        request_timeout=5000,
        pubsub_subscriptions=subscriptions,
    )


PROTOCOLS = [ProtocolVersion.RESP3, ProtocolVersion.RESP2]


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=["resp3", "resp2"])
async def test_glide_commands_and_batches(proxy: ThreadedProxy, protocol: ProtocolVersion) -> None:
    client = await GlideClient.create(config(proxy, protocol))
    try:
        assert await client.set("a", "1") == "OK"
        assert await client.get("a") == b"1"
        assert await client.incr("n") == 1
        await client.hset("h", {"f": "v", "g": "w"})
        assert await client.hgetall("h") == {b"f": b"v", b"g": b"w"}  # a map in RESP3
        assert await client.custom_command(["ECHO", "in step"]) == b"in step"
        assert await client.get("missing") is None

        pipeline = Batch(is_atomic=False)
        for i in range(500):
            pipeline.set(f"k{i}", str(i))
            pipeline.incr(f"k{i}")
            pipeline.get(f"k{i}")
        results = await client.exec(pipeline, raise_on_error=True)
        assert results is not None
        assert results[0::3] == ["OK"] * 500
        assert results[1::3] == [i + 1 for i in range(500)]
        assert results[2::3] == [str(i + 1).encode() for i in range(500)]

        transaction = Batch(is_atomic=True)
        transaction.set("t", "x")
        transaction.append("t", "y")
        transaction.get("t")
        assert await client.exec(transaction, raise_on_error=True) == ["OK", 2, b"xy"]

        # many requests in flight at once on glide's one multiplexed connection
        values = await asyncio.gather(*(client.incr("c") for _ in range(300)))
        assert sorted(values) == list(range(1, 301))
    finally:
        await client.close()
    stats = proxy.finished(1)
    assert stats and all(s.replies == s.commands for s in stats)


async def test_glide_pubsub_through_the_proxy(proxy: ThreadedProxy) -> None:
    subscriptions = GlideClientConfiguration.PubSubSubscriptions(
        channels_and_patterns={GlideClientConfiguration.PubSubChannelModes.Exact: {"news"}},
        callback=None,
        context=None,
    )
    listener = await GlideClient.create(config(proxy, ProtocolVersion.RESP3, subscriptions))
    publisher = await GlideClient.create(config(proxy, ProtocolVersion.RESP3))
    try:
        for _ in range(100):  # the subscription is made as the client connects
            if await publisher.publish("first", "news") == 1:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the subscription never reached the server")
        for i in range(5):
            assert await publisher.publish(f"m{i}", "news") == 1
        received = []
        for _ in range(6):
            message = await asyncio.wait_for(listener.get_pubsub_message(), 5)
            received.append(message.message)
        assert received == [b"first", *(f"m{i}".encode() for i in range(5))]
        # the subscribed RESP3 connection still answers commands
        assert await listener.set("after", "sub") == "OK"
    finally:
        await listener.close()
        await publisher.close()

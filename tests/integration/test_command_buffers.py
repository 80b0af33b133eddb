"""What a session holds of a command still arriving is bounded: the single-node engine
streams arguments to the server (a large value is never held), the cluster engine holds
each command whole up to ``max_command_buffer`` per session and
``max_command_buffer_total`` for all, and refuses beyond with an error naming the limit.
Asserted on the engines' own counters of held bytes, not on RSS."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest

from dbservice.engine.proxy import ProxyLimits, TcpConnector
from dbservice.engine.proxy.settings import CommandBuffers
from dbservice.engine.proxy.testing import LoopbackProxy
from sandbox.memorydb import StandinConfig, ThreadedStandin
from sandbox.valkeynode import ValkeyNode
from tests.kits import proxy as proxykit
from tests.kits.cluster import ClusterProxy

node = proxykit.node  # the kit's fixture, used by name

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
READ = ProxyLimits().read_size


def set_header(key: bytes, size: int) -> bytes:
    return b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(key), key, size)


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedStandin]:
    config = StandinConfig(dir=tmp_path_factory.mktemp("cluster"), shards=3)
    with ThreadedStandin(config) as running:
        yield running


async def test_single_node_engine_streams_a_large_value(node: ValkeyNode) -> None:
    size = 40 * MiB
    connector = TcpConnector("127.0.0.1", node.port)
    async with LoopbackProxy(connector, inspect=("*",)) as proxy:  # as the agent inspects
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(set_header(b"big", size))
            await writer.drain()
            peak, sent, piece = 0, 0, b"v" * (256 * 1024)
            while sent < size:
                writer.write(piece[: size - sent])
                sent += min(len(piece), size - sent)
                await writer.drain()
                await asyncio.sleep(0)
                peak = max([peak, *(session.buffered for session in proxy.live)])
            writer.write(b"\r\n*2\r\n$6\r\nSTRLEN\r\n$3\r\nbig\r\n")
            async with asyncio.timeout(30):
                assert await reader.readline() == b"+OK\r\n"
                assert await reader.readline() == b":%d\r\n" % size
        finally:
            writer.transport.abort()
    # the command header read whole (max_inspect) plus one read at most, never the value
    assert peak <= ProxyLimits().max_inspect + READ, peak


def read_all(sock: socket.socket, limit: float = 10.0) -> bytes:
    """Everything until the proxy closes the connection."""
    sock.settimeout(limit)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def wait_for(check: object, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_cluster_engine_refuses_a_command_declared_over_the_session_limit(
    standin: ThreadedStandin,
) -> None:
    buffers = CommandBuffers(8 * MiB)
    limits = ProxyLimits(max_command_buffer=3 * MiB)
    with ClusterProxy(standin, limits=limits, buffers=buffers) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n" + set_header(b"k", 256 * MiB))
            sock.sendall(b"x" * (2 * MiB))  # of the 256 MiB declared
            answer = read_all(sock)
        assert answer.startswith(b"+PONG\r\n-ERR command of at least 268435")
        assert answer.endswith(
            b"bytes is larger than the 3145728 bytes the agent holds of one command "
            b"(listener.max_command_buffer)\r\n"
        )
        # refused on the lengths: before the payload, no more than one read was held
        wait_for(lambda: buffers.held == 0)
        assert proxy.finished(1)[0].reason.startswith("refused: command of at least")

        # a value under the limit still works, in pieces
        with proxy.client() as client:
            value = bytes(range(256)) * (2 * MiB // 256)
            assert client.set("ok", value)
            assert client.get("ok") == value
        assert buffers.held == 0


def test_cluster_engine_bounds_what_all_sessions_hold(standin: ThreadedStandin) -> None:
    buffers = CommandBuffers(4 * MiB)
    limits = ProxyLimits(max_command_buffer=3 * MiB)
    size = 2 * MiB + MiB // 2
    with ClusterProxy(standin, limits=limits, buffers=buffers) as proxy:
        first = socket.create_connection(("127.0.0.1", proxy.port))
        second = socket.create_connection(("127.0.0.1", proxy.port))
        try:
            first.sendall(set_header(b"{a}first", size) + b"a" * (2 * MiB + 100))
            wait_for(lambda: buffers.held >= 2 * MiB)
            second.sendall(set_header(b"{b}second", size) + b"b" * (2 * MiB + 100))
            answer = read_all(second)
            assert answer.startswith(b"-ERR the agent holds ")
            assert answer.endswith(
                b"bytes of unfinished commands, over its limit of 4194304 "
                b"(listener.max_command_buffer_total); try again\r\n"
            )
            # the refused session's share is given back; the first one's is still held
            wait_for(lambda: buffers.held < 3 * MiB)
            assert 2 * MiB <= buffers.held <= 2 * MiB + 200
            # the first session goes on and completes its command
            first.sendall(b"a" * (size - 2 * MiB - 100) + b"\r\n")
            first.settimeout(10)
            assert first.recv(100) == b"+OK\r\n"
            wait_for(lambda: buffers.held == 0)
        finally:
            first.close()
            second.close()
        with proxy.client() as client:
            assert client.strlen("{a}first") == size
            assert client.exists("{b}second") == 0

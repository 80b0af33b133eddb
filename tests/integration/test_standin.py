"""The local MemoryDB stand-in: real valkey-server cluster nodes behind TLS fronts."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis
import redis.asyncio
import redis.cluster
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import MovedError
from redis.retry import Retry

from sandbox.memorydb import MemoryDBStandin, StandinConfig, ThreadedStandin, slot_ranges
from sandbox.tlsca import TestCA
from sandbox.tlsfront import TLSFront

pytestmark = pytest.mark.timeout(30)

CFG_NAME = "clustercfg.standin.abc123.memorydb.us-east-1.amazonaws.com"
TIMEOUTS: dict[str, Any] = {"socket_timeout": 3.0, "socket_connect_timeout": 3.0}
NO_RETRY = Retry(NoBackoff(), 0)  # fail at once: several tests expect failures


def tls_client(address: tuple[str, int], ca_file: Path, **kwargs: Any) -> redis.Redis:
    options: dict[str, Any] = {**TIMEOUTS, "retry": NO_RETRY, **kwargs}
    return redis.Redis(
        host=address[0], port=address[1], ssl=True, ssl_ca_certs=str(ca_file), **options
    )


@pytest.fixture(scope="module")
def standin1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedStandin]:
    """One shard, shared by the tests that only read it."""
    config = StandinConfig(dir=tmp_path_factory.mktemp("db1"), extra_dns_names=[CFG_NAME])
    with ThreadedStandin(config) as standin:
        yield standin


@pytest.fixture(scope="module")
def standin3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedStandin]:
    """Three shards with a replica each, shared by the tests that only read it."""
    config = StandinConfig(dir=tmp_path_factory.mktemp("db3"), shards=3, replicas=1)
    with ThreadedStandin(config) as standin:
        yield standin


@pytest.fixture
def own1(tmp_path: Path) -> Iterator[ThreadedStandin]:
    """One shard for a single test that takes nodes down."""
    with ThreadedStandin(StandinConfig(dir=tmp_path / "db")) as standin:
        yield standin


def test_slot_ranges_cover_every_slot() -> None:
    for shards in (1, 2, 3, 5):
        ranges = slot_ranges(shards)
        assert ranges[0][0] == 0 and ranges[-1][1] == 16383
        assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(ranges))


def test_tls_endpoint_serves_commands(standin1: ThreadedStandin) -> None:
    with tls_client(standin1.endpoint, standin1.ca_file) as client:
        assert client.ping()
        assert client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"
    with tls_client(standin1.node_fronts[0], standin1.ca_file) as client:
        assert client.get("greeting") == b"hello"


def test_plain_connection_to_front_fails(standin1: ThreadedStandin) -> None:
    host, port = standin1.endpoint
    with (
        redis.Redis(host=host, port=port, retry=NO_RETRY, **TIMEOUTS) as client,
        pytest.raises(redis.ConnectionError),
    ):
        client.ping()


def test_wrong_ca_fails_verification(standin1: ThreadedStandin, tmp_path: Path) -> None:
    other_ca = TestCA.create("some other CA").write(tmp_path / "other")
    with (
        tls_client(standin1.endpoint, other_ca) as client,
        pytest.raises(redis.ConnectionError, match="certificate verify failed"),
    ):
        client.ping()


def test_certificate_names(standin1: ThreadedStandin) -> None:
    context = ssl.create_default_context(cadata=standin1.ca_pem.decode())
    for name in (CFG_NAME, "localhost"):
        with (
            socket.create_connection(standin1.endpoint, timeout=3) as sock,
            context.wrap_socket(sock, server_hostname=name) as tls,
        ):
            assert tls.version() is not None
    with (
        socket.create_connection(standin1.endpoint, timeout=3) as sock,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(sock, server_hostname="elsewhere.example.com")


def test_cluster_client_through_fronts(standin3: ThreadedStandin) -> None:
    host, port = standin3.endpoint
    cluster = redis.cluster.RedisCluster(
        host=host, port=port, ssl=True, ssl_ca_certs=str(standin3.ca_file), **TIMEOUTS
    )
    try:
        for i in range(200):
            cluster.set(f"key:{i}", i)
        assert [int(cluster.get(f"key:{i}")) for i in range(200)] == list(range(200))
    finally:
        cluster.close()
    for address in standin3.node_fronts[:3]:  # the primaries: each holds some keys
        with tls_client(address, standin3.ca_file) as client:
            assert client.dbsize() > 0


def test_cluster_replies_name_only_fronts(standin3: ThreadedStandin) -> None:
    fronts = {port for _, port in standin3.node_fronts}
    real = {n.port for n in standin3.nodes} | {n.bus_port for n in standin3.nodes}
    with tls_client(standin3.endpoint, standin3.ca_file) as client:
        slots = client.execute_command("CLUSTER", "SLOTS")
        shards = client.execute_command("CLUSTER", "SHARDS")
    # a primary that does not own the key's slot redirects through the owner's TLS front
    slot = key_slot(b"a")
    owner = next(i for i, (lo, hi) in enumerate(slot_ranges(3)) if lo <= slot <= hi)
    with (
        tls_client(standin3.node_fronts[(owner + 1) % 3], standin3.ca_file) as other,
        pytest.raises(MovedError) as moved,
    ):
        other.execute_command("SET", "a", "1")
    slot_ports = {node[1] for entry in slots for node in entry[2:]}
    shard_ports = {node[b"port"] for shard in shards for node in shard[b"nodes"]}
    assert slot_ports == shard_ports == fronts
    assert not fronts & real
    assert any(node.get(b"role") == b"replica" for s in shards for node in s[b"nodes"])
    assert moved.value.slot_id == slot
    assert (moved.value.host, moved.value.port) == standin3.node_fronts[owner]


def test_stop_and_start_node(own1: ThreadedStandin) -> None:
    with tls_client(own1.node_fronts[0], own1.ca_file) as client:
        assert client.ping()
        own1.stop_node(0)
        with pytest.raises(redis.ConnectionError):
            client.ping()
        with (
            tls_client(own1.endpoint, own1.ca_file) as cfg,
            pytest.raises(redis.ConnectionError),
        ):
            cfg.ping()
        own1.start_node(0)
        assert client.ping()
        assert client.set("after", "restart")


def test_pause_and_resume_node(own1: ThreadedStandin) -> None:
    with tls_client(own1.endpoint, own1.ca_file, socket_timeout=0.5) as client:
        assert client.ping()
        own1.pause_node(0)
        with pytest.raises(redis.TimeoutError):
            client.ping()
        own1.resume_node(0)
        assert client.ping()


def test_whole_database_down_then_up(tmp_path: Path) -> None:
    with ThreadedStandin(StandinConfig(dir=tmp_path / "db", shards=3)) as standin:
        standin.stop_all_nodes()
        with tls_client(standin.endpoint, standin.ca_file) as client:
            with pytest.raises(redis.ConnectionError):
                client.ping()
            standin.start_all_nodes()
            assert client.ping()
        host, port = standin.endpoint
        cluster = redis.cluster.RedisCluster(
            host=host, port=port, ssl=True, ssl_ca_certs=str(standin.ca_file), **TIMEOUTS
        )
        try:
            cluster.set("back", "up")
            assert cluster.get("back") == b"up"
        finally:
            cluster.close()


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_stop_leaves_nothing_behind(tmp_path: Path) -> None:
    standin = ThreadedStandin(StandinConfig(dir=tmp_path / "db", shards=3)).start()
    try:
        pids = [n.proc.pid for n in standin.nodes if n.proc is not None]
        ports = [p for _, p in [*standin.node_fronts, standin.endpoint]]
        ports += [p for n in standin.nodes for p in (n.port, n.bus_port)]
        assert len(pids) == 3 and all(_port_in_use(p) for p in ports)
    finally:
        standin.stop()
    standin.stop()  # idempotent
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not [p for p in ports if _port_in_use(p)]
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()


class RecordingFront(TLSFront):
    """Sees each connection's first bytes (where AUTH / HELLO arrive) before relaying."""

    first: ClassVar[list[bytes]] = []

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        data = await reader.read(65536)
        self.first.append(data)
        upstream = await self.open_upstream()
        if upstream is not None:
            upstream[1].write(data)
            await self.relay(reader, writer, *upstream)


def test_front_subclass_sees_first_command(tmp_path: Path) -> None:
    config = StandinConfig(dir=tmp_path / "db", front_factory=RecordingFront)
    with (
        ThreadedStandin(config) as standin,
        tls_client(standin.endpoint, standin.ca_file, protocol=3) as client,
    ):
        assert client.ping()
    assert RecordingFront.first[0].startswith(b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n")


async def test_async_standin(tmp_path: Path) -> None:
    async with MemoryDBStandin(StandinConfig(dir=tmp_path / "db")) as standin:
        host, port = standin.endpoint
        client = redis.asyncio.Redis(
            host=host, port=port, ssl=True, ssl_ca_certs=str(standin.ca_file), **TIMEOUTS
        )
        try:
            assert await client.set("k", "v")
            assert await client.get("k") == b"v"
        finally:
            await client.aclose()
    assert all(not node.running for node in standin.nodes)

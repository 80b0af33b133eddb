"""Cluster foundations against a real valkey-server: key slots, the command table from
its ``COMMAND`` reply, and the topology from ``CLUSTER SHARDS`` / ``CLUSTER SLOTS``."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dbservice.engine.cluster import merge, resp
from dbservice.engine.cluster.keyspecs import CommandTable
from dbservice.engine.cluster.slots import key_slot
from dbservice.engine.cluster.topology import from_shards, from_slots
from dbservice.engine.proxy.errors import ProtocolError
from dbservice.engine.proxy.settings import ProxyLimits
from sandbox.memorydb import MemoryDBStandin, StandinConfig
from sandbox.valkeynode import ValkeyNode

LIMITS = ProxyLimits()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyNode]:
    valkey = ValkeyNode(index=0, directory=tmp_path_factory.mktemp("node"), client_port=0)
    asyncio.run(valkey.start())
    try:
        yield valkey
    finally:
        asyncio.run(valkey.stop())


async def raw(address: tuple[str, int], *args: bytes | str, protocol: int = 2) -> bytes:
    """One command's reply as sent, on a fresh connection."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        if protocol == 3:
            writer.write(resp.encode_command([b"HELLO", b"3"]))
            await resp.read_frame(reader, LIMITS)
        writer.write(resp.encode_command([a.encode() if isinstance(a, str) else a for a in args]))
        return await asyncio.wait_for(resp.read_frame(reader, LIMITS), 5)
    finally:
        writer.close()


def test_key_slot_known_values() -> None:
    assert key_slot(b"123456789") == 0x31C3 & 16383
    assert key_slot(b"foo") == 12182
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers")
    assert key_slot(b"{user1000}.following") == key_slot(b"user1000")
    assert key_slot(b"foo{}{bar}") != key_slot(b"bar")  # the first tag is empty: whole key
    assert key_slot(b"foo{{bar}}zap") == key_slot(b"{bar")
    assert key_slot(b"foo{bar}{zap}") == key_slot(b"bar")


async def test_key_slot_matches_the_server(node: ValkeyNode) -> None:
    rng = random.Random(7)
    alphabet = b"ab{}xyz:0123456789"
    keys = [bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(300)]
    reader, writer = await asyncio.open_connection(node.host, node.port)
    try:
        writer.write(b"".join(resp.encode_command([b"CLUSTER", b"KEYSLOT", k]) for k in keys))
        for key in keys:
            assert resp.decode(await resp.read_frame(reader, LIMITS)) == key_slot(key), key
    finally:
        writer.close()


GETKEYS_CASES: list[list[bytes]] = [
    c.split()
    for c in [
        b"GET k1",
        b"SET k1 v EX 10",
        b"MSET a 1 b 2 c 3",
        b"MGET a b c d",
        b"DEL a b",
        b"EVAL return 1 2 ka kb arg",
        b"FCALL f 1 ka arg",
        b"XREAD COUNT 2 STREAMS s1 s2 0 0",
        b"XREADGROUP GROUP g c BLOCK 0 STREAMS s1 >",
        b"ZUNIONSTORE dst 2 z1 z2 WEIGHTS 1 2",
        b"LMOVE l1 l2 LEFT RIGHT",
        b"BLPOP l1 l2 l3 0",
        b"BLMPOP 0 2 l1 l2 LEFT",
        b"OBJECT ENCODING k1",
        b"MEMORY USAGE k1",
        b"XINFO STREAM s1",
        b"SORT k1 LIMIT 0 1",
        b"GEOSEARCHSTORE dst src FROMMEMBER m BYRADIUS 1 km",
        b"BITOP AND dst a b c",
        b"MIGRATE h 1 k1 0 10",
        b"RENAME a b",
        b"PFMERGE dst a b",
        b"SINTERCARD 2 a b LIMIT 1",
        b"LCS a b",
        b"COPY a b",
    ]
]


async def test_key_positions_match_command_getkeys(node: ValkeyNode) -> None:
    table = CommandTable.from_reply(resp.decode(await raw((node.host, node.port), "COMMAND")))
    assert len(table) > 200
    for args in GETKEYS_CASES:
        expected = resp.decode(await raw((node.host, node.port), b"COMMAND", b"GETKEYS", *args))
        assert table.keys(args) == expected, args
    for keyless in (b"PING", b"DBSIZE", b"INFO server", b"SCRIPT FLUSH", b"EVAL return 0 0"):
        assert table.keys(keyless.split()) == []
    assert table.keys([b"NOSUCHCOMMAND", b"x"]) == []
    info = table.lookup([b"mset", b"a", b"1"])
    assert info is not None and "request_policy:multi_shard" in info.tips


async def test_simple_commands_are_those_with_one_key(node: ValkeyNode) -> None:
    """The quick path's table: a command's arity and its one key's position, exactly
    for the commands whose key specs name one key, by the upper-case name."""
    table = CommandTable.from_reply(resp.decode(await raw((node.host, node.port), "COMMAND")))
    assert table.simple["GET"] == (2, 1)
    assert table.simple["SET"] == (-3, 1)
    assert table.simple["HSET"] == (-4, 1)
    for several in ("MGET", "MSET", "DEL", "RENAME", "EVAL", "XREAD", "CLIENT", "PING"):
        assert several not in table.simple
    for name, (arity, at) in table.simple.items():
        info = table.lookup([name.encode()])
        assert info is not None and info.arity == arity and not info.subcommands
        args = [name.encode(), *(b"k%d" % i for i in range(max(abs(arity), at + 1) - 1))]
        assert table.key_positions(args) == [at], name


async def test_command_table_from_resp3(node: ValkeyNode) -> None:
    frame = await raw((node.host, node.port), "COMMAND", "INFO", "xread", "get", protocol=3)
    table = CommandTable.from_reply(resp.decode(frame))
    assert table.keys([b"XREAD", b"STREAMS", b"a", b"b", b"0", b"0"]) == [b"a", b"b"]
    assert table.keys([b"get", b"x"]) == [b"x"]


def test_legacy_positions_without_key_specs() -> None:
    reply: list[resp.Value] = [
        [b"mget", -2, [resp.Status(b"readonly")], 1, -1, 1],
        [b"mset", -3, [], 1, -1, 2],
    ]
    table = CommandTable.from_reply(reply)
    assert table.keys([b"MGET", b"a", b"b"]) == [b"a", b"b"]
    assert table.keys([b"MSET", b"a", b"1", b"b", b"2"]) == [b"a", b"b"]


async def test_topology_of_three_shards(tmp_path: Path) -> None:
    async with MemoryDBStandin(StandinConfig(dir=tmp_path, shards=3, replicas=1)) as standin:
        address = standin.nodes[0].host, standin.nodes[0].port
        shards = from_shards(resp.decode(await raw(address, "CLUSTER", "SHARDS")))
        slots = from_slots(resp.decode(await raw(address, "CLUSTER", "SLOTS")))
        shards3 = from_shards(resp.decode(await raw(address, "CLUSTER", "SHARDS", protocol=3)))
        fronts = set(standin.node_fronts[:3])
        for topology in (shards, slots, shards3):
            assert topology.covered and len(topology.primaries) == 3
            assert {n.address for n in topology.primaries} == fronts
            assert all(len(s.replicas) == 1 for s in topology.shards)
            assert topology.shard_of_slot(0) == topology.shards[0]
            assert topology.shard_of_slot(16383) == topology.shards[2]
        assert shards.owner == slots.owner == shards3.owner
        first = shards.shards[0]
        assert shards.find(first.id) is first
        assert shards.find(first.primary.id[:10]) is first
        assert shards.find(f"{first.primary.host}:{first.primary.port}") is first
        assert shards.find("nope") is None


def test_command_reader_keeps_order_across_reads_and_joins_large_values_once() -> None:
    reader = resp.CommandReader(LIMITS)
    big = b"v" * 300_000
    data = (
        resp.encode_command([b"SET", b"k", big])
        + b"PING\r\n"
        + b"*0\r\n"
        + resp.encode_command([b"GET", b"k"])
    )
    got: list[tuple[list[bytes], resp.Payload]] = []
    for i in range(0, len(data), 7000):
        got += reader.feed(data[i : i + 7000])
    assert [args[0] for args, _ in got] == [b"SET", b"PING", b"GET"]
    assert got[0][0][2] == big and got[0][1] == resp.encode_command([b"SET", b"k", big])
    assert got[2][1] == resp.encode_command([b"GET", b"k"])  # forwarded as sent


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"*1\r\n+PING\r\n", "expected '\\$'"),
        (b"*x\r\n", "invalid multibulk length"),
        (b"*1\r\n$-5\r\n", "invalid bulk length"),
    ],
)
def test_command_reader_refuses_malformed_input(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        resp.CommandReader(LIMITS).feed(data)
    # commands before the bad one are still returned, the error comes after them
    reader = resp.CommandReader(LIMITS)
    assert [a for a, _ in reader.feed(b"PING\r\n" + data)] == [[b"PING"]]
    assert reader.error is not None


def test_frame_reader_finds_whole_replies() -> None:
    frames = [
        b"+OK\r\n",
        b"$3\r\nabc\r\n",
        b"*2\r\n*1\r\n:1\r\n$-1\r\n",
        b"%1\r\n+a\r\n*0\r\n",
        b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nx\r\n",
        b"|1\r\n+k\r\n+v\r\n:5\r\n",
        b"*-1\r\n",
    ]
    data = b"".join(frames)
    reader = resp.FrameReader(LIMITS)
    out: list[bytes] = []
    for i in range(len(data)):
        out += reader.feed(data[i : i + 1])
    assert out == frames
    assert resp.decode(frames[5]) == 5  # an attribute is skipped
    assert resp.decode(frames[3]) == {b"a": []}


def test_frame_reader_small_replies_split_anywhere() -> None:
    """Small bulk replies (``$<digit>``) and one-line replies are framed without the
    scanner; whatever way the bytes arrive, the frames are the ones sent, whole."""
    frames = [
        b"$0\r\n\r\n",
        b"$5\r\nab\r\nc\r\n",  # a CRLF inside the value
        b"$9\r\n123456789\r\n",
        b"$10\r\n1234567890\r\n",
        b"$-1\r\n",
        b"+OK\r\n",
        b"-MOVED 3999 127.0.0.1:6381\r\n",
        b":12345\r\n",
        b"_\r\n",
        b"#t\r\n",
        b"!3\r\nerr\r\n",
        b"=8\r\ntxt:abcd\r\n",
        b"*2\r\n$1\r\na\r\n+b\r\n",
        b"$3\r\nxyz\r\n",
    ]
    data = b"".join(frames)
    assert resp.FrameReader(LIMITS).feed(data) == frames
    for cut in range(1, len(data)):
        reader = resp.FrameReader(LIMITS)
        assert reader.feed(data[:cut]) + reader.feed(data[cut:]) == frames, cut
    rng = random.Random(18)
    for _ in range(200):
        reader = resp.FrameReader(LIMITS)
        out: list[bytes] = []
        p = 0
        while p < len(data):
            step = rng.randint(1, 12)
            out += reader.feed(data[p : p + step])
            p += step
        assert out == frames


def test_scan_cursor_walks_shards_in_order() -> None:
    assert merge.scan_cursor(b"0", 3) == (0, 0)
    reply = resp.encode_value([b"17", [b"a"]], False)
    assert resp.decode(merge.scan_reply(reply, 1, 3, False)) == [b"%d" % (17 << 10 | 1), [b"a"]]
    done = resp.encode_value([b"0", [b"b"]], False)
    assert resp.decode(merge.scan_reply(done, 1, 3, False))[0] == b"2"  # type: ignore[index]
    assert resp.decode(merge.scan_reply(done, 2, 3, False))[0] == b"0"  # type: ignore[index]
    assert merge.scan_cursor(b"%d" % (17 << 10 | 1), 3) == (1, 17)
    assert merge.scan_cursor(b"5", 3) is None and merge.scan_cursor(b"x", 3) is None


def test_mget_split_is_regrouped_in_key_order() -> None:
    frames = [resp.encode_value([b"1", None], False), resp.encode_value([b"2"], False)]
    order = [(1, 0), (0, 0), (0, 1)]
    assert resp.decode(merge.regroup(order, frames, True)) == [b"2", b"1", None]
    assert merge.total([b":2\r\n", b":3\r\n"]) == b":5\r\n"
    assert merge.all_ok([b"+OK\r\n", b"-ERR no\r\n"]) == b"-ERR no\r\n"


def test_a_link_through_the_configuration_endpoint_names_its_node() -> None:
    """Errors on the configuration endpoint's connection, once it serves a shard, name
    the shard's node as well (the client is told which node is down either way)."""
    from dbservice.engine.cluster.link import Link
    from dbservice.engine.proxy.settings import ProxyLimits

    async def never(address: tuple[str, int]) -> Any:
        raise AssertionError("not dialled")

    async def nothing(link: Link, streams: Any) -> None:
        return None

    link = Link(("10.0.0.9", 6379), dial=never, prepare=nothing, limits=ProxyLimits())
    assert link.name == "10.0.0.9:6379"
    link.serves = ("10.0.0.1", 7001)
    assert link.name == "10.0.0.1:7001 (through the configuration endpoint 10.0.0.9:6379)"
    link.serves = ("10.0.0.9", 6379)
    assert link.name == "10.0.0.9:6379"
